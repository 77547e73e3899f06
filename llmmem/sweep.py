"""Expand a SweepSpec into cells and run them: each model loaded once, dense weights restored in memory.

Plan first (printed, with which cells are already done), then run. A cell is finished only when its
``results.json`` exists (written last, atomically), so a killed sweep is resumed by running it again:
finished cells are skipped, the interrupted one is redone. A lock file in the run directory keeps a
second sweep out.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llmmem.config import ConfigError, ModelSpec, PruneSpec, SweepSpec, model_display_name, model_spec_from_args
from llmmem.results import Cell, cell_name

log = logging.getLogger(__name__)

LOCK_FILE = ".llmmem.lock"


@dataclass
class CellPlan:
    model: str  # as given in the config
    model_display: str
    seed: int
    prune: PruneSpec | None  # None: the dense baseline
    config: dict
    name: str
    done: bool = False

    @property
    def method(self) -> str:
        return self.prune.method if self.prune else "dense"

    @property
    def label(self) -> str:
        if self.prune is None:
            return "dense"
        p = self.prune
        prof = "" if p.profile == "uniform" else f"-{p.profile}"
        return f"{p.method}-{p.structure}-s{p.sparsity:g}{prof}"


def _model_entries(spec: SweepSpec) -> list[tuple[str, str | dict]]:
    out = []
    for m in spec.models:
        if isinstance(m, dict):
            if "name" not in m:
                raise ConfigError(f"sweep: a model entry needs 'name': {m}")
            out.append((str(m["name"]), m.get("model_args", spec.model_args)))
        else:
            out.append((str(m), spec.model_args))
    return out


def plan(spec: SweepSpec, run_dir: Path) -> list[CellPlan]:
    prunes = spec.prune_specs()
    if spec.methods and not prunes:
        raise ConfigError("sweep: the grid is empty: no pruning cell (check sparsities and structures)")
    cells = []
    for model, margs in _model_entries(spec):
        mspec = model_spec_from_args(model, margs)
        for seed in spec.seeds:
            for p in [None, *prunes]:
                config = {
                    "model": model, "model_args": {k: v for k, v in mspec.__dict__.items() if k != "name"},
                    "backend": spec.backend, "seed": seed, "tasks": list(spec.tasks),
                    "limit": {t: spec.limit_for(t) for t in spec.tasks}, "num_fewshot": spec.num_fewshot,
                    "pruning": p.__dict__ if p else None,
                }
                disp = model_display_name(model)
                name = cell_name(disp, config, p.method if p else "dense", p.structure if p else "unstructured",
                                 p.sparsity if p else 0.0, None)
                if p is not None and p.profile != "uniform":
                    head, leaf = name.split("/")
                    parts = leaf.rsplit("-", 1)
                    name = f"{head}/{parts[0]}-{p.profile}-{parts[1]}"
                cells.append(CellPlan(model, disp, seed, p, config, name, (run_dir / name / "results.json").is_file()))
    return cells


def format_plan(cells: list[CellPlan]) -> str:
    lines = [f"plan: {len(cells)} cells, {sum(c.done for c in cells)} already done"]
    for i, c in enumerate(cells, 1):
        lines.append(f"  [{i:>3}] {'done' if c.done else 'todo'}  {c.model_display:<20} seed {c.seed}  {c.label}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
                if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
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
def _summary(results) -> str:
    parts = []
    for r in results:
        m = r.primary_metric
        if m and isinstance(r.metrics.get(m), float):
            parts.append(f"{r.task}.{m}={r.metrics[m]:.3f}")
    return " ".join(parts)


def check_sweep(spec: SweepSpec) -> list:
    """Everything that can be checked before a model loads: tasks, their data, models' sources."""
    from llmmem.evaluation import resolve_tasks
    from llmmem.models import resolve
    from llmmem.pruning.calibration import check_source
    from llmmem.tasks import with_model_tasks

    tasks = resolve_tasks(spec.tasks, with_model_tasks(spec.include_path, [m for m, _ in _model_entries(spec)]))
    for t in tasks:
        t.docs(limit=spec.limit_for(t.name))
    for model, margs in _model_entries(spec):
        mspec = model_spec_from_args(model, margs)
        if not Path(model).expanduser().exists():
            resolve(mspec)  # unknown preset / hub id while offline -> ConfigError (fetches a preset once)
    if any(p.needs_calibration for p in spec.prune_specs()):
        check_source(spec.calibration)
    from llmmem.backends import check_backend

    check_backend(spec.backend)
    return tasks


