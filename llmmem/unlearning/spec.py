"""The unlearning spec (torch-free, validated on creation): the method and its training, and what the
evaluation side tracks while it runs.

Training keys decide the unlearned weights; tracking keys (``nonmember``, ``eval_every``,
``utility_tasks``, ``reference_model``, ...) decide what is measured along the way. Both enter the cell's
identity: results differ when either does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from llmmem.config import (
    ConfigError,
    check_keys,
    parse_bool,
    parse_choice,
    parse_float,
    parse_int,
    parse_kv_list,
    parse_positive_int,
    read_id_file,
)
from llmmem.unlearning import METHODS

SCHEDULES = ("constant", "linear", "cosine")
TRAINING_KEYS = ("method", "method_args", "forget", "forget_ids", "forget_filter", "retain", "retain_filter", "steps",
                 "lr", "batch_size", "grad_accum", "weight_decay", "warmup_steps", "schedule", "grad_clip",
                 "gradient_checkpointing", "precision")
PRECISIONS = ("float32", "bf16")  # bf16: autocast (float32 master weights and AdamW state)
TRACKING_KEYS = ("nonmember", "nonmember_filter", "eval_every", "utility_tasks", "utility_limit", "reference_model",
                 "grad_norm_steps", "exposure_alternatives", "secret_format", "min_k")


def _filter(key: str, value) -> dict:
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping field -> value or [values], got {value!r}")
    return dict(value)


def _source(key: str, value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}={value!r}: give a task name or a .jsonl file")
    return value.strip()


def _method_arg(key: str, value):
    """A method argument as the cell records it: numbers (and number strings, e.g. from ``method_args=beta=0.2``)
    as floats, so ``beta: 1`` and ``beta: 1.0`` are the same cell; words (``retain_loss: kl``, ``tokens: all``),
    file paths and lists of words (RMU's ``params``) as given. The method checks names and values
    (:func:`llmmem.interventions.unlearn.check_method`, before any model loads)."""
    if isinstance(value, bool):
        raise ConfigError(f"method_args.{key}={value!r}: give a number or a word, not a boolean")
    if isinstance(value, (int, float)):
        return parse_float(f"method_args.{key}", value)
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return value.strip()
        return parse_float(f"method_args.{key}", value)  # refuses nan / inf
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return [str(v) for v in value]
    raise ConfigError(f"method_args.{key}={value!r}: give a number, a word or a list of words")


@dataclass
class UnlearnSpec:
    """One unlearning run: a method's loss over forget/retain batches, tracked every ``eval_every`` steps.

    Defaults follow open-unlearning's trainer (lr 1e-5, weight decay 0.01, gradient clipping 1.0,
    constant schedule after warmup); methods may declare their own ``trainer_defaults``."""

    forget: str
    retain: str | None = None
    method: str = "grad_diff"
    method_args: dict = field(default_factory=dict)
    forget_ids: list | None = None
    forget_filter: dict = field(default_factory=dict)
    retain_filter: dict = field(default_factory=dict)
    steps: int = 100
    lr: float = 1e-5
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "constant"
    grad_clip: float | None = 1.0
    gradient_checkpointing: bool = False
    precision: str = "float32"  # float32 | bf16 (autocast on the model's device; mixed precision under accelerate)
    # tracking (the evaluation side)
    nonmember: str | None = None
    nonmember_filter: dict = field(default_factory=dict)
    eval_every: int = 10
    utility_tasks: list = field(default_factory=list)
    utility_limit: int | None = 200
    reference_model: str | None = None
    grad_norm_steps: int = 5
    exposure_alternatives: int = 200  # per canary and evaluation; each exposure carries its interval
    secret_format: dict | None = None  # alphabet / length / separator of the canaries' secrets (else the task's)
    min_k: float = 0.2

    def __post_init__(self):
        self.method = METHODS.check(str(self.method))
        self.forget = _source("forget", self.forget)
        if self.forget is None:
            raise ConfigError("forget is required: a task name or a .jsonl file of examples to forget")
        self.retain = _source("retain", self.retain)
        self.nonmember = _source("nonmember", self.nonmember)
        if isinstance(self.method_args, str):
            self.method_args = parse_kv_list(self.method_args, "method_args")
        if not isinstance(self.method_args, dict):
            raise ConfigError(f"method_args must be a mapping name -> value, got {self.method_args!r}")
        self.method_args = {str(k): _method_arg(str(k), v) for k, v in self.method_args.items()}
        if isinstance(self.forget_ids, str):  # a file of ids, one per line (the same file as testbed --exclude)
            self.forget_ids = read_id_file(self.forget_ids, "forget_ids file")
            if not self.forget_ids:
                raise ConfigError("forget_ids file names no ids")
        elif self.forget_ids is not None:
            if not isinstance(self.forget_ids, list) or not self.forget_ids:
                raise ConfigError(f"forget_ids must be a non-empty list of ids or a file, got {self.forget_ids!r}")
            self.forget_ids = [str(i) for i in self.forget_ids]
        self.forget_filter = _filter("forget_filter", self.forget_filter)
        self.retain_filter = _filter("retain_filter", self.retain_filter)
        self.nonmember_filter = _filter("nonmember_filter", self.nonmember_filter)
        self.steps = parse_positive_int("steps", self.steps)
        self.lr = parse_float("lr", self.lr, low=0.0, low_open=True)
        self.batch_size = parse_positive_int("batch_size", self.batch_size)
        self.grad_accum = parse_positive_int("grad_accum", self.grad_accum)
        self.weight_decay = parse_float("weight_decay", self.weight_decay, low=0.0)
        self.warmup_steps = parse_int("warmup_steps", self.warmup_steps, minimum=0)
        self.schedule = parse_choice("schedule", self.schedule, SCHEDULES)
        if self.grad_clip is not None:
            self.grad_clip = parse_float("grad_clip", self.grad_clip, low=0.0)
            if self.grad_clip == 0:
                self.grad_clip = None
        self.gradient_checkpointing = parse_bool("gradient_checkpointing", self.gradient_checkpointing)
        if str(self.precision).strip().lower() == "bfloat16":
            self.precision = "bf16"
        self.precision = parse_choice("precision", self.precision, PRECISIONS)
        self.eval_every = parse_positive_int("eval_every", self.eval_every)
        if self.eval_every > self.steps:
            raise ConfigError(f"eval_every={self.eval_every} is larger than steps={self.steps}")
        if isinstance(self.utility_tasks, str):
            self.utility_tasks = [t.strip() for t in self.utility_tasks.split(",") if t.strip()]
        if not isinstance(self.utility_tasks, list):
            raise ConfigError(f"utility_tasks must be a list of task names, got {self.utility_tasks!r}")
        if self.utility_limit is not None:
            self.utility_limit = parse_positive_int("utility_limit", self.utility_limit)
        self.grad_norm_steps = parse_int("grad_norm_steps", self.grad_norm_steps, minimum=0)
        self.exposure_alternatives = parse_positive_int("exposure_alternatives", self.exposure_alternatives)
        if self.secret_format is not None:
            from llmmem.exposure import SecretSpace

            SecretSpace.from_options(self.secret_format, where="secret_format")
        self.min_k = parse_float("min_k", self.min_k, low=0.0, high=1.0, low_open=True)
        if self.retain is None and self.method_needs_retain():
            raise ConfigError(f"method={self.method} needs a retain set: give retain (a task name or a .jsonl file)")

    def method_needs_retain(self) -> bool:
        if self.method in ("grad_ascent", "finetune"):
            return False
        if self.method == "undial":  # UNDIAL's reference has no retain term (alpha 0) unless one is asked for
            return bool(self.method_args.get("alpha", 0.0))
        return True

    def canonical(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "precision" and v == "float32":
                continue  # the default is left out, so cells from before the key existed keep their hash
            if v not in (None, {}, []) or f.name in ("forget", "method", "steps", "lr"):
                out[f.name] = v
        return out

    def label(self) -> str:
        return f"{self.method}-{self.steps}steps"


def unlearn_spec_from(doc: dict, where: str = "unlearn") -> UnlearnSpec:
    check_keys(where, doc, set(TRAINING_KEYS) | set(TRACKING_KEYS))
    try:
        return UnlearnSpec(**doc)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclass
class UnlearnConfig:
    """``llmmem unlearn``'s flat config: the model, the unlearning spec, where to write, the seed."""

    model: object  # ModelSpec
    spec: UnlearnSpec
    output_path: str = "results/unlearn"
    seed: int = 0
    description: str = ""


