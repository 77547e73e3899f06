"""lm-evaluation-harness model ``llmmem``: lm-eval's own command line on a model loaded and changed by llmmem.

    python -m llmmem.lm_eval_plugin --model llmmem \\
        --model_args pretrained=smollm2-135m,prune=wanda:0.5 --tasks hellaswag --limit 100

takes every ``lm_eval`` flag unchanged. ``pretrained`` is anything ``llmmem --model`` takes (local directory,
hub id, preset, .gguf); the model is loaded by llmmem (``dtype`` defaults to float32), then the interventions
in ``--model_args`` are applied in the order given, then lm-eval's ``HFLM`` evaluates the in-memory model:

* ``prune=METHOD:SPARSITY[:STRUCTURE]`` — ``magnitude|wanda|sparsegpt``, e.g. ``wanda:0.5``,
  ``sparsegpt:0.5:2:4``; options ``calibration`` (default auto), ``nsamples``, ``seqlen``, ``profile``,
  ``scope``, ``prune_seed`` (the cell seed: calibration sampling), ``prune_batch_size`` (default 8, as
  ``llmmem prune``: self-generated calibration depends on it).

* ``quantize=METHOD:BITS[:GROUP_SIZE]`` — ``rtn|gptq``, e.g. ``rtn:4:32`` (group -1: per output channel);
  after ``prune=`` when both are given in that order (sparse + quantized: zeros stay zeros).

The interventions are applied by llmmem's own runner (``llmmem.runner.apply_chain`` on a one-cell
session), exactly as ``llmmem prune`` / ``llmmem sweep`` apply them.

Why a wrapper: lm-eval 0.4.x (0.4.13 and upstream main as of 2026-08-21) resolves ``--model NAME`` only
against its own registry (``lm_eval.models.MODEL_MAPPING`` + classes whose module was imported); it reads no
entry points and its CLI imports no user module before the model is built (task ``!function`` modules load
after it). So ``lm_eval --model llmmem`` alone cannot find this class; ``python -m llmmem.lm_eval_plugin``
registers it and then runs lm-eval's own ``cli_evaluate``. From Python: ``import llmmem.lm_eval_plugin``, then
``lm_eval.simple_evaluate(model="llmmem", model_args=...)``. lm-eval's open plugin PR (#4013) discovers an
``lm_eval.models`` entry point; with it in llmmem's pyproject the plain ``lm_eval --model llmmem`` will work
there unchanged.

lm-eval's ``--use_cache`` keys answers on the request only. A cache file is therefore stamped with this
model's key (dense fingerprint + intervention chain) and refused for any other model or intervention.
"""

from __future__ import annotations

import logging
import sys

from llmmem.config import MODEL_ARG_KEYS, ConfigError, parse_int, parse_positive_int
from llmmem.interventions import Step
from llmmem.pruning import METHODS as PRUNE_METHODS
from llmmem.pruning.spec import PruneSpec

try:
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.models.huggingface import HFLM  # imports lm_eval.models first, which registers lm-eval's own
except ImportError:  # pragma: no cover - exercised only without lm-eval
    raise ConfigError("the llmmem lm-eval model needs lm-eval: pip install 'llmmem[lm_eval]'") from None

log = logging.getLogger(__name__)

MODEL_NAME = "llmmem"
INTERVENTIONS = ("prune", "quantize")
PRUNE_OPTIONS = ("calibration", "nsamples", "seqlen", "profile", "scope", "prune_seed", "prune_batch_size")
PRUNE_BATCH_SIZE = 8  # llmmem's default --batch_size: self-generated calibration draws one seed per batch
# HFLM arguments that still mean something for a model built in memory (loading arguments do not)
HFLM_KEYS = ("batch_size", "max_batch_size", "max_length", "truncation", "logits_cache", "add_bos_token",
             "prefix_token_id", "softmax_dtype", "mixed_precision_dtype", "think_end_token", "enable_thinking",
             "chat_template_args", "backend")
CACHE_MARK = "llmmem:model_key"


def _allowed() -> str:
    return ", ".join(("pretrained", *INTERVENTIONS, *PRUNE_OPTIONS, *MODEL_ARG_KEYS,
                      *(k for k in HFLM_KEYS if k not in MODEL_ARG_KEYS)))


