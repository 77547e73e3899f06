"""A cell: a model, a chain of interventions, an evaluation and a seed - the one producer of a cell's
config, name, hash and directory, whichever command built it (``eval``, ``sweep``, ``prune``,
``quantize``, ``unlearn``).

``Cell.config()`` is the canonical description recorded in ``results.json``; ``Cell.key()`` hashes it, so
the same cell has the same hash in every run directory; ``Cell.name()`` is readable
(``<model>/<chain label>-<hash8>``, e.g. ``smollm2-135m/wanda-unstructured-s0.5+rtn-w4g32-1a2b3c4d``) and is
never parsed back: reports read the chain from the config.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from llmmem.config import ConfigError, ModelSpec, check_keys, parse_bool, parse_float, parse_int, parse_kv_list
from llmmem.interventions import Chain, chain_canonical, chain_label

RESULTS_LAYOUT = 2  # the cell layout (chains); bumped with results.SCHEMA_VERSION


def parse_limit(key: str, value):
    """``--limit``: a count (int >= 1) or a fraction of each task's docs (0 < x < 1), as lm-eval."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not a count or a fraction")
    if isinstance(value, str):
        v = value.strip()
        try:
            value = int(v)
        except ValueError:
            value = parse_float(key, v)
    if isinstance(value, float):
        value = parse_float(key, value)  # nan / inf: one line
    if isinstance(value, float) and value != int(value) or (isinstance(value, float) and value < 1):
        return parse_float(key, value, low=0.0, high=1.0, low_open=True, high_open=True)
    return parse_int(key, value, minimum=1)


def parse_gen_kwargs(value) -> dict:
    """``--gen_kwargs k=v,...`` (lm-eval): values parsed as YAML scalars (numbers, booleans, strings)."""
    if value in (None, ""):
        return {}
    if isinstance(value, str):
        from llmmem.config import yaml_load

        raw = parse_kv_list(value, "--gen_kwargs")
        out = {}
        for k, v in raw.items():
            try:
                out[k] = yaml_load(v)
            except Exception:  # noqa: BLE001 - a plain string
                out[k] = v
        value = out
    if not isinstance(value, dict):
        raise ConfigError(f"gen_kwargs must be k=v,... or a mapping, got {value!r}")
    allowed = {"max_gen_toks", "until", "do_sample", "temperature", "top_p", "top_k", "max_new_tokens"}
    check_keys("gen_kwargs", value, allowed)
    out = dict(value)
    if "max_new_tokens" in out:
        out["max_gen_toks"] = out.pop("max_new_tokens")
    if "max_gen_toks" in out:
        out["max_gen_toks"] = parse_int("gen_kwargs.max_gen_toks", out["max_gen_toks"], minimum=1)
    if "temperature" in out:
        out["temperature"] = parse_float("gen_kwargs.temperature", out["temperature"], low=0.0)
    if "top_p" in out:
        out["top_p"] = parse_float("gen_kwargs.top_p", out["top_p"], low=0.0, high=1.0, low_open=True)
    if "top_k" in out:
        out["top_k"] = parse_int("gen_kwargs.top_k", out["top_k"], minimum=0)
    if "do_sample" in out:
        out["do_sample"] = parse_bool("gen_kwargs.do_sample", out["do_sample"])
    if "until" in out:
        u = out["until"]
        out["until"] = [str(x) for x in (u if isinstance(u, list) else [u])]
    return out


