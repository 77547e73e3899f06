"""Sweeps: a config -> a grid of cells (models x intervention chains x seeds, on tasks) -> run, resumable.

Plan first (printed, with which cells are already done), then run. Every check that needs no model runs
before the first model loads: models resolvable (a preset that builds locally, like the testbed, is built
first, saying so), tasks and their data, every intervention spec, the backend, the run directory. A cell is
finished only when its ``results.json`` exists (written last, atomically), so a killed sweep is resumed by
running it again. A lock file keeps a second sweep out of the run directory.

Chains come from the ``interventions:`` key (a list of stages; see ``llmmem/interventions``), or, for the
pruning grid, from the flat keys ``methods`` x ``structures`` x ``sparsities`` x ``profiles``. Per model the
cells run in an order where a chain's prefix comes before the chains that extend it, and the weights after a
shared prefix (the dense model, an unlearned model) are kept in memory and restored, never recomputed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmmem.cells import Cell, EvalSpec
from llmmem.config import (
    ConfigError,
    ModelSpec,
    check_keys,
    check_output_path,
    load_config_doc,
    model_spec_from_args,
    parse_batch_size,
    parse_bool,
    parse_int,
    parse_positive_int,
)
from llmmem.interventions import PrepareEnv, expand_stages, with_prefixes
from llmmem.results import CellDir, check_run_record, pid_alive, read_cell

log = logging.getLogger(__name__)

LOCK_FILE = ".llmmem.lock"
PRUNE_GRID_KEYS = ("methods", "structures", "sparsities", "profiles", "calibration", "nsamples", "seqlen")
EVAL_KEYS = ("tasks", "limit", "num_fewshot", "backend", "apply_chat_template", "fewshot_as_multiturn",
             "system_instruction", "gen_kwargs", "mia_reference", "predict_only", "track")
EXECUTOR_KEYS = ("executor", "workers", "slurm")  # where cells run (llmmem/executors.py); not in any cell's identity
SWEEP_KEYS = {"models", "model_args", "interventions", "seeds", "batch_size", "output_path", "include_path",
              "description", "log_samples", "use_cache", "max_batch_size", *PRUNE_GRID_KEYS, *EVAL_KEYS,
              *EXECUTOR_KEYS}


@dataclass
class ModelEntry:
    spec: ModelSpec
    include_path: str | None = None
    chains: list | None = None  # this model's own chains (else the sweep's)


@dataclass
class SweepSpec:
    """A validated sweep: models x chains x seeds, each evaluated with one EvalSpec."""

    models: list[ModelEntry]
    chains: list
    eval: EvalSpec
    seeds: list[int]
    batch_size: int | str = 8  # or "auto" / "auto:N" (llmmem.autobatch)
    max_batch_size: int | None = None
    output_path: str = "results/sweep"
    include_path: str | None = None
    description: str = ""
    log_samples: bool = False
    use_cache: str | None = None
    warnings: list = field(default_factory=list)
    doc: dict = field(default_factory=dict)
    executor: object = None  # llmmem.executors.ExecutorSpec

    def chains_for(self, entry: ModelEntry) -> list:
        return self.chains if entry.chains is None else entry.chains


def _models(doc: dict) -> list[ModelEntry]:
    models = doc.get("models")
    if not isinstance(models, list):
        models = [models]
    if not models or models == [None]:
        raise ConfigError("sweep: 'models' is empty")
    out = []
    for m in models:
        if isinstance(m, dict):
            check_keys("sweep: a models entry", m, {"name", "model_args"})
            if "name" not in m:
                raise ConfigError(f"sweep: a models entry needs 'name': {m}")
            out.append(ModelEntry(model_spec_from_args(str(m["name"]), m.get("model_args", doc.get("model_args")))))
        elif isinstance(m, str) and m.strip():
            out.append(ModelEntry(model_spec_from_args(m, doc.get("model_args"))))
        else:
            raise ConfigError(f"sweep: models entry {m!r} is not a model name or path")
    names = [e.spec.display_name for e in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup and len({json.dumps(e.spec.identity(), sort_keys=True) for e in out}) < len(out):
        raise ConfigError(f"sweep: model {dup[0]!r} is listed twice")
    return out


def _stages(doc: dict) -> list:
    """The ``interventions`` stages, or the one pruning stage of the flat keys."""
    flat = {k: doc[k] for k in PRUNE_GRID_KEYS if k in doc}
    if "interventions" in doc:
        if flat:
            raise ConfigError(f"sweep: {', '.join(sorted(flat))} cannot be combined with 'interventions'; put them "
                              f"inside the prune stage (e.g. interventions: [{{prune: {{method: [wanda], sparsity: "
                              f"[0.5]}}}}])")
        stages = doc["interventions"]
        if stages is None:
            return []
        return stages
    methods = flat.get("methods", ["magnitude", "wanda"])
    methods = methods if isinstance(methods, list) else [methods]
    if not methods:
        return []
    stage = {"method": methods}
    for key, field_ in (("structures", "structure"), ("sparsities", "sparsity"), ("profiles", "profile")):
        if key in flat:
            v = flat[key]
            stage[field_] = v if isinstance(v, list) else [v]
    stage.setdefault("sparsity", [0.5])
    for key in ("calibration", "nsamples", "seqlen"):
        if flat.get(key) is not None:
            stage[key] = flat[key]
    if not stage["sparsity"] and not any("unstructured" != str(s) for s in stage.get("structure", ["unstructured"])):
        raise ConfigError("sweep: the grid is empty: no pruning cell (sparsities is empty)")
    return [{"prune": stage}]


def parse_sweep(doc: dict) -> SweepSpec:
    """Validate a sweep config mapping (from YAML + overrides + flags) into a SweepSpec. Torch-free."""
    if "models" not in doc:
        raise ConfigError("sweep: missing required key 'models'")
    if "tasks" not in doc:
        raise ConfigError("sweep: missing required key 'tasks'")
    models = _models(doc)
    chains, warnings = expand_stages(_stages(doc), "interventions" if "interventions" in doc else "sweep")
    ev = EvalSpec(**{k: doc[k] for k in EVAL_KEYS if k in doc})
    if not ev.tasks:
        raise ConfigError("sweep: 'tasks' is empty")
    seeds = doc.get("seeds", [0])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if not seeds:
        raise ConfigError("sweep: 'seeds' is empty; give at least one seed, e.g. seeds: [0]")
    seeds = [parse_int("sweep: seed", s, minimum=0) for s in seeds]
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"sweep: seeds {seeds} lists a seed twice")
    from llmmem.backends import BACKENDS
    from llmmem.executors import parse_executor

    BACKENDS.check(ev.backend)
    executor = parse_executor(doc)
    use_cache = doc.get("use_cache")
    if use_cache:
        check_output_path("use_cache", str(use_cache))
    return SweepSpec(models=models, chains=chains, eval=ev, seeds=seeds,
                     batch_size=parse_batch_size(doc.get("batch_size", 8)),
                     max_batch_size=(parse_positive_int("max_batch_size", doc["max_batch_size"])
                                     if doc.get("max_batch_size") is not None else None),
                     output_path=str(doc.get("output_path") or "results/sweep"),
                     include_path=doc.get("include_path"), description=str(doc.get("description") or ""),
                     log_samples=parse_bool("log_samples", doc.get("log_samples", False)),
                     use_cache=str(use_cache) if use_cache else None,
                     warnings=list(dict.fromkeys(warnings)), doc=doc, executor=executor)


def load_sweep_spec(path: str | None, overrides: list[str] | None = None, **cli) -> SweepSpec:
    """YAML file + ``key=value`` overrides (YAML-parsed values) + explicit CLI flags, validated."""
    return parse_sweep(load_config_doc(path, "sweep", SWEEP_KEYS, ("models", "tasks"), overrides, cli))


# ----------------------------------------------------------------------------- plan
@dataclass
class PlannedCell:
    cell: Cell
    entry: ModelEntry
    done: bool = False
    redo_reason: str = ""
    failed: str = ""  # this command: the error line of a cell that raised (recorded in <run>/.failed/)
    left: bool = False  # this command: held by another worker (of another command), left to it

    @property
    def model_display(self) -> str:
        return self.cell.model.display_name

    @property
    def label(self) -> str:
        return self.cell.label()

    @property
    def seed(self) -> int:
        return self.cell.seed


def prepare(spec: SweepSpec, build: bool = True) -> dict:
    """Everything that can be checked before a model loads, then (``build``) the presets that are built locally
    and not built yet (the testbed: checked against its tasks before it is built). Returns {model display
    name: tasks}."""
    from llmmem.backends import check_backend
    from llmmem.evaluation import check_tasks, resolve_tasks
    from llmmem.sources import check_model, ensure_model, needs_build
    from llmmem.tasks import with_model_tasks

    check_output_path("output_path", spec.output_path)
    tasks_by_model = {}
    for entry in spec.models:
        name = entry.spec.name
        if not Path(name).expanduser().exists():
            check_model(entry.spec)  # unknown preset / hub id while offline -> ConfigError
        entry.include_path = with_model_tasks(spec.include_path, [name])
        tasks = resolve_tasks(spec.eval.tasks, entry.include_path)
        check_tasks(tasks, spec.eval.limit_for, spec.eval.num_fewshot)
        tasks_by_model[entry.spec.display_name] = tasks
        env = PrepareEnv(include_path=entry.include_path, model=name)
        if spec.eval.track:
            from llmmem.tracking import prepare_track

            prepare_track(spec.eval.track, entry.include_path)
        for chain in spec.chains_for(entry):
            for step in chain:
                step.intervention.prepare(step.spec, env)
    check_backend(spec.eval.backend)
    for entry in spec.models:
        if build and needs_build(entry.spec):
            ensure_model(entry.spec)  # builds it, saying so; then its own tasks directory replaces the preview
            entry.include_path = with_model_tasks(spec.include_path, [entry.spec.name])
            tasks_by_model[entry.spec.display_name] = resolve_tasks(spec.eval.tasks, entry.include_path)
    if spec.eval.apply_chat_template:
        from llmmem.chat import check_model_template

        for entry in spec.models:  # the tokenizer only: a model without the template fails before any loads
            check_model_template(entry.spec, spec.eval.apply_chat_template)
    return tasks_by_model


def plan(spec: SweepSpec, run_dir: Path) -> list[PlannedCell]:
    cells = []
    for entry in spec.models:
        for seed in spec.seeds:
            for chain in with_prefixes(spec.chains_for(entry)):
                cell = Cell(entry.spec, chain, spec.eval, seed)
                pc = PlannedCell(cell, entry)
                path = run_dir / cell.name() / "results.json"
                pc.done = read_cell(path, strict=False) is not None
                if path.exists() and not pc.done:
                    pc.redo_reason = "its results.json does not read (corrupt or another schema): redone"
                cells.append(pc)
    return cells


def format_plan(cells: list[PlannedCell], warnings: list[str] | None = None) -> str:
    lines = [f"plan: {len(cells)} cells, {sum(c.done for c in cells)} already done"]
    for i, c in enumerate(cells, 1):
        note = f"  ({c.redo_reason})" if c.redo_reason else ""
        lines.append(f"  [{i:>3}] {'done' if c.done else 'todo'}  {c.model_display:<20} seed {c.seed}  {c.label}{note}")
    for w in warnings or []:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


def check_old_layout(run_dir: Path) -> None:
    """A run directory written before cells were chains is refused with a clear message."""
    for path in Path(run_dir).glob("*/*/results.json"):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        from llmmem.results import SCHEMA_VERSION

        if isinstance(doc, dict) and doc.get("schema_version") not in (None, SCHEMA_VERSION):
            raise ConfigError(f"{run_dir} holds cells written by llmmem results schema {doc.get('schema_version')} "
                              f"(e.g. {path.parent.relative_to(run_dir)}), before cells were intervention chains; "
                              f"write this sweep into a new output_path")


# ----------------------------------------------------------------------------- lock
class RunLock:
    """``<run>/.llmmem.lock`` holding pid, host and start time; stale locks (dead pid, same host) are taken over."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "argv": sys.argv}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    other = {}
                pid, host = other.get("pid"), other.get("host")
                if host == me["host"] and isinstance(pid, int) and not pid_alive(pid):
                    log.warning("taking over a stale lock of pid %s (no longer running)", pid)
                    self.path.unlink(missing_ok=True)
                    continue
                raise ConfigError(
                    f"run directory {self.path.parent} is locked by pid {pid} on {host} since "
                    f"{other.get('started', '?')}; wait for it, or delete {self.path} if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise ConfigError(f"cannot lock {self.path}")

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# ----------------------------------------------------------------------------- run
def run_sweep(spec: SweepSpec, run_dir: Path | None = None, *, overwrite: bool = False, quiet: bool = False,
              dry_run: bool = False, print_fn=print, threads: int | None = None) -> list[PlannedCell]:
    """Plan, print the plan, then run the cells that are not done with the spec's executor
    (``llmmem/executors.py``) under the run lock. Cells that fail are recorded and marked (``failed``),
    the others still run."""
    from llmmem.executors import ExecutorSpec, annotate_plan, check_environment, execute, plan_record

    run_dir = Path(run_dir or spec.output_path)
    executor = spec.executor or ExecutorSpec()  # a spec built in code (e.g. durability): in this process
    if not dry_run:
        check_environment(executor)  # e.g. submitit and sbatch for executor slurm, before anything runs
    prepare(spec, build=not dry_run)
    check_old_layout(run_dir)
    evals = {e.spec.display_name: {**spec.eval.canonical(), "model": e.spec.identity()} for e in spec.models}
    check_run_record(run_dir, evals, write=False)
    cells = plan(spec, run_dir)
    if overwrite:
        for c in cells:
            c.done = False
    annotate_plan(cells, run_dir)
    print_fn(format_plan(cells, spec.warnings))
    if dry_run:
        from llmmem.sources import needs_build

        for e in spec.models:
            if needs_build(e.spec):
                print_fn(f"  note: preset {e.spec.name} is not built yet; a run builds it first")
        return cells
    with RunLock(run_dir):
        check_run_record(run_dir, evals, write=True)
        from llmmem.results import atomic_write_json

        atomic_write_json(run_dir / "sweep.json", {"config": spec.doc, "warnings": spec.warnings,
                                                    "cells": plan_record(cells)})
        outcome = execute(spec, run_dir, cells, executor, overwrite=overwrite, quiet=quiet, threads=threads,
                          print_fn=print_fn)
    for c in cells:
        name = c.cell.name()
        if name in outcome.done:
            c.done = True
        elif name in outcome.failed:
            c.failed = outcome.failed[name]
        elif name in outcome.left:
            c.left = True
    for m in outcome.messages:
        print_fn(m)
    if outcome.submitted:  # a Slurm array not waited for: the cells not done are its to compute
        for c in cells:
            c.left = c.left or not c.done
    return cells


def cell_dir(run_dir: Path, cell: Cell) -> CellDir:
    return CellDir(run_dir, cell.name())