def parse_prune(value, options: dict | None = None) -> PruneSpec:
    """``METHOD:SPARSITY[:STRUCTURE]`` (+ prune options) -> PruneSpec; bad input -> one-line ConfigError."""
    text = str(value).strip()
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"model_args prune={text!r}: expected METHOD:SPARSITY[:STRUCTURE] "
                          f"(e.g. wanda:0.5, sparsegpt:0.5:2:4); methods: {', '.join(PRUNE_METHODS.names())}")
    method, sparsity = parts[0].strip().lower(), parts[1].strip()
    if method not in PRUNE_METHODS:
        raise ConfigError(f"model_args prune={text!r}: unknown method {method!r}; "
                          f"allowed: {', '.join(PRUNE_METHODS.names())}")
    opts = dict(options or {})
    kwargs = {"method": method, "sparsity": sparsity, "structure": parts[2].strip() if len(parts) > 2 else "unstructured"}
    if "calibration" in opts:
        kwargs["calibration"] = str(opts["calibration"])
    for key in ("nsamples", "seqlen"):
        if opts.get(key) is not None:
            kwargs[key] = parse_positive_int(key, opts[key])
    for key in ("profile", "scope"):
        if key in opts:
            kwargs[key] = str(opts[key])
    try:
        return PruneSpec(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"model_args prune={text!r}: {e}") from None


def parse_quantize(value, options: dict | None = None):
    """``METHOD:BITS[:GROUP_SIZE]`` (e.g. ``rtn:4:32``, ``gptq:4:128``; group -1 = per channel) -> QuantizeSpec;
    gptq calibrates with the prune options ``calibration``/``nsamples``/``seqlen``."""
    from llmmem.quantization.spec import QuantizeSpec

    text = str(value).strip()
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
        raise ConfigError(f"model_args quantize={text!r}: expected METHOD:BITS[:GROUP_SIZE] (e.g. rtn:4:32, gptq:4:128)")
    kw = {"method": parts[0].strip().lower(), "bits": parts[1].strip()}
    if len(parts) == 3:
        kw["group_size"] = parts[2].strip()
    for key in ("calibration", "nsamples", "seqlen"):
        if (options or {}).get(key) is not None:
            kw[key] = options[key]
    try:
        return QuantizeSpec(**kw)
    except ConfigError as e:
        raise ConfigError(f"model_args quantize={text!r}: {e}") from None


def parse_interventions(kv: dict) -> list[Step]:
    """The interventions in ``model_args`` in the order given, as a chain of Steps."""
    chain: list[Step] = []
    prune_opts = {k: kv[k] for k in PRUNE_OPTIONS if k in kv}
    for key, value in kv.items():
        if key == "prune":
            chain.append(Step("prune", parse_prune(value, prune_opts)))
        elif key == "quantize":
            chain.append(Step("quantize", parse_quantize(value, prune_opts)))
    if prune_opts and not chain:
        raise ConfigError(f"model_args {', '.join(prune_opts)} given without prune=METHOD:SPARSITY[:STRUCTURE] "
                          f"or quantize=METHOD:BITS[:GROUP_SIZE]")
    return chain


def load_cell(spec, chain: list[Step], *, seed: int = 0, batch_size: int = 8, quiet: bool = True):
    """Load the model and apply ``chain`` with llmmem's runner; (session, cell, reports)."""
    from llmmem.cells import Cell, EvalSpec
    from llmmem.interventions import PrepareEnv
    from llmmem.runner import Session, apply_chain

    cell = Cell(spec, tuple(chain), EvalSpec(), seed)
    for step in cell.chain:
        step.intervention.prepare(step.spec, PrepareEnv(model=spec.name))
    session = Session(spec, batch_size=batch_size, quiet=quiet, keep_dense=False)
    reports, _warnings, _ = apply_chain(session, cell)
    return session, cell, reports