def run_sweep(spec: SweepSpec, run_dir: Path, *, overwrite: bool = False, quiet: bool = False,
              dry_run: bool = False, print_fn=print) -> list[CellPlan]:
    run_dir = Path(run_dir)
    tasks = check_sweep(spec)
    cells = plan(spec, run_dir)
    if overwrite:
        for c in cells:
            c.done = False
    print_fn(format_plan(cells))
    if dry_run:
        return cells
    with RunLock(run_dir):
        (run_dir / "sweep.json").write_text(json.dumps({"spec": spec.__dict__}, indent=1, default=str) + "\n")
        by_model: dict[tuple, list[CellPlan]] = {}
        for c in cells:
            by_model.setdefault((c.model, json.dumps(c.config["model_args"], sort_keys=True)), []).append(c)
        total, k = len(cells), 0
        for group in by_model.values():
            todo = [c for c in group if not c.done]
            k += len(group) - len(todo)
            if not todo:
                continue
            k = _run_model(spec, run_dir, todo, tasks, overwrite, quiet, print_fn, k, total)
    return cells


def _run_model(spec, run_dir, todo, tasks, overwrite, quiet, print_fn, k, total) -> int:
    import torch

    from llmmem.backends import make_backend
    from llmmem.evaluation import evaluate, write_cell
    from llmmem.models import load_model, resolve_device
    from llmmem.pruning import prune
    from llmmem.pruning.calibration import load_calibration

    t0 = time.time()
    mspec = ModelSpec(name=todo[0].model, **todo[0].config["model_args"])
    lm = load_model(mspec)
    device = resolve_device(mspec.device)
    # dense weights stay in memory (on the CPU when the model is on an accelerator) and are restored per cell
    snapshot = {n: t.detach().to("cpu", copy=True) for n, t in lm.model.state_dict().items()}
    load_seconds = round(time.time() - t0, 3)
    backend = make_backend(spec.backend, lm, batch_size=spec.batch_size, quiet=quiet)
    engine_dense = True  # an engine holding its own weights starts from the dense checkpoint
    prunable = None
    calibrations: dict = {}
    limits = {t.name: spec.limit_for(t.name) for t in tasks}
    for c in todo:
        k += 1
        tc = time.time()
        with torch.no_grad():
            state = lm.model.state_dict()
            for n, t in snapshot.items():
                state[n].copy_(t)
        restore_seconds = time.time() - tc
        torch.manual_seed(c.seed)
        cell = Cell(run_dir, c.name).prepare(overwrite=True)  # not done, or --overwrite: clear leftovers
        report, prune_seconds = None, 0.0
        if c.prune is not None:
            tp = time.time()
            calib = None
            if c.prune.needs_calibration:
                key = (c.seed, c.prune.calibration, c.prune.nsamples, c.prune.seqlen)
                if key not in calibrations:
                    # from the dense model (restored above), once per model and seed
                    calibrations[key] = load_calibration(c.prune.calibration, lm.model, lm.tokenizer, c.prune.nsamples,
                                                         c.prune.seqlen, c.seed, batch_size=spec.batch_size, quiet=quiet)
                calib = calibrations[key]
            report = prune(lm.model, c.prune, calib, device=device, batch_size=spec.batch_size,
                           offload=mspec.offload, quiet=quiet)
            prune_seconds = time.time() - tp
        engine_update = None
        # a backend holding its own copy of the weights (a vLLM engine) gets the cell's weights pushed
        if hasattr(backend, "update_weights") and (c.prune is not None or not engine_dense):
            from llmmem.models import prunable_parameter_names

            prunable = prunable or prunable_parameter_names(lm.model)
            engine_update = backend.update_weights(lm.model, prunable)
        engine_dense = c.prune is None
        results = evaluate(backend, tasks, limit=limits, num_fewshot=spec.num_fewshot, seed=c.seed)
        write_cell(cell, results, config=c.config,
                   model={"name": lm.name, "source": lm.source.path, "fingerprint": lm.fingerprint},
                   seeds={"seed": c.seed}, log_samples=False,
                   extra={"pruning": report.to_dict() if report else None,
                          "sweep": {"method": c.method, "sparsity": c.prune.sparsity if c.prune else 0.0,
                                    "structure": c.prune.structure if c.prune else "dense",
                                    "profile": c.prune.profile if c.prune else "uniform", "label": c.label}},
                   timings={"load_seconds": load_seconds, "restore_seconds": round(restore_seconds, 4),
                            "prune_seconds": round(prune_seconds, 3), "cell_seconds": round(time.time() - tc, 3),
                            **({"engine_update": engine_update} if engine_update else {})})
        c.done = True
        print_fn(f"[{k}/{total}] {c.model_display} {c.label} seed {c.seed}: {_summary(results)} "
                 f"({time.time() - tc:.1f}s)")
        sys.stdout.flush()
    del backend, lm, snapshot
    return k
