"""Configuration shared by the CLI, YAML configs and the Python API: the model spec, value parsers,
YAML loading, and the environment.

YAML and command-line flags fill the same dataclasses; validation raises :class:`ConfigError`
with a one-line message naming the key, the bad value and what is allowed. This module never
imports torch, so the CLI can reject bad input before any heavy import. The specs of the
interventions live beside them (``llmmem/pruning/spec.py``, ``quantization/spec.py``,
``unlearning/spec.py``); a cell (model + chain + evaluation) is in ``llmmem/cells.py``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

from llmmem.errors import ConfigError

__all__ = ["ConfigError", "ModelSpec", "model_spec_from_args", "parse_bool", "parse_int", "parse_positive_int",
           "parse_float", "llmmem_home", "yaml_load", "yaml_load_file", "load_config_doc", "read_id_file"]

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


def parse_int(key: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (an int, or a string of one; not a bool, not a float with a fraction) within bounds."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not an integer")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ConfigError(f"{key}={value!r} is not an integer")
        value = int(value)
    try:
        n = int(str(value).strip()) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not an integer") from None
    if minimum is not None and n < minimum:
        raise ConfigError(f"{key}={n} must be >= {minimum}")
    if maximum is not None and n > maximum:
        raise ConfigError(f"{key}={n} must be <= {maximum}")
    return n


def parse_positive_int(key: str, value, minimum: int = 1) -> int:
    return parse_int(key, value, minimum=minimum)


def parse_float(key: str, value, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """A finite number (nan and inf are refused) within [low, high] (or open ends)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not a number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a number") from None
    if not math.isfinite(x):
        raise ConfigError(f"{key}={value!r} is not a finite number")
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    rng = f"{lo}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{hi}"
    if low is not None and (x < low or (low_open and x == low)):
        raise ConfigError(f"{key}={x:g} is outside {rng}")
    if high is not None and (x > high or (high_open and x == high)):
        raise ConfigError(f"{key}={x:g} is outside {rng}")
    return x


def parse_choice(key: str, value, choices) -> str:
    v = str(value).strip()
    if v not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose from: {', '.join(choices)}")
    return v


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
            self.gpu_memory_utilization = parse_float("gpu_memory_utilization", self.gpu_memory_utilization,
                                                      low=0, high=1, low_open=True)
        for key in ("revision", "gguf_file", "attn_implementation"):
            v = getattr(self, key)
            if v is not None and not str(v).strip():
                raise ConfigError(f"{key}={v!r} is empty; leave it out or give a value")

    # fields that change what a model computes (they enter a cell's identity); device, offload and the
    # vLLM engine settings do not
    IDENTITY_KEYS = ("dtype", "revision", "gguf_file", "max_length", "trust_remote_code")

    def identity(self) -> dict:
        """The canonical description of this model for a cell's config and hash.

        A local path is made absolute (so ``./m`` and ``/abs/m`` are the same model); presets and hub
        ids are kept as given."""
        name = str(self.name)
        p = Path(name).expanduser()
        if p.exists():
            name = str(p.resolve())
        out = {"name": name}
        for k in self.IDENTITY_KEYS:
            v = getattr(self, k)
            if v not in (None, False) or k == "dtype":
                out[k] = v
        return out

    @property
    def display_name(self) -> str:
        return model_display_name(self.name)

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


def model_spec_from_args(model: str | None, model_args: str | dict | None) -> ModelSpec:
    """Build a ModelSpec from ``--model`` and ``--model_args`` (a k=v string or a dict).

    ``pretrained=NAME`` in the model args is lm-evaluation-harness's spelling of ``--model``."""
    kv = parse_kv_list(model_args) if isinstance(model_args, str) or model_args is None else dict(model_args)
    if "pretrained" in kv:
        pre = str(kv.pop("pretrained"))
        if model and str(model) != pre:
            raise ConfigError(f"--model {model!r} and --model_args pretrained={pre!r} disagree; give one of them")
        model = pre
    for key in kv:
        if key not in MODEL_ARG_KEYS:
            raise ConfigError(f"--model_args: unknown key {key!r}; allowed: pretrained, {', '.join(MODEL_ARG_KEYS)}")
    if not model:
        raise ConfigError("no model given: use --model NAME_OR_PATH (or --model_args pretrained=NAME_OR_PATH)")
    return ModelSpec(name=model, **kv)