class LlmmemLM(HFLM):
    """lm-eval's HFLM over a model loaded by llmmem with its interventions applied (see the module docstring)."""

    def __init__(self, pretrained: str | None = None, **kwargs):
        from llmmem.backends.cache import cache_model_key
        from llmmem.config import model_spec_from_args

        if pretrained is None or not str(pretrained).strip():
            raise ConfigError("model_args pretrained=... is required (a local directory, hub id, preset or .gguf)")
        unknown = [k for k in kwargs if k not in (*INTERVENTIONS, *PRUNE_OPTIONS, *MODEL_ARG_KEYS, *HFLM_KEYS)]
        if unknown:
            raise ConfigError(f"model_args: unknown key {unknown[0]!r} for --model {MODEL_NAME}; allowed: {_allowed()}")
        chain = parse_interventions(kwargs)
        margs = {k: kwargs[k] for k in MODEL_ARG_KEYS if kwargs.get(k) is not None}
        spec = model_spec_from_args(str(pretrained), {k: v if isinstance(v, bool) else str(v) for k, v in margs.items()})
        hf_args = {k: kwargs[k] for k in HFLM_KEYS if k in kwargs and kwargs[k] is not None}
        if spec.dtype != "float32" and "softmax_dtype" not in hf_args:
            hf_args["softmax_dtype"] = "float32"  # llmmem's rule: log-probabilities in float32
        calib_batch = parse_positive_int("prune_batch_size", kwargs.get("prune_batch_size", PRUNE_BATCH_SIZE))
        seed = parse_int("prune_seed", kwargs.get("prune_seed", 0), minimum=0)
        session, cell, reports = load_cell(spec, chain, seed=seed, batch_size=calib_batch)
        lm = session.lm
        self.llmmem_reports = [{s.kind: r} for s, r in zip(chain, reports)]
        self.llmmem_model = lm
        self.llmmem_interventions = [s.canonical() for s in chain]
        dtype = str(next(lm.model.parameters()).dtype).replace("torch.", "")
        self.llmmem_model_key = f"{cache_model_key(lm.fingerprint, cell.weights_key())}|{dtype}|{lm.device.type}"
        super().__init__(pretrained=lm.model, tokenizer=lm.tokenizer, **hf_args)
        self.pretrained = str(pretrained)  # HFLM reports it (model_sha lookup, names); the model object is self.model

    def get_model_info(self) -> dict:
        """As HFLM's (without its hub lookup of a commit sha), plus llmmem's fingerprint and interventions."""
        fp = self.llmmem_model.fingerprint
        info = {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                "model_dtype": str(getattr(self._model, "dtype", "")), "model_revision": self.revision,
                "model_sha": fp.rsplit("@", 1)[1] if fp.startswith("hub:") and "@" in fp else ""}
        info["llmmem"] = {"fingerprint": self.llmmem_model.fingerprint, "model_key": self.llmmem_model_key,
                          "interventions": self.llmmem_interventions, "reports": self.llmmem_reports}
        return info

    def set_cache_hook(self, cache_hook) -> None:
        """lm-eval's ``--use_cache`` file is keyed by request only: refuse one written for other weights."""
        db = getattr(cache_hook, "dbdict", None)
        if db is not None:
            stamp = db.get(CACHE_MARK)
            where = getattr(db, "filename", "the --use_cache file")
            if stamp is None:
                if len(db):
                    raise ConfigError(f"--use_cache {where} holds answers from an unknown model; lm-eval keys them "
                                      "on the request only, so give a new --use_cache path for this model")
                db[CACHE_MARK] = self.llmmem_model_key
                db.commit()
            elif stamp != self.llmmem_model_key:
                raise ConfigError(f"--use_cache {where} holds answers of other weights ({stamp}); this model is "
                                  f"{self.llmmem_model_key}. lm-eval keys them on the request only: use one "
                                  "--use_cache path per model and intervention")
        super().set_cache_hook(cache_hook)


if __name__ != "__main__" and MODEL_NAME not in model_registry:
    # (an ``lm_eval.models`` entry point, where lm-eval reads them, registers the same class lazily)
    register_model(MODEL_NAME)(LlmmemLM)


def main(argv: list[str] | None = None) -> int:
    """``python -m llmmem.lm_eval_plugin [lm_eval flags]``: lm-eval's CLI with ``--model llmmem`` registered."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["lm_eval", *args]
    try:
        cli_evaluate()
    except ConfigError as e:
        sys.stderr.write(f"llmmem lm_eval: error: {str(e).splitlines()[0] if str(e) else e}\n")
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":  # run the registered module's main, not this __main__ copy's class
    from llmmem.lm_eval_plugin import main as _main

    sys.exit(_main())