@dataclass
class EvalSpec:
    """What a cell is evaluated on, and how (the settings that change the numbers).

    Batch size, threads, ``--log_samples`` and the request cache do not change a number, so they are not
    part of a cell's identity."""

    tasks: list = field(default_factory=list)
    limit: object = None  # count, fraction, or {task: count or fraction, default: ...}
    num_fewshot: int | None = None
    backend: str = "hf"
    apply_chat_template: object = False  # False, True (the model's default template) or a template name
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    gen_kwargs: dict = field(default_factory=dict)
    mia_reference: str | None = None
    predict_only: bool = False
    track: dict | None = None  # per-example survival measures of example sets (llmmem.tracking.check_track)

    def __post_init__(self):
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if not isinstance(self.tasks, list) or not all(isinstance(t, str) and t.strip() for t in self.tasks):
            raise ConfigError(f"tasks must be a list of task names, got {self.tasks!r}")
        dup = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if dup:
            raise ConfigError(f"tasks: {dup[0]!r} is listed twice")
        if isinstance(self.limit, dict):
            allowed = set(self.tasks) | {"default"}
            check_keys("limit", self.limit, allowed)
            self.limit = {str(k): parse_limit(f"limit.{k}", v) for k, v in self.limit.items()}
        else:
            self.limit = parse_limit("limit", self.limit)
        if self.num_fewshot is not None:
            self.num_fewshot = parse_int("num_fewshot", self.num_fewshot, minimum=0)
        if self.apply_chat_template not in (False, True):
            v = str(self.apply_chat_template).strip()
            low = v.lower()
            self.apply_chat_template = True if low in ("true", "1", "yes", "default") else \
                False if low in ("false", "0", "no", "") else v
        self.fewshot_as_multiturn = parse_bool("fewshot_as_multiturn", self.fewshot_as_multiturn)
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ConfigError("fewshot_as_multiturn needs apply_chat_template (as in lm-eval)")
        if self.system_instruction is not None and not str(self.system_instruction).strip():
            raise ConfigError(f"system_instruction={self.system_instruction!r} is empty; leave it out for none")
        self.gen_kwargs = parse_gen_kwargs(self.gen_kwargs)
        self.predict_only = parse_bool("predict_only", self.predict_only)
        from llmmem.tracking import check_track

        self.track = check_track(self.track)

    def limit_for(self, task: str):
        if isinstance(self.limit, dict):
            return self.limit.get(task, self.limit.get("default"))
        return self.limit

    def canonical(self) -> dict:
        out = {"tasks": list(self.tasks), "limit": {t: self.limit_for(t) for t in self.tasks},
               "num_fewshot": self.num_fewshot, "backend": self.backend}
        if self.apply_chat_template:
            out.update(apply_chat_template=self.apply_chat_template, fewshot_as_multiturn=self.fewshot_as_multiturn)
        if self.system_instruction:
            out["system_instruction"] = self.system_instruction
        if self.gen_kwargs:
            out["gen_kwargs"] = self.gen_kwargs
        if self.mia_reference:
            out["mia_reference"] = self.mia_reference
        if self.predict_only:
            out["predict_only"] = True
        if self.track:
            out["track"] = self.track
        return out


def config_hash(obj, n: int = 8) -> str:
    """First ``n`` hex digits of the sha256 of the canonical JSON of ``obj``."""
    from llmmem.results import jsonable

    canon = json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:n]


@dataclass
class Cell:
    model: ModelSpec
    chain: Chain
    eval: EvalSpec
    seed: int = 0

    def config(self) -> dict:
        """The canonical config: what decides this cell's numbers."""
        return {"layout": RESULTS_LAYOUT, "model": self.model.identity(), "chain": chain_canonical(self.chain),
                "eval": self.eval.canonical(), "seed": self.seed}

    def key(self) -> str:
        return config_hash(self.config())

    def weights_key(self) -> str:
        """A hash of what decides the weights (model + chain + seed): the request cache's model key."""
        return config_hash({"model": self.model.identity(), "chain": chain_canonical(self.chain), "seed": self.seed},
                           16)

    def label(self) -> str:
        return chain_label(self.chain)

    def name(self) -> str:
        from llmmem.results import safe_name

        return f"{safe_name(self.model.display_name)}/{self.label()}-{self.key()}"

    def describe(self) -> dict:
        """What reports read: the chain step by step (kind, label, canonical spec, plot axis)."""
        steps = []
        for s in self.chain:
            iv = s.intervention
            steps.append({"kind": s.kind, "label": s.label(), "series": iv.series(s.spec),
                          "spec": iv.canonical(s.spec), "axis": iv.axis, "axis_value": iv.axis_value(s.spec),
                          "axis_base": iv.axis_base})
        return {"label": self.label(), "steps": steps}