def llmmem_home() -> Path:
    """Where presets and caches live: ``$LLMMEM_HOME`` or ``~/.cache/llmmem``."""
    return Path(os.environ.get("LLMMEM_HOME") or Path.home() / ".cache" / "llmmem").expanduser()


def default_threads() -> int:
    """``$LLMMEM_THREADS``, else half the visible cores (1 on a 2-core machine)."""
    env = os.environ.get("LLMMEM_THREADS")
    if env is not None and env.strip() != "":
        return parse_int("LLMMEM_THREADS", env, minimum=1)
    return max(1, (os.cpu_count() or 2) // 2)


def parse_batch_size(value) -> int | str:
    """``--batch_size``: N >= 1, ``auto`` (the largest batch that fits, found once per model and cached) or
    ``auto:N`` (search again up to N times during a run, as lm-eval; llmmem searches once)."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "auto":
            return "auto"
        if v.startswith("auto:"):
            parse_positive_int("--batch_size auto:N", v[5:])
            return v
    return parse_positive_int("--batch_size", value)


@dataclass
class RunSettings:
    """Settings shared by every subcommand that runs a model (not part of any cell's identity)."""

    batch_size: int | str = 8
    seed: int = 0
    quiet: bool = False
    threads: int | None = None

    def __post_init__(self):
        self.batch_size = parse_batch_size(self.batch_size)
        self.seed = parse_int("--seed", self.seed, minimum=0)
        if self.threads is not None:
            self.threads = parse_positive_int("--threads", self.threads)
        else:
            self.threads = default_threads()


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


def read_text_file(path: Path | str, what: str) -> str:
    """A text file's content; a missing, unreadable or non-UTF-8 file is one ConfigError line."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {path} does not exist")
    if not p.is_file():
        raise ConfigError(f"{what} {path} is not a file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror or e}") from None


def read_id_file(path: Path | str, what: str) -> list[str]:
    """Ids one per line (blank lines and ``#`` comments skipped), e.g. the canaries to forget or leave out."""
    text = read_text_file(path, what)
    ids = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{what} {path} names {dup[0]!r} more than once")
    return ids


def check_output_path(key: str, path: Path | str, *, must_be_empty: bool = False, overwrite: bool = False) -> Path:
    """An output directory that can be created (or exists as a directory), checked without creating it."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key} {path} exists and is not a directory")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(f"{key} {path} is not writable")
        if must_be_empty and not overwrite and any(not c.name.startswith(".llmmem-partial-") for c in p.iterdir()):
            raise ConfigError(f"{key} {path} is not empty; pass --overwrite to replace it")
        return p
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{key} {path}: {parent} is a file, so the directory cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} {path} cannot be created: {parent} is not writable")
    return p


def check_keys(where: str, mapping, allowed) -> dict:
    """A mapping whose keys are all in ``allowed`` (a typo inside a nested mapping is an error, never ignored)."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where} must be a mapping, got {mapping!r}")
    unknown = sorted(str(k) for k in mapping if k not in allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(map(str, allowed)))}")
    return mapping


def yaml_load_file(path: Path | str, what: str = "file"):
    """Parse a YAML file; a syntax error becomes one ConfigError line naming the file and line."""
    import yaml

    text = read_text_file(path, what)
    try:
        doc = yaml_load(text)
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
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{kind} config {path} does not exist")
        if p.suffix not in (".yaml", ".yml"):
            raise ConfigError(f"{kind} config {path} is not a .yaml file (to override a key, write key=value)")
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


def model_display_name(name: str) -> str:
    """How a model is named in results: a preset or hub id as given, a path by its last component."""
    p = Path(str(name)).expanduser()
    if p.exists():
        return (p.with_suffix("") if p.suffix == ".gguf" else p).resolve().name
    return str(name)
