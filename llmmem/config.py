"""Typed specs shared by the CLI, YAML configs and the Python API.

YAML and command-line flags fill the same dataclasses; validation raises :class:`ConfigError`
with a one-line message naming the bad value and what is allowed. This module never imports
torch, so the CLI can reject bad input before any heavy import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    """A user error: printed as one line on stderr, exit code 2, nothing half-written."""


DTYPES = ("float32", "bfloat16", "float16", "auto")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(key: str, value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{key}={value!r} is not a boolean; use true or false")


def parse_positive_int(key: str, value, minimum: int = 1) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not an integer") from None
    if n < minimum:
        raise ConfigError(f"{key}={n} must be >= {minimum}")
    return n


def check_device(device: str) -> str:
    """Syntax check of a device string (availability is checked when a model is loaded)."""
    d = device.strip().lower()
    if d in ("cpu", "cuda", "auto", "mps"):
        return d
    if d.startswith("cuda:") and d[5:].isdigit():
        return d
    raise ConfigError(f"device={device!r} is not valid; use cpu, cuda, cuda:N or auto")


@dataclass
class ModelSpec:
    """How to load one model. ``name`` is a local dir, hub id, .gguf file or preset name."""

    name: str
    dtype: str = "float32"
    device: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    gguf_file: str | None = None
    offload: bool = False
    max_length: int | None = None
    attn_implementation: str | None = None
    # vLLM engine settings (ignored by the HF backend)
    tensor_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None

    def __post_init__(self):
        if not self.name or not str(self.name).strip():
            raise ConfigError("--model is empty; give a local directory, a hub id, a .gguf file or a preset")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not valid; choose from: {', '.join(DTYPES)}")
        self.device = check_device(self.device)
        self.trust_remote_code = parse_bool("trust_remote_code", self.trust_remote_code)
        self.offload = parse_bool("offload", self.offload)
        if self.max_length is not None:
            self.max_length = parse_positive_int("max_length", self.max_length)
        if self.tensor_parallel_size is not None:
            self.tensor_parallel_size = parse_positive_int("tensor_parallel_size", self.tensor_parallel_size)
        if self.max_model_len is not None:
            self.max_model_len = parse_positive_int("max_model_len", self.max_model_len)
        if self.gpu_memory_utilization is not None:
            try:
                self.gpu_memory_utilization = float(self.gpu_memory_utilization)
            except ValueError:
                raise ConfigError(f"gpu_memory_utilization={self.gpu_memory_utilization!r} is not a number") from None
            if not 0 < self.gpu_memory_utilization <= 1:
                raise ConfigError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")

    def engine_args(self) -> dict:
        """The vLLM engine arguments set in ``--model_args``."""
        out = {k: getattr(self, k) for k in ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len")
               if getattr(self, k) is not None}
        if self.dtype != "auto":
            out["dtype"] = self.dtype
        return out


MODEL_ARG_KEYS = tuple(f.name for f in fields(ModelSpec) if f.name != "name")


def parse_kv_list(text: str | None, flag: str = "--model_args") -> dict[str, str]:
    """Parse ``k=v,k=v`` (lm-evaluation-harness style). Empty or None gives {}."""
    out: dict[str, str] = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"{flag}: {item!r} is not key=value (expected k=v,k=v)")
        key, value = item.split("=", 1)
        key, value = key.strip(), value.strip()
        if not key:
            raise ConfigError(f"{flag}: {item!r} has an empty key")
        if key in out:
            raise ConfigError(f"{flag}: key {key!r} is given twice")
        out[key] = value
    return out


def model_spec_from_args(model: str, model_args: str | dict | None) -> ModelSpec:
    """Build a ModelSpec from ``--model`` and ``--model_args`` (a k=v string or a dict)."""
    kv = parse_kv_list(model_args) if isinstance(model_args, str) or model_args is None else dict(model_args)
    for key in kv:
        if key not in MODEL_ARG_KEYS:
            raise ConfigError(
                f"--model_args: unknown key {key!r}; allowed: {', '.join(MODEL_ARG_KEYS)}"
            )
    if "pretrained" in kv:  # lm-eval spelling
        model = kv.pop("pretrained")
    return ModelSpec(name=model, **kv)


def llmmem_home() -> Path:
    """Where presets and caches live: ``$LLMMEM_HOME`` or ``~/.cache/llmmem``."""
    return Path(os.environ.get("LLMMEM_HOME") or Path.home() / ".cache" / "llmmem").expanduser()


@dataclass
class RunSettings:
    """Settings shared by every subcommand that runs a model."""

    batch_size: int = 8
    seed: int = 0
    quiet: bool = False
    threads: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.batch_size = parse_positive_int("--batch_size", self.batch_size)
        if self.threads is not None:
            self.threads = parse_positive_int("--threads", self.threads)


PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
PROFILES = ("uniform", "owl")
SCOPES = ("layer", "global")


def parse_structure(structure: str) -> tuple[int, int]:
    """``unstructured`` -> (0, 0); ``N:M`` -> (N, M) with 0 < N < M."""
    s = str(structure).strip().lower()
    if s == "unstructured":
        return 0, 0
    parts = s.replace("of", ":").split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m:
            return n, m
        raise ConfigError(f"structure {structure!r}: N:M needs 0 < N < M")
    raise ConfigError(f"structure {structure!r} is not valid; use unstructured or N:M (e.g. 2:4)")


@dataclass
class PruneSpec:
    """One pruning intervention. ``sparsity`` may be None only for N:M (then it is N/M)."""

    method: str
    sparsity: float | None = None
    structure: str = "unstructured"
    profile: str = "uniform"
    scope: str = "layer"  # magnitude only: one threshold per matrix (layer) or over all (global)
    calibration: str = "auto"  # auto | self | token/text file | hf:PATH[:CONFIG[:SPLIT]] | c4
    nsamples: int | None = None  # default 128 (or the token file's rows)
    seqlen: int | None = None  # default 2048 (or the token file's columns)
    seed: int = 0
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    blocksize: int = 128  # SparseGPT column block
    percdamp: float = 0.01  # SparseGPT dampening, fraction of mean(diag H)

    def __post_init__(self):
        if self.method not in PRUNE_METHODS:
            raise ConfigError(f"unknown pruning method {self.method!r}; choose from: {', '.join(PRUNE_METHODS)}")
        if self.profile not in PROFILES:
            raise ConfigError(f"unknown profile {self.profile!r}; choose from: {', '.join(PROFILES)}")
        if self.scope not in SCOPES:
            raise ConfigError(f"unknown scope {self.scope!r}; choose from: {', '.join(SCOPES)}")
        if self.scope == "global" and self.method != "magnitude":
            raise ConfigError("--scope global applies to magnitude pruning only")
        n, m = parse_structure(self.structure)
        self.structure = "unstructured" if m == 0 else f"{n}:{m}"
        if self.sparsity is not None:
            try:
                self.sparsity = float(self.sparsity)
            except (TypeError, ValueError):
                raise ConfigError(f"sparsity {self.sparsity!r} is not a number") from None
            if not 0.0 <= self.sparsity < 1.0:
                raise ConfigError(f"sparsity {self.sparsity} is outside [0, 1)")
        if m:
            if self.sparsity is None:
                self.sparsity = n / m
            elif abs(self.sparsity - n / m) > 1e-9:
                raise ConfigError(f"sparsity {self.sparsity} does not match structure {n}:{m} (= {n / m:g})")
            if self.profile != "uniform":
                raise ConfigError("N:M structure fixes every row's sparsity; use --profile uniform")
        elif self.sparsity is None:
            raise ConfigError("--sparsity is required for unstructured pruning")
        if self.nsamples is not None:
            self.nsamples = parse_positive_int("--nsamples", self.nsamples)
        if self.seqlen is not None:
            self.seqlen = parse_positive_int("--seqlen", self.seqlen)
        if not 0 < self.owl_lambda < 0.5:
            raise ConfigError(f"owl_lambda {self.owl_lambda} must be in (0, 0.5)")
        if self.owl_m <= 0:
            raise ConfigError(f"owl_m {self.owl_m} must be > 0")
        if self.percdamp <= 0:
            raise ConfigError(f"percdamp {self.percdamp} must be > 0")
        self.blocksize = parse_positive_int("blocksize", self.blocksize)

    @property
    def nm(self) -> tuple[int, int]:
        return parse_structure(self.structure)

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude" or self.profile == "owl"


# ----------------------------------------------------------------------------- sweeps
SWEEP_KEYS = {"models", "model_args", "backend", "methods", "structures", "sparsities", "profiles", "calibration",
              "nsamples", "seqlen", "tasks", "limit", "num_fewshot", "seeds", "batch_size", "output_path",
              "include_path", "description"}


@dataclass
class SweepSpec:
    """A grid: models x (methods x structures x sparsities x profiles, plus dense) x seeds, on tasks."""

    models: list
    tasks: list
    methods: list = field(default_factory=lambda: ["magnitude", "wanda"])
    structures: list = field(default_factory=lambda: ["unstructured"])
    sparsities: list = field(default_factory=lambda: [0.5])
    profiles: list = field(default_factory=lambda: ["uniform"])
    calibration: str = "auto"
    nsamples: int | None = None
    seqlen: int | None = None
    model_args: str | dict = ""
    backend: str = "hf"
    limit: int | dict | None = None  # an int, or {task: n, default: n}
    num_fewshot: int | None = None
    seeds: list = field(default_factory=lambda: [0])
    batch_size: int = 8
    output_path: str = "results/sweep"
    include_path: str | None = None
    description: str = ""

    def __post_init__(self):
        for key in ("models", "tasks", "methods", "structures", "sparsities", "profiles", "seeds"):
            v = getattr(self, key)
            if not isinstance(v, list):
                setattr(self, key, [v])
        if not self.models:
            raise ConfigError("sweep: 'models' is empty")
        if not self.tasks:
            raise ConfigError("sweep: 'tasks' is empty")
        for s in self.sparsities:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
                raise ConfigError(f"sweep: sparsity {s!r} is not a number in [0, 1)")
        for m in self.methods:
            if m not in PRUNE_METHODS:
                raise ConfigError(f"sweep: unknown pruning method {m!r}; choose from: {', '.join(PRUNE_METHODS)}")
        for p in self.profiles:
            if p not in PROFILES:
                raise ConfigError(f"sweep: unknown profile {p!r}; choose from: {', '.join(PROFILES)}")
        for st in self.structures:
            parse_structure(st)
        if self.backend not in ("hf", "vllm"):
            raise ConfigError(f"sweep: unknown backend {self.backend!r}; choose from: hf, vllm")
        self.batch_size = parse_positive_int("batch_size", self.batch_size)
        if isinstance(self.limit, dict):
            for k, v in self.limit.items():
                parse_positive_int(f"limit.{k}", v)
        elif self.limit is not None:
            self.limit = parse_positive_int("limit", self.limit)
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int):
                raise ConfigError(f"sweep: seed {s!r} is not an integer")

    def limit_for(self, task: str) -> int | None:
        if isinstance(self.limit, dict):
            return self.limit.get(task, self.limit.get("default"))
        return self.limit

    def prune_specs(self) -> list[PruneSpec]:
        """Every pruning intervention of the grid (the dense baseline is not among them)."""
        out, seen = [], set()
        for method in self.methods:
            for structure in self.structures:
                n, m = parse_structure(structure)
                sps = [n / m] if m else [s for s in self.sparsities if s > 0]
                for s in sps:
                    for profile in self.profiles if not m else ["uniform"]:
                        spec = PruneSpec(method, s, structure, profile, calibration=self.calibration,
                                         nsamples=self.nsamples, seqlen=self.seqlen)
                        key = (method, spec.structure, round(s, 6), profile)
                        if key not in seen:
                            seen.add(key)
                            out.append(spec)
        return out


def yaml_load(text: str):
    """yaml.safe_load without YAML 1.1's base-60 integers (so ``2:4`` stays the string "2:4", not 124)."""
    import re

    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.yaml_implicit_resolvers = {
        k: [r for r in v if r[0] != "tag:yaml.org,2002:int"] for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:int",
        re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
        list("-+0123456789"),
    )
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def read_id_file(path: Path | str, what: str) -> list[str]:
    """Ids one per line (blank lines and ``#`` comments skipped), e.g. the canaries to forget or leave out."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    return [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def yaml_load_file(path: Path | str, what: str = "file"):
    """Parse a YAML file; a syntax error becomes one ConfigError line naming the file and line."""
    import yaml

    path = Path(path)
    try:
        doc = yaml_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"YAML error in {path}{line}: {getattr(e, 'problem', None) or e}") from None
    if doc is not None and not isinstance(doc, dict):
        raise ConfigError(f"{path}: a {what} must be a mapping")
    return doc or {}


def _parse_override(item: str) -> tuple[str, object]:
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, value = item.split("=", 1)
    try:
        return key.strip(), yaml_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def load_config_doc(path: str | None, kind: str, allowed: set, required: tuple, overrides: list[str] | None,
                    cli: dict) -> dict:
    """A config mapping from YAML, then ``key=value`` overrides, then CLI flags; unknown keys rejected."""
    doc: dict = {}
    if path:
        if not Path(path).is_file():
            raise ConfigError(f"{kind} config {path} does not exist")
        doc = yaml_load_file(path, f"{kind} config")
    for item in overrides or []:
        k, v = _parse_override(item)
        doc[k] = v
    for k, v in cli.items():
        if v is not None:
            doc[k] = v
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise ConfigError(f"{kind}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    for req in required:
        if req not in doc:
            raise ConfigError(f"{kind}: missing required key {req!r}")
    return doc


def load_sweep_spec(path: str | None, overrides: list[str] | None = None, **cli) -> SweepSpec:
    """YAML file + ``key=value`` overrides (YAML-parsed values) + explicit CLI flags, validated."""
    return SweepSpec(**load_config_doc(path, "sweep", SWEEP_KEYS, ("models", "tasks"), overrides, cli))


def model_display_name(name: str) -> str:
    """How a model is named in results: a preset or hub id as given, a path by its last component."""
    p = Path(str(name)).expanduser()
    if p.exists():
        return (p.with_suffix("") if p.suffix == ".gguf" else p).resolve().name
    return str(name)


# ----------------------------------------------------------------------------- unlearning
UNLEARN_KEYS = {"model", "model_args", "method", "method_args", "forget", "retain", "nonmember", "forget_ids",
                "forget_filter", "nonmember_filter", "retain_filter", "steps", "lr", "batch_size", "eval_every", "seed", "utility_tasks", "utility_limit",
                "reference_model", "grad_norm_steps", "exposure_alternatives", "output_path", "description"}


@dataclass
class UnlearnSpec:
    """One unlearning run: a method's loss over forget/retain batches, evaluated every ``eval_every`` steps."""

    model: str
    forget: str  # task name or jsonl file
    retain: str
    method: str = "grad_diff"
    method_args: dict = field(default_factory=dict)
    model_args: str | dict = ""
    nonmember: str | None = None  # never-seen examples (median loss threshold, MIA); task or jsonl
    forget_ids: list | None = None
    forget_filter: dict = field(default_factory=dict)
    retain_filter: dict = field(default_factory=dict)
    nonmember_filter: dict = field(default_factory=dict)
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 8
    eval_every: int = 10
    seed: int = 0
    utility_tasks: list = field(default_factory=list)
    utility_limit: int | None = 200
    reference_model: str | None = None  # trained without the forget set (testbed --exclude)
    grad_norm_steps: int = 5
    exposure_alternatives: int = 100
    output_path: str = "results/unlearn"
    description: str = ""

    def __post_init__(self):
        from llmmem.unlearning import METHODS

        METHODS.check(self.method)
        self.steps = parse_positive_int("--steps", self.steps)
        try:
            self.lr = float(self.lr)
        except (TypeError, ValueError):
            raise ConfigError(f"--lr {self.lr!r} is not a number") from None
        if not self.lr > 0:
            raise ConfigError(f"--lr {self.lr} must be > 0")
        self.batch_size = parse_positive_int("--batch_size", self.batch_size)
        self.eval_every = parse_positive_int("--eval_every", self.eval_every)
        if self.eval_every > self.steps:
            raise ConfigError(f"--eval_every {self.eval_every} is larger than --steps {self.steps}")
        self.grad_norm_steps = parse_positive_int("grad_norm_steps", self.grad_norm_steps, minimum=0)
        if isinstance(self.forget_ids, str):  # a file of ids, one per line (the same file as testbed --exclude)
            self.forget_ids = read_id_file(self.forget_ids, "forget_ids file")
        if isinstance(self.utility_tasks, str):
            self.utility_tasks = [t for t in self.utility_tasks.split(",") if t.strip()]
        if isinstance(self.method_args, str):
            self.method_args = {k: float(v) for k, v in parse_kv_list(self.method_args, "--method_args").items()}


def load_unlearn_spec(path: str | None, overrides: list[str] | None = None, **cli) -> UnlearnSpec:
    return UnlearnSpec(**load_config_doc(path, "unlearn", UNLEARN_KEYS, ("model", "forget", "retain"), overrides, cli))
