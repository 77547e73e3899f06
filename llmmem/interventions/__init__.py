"""Interventions: the changes a cell makes to a model's weights, applied in a chain.

A cell is a model plus a chain of interventions (``llmmem/cells.py``). Each intervention is a small class
registered in :data:`INTERVENTIONS` (lazy, torch-free entries): a typed spec validated before any model
loads (``parse``/``expand``/``prepare``), a canonical description that enters the cell's hash, a label
for names and reports, the numeric parameter plots put on the x-axis, and
``apply(model, spec, ctx) -> report`` that changes the model in memory and returns its results section.

An intervention never imports a suite, a backend or the evaluation code: whatever it needs from the
outside (calibration data, a tracking hook for unlearning) comes through :class:`Context`. A suite never
imports an intervention (``tests/test_layering.py`` holds both rules).

Chains in a sweep (``interventions:`` key) are a list of *stages*; each stage is one mapping
``{kind: {key: value or [values]}}`` (list values of the kind's grid keys expand into alternatives), or a
list of such mappings and ``none`` (the stage may be skipped). The chains are the product of the stages;
every prefix of a chain is a cell too (the dense model is the empty chain).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from llmmem.config import ConfigError, check_keys
from llmmem.errors import IncompatibleError
from llmmem.registry import Registry


class Intervention:
    """One kind of weight change. Subclasses set the class attributes and implement ``apply``."""

    kind: str = ""
    spec_class: type = object
    section: str = ""  # results.json section holding the report
    grid_keys: tuple = ()  # keys a sweep may give as a list of alternatives
    axis: str | None = None  # the spec field plots use as the x-axis (sparsity, bits, steps)
    axis_base: float = 0.0  # the axis value of the unchanged model (sparsity 0, 16 bits, 0 steps)
    aliases: dict = {}  # old or alternative key names -> spec field names

    # ------------------------------------------------------------ before any model loads (no torch)
    def keys(self) -> set:
        return {f.name for f in fields(self.spec_class)} | set(self.aliases)

    def parse(self, raw: dict, where: str = ""):
        """One spec from a mapping of scalar values; unknown keys and bad values raise ConfigError."""
        where = where or self.kind
        check_keys(where, raw, self.keys())
        kw = {self.aliases.get(k, k): v for k, v in raw.items()}
        try:
            return self.spec_class(**kw)
        except IncompatibleError as e:
            raise IncompatibleError(f"{where}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except TypeError as e:  # a missing required field
            raise ConfigError(f"{where}: {e}") from None

    def expand(self, raw: dict, where: str = "") -> tuple[list, list[str]]:
        """Every spec of a grid mapping (list values of grid keys are alternatives) and the warnings
        for combinations that cannot be built (dropped visibly, never silently)."""
        where = where or self.kind
        check_keys(where, raw, self.keys())
        axes = [(k, v) for k, v in raw.items() if self.aliases.get(k, k) in self.grid_keys and isinstance(v, list)]
        for k, v in axes:
            if not v:
                raise ConfigError(f"{where}: {k} is an empty list")
        fixed = {k: v for k, v in raw.items() if (k, v) not in axes}
        specs, warnings, seen = [], [], set()
        for combo in itertools.product(*[v for _, v in axes]):
            kw = dict(fixed, **{k: c for (k, _), c in zip(axes, combo)})
            try:
                spec = self.parse(kw, where)
            except IncompatibleError as e:  # a combination that cannot be built: dropped, visibly
                if not axes:
                    raise
                warnings.append(str(e))
                continue
            key = repr(self.canonical(spec))
            if key not in seen:
                seen.add(key)
                specs.append(spec)
        if not specs:
            raise IncompatibleError(warnings[0]) if warnings else ConfigError(f"{where}: no valid combination")
        return specs, warnings

    def prepare(self, spec, env: PrepareEnv) -> None:
        """Checks that need the file system (data files, calibration sources), before any model loads."""

    def calibration_needs(self, spec) -> list[tuple]:
        """(source, nsamples, seqlen) of the calibration samples ``apply`` will ask the context for."""
        return []

    def canonical(self, spec) -> dict:
        return spec.canonical()

    def label(self, spec) -> str:
        return spec.label()

    def axis_value(self, spec) -> float | None:
        return None if self.axis is None else getattr(spec, self.axis)

    def series(self, spec) -> str:
        """The label of this step without its axis value: cells of one series differ only on the axis."""
        return self.kind

    # ------------------------------------------------------------ in memory
    def apply(self, model, spec, ctx: Context) -> dict:
        raise NotImplementedError


@dataclass
class PrepareEnv:
    """What ``prepare`` may look at: the task search path (including tasks a model ships) and the model."""

    include_path: str | None = None
    model: str | None = None


@dataclass
class Context:
    """What an intervention gets from the runner besides the model."""

    tokenizer: Any = None
    device: Any = None
    batch_size: int = 8
    offload: bool = False
    seed: int = 0
    quiet: bool = True
    include_path: str | None = None
    # (source, nsamples, seqlen) -> Calibration; sampled from the DENSE model when the source is "self"
    calibration: Callable | None = None
    # named callbacks from the evaluation side, e.g. "unlearn_eval": fn(step, model) during unlearning
    hooks: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    # objects an intervention leaves for whoever saves the model (e.g. a quantization report's scales)
    artifacts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """One intervention of a chain: its kind and its (validated) spec."""

    kind: str
    spec: Any

    @property
    def intervention(self) -> Intervention:
        return get(self.kind)

    def canonical(self) -> dict:
        return {"kind": self.kind, **self.intervention.canonical(self.spec)}

    def label(self) -> str:
        return self.intervention.label(self.spec)

    def key(self) -> str:
        import json

        return json.dumps(self.canonical(), sort_keys=True, default=str)


INTERVENTIONS: Registry[type[Intervention]] = Registry("intervention")
INTERVENTIONS.register("prune", "llmmem.interventions.prune:Prune", "magnitude, Wanda, SparseGPT; unstructured or N:M; OWL")
INTERVENTIONS.register("quantize", "llmmem.interventions.quantize:Quantize", "weight-only RTN or GPTQ, 2-8 bits")
INTERVENTIONS.register("unlearn", "llmmem.interventions.unlearn:Unlearn", "GA, GradDiff, NPO, SimNPO, ... on a forget set")
INTERVENTIONS.register("relearn", "llmmem.interventions.unlearn:Relearn", "fine-tuning steps on a data set (relearning)")


_instances: dict = {}


def get(kind: str) -> Intervention:
    if kind not in _instances:
        _instances[kind] = INTERVENTIONS.get(kind)()
    return _instances[kind]


# ----------------------------------------------------------------------------- chains
Chain = tuple  # tuple[Step, ...]


def _stage_alternatives(stage, where: str) -> tuple[list, list[str]]:
    """A stage -> its alternatives (Step, or None = skip the stage) and warnings."""
    items = stage if isinstance(stage, list) else [stage]
    if not items:
        raise ConfigError(f"{where} is an empty list")
    out, warnings = [], []
    for i, item in enumerate(items):
        w = f"{where}[{i}]" if isinstance(stage, list) else where
        if item is None or (isinstance(item, str) and item.strip().lower() == "none"):
            out.append(None)
            continue
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(f"{w}: a stage is one mapping {{kind: {{...}}}} (kinds: {', '.join(INTERVENTIONS.names())}) "
                              f"or none; got {item!r}")
        ((kind, raw),) = item.items()
        INTERVENTIONS.check(str(kind))
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{w}.{kind} must be a mapping of its settings, got {raw!r}")
        specs, warns = get(kind).expand(raw, f"{w}.{kind}")
        out += [Step(kind, s) for s in specs]
        warnings += warns
    return out, warnings


def expand_stages(stages, where: str = "interventions") -> tuple[list[Chain], list[str]]:
    """Every chain of a list of stages (the product of their alternatives; None skips a stage), deduplicated,
    in order, and the warnings for dropped combinations."""
    if not isinstance(stages, list):
        raise ConfigError(f"{where} must be a list of stages, got {stages!r}")
    per_stage, warnings = [], []
    for i, stage in enumerate(stages):
        alts, w = _stage_alternatives(stage, f"{where}[{i}]" if where == "interventions" else where)
        per_stage.append(alts)
        warnings += w
    chains, seen = [], set()
    for combo in itertools.product(*per_stage):
        chain = tuple(s for s in combo if s is not None)
        key = chain_key(chain)
        if key not in seen:
            seen.add(key)
            chains.append(chain)
    return chains, warnings


def with_prefixes(chains: list[Chain]) -> list[Chain]:
    """Every chain and every prefix of it (the empty chain - the dense model - first), each once, a prefix
    always before the chains that extend it."""
    out, seen = [], set()
    for chain in [(), *chains]:
        for k in range(len(chain) + 1):
            pre = chain[:k]
            key = chain_key(pre)
            if key not in seen:
                seen.add(key)
                out.append(pre)
    return out


def chain_key(chain: Chain) -> str:
    return "|".join(s.key() for s in chain)


def chain_label(chain: Chain) -> str:
    return "+".join(s.label() for s in chain) or "dense"


def chain_canonical(chain: Chain) -> list[dict]:
    return [s.canonical() for s in chain]
