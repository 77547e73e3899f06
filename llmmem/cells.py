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

from llmmem.config import ConfigError, ModelSpec, check_keys, parse_bool, parse_float, parse_int
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


GEN_KWARGS = ("max_gen_toks", "until", "do_sample", "temperature", "top_p", "top_k")
# lm-eval's aliases of max_gen_toks (lm_eval/models/utils.py normalize_gen_kwargs, in its priority order)
MAX_TOKENS_ALIASES = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """``text`` split at ``sep`` outside brackets and quotes (lm-eval's ``split_top_level`` for ``--gen_kwargs``:
    ``until=["\\n\\n","Q:"],max_gen_toks=32`` is two items)."""
    out, cur, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        elif ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return [x.strip() for x in out if x.strip()]


def _gen_value(text: str):
    """A ``--gen_kwargs`` value as lm-eval reads it (``lm_eval/_cli/utils.py`` ``handle_cli_value_string``:
    true/false, numbers, then ``ast.literal_eval`` (lists, quoted strings with escapes, None), else the text)."""
    import ast

    v = text.strip()
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if v.isnumeric():
        return int(v)
    try:
        return float(v)
    except ValueError:
        pass
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return v


def parse_gen_kwargs(value) -> dict:
    """``--gen_kwargs k=v,...`` (lm-eval): overrides of a task's ``generation_kwargs`` for every generate request.

    Keys: max_gen_toks (or lm-eval's aliases max_new_tokens, max_tokens, max_completion_tokens), until (a
    string or a list: ``until=["\\n\\n","Q:"]``), do_sample, temperature, top_p, top_k (0 only: llmmem's
    backends sample without top-k). As lm-eval, ``temperature=0`` without do_sample means greedy."""
    if value in (None, "", {}):
        return {}
    if isinstance(value, (list, tuple)):  # lm-eval 0.4.13's space-separated form: --gen_kwargs a=1 b=2
        value = ",".join(str(v) for v in value)
    if isinstance(value, str) and value.strip().startswith("{"):  # lm-eval also takes a JSON object
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ConfigError(f"--gen_kwargs {value!r} is not valid JSON ({e}); or write k=v,k=v") from None
    if isinstance(value, str):
        out = {}
        for item in split_top_level(value):
            if "=" not in item:
                raise ConfigError(f"--gen_kwargs: {item!r} is not key=value (expected k=v,k=v)")
            k, v = item.split("=", 1)
            k = k.strip()
            if k in out:
                raise ConfigError(f"--gen_kwargs: key {k!r} is given twice")
            out[k] = _gen_value(v)
        value = out
    if not isinstance(value, dict):
        raise ConfigError(f"gen_kwargs must be k=v,... or a mapping, got {value!r}")
    check_keys("gen_kwargs", value, set(GEN_KWARGS) | set(MAX_TOKENS_ALIASES))
    out = {k: v for k, v in value.items() if k not in MAX_TOKENS_ALIASES}
    given = [k for k in MAX_TOKENS_ALIASES if value.get(k) is not None]
    if given:
        out["max_gen_toks"] = parse_int(f"gen_kwargs.{given[0]}", value[given[0]], minimum=1)
    if "temperature" in out:
        out["temperature"] = parse_float("gen_kwargs.temperature", out["temperature"], low=0.0)
    if "top_p" in out:
        out["top_p"] = parse_float("gen_kwargs.top_p", out["top_p"], low=0.0, high=1.0, low_open=True)
    if "top_k" in out:
        k = parse_int("gen_kwargs.top_k", out["top_k"], minimum=0)
        if k != 0:
            raise ConfigError(f"gen_kwargs.top_k={k}: llmmem's backends sample without top-k; only top_k=0 "
                              f"(off) is accepted")
        del out["top_k"]
    if "do_sample" in out:
        out["do_sample"] = parse_bool("gen_kwargs.do_sample", out["do_sample"])
    elif out.get("temperature") == 0.0:
        out["do_sample"] = False  # lm-eval: temperature 0 without do_sample is greedy
    if out.get("do_sample") and out.get("temperature") == 0.0:
        raise ConfigError("gen_kwargs: do_sample=true with temperature=0 is not a sampling setting; give "
                          "temperature > 0 or do_sample=false")
    if "until" in out:
        u = out["until"]
        if u is None:
            u = []
        out["until"] = [str(x) for x in (u if isinstance(u, list) else [u])]
    return out