def load_unlearn_config(path: str | None, overrides: list[str] | None = None, **cli) -> UnlearnConfig:
    """YAML file + ``key=value`` overrides + explicit flags -> a validated UnlearnConfig (torch-free)."""
    from llmmem.config import load_config_doc, model_spec_from_args

    allowed = {"model", "model_args", "output_path", "seed", "description", *TRAINING_KEYS, *TRACKING_KEYS}
    doc = load_config_doc(path, "unlearn", allowed, ("model", "forget"), overrides, cli)
    model = model_spec_from_args(str(doc.pop("model")), doc.pop("model_args", None))
    output = str(doc.pop("output_path", None) or "results/unlearn")
    seed = parse_int("seed", doc.pop("seed", 0), minimum=0)
    description = str(doc.pop("description", "") or "")
    return UnlearnConfig(model, unlearn_spec_from(doc), output, seed, description)


def secret_space(spec: UnlearnSpec, include_path: str | None, secrets: list[str]):
    """The secret space of an unlearning run's canaries (see :func:`resolve_secret_space`)."""
    return resolve_secret_space(spec.forget, spec.secret_format, spec.exposure_alternatives, include_path, secrets)


def resolve_secret_space(source: str, secret_format: dict | None, n_alternatives: int, include_path: str | None,
                         secrets: list[str]):
    """The canaries' secret space: ``secret_format`` if given, else the source task's declared
    ``options.exposure``, else ten digits when every secret is space-separated digits; otherwise an error
    (exposure needs the space the secrets were drawn from, never one guessed from the secrets' own symbols).
    The alternatives budget is checked against it. None when there are no secrets."""
    from llmmem.exposure import DIGITS, SecretSpace

    if not secrets:
        return None
    options = secret_format
    if options is None and not source.endswith(".jsonl"):
        from llmmem.tasks import get_task

        options = get_task(source, include_path).options.get("exposure")
    if options is not None:
        space = SecretSpace.from_options({k: v for k, v in options.items() if k not in ("n_alternatives",)},
                                         where="secret_format")
    elif all(p in DIGITS for s in secrets for p in s.split(" ")):
        space = SecretSpace(DIGITS, None, " ")
    else:
        raise ConfigError(f"the secrets of {source} are not space-separated digits; declare their space with "
                          f"secret_format: {{alphabet: [...], length: N, separator: ' '}} (e.g. {secrets[0]!r})")
    for s in secrets:
        space.check(s, "secret")
        space.check_budget(n_alternatives, s, key="exposure_alternatives")
    return space


