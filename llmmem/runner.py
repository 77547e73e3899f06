"""Running cells: one ``run_cell()`` for every command (``eval``, ``sweep``, ``prune``, ``quantize``,
``unlearn``).

A :class:`Session` holds one loaded model and what the cells evaluated on it share: the dense weights
(kept on the CPU and copied back in place), the weights after a shared chain prefix (e.g. an unlearned
model that several quantization cells start from), calibration samples (``self`` calibration is sampled
from the dense model), and the backends. ``run_cell`` restores the longest prefix it holds, applies the
rest of the chain, evaluates, and writes the cell (``results.json`` last, atomically); an error after the
model loaded removes the unfinished cell directory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from llmmem.cells import Cell
from llmmem.config import ConfigError, ModelSpec
from llmmem.interventions import Context, chain_key
from llmmem.results import CellDir

log = logging.getLogger(__name__)

PROMPT_KEYS = ("prompt", "prefix", "response")


class Session:
    """One loaded model and everything the cells evaluated on it share."""

    def __init__(self, model_spec: ModelSpec, *, batch_size: int = 8, quiet: bool = True,
                 include_path: str | None = None, need_tokenizer: bool = True, keep_dense: bool = True):
        import torch

        from llmmem.models import load_model, resolve_device

        t0 = time.time()
        self.spec = model_spec
        self.lm = load_model(model_spec, need_tokenizer=need_tokenizer)
        self.device = resolve_device(model_spec.device)
        self.batch_size = batch_size
        self.quiet = quiet
        self.include_path = include_path
        # the dense weights stay on the CPU (the model may be on an accelerator); a one-cell run keeps none
        self.snapshots: dict[str, dict] = {"": self._state()} if keep_dense else {}
        self.current = ""  # chain key of what the model's weights hold now
        self.keep: set[str] = set()  # chain prefixes to keep in memory for later cells
        self.reports: dict[str, dict] = {}  # the report of each kept prefix's last step
        self.artifacts: dict = {}  # what the last applied chain left for saving (see Context.artifacts)
        self.calibrations: dict = {}
        self.backends: dict = {}
        self.ref_backends: dict = {}
        self.load_seconds = round(time.time() - t0, 3)
        self._torch = torch

    # ------------------------------------------------------------------ weights
    def _state(self) -> dict:
        return {n: t.detach().to("cpu", copy=True) for n, t in self.lm.model.state_dict().items()}

    def _load_state(self, snap: dict) -> None:
        with self._torch.no_grad():
            state = self.lm.model.state_dict()
            for n, t in snap.items():
                state[n].copy_(t)

    def restore(self, chain) -> int:
        """Put the weights of the longest kept prefix of ``chain`` into the model; return its length."""
        for k in range(len(chain), -1, -1):
            key = chain_key(chain[:k])
            if key == self.current:
                return k
            if key in self.snapshots:
                self._load_state(self.snapshots[key])
                self.current = key
                return k
        raise RuntimeError("this session keeps no dense weights (keep_dense=False): it runs one cell")

    def forget_unneeded(self, still_needed: set[str]) -> None:
        for key in [k for k in self.snapshots if k and k not in still_needed]:
            del self.snapshots[key]
            self.reports.pop(key, None)

    # ------------------------------------------------------------------ calibration (from the dense model)
    def calibration(self, source: str, nsamples: int | None, seqlen: int | None, seed: int):
        key = (source, nsamples, seqlen, seed)
        if key not in self.calibrations:
            from llmmem.pruning.calibration import load_calibration

            swapped = None
            if source == "self" and self.current != "":
                if "" not in self.snapshots:
                    raise RuntimeError("self calibration after a chain step needs the dense weights (keep_dense)")
                swapped = self._state()  # sample from the dense model, then put these weights back
                self._load_state(self.snapshots[""])
            try:
                self.calibrations[key] = load_calibration(source, self.lm.model, self.lm.tokenizer, nsamples, seqlen,
                                                          seed, batch_size=self.batch_size, quiet=self.quiet)
            finally:
                if swapped is not None:
                    self._load_state(swapped)
        return self.calibrations[key]

    # ------------------------------------------------------------------ backends
    def backend(self, name: str):
        if name not in self.backends:
            from llmmem.backends import make_backend

            self.backends[name] = make_backend(name, self.lm, batch_size=self.batch_size, quiet=self.quiet)
            self.backends[name].weights_key = ""  # what the backend's own copy holds (engines that keep one)
        return self.backends[name]

    def reference_backend(self, model: str):
        if model not in self.ref_backends:
            from llmmem.backends import make_backend
            from llmmem.config import model_spec_from_args
            from llmmem.models import load_model

            spec = model_spec_from_args(model, {k: v for k, v in self.spec.__dict__.items()
                                                if k in ("dtype", "device", "max_length")})
            self.ref_backends[model] = make_backend("hf", load_model(spec), batch_size=self.batch_size, quiet=True)
        return self.ref_backends[model]

    def close(self) -> None:
        for b in self.backends.values():
            close = getattr(b, "close", None)
            if close:
                close()
        self.backends.clear()
        self.snapshots.clear()


def _step_seed(seed: int, i: int) -> int:
    """The RNG seed before step i of a chain: the same whether the prefix was computed now or restored."""
    return (seed * 1000003 + i * 7919) % (2**31)


def apply_chain(session: Session, cell: Cell, *, hooks_for=None) -> tuple[list[dict], list[str], dict]:
    """Bring the model to ``cell``'s weights: restore the longest kept prefix, apply the remaining steps
    (snapshotting prefixes other cells will need). Returns the reports of the applied steps (restored steps
    report ``{"restored": true}`` plus their recorded report), warnings, and timings."""
    torch = session._torch
    t0 = time.time()
    if session.current == "":  # sample every "self" calibration of the chain from the dense weights, now
        for step in cell.chain:
            for src, n, t in step.intervention.calibration_needs(step.spec):
                if src == "self":
                    session.calibration(src, n, t, cell.seed)
    k = session.restore(cell.chain)
    restore_seconds = time.time() - t0
    reports: list[dict] = []
    warnings: list[str] = []
    session.artifacts = {}
    for i, step in enumerate(cell.chain):
        if i < k:
            reports.append(session.reports.get(chain_key(cell.chain[:i + 1]), {"restored": True}))
            continue
        torch.manual_seed(_step_seed(cell.seed, i))
        ctx = Context(tokenizer=session.lm.tokenizer, device=session.device, batch_size=session.batch_size,
                      offload=session.spec.offload, seed=cell.seed, quiet=session.quiet,
                      include_path=session.include_path,
                      calibration=lambda src, n, t: session.calibration(src, n, t, cell.seed),
                      hooks=(hooks_for(i, step) if hooks_for else {}) or {})
        report = step.intervention.apply(session.lm.model, step.spec, ctx)
        warnings += ctx.warnings
        session.artifacts.update(ctx.artifacts)
        reports.append(report)
        key = chain_key(cell.chain[: i + 1])
        session.current = key
        if key in session.keep and key not in session.snapshots:
            session.snapshots[key] = session._state()
            session.reports[key] = report
    return reports, warnings, {"restore_seconds": round(restore_seconds, 4),
                               "intervention_seconds": round(time.time() - t0 - restore_seconds, 3)}


def _tracking_hooks(session: Session, cell: Cell, celldir: CellDir | None, holder: dict):
    """The unlearn step's per-example tracker, when the cell's LAST step is an unlearning run being written."""

    def hooks_for(i: int, step):
        if step.kind != "unlearn" or i != len(cell.chain) - 1 or celldir is None:
            return {}
        from llmmem.evaluation import resolve_tasks
        from llmmem.interventions.unlearn import load_sets
        from llmmem.tracking import Tracker

        spec = step.spec
        forget, retain, nonmember = load_sets(spec, session.include_path)
        utility = resolve_tasks(spec.utility_tasks, session.include_path) if spec.utility_tasks else []
        tracker = Tracker(session.backend("hf"), spec, forget, retain, nonmember, utility, cell.seed,
                          curves_path=celldir.path / "curves.jsonl", include_path=session.include_path)
        holder["tracker"] = tracker
        return {"unlearn_eval": tracker}

    return hooks_for


def run_cell(session: Session, cell: Cell, *, run_dir: Path | str | None = None, save_to: Path | str | None = None,
             overwrite: bool = False, log_samples: bool = False, save_format: str = "fake",
             tasks: list | None = None, cache_dir: str | None = None) -> dict:
    """Apply ``cell``'s chain to the session's model, evaluate its tasks and write the cell directory (when
    ``run_dir`` is given) and/or save the changed model as a checkpoint (``save_to``). Returns the payload."""
    from llmmem.evaluation import evaluate, resolve_tasks

    tc = time.time()
    celldir = CellDir(run_dir, cell.name()).prepare(overwrite=overwrite) if run_dir is not None else None
    try:
        holder: dict = {}
        reports, warnings, timings = apply_chain(session, cell, hooks_for=_tracking_hooks(session, cell, celldir, holder))
        if tasks is None:
            tasks = resolve_tasks(cell.eval.tasks, session.include_path) if cell.eval.tasks else []
        results = []
        if tasks and celldir is not None:
            backend = session.backend(cell.eval.backend)
            engine_update = None
            if hasattr(backend, "update_weights") and backend.weights_key != session.current:
                from llmmem.models import prunable_parameter_names

                engine_update = backend.update_weights(session.lm.model, prunable_parameter_names(session.lm.model))
                backend.weights_key = session.current
            if engine_update:
                timings["engine_update"] = engine_update
            eval_backend = backend
            if cache_dir:
                from llmmem.backends.cache import CachingBackend, cache_model_key

                eval_backend = CachingBackend(backend, cache_dir, cache_model_key(session.lm.fingerprint,
                                                                                  cell.weights_key()))
            ref = session.reference_backend(cell.eval.mia_reference) if cell.eval.mia_reference else None
            session._torch.manual_seed(cell.seed)
            results = evaluate(eval_backend, tasks, eval_spec=cell.eval, seed=cell.seed, ref_backend=ref)
        survival = None
        if cell.eval.track and celldir is not None:
            from llmmem.tracking import survival_metrics, survival_rows

            ts = time.time()
            survival = survival_rows(session.backend("hf"), cell.eval.track, session.include_path, cell.seed)
            timings["track_seconds"] = round(time.time() - ts, 3)
        payload = cell_payload(session, cell, reports, warnings, results, timings, log_samples=log_samples)
        if survival is not None:
            from llmmem.tracking import survival_metrics

            payload["metrics"].update(survival_metrics(survival))
            celldir.write_samples("", survival, filename="survival.jsonl")
        tracker = holder.get("tracker")
        if tracker is not None:
            extra, n, section = tracker.summary(reports[-1], cell.seed)
            payload["metrics"].update(extra)
            payload["n_samples"].update(n)
            payload["unlearning"] = {**reports[-1], **section}
            spec = cell.chain[-1].spec
            if spec.reference_model:
                from llmmem.tracking import compare_with_reference

                payload["unlearning"]["reference"] = compare_with_reference(
                    tracker.backend, session.reference_backend(spec.reference_model), tracker)
        payload["timings"]["cell_seconds"] = round(time.time() - tc, 3)
        if save_to is not None:
            save_checkpoint(session, cell, reports, save_to, save_format)
        if celldir is not None:
            lm_eval = write_samples(celldir, results, tasks, cell, payload, log_samples)
            celldir.finish(payload, lm_eval)
            payload["_path"] = str(celldir.path)
        payload["_results"] = results
        return payload
    except BaseException:
        if celldir is not None:
            celldir.discard()
        raise


def write_samples(celldir: CellDir, results: list, tasks: list, cell: Cell, payload: dict, log_samples: bool) -> dict:
    """Per-doc rows (``samples_<task>.jsonl``: ids and per-sample metrics, prompts with --log_samples) and,
    with --log_samples, lm-eval's ``samples_<task>_<date>.jsonl``; returns lm-eval's results keys."""
    from llmmem.evaluation import limit_count
    from llmmem.lmeval_format import date_id, metric_names, sample_records, samples_filename, to_lm_eval
    from llmmem.lmeval_format import write_samples as write_lm_eval_samples
    from llmmem.tasks import Task

    by_name = {t.name: t for t in tasks}
    records = {}
    for r in results:
        rows = r.rows if log_samples else [{k: v for k, v in row.items() if k not in PROMPT_KEYS or k == "response"}
                                           for row in r.rows]
        celldir.write_samples(r.task, rows)
        task = by_name.get(r.task)
        if isinstance(task, Task):
            docs = task.docs(limit=limit_count(task, cell.eval.limit_for(task.name)))
            payload["tasks"][r.task]["n_original"] = len(task.docs())  # before --limit (lm-eval's n-samples)
            records[r.task] = sample_records(r.rows, suite=r.suite, metrics=metric_names(r.metrics), task=task,
                                             docs=docs)
            if log_samples:
                write_lm_eval_samples(celldir.path / samples_filename(r.task, date_id(celldir.started)), records[r.task])
    return to_lm_eval(payload, tasks={k: v for k, v in by_name.items() if isinstance(v, Task)}, samples=records,
                      date=celldir.started)


def cell_payload(session: Session, cell: Cell, reports: list[dict], warnings: list[str], results: list,
                 timings: dict, *, log_samples: bool) -> dict:
    """The ``results.json`` document of a cell (before the writer adds schema version and versions)."""
    lm = session.lm
    interventions = [{"kind": s.kind, "label": s.label(), "report": r} for s, r in zip(cell.chain, reports)]
    payload = {
        "cell_config": cell.config(),
        "cell": {"name": cell.name(), **cell.describe()},
        "model": {"name": lm.name, "source": lm.source.path, "fingerprint": lm.fingerprint},
        "interventions": interventions,
        "metrics": {r.task: r.metrics for r in results},
        "n_samples": {r.task: r.n_samples for r in results},
        "tasks": {r.task: {"version": r.version, "hash": r.hash, "num_fewshot": r.num_fewshot, "seconds": r.seconds,
                           "suite": r.suite, "primary_metric": r.primary_metric, "chance": r.chance,
                           "conventions": r.conventions, "n_truncated": r.n_truncated}
                  for r in results},
        "seeds": {"seed": cell.seed},
        "run": {"batch_size": session.batch_size, "device": str(session.device), "log_samples": log_samples,
                "backend": cell.eval.backend},
        "warnings": warnings + [f"{r.task}: {r.n_truncated} request(s) did not fit the model's context "
                                f"(prompts left-cut, or long texts scored in windows)"
                                for r in results if r.n_truncated],
        "timings": dict(timings, load_seconds=session.load_seconds,
                        eval_seconds=round(sum(r.seconds for r in results), 3)),
    }
    for step, report in zip(cell.chain, reports):
        payload[step.intervention.section] = report  # the last step of each kind, by its section name
    return payload


def save_checkpoint(session: Session, cell: Cell, reports: list[dict], output, fmt: str = "fake") -> Path:
    """Save the model as it is now (after the chain) as a normal checkpoint, with the chain's reports beside it
    (``pruning.json`` / ``quantization.json`` / ``unlearning.json`` for the last step of each kind and
    ``llmmem_cell.json`` for the whole chain)."""
    from llmmem.checkpoint import save_model

    sidecars = {"llmmem_cell.json": {"config": cell.config(), "cell": cell.describe(),
                                     "dense": {"name": session.lm.name, "source": session.lm.source.path,
                                               "fingerprint": session.lm.fingerprint},
                                     "interventions": [{"kind": s.kind, "label": s.label(), "report": r}
                                                       for s, r in zip(cell.chain, reports)]}}
    for step, report in zip(cell.chain, reports):
        sidecars[f"{step.intervention.section}.json"] = {"spec": step.intervention.canonical(step.spec), **report}
    if fmt != "fake":
        from llmmem.quantization.io import save_quantized

        quant = [s for s in cell.chain if s.kind == "quantize"]
        report = session.artifacts.get("quantization_report")
        if cell.chain[-1].kind != "quantize" or report is None:
            raise ConfigError(f"--format {fmt} needs the chain to end with a quantization step")
        return save_quantized(session.lm, quant[-1].spec, report, output, format=fmt, sidecars=sidecars)
    return save_model(session.lm, output, sidecars)