def parse_seed(value) -> tuple[int, int | None, int | None, int | None]:
    """``--seed``: one integer (llmmem's cell seed), or lm-eval's ``python,numpy,torch,fewshot`` form.

    Returns (cell seed, numpy seed, torch seed, fewshot seed); ``None`` where the form leaves the seed to
    llmmem's default (one integer; a slot written ``None``). The python seed is llmmem's cell seed (it seeds
    the interventions, the bootstrap and, unless the fourth value is given, the few-shot sampler as
    ``1234 + seed``); numpy and torch seed those generators before the run; the torch seed also seeds sampled
    generation (``gen_kwargs do_sample=true``); the fewshot seed is the few-shot sampler's seed itself.
    lm-eval reads one integer as all four seeds; llmmem keeps one integer its cell seed (so ``--seed 0`` is
    lm-eval's default ``0,1234,1234,1234``, and ``--seed 3`` draws shots with seed 1237)."""
    if isinstance(value, bool):
        raise ConfigError(f"--seed {value!r} is not an integer")
    if isinstance(value, int):
        return parse_int("--seed", value, minimum=0), None, None, None
    text = str(value).strip()
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 1:
        return parse_int("--seed", text, minimum=0), None, None, None
    if len(parts) not in (3, 4):  # lm-eval: 3 or 4 values, a missing fourth takes its default 1234
        raise ConfigError(f"--seed {text!r}: give one integer, or lm-eval's python,numpy,torch,fewshot seeds "
                          f"(e.g. 0,1234,1234,1234; None leaves a seed at its default)")
    if len(parts) == 3:
        parts.append("1234")

    def one(i, name):
        p = parts[i]
        if p.lower() == "none":
            return None
        return parse_int(f"--seed ({name})", p, minimum=0)

    py = one(0, "python")
    return (py if py is not None else 0), one(1, "numpy"), one(2, "torch"), one(3, "fewshot")


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
    fewshot_as_multiturn: bool | None = None  # None: on with a chat template (lm-eval 0.4.13's default)
    system_instruction: str | None = None
    gen_kwargs: dict = field(default_factory=dict)
    mia_reference: str | None = None
    predict_only: bool = False
    fewshot_seed: int | None = None  # lm-eval's fourth --seed value; None: 1234 + the cell seed
    torch_seed: int | None = None  # lm-eval's third --seed value: seeds sampled generation; None: the cell seed
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
        if self.fewshot_as_multiturn is None:  # lm-eval 0.4.13: on by default with --apply_chat_template
            self.fewshot_as_multiturn = bool(self.apply_chat_template)
        else:
            self.fewshot_as_multiturn = parse_bool("fewshot_as_multiturn", self.fewshot_as_multiturn)
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ConfigError("fewshot_as_multiturn=true needs apply_chat_template (as in lm-eval): few-shot "
                              "examples become chat turns only inside a chat template")
        if self.system_instruction is not None:
            if not isinstance(self.system_instruction, str):
                raise ConfigError(f"system_instruction must be text, got {self.system_instruction!r}")
            if not self.system_instruction.strip():
                raise ConfigError(f"system_instruction={self.system_instruction!r} is empty; leave it out for none")
        self.gen_kwargs = parse_gen_kwargs(self.gen_kwargs)
        self.predict_only = parse_bool("predict_only", self.predict_only)
        for key in ("fewshot_seed", "torch_seed"):
            if getattr(self, key) is not None:
                setattr(self, key, parse_int(key, getattr(self, key), minimum=0))
        from llmmem.tracking import check_track

        self.track = check_track(self.track)

    def fewshot_seed_for(self, seed: int) -> int:
        """The few-shot sampler's seed of a cell with seed ``seed``."""
        from llmmem.tasks import fewshot_seed

        return self.fewshot_seed if self.fewshot_seed is not None else fewshot_seed(seed)

    def sampling_seed_for(self, seed: int) -> int:
        """The seed of sampled generations (``gen_kwargs do_sample=true``) of a cell with seed ``seed``."""
        return self.torch_seed if self.torch_seed is not None else seed

    def samples(self) -> bool:
        return bool(self.gen_kwargs.get("do_sample"))

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
        if self.fewshot_seed is not None:
            out["fewshot_seed"] = self.fewshot_seed
        if self.torch_seed is not None and self.samples():
            out["torch_seed"] = self.torch_seed
        if self.track:
            out["track"] = self.track
        return out

    def canonical_for(self, seed: int) -> dict:
        """:meth:`canonical` for a cell of seed ``seed``: a seed equal to its default (fewshot 1234 + seed,
        torch = seed) is left out, so ``--seed 0`` and lm-eval's ``--seed 0,1234,0,1234`` are one cell."""
        from llmmem.tasks import fewshot_seed

        out = self.canonical()
        if out.get("fewshot_seed") == fewshot_seed(seed):
            del out["fewshot_seed"]
        if out.get("torch_seed") == seed:
            del out["torch_seed"]
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
                "eval": self.eval.canonical_for(self.seed), "seed": self.seed}

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