@dataclass
class RelearnSpec:
    """Fine-tuning steps on a data set after unlearning (a relearning attack): ``data`` is a task name or a
    .jsonl file, narrowed by ``ids`` (a list or a file of ids) and ``filter``; ``name`` labels it in reports
    (e.g. ``forget10``, ``retain``, ``unrelated``)."""

    data: str
    steps: int = 10
    name: str | None = None
    ids: list | None = None
    filter: dict = field(default_factory=dict)
    lr: float = 1e-4
    batch_size: int = 8
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0

    def __post_init__(self):
        self.data = _source("data", self.data)
        if self.data is None:
            raise ConfigError("relearn: data is required (a task name or a .jsonl file)")
        self.steps = parse_int("steps", self.steps, minimum=1)
        if self.name is not None:
            self.name = str(self.name).strip()
            if not self.name or any(c in self.name for c in "/+ "):
                raise ConfigError(f"name={self.name!r} must be a short label without spaces, '/' or '+'")
        if isinstance(self.ids, str):
            self.ids = read_id_file(self.ids, "relearn ids file")
        elif self.ids is not None:
            if not isinstance(self.ids, list) or not self.ids:
                raise ConfigError(f"ids must be a non-empty list of ids or a file, got {self.ids!r}")
            self.ids = [str(i) for i in self.ids]
        self.filter = _filter("filter", self.filter)
        self.lr = parse_float("lr", self.lr, low=0.0, low_open=True)
        self.batch_size = parse_positive_int("batch_size", self.batch_size)
        self.weight_decay = parse_float("weight_decay", self.weight_decay, low=0.0)
        if self.grad_clip is not None:
            self.grad_clip = parse_float("grad_clip", self.grad_clip, low=0.0) or None

    @property
    def short(self) -> str:
        return self.name or self.data.rsplit("/", 1)[-1].removesuffix(".jsonl")

    def canonical(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if v not in (None, {}, [])}

    def label(self) -> str:
        return f"relearn-{self.short}-{self.steps}steps"

    def training_spec(self) -> UnlearnSpec:
        """The loop's spec: fine-tuning (``finetune``) on the data, nothing tracked."""
        return UnlearnSpec(forget=self.data, method="finetune", forget_ids=self.ids, forget_filter=self.filter,
                           steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                           weight_decay=self.weight_decay, grad_clip=self.grad_clip, eval_every=self.steps,
                           grad_norm_steps=0)
