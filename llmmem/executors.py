"""Executors: where a sweep's cells run - in this process, in N local worker processes, or as a Slurm job
array through submitit - all writing into one shared run directory.

Every executor runs the same worker (:func:`run_worker`) over *units*: a unit is a chain's first-step
prefix cell (or the dense cell) and every cell of the same model and seed that extends it, in plan order
(a prefix before the chains that extend it), so the weights after a shared prefix (e.g. an unlearned
model) are computed once and restored in memory for the cells that extend it. A worker claims a unit
before computing it (``llmmem/claims.py``: an atomic claim file refreshed by a heartbeat thread), so two
workers - of this command or of another one, on this host or another - never compute the same cell. A cell
that raises is recorded as failed (``<run>/.failed/``) and the worker goes on with the next cell; cells
that extend a failed cell are recorded as not run. A failed cell is retried by the next command.

- ``local`` (default): one worker in this process (the sweep as it always ran).
- ``local`` with ``workers: N``: N worker processes on this node, each taking units as it goes; with GPUs
  visible each worker gets one (``CUDA_VISIBLE_DEVICES``, round-robin), otherwise the CPU threads are
  split between them (``--threads`` / ``$LLMMEM_THREADS`` per worker).
- ``slurm``: a submitit job array; each array task is one worker over a group of units of one model
  (``slurm.cells_per_task``), so it loads its model once. ``slurm.cluster: local`` runs the same array
  through submitit's LocalExecutor (subprocesses on this machine) to try a config before submitting.

The coordinator (the ``llmmem sweep`` command) holds ``<run>/.llmmem.lock`` while it checks and writes
``run.json`` (so a sweep with other evaluation settings is refused even under concurrency), writes
``sweep.json`` (the config and the plan) and runs local workers; a Slurm array's tasks run on other hosts
after the command returned, and rely on claims only.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

from llmmem.claims import (
    Claims,
    Identity,
    cell_key,
    claim_liveness,
    clear_failure,
    new_run_id,
    read_failures,
    record_failure,
)
from llmmem.config import ConfigError, check_keys, parse_bool, parse_float, parse_int

log = logging.getLogger(__name__)

EXECUTORS = ("local", "slurm")
CLUSTERS = ("slurm", "local", "debug")
EXECUTOR_DIR = ".executor"
SUBMISSIONS = "submissions.jsonl"
# the slurm mapping: submitit's parameters (passed through) and llmmem's own (cluster, cells_per_task, wait, folder)
SLURM_KEYS = {
    "partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos",
    "constraint": "slurm_constraint", "array_parallelism": "slurm_array_parallelism", "setup": "slurm_setup",
    "additional_parameters": "slurm_additional_parameters", "gpus_per_node": "gpus_per_node",
    "cpus_per_task": "cpus_per_task", "mem_gb": "mem_gb", "time_min": "timeout_min", "job_name": "name",
}
SLURM_OWN_KEYS = ("cluster", "cells_per_task", "wait", "folder")
DEFAULT_TIME_MIN = 240  # submitit's own default (5 minutes) would kill any real cell


@dataclass
class ExecutorSpec:
    """Where the cells run. Not part of any cell's identity: the same cell gives the same numbers anywhere."""

    kind: str = "local"
    workers: int | None = None  # local: None = in this process; N = N worker processes
    slurm: dict = field(default_factory=dict)

    @property
    def cluster(self) -> str:
        return self.slurm.get("cluster", "slurm")

    @property
    def wait(self) -> bool:
        return bool(self.slurm.get("wait", False))

    @property
    def cells_per_task(self) -> int:
        return int(self.slurm.get("cells_per_task", 1))


def _parse_slurm(raw) -> dict:
    if raw is None:
        return {}
    check_keys("slurm", raw, set(SLURM_KEYS) | set(SLURM_OWN_KEYS))
    out = {}
    for k, v in raw.items():
        if v is None:
            continue
        if k in ("partition", "account", "qos", "constraint", "job_name", "folder"):
            if not isinstance(v, (str, int)) or not str(v).strip():
                raise ConfigError(f"slurm.{k}={v!r} must be a non-empty string")
            out[k] = str(v).strip()
        elif k == "gpus_per_node":
            out[k] = parse_int(f"slurm.{k}", v, minimum=0)
        elif k in ("cpus_per_task", "array_parallelism", "cells_per_task", "time_min"):
            out[k] = parse_int(f"slurm.{k}", v, minimum=1)
        elif k == "mem_gb":
            out[k] = parse_float(f"slurm.{k}", v, low=0.0, low_open=True)
        elif k == "setup":
            lines = v if isinstance(v, list) else [v]
            if not all(isinstance(x, str) and x.strip() for x in lines):
                raise ConfigError(f"slurm.setup={v!r} must be a list of shell lines (e.g. [module load cuda])")
            out[k] = [str(x) for x in lines]
        elif k == "additional_parameters":
            if not isinstance(v, dict):
                raise ConfigError(f"slurm.additional_parameters={v!r} must be a mapping of sbatch options")
            out[k] = dict(v)
        elif k == "cluster":
            if v not in CLUSTERS:
                raise ConfigError(f"slurm.cluster={v!r} is not valid; choose from: {', '.join(CLUSTERS)} "
                                  f"(local: the same job array as subprocesses on this machine)")
            out[k] = v
        elif k == "wait":
            out[k] = parse_bool("slurm.wait", v)
    return out


def parse_executor(doc: dict) -> ExecutorSpec:
    """The ``executor``, ``workers`` and ``slurm`` keys of a sweep config (torch-free, nothing checked on
    the machine: see :func:`check_environment`)."""
    kind = doc.get("executor") or "local"
    if not isinstance(kind, str) or kind not in EXECUTORS:
        raise ConfigError(f"executor={kind!r} is not valid; choose from: {', '.join(EXECUTORS)}")
    workers = doc.get("workers")
    if workers is not None:
        workers = parse_int("workers", workers, minimum=1)
        if kind != "local":
            raise ConfigError(f"workers={workers} applies to executor local; with executor={kind} each array task "
                              f"is one worker (group size: slurm.cells_per_task)")
    return ExecutorSpec(kind=kind, workers=workers, slurm=_parse_slurm(doc.get("slurm")))


def check_environment(ex: ExecutorSpec) -> None:
    """What the executor needs on this machine, before anything runs: submitit, and Slurm's commands."""
    if ex.kind != "slurm":
        return
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ConfigError("executor=slurm needs submitit, which is not installed: pip install 'llmmem[slurm]' "
                          "(or pip install submitit)") from None
    if ex.cluster == "slurm" and (shutil.which("sbatch") is None or shutil.which("srun") is None):
        raise ConfigError("executor=slurm: Slurm's sbatch/srun are not on PATH here; run the command on a login "
                          "node, or set slurm.cluster=local to try the job array on this machine")


def visible_gpus() -> list[str]:
    """GPU ids a worker can be given: ``$CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``; [] without."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]


# ----------------------------------------------------------------------------- units and groups
@dataclass
class Unit:
    """A chain's first-step prefix cell and the cells that extend it (same model and seed), prefix first."""

    key: str  # claim key: the root cell's
    name: str  # the root cell's name
    cells: list = field(default_factory=list)  # Cell
    todo: set = field(default_factory=set)  # keys of the cells this command asks for

    def todo_cells(self) -> list:
        return [c for c in self.cells if cell_key(c) in self.todo]


@dataclass
class ModelWork:
    entry: object  # sweep.ModelEntry (its spec and include path)
    units: list  # [Unit]


def make_units(planned: list) -> list[ModelWork]:
    """Per model (in plan order), the units of the planned cells; ``todo`` holds the cells not done."""
    from llmmem.cells import Cell

    works: list[ModelWork] = []
    for pc in planned:
        if not works or works[-1].entry is not pc.entry:
            works.append(ModelWork(pc.entry, []))
        cell = pc.cell
        root = Cell(cell.model, tuple(cell.chain[:1]), cell.eval, cell.seed)
        key = cell_key(root)
        units = works[-1].units
        unit = next((u for u in units if u.key == key), None)
        if unit is None:
            unit = Unit(key, root.name())
            units.append(unit)
        unit.cells.append(cell)
        if not pc.done:
            unit.todo.add(cell_key(cell))
    for w in works:
        w.units = [u for u in w.units if u.todo]
    return [w for w in works if w.units]


def group_units(works: list[ModelWork], cells_per_task: int = 1) -> list[list[ModelWork]]:
    """Array tasks: each a group of whole units of ONE model (one model load per task), filled in plan order
    until it holds at least ``cells_per_task`` cells to compute."""
    groups = []
    for w in works:
        current: list = []
        n = 0
        for u in w.units:
            current.append(u)
            n += len(u.todo)
            if n >= cells_per_task:
                groups.append([ModelWork(w.entry, current)])
                current, n = [], 0
        if current:
            groups.append([ModelWork(w.entry, current)])
    return groups


# ----------------------------------------------------------------------------- the worker
@dataclass
class WorkerJob:
    """Everything a worker needs (picklable: sent to worker processes and Slurm tasks)."""

    run_dir: str
    run_id: str
    works: list  # [ModelWork]
    worker: str = "main"
    batch_size: object = 8  # N, "auto" or "auto:N" (resolved once per model by the Session)
    max_batch_size: int | None = None  # the cap of --batch_size auto
    log_samples: bool = False
    use_cache: str | None = None
    quiet: bool = True
    # --overwrite: results written before this time (the command's start) are redone; those written after it,
    # by this command's own workers, are kept (else every worker would redo what the others just finished)
    overwrite_before: float | None = None
    threads: int | None = None
    rotate: int = 0  # local workers start at different units (worker i of n at unit i*len/n)
    n_workers: int = 1
    progress: tuple | None = None  # (done before, total): "[k/total]" lines (the in-process worker)
    setup_torch: bool = True


def _summary_line(results) -> str:
    parts = []
    for r in results:
        m = r.primary_metric
        if m and isinstance(r.metrics.get(m), float):
            parts.append(f"{r.task}.{m}={r.metrics[m]:.3f}")
    return " ".join(parts)


def _needed_prefixes(cells: list) -> set[str]:
    from llmmem.interventions import chain_key

    need = set()
    for c in cells:
        for k in range(1, len(c.chain)):
            need.add(chain_key(c.chain[:k]))
    return need


def _is_done(run_dir: Path, cell, overwrite_before: float | None = None) -> bool:
    """A finished cell (and, under --overwrite, one finished by this command: at or after its start)."""
    from llmmem.results import read_cell

    path = run_dir / cell.name() / "results.json"
    if read_cell(path, strict=False) is None:
        return False
    try:
        return overwrite_before is None or path.stat().st_mtime >= overwrite_before
    except OSError:
        return False


INVALID_WEIGHTS = "\0invalid"  # a session's weights after a failed step: restore from a snapshot


def run_worker(job: WorkerJob, print_fn=None) -> dict:
    """Compute the job's units: claim each, run its cells in order (a failure is recorded, the rest go on),
    release. Returns {"done": [...], "failed": [...], "skipped": [...]} (cell names; skipped: held by others)."""
    print_fn = print_fn or (lambda line: print(line, flush=True))
    run_dir = Path(job.run_dir)
    if job.setup_torch:
        from llmmem.cli import setup_torch
        from llmmem.config import RunSettings

        threads = job.threads or (int(os.environ["SLURM_CPUS_PER_TASK"]) if os.environ.get("SLURM_CPUS_PER_TASK")
                                  else None)
        setup_torch(RunSettings(quiet=job.quiet, threads=threads))
    me = Identity(worker=job.worker, run_id=job.run_id)
    out = {"worker": job.worker, "host": me.host, "pid": me.pid, "done": [], "failed": [], "skipped": []}
    k0, total = job.progress or (0, 0)
    with Claims(run_dir, me) as claims:
        for work in job.works:
            units = list(work.units)
            if job.n_workers > 1 and units:
                start = (job.rotate * len(units)) // job.n_workers
                units = units[start:] + units[:start]
            ctx = {"session": None, "tasks": None, "load_error": None}
            try:
                for unit in units:
                    k0 = _run_unit(job, run_dir, claims, me, work.entry, unit, ctx, out, print_fn, k0, total)
            finally:
                if ctx["session"] is not None:
                    ctx["session"].close()
    return out


def _run_unit(job, run_dir, claims, me, entry, unit: Unit, ctx, out, print_fn, k, total) -> int:
    wanted = [c for c in unit.todo_cells() if not _is_done(run_dir, c, job.overwrite_before)]
    if not wanted:
        return k
    claim = claims.acquire(unit.key, unit.name, [c.name() for c in wanted])
    if claim is None:
        out["skipped"] += [c.name() for c in wanted]
        return k
    try:
        failures = read_failures(run_dir)
        # re-read after claiming: another worker may have finished cells meanwhile; a cell that failed in
        # THIS command (another worker of it) is not retried until the next command
        todo = [c for c in wanted if not _is_done(run_dir, c, job.overwrite_before)
                and (failures.get(c.name()) or {}).get("run_id") != job.run_id]
        failed_chains: list = []
        for i, cell in enumerate(todo):
            key = cell_key(cell)
            bad_prefix = next((f for f in failed_chains if len(f[0]) < len(cell.chain)
                               and tuple(cell.chain[:len(f[0])]) == f[0]), None)
            if bad_prefix is not None or ctx["load_error"] is not None:
                why = (f"NotRun: its prefix cell {bad_prefix[1]} failed" if bad_prefix is not None
                       else f"ModelLoadError: {ctx['load_error']}")
                record_failure(run_dir, key, cell.name(), why, "", me)
                out["failed"].append(cell.name())
                print_fn(f"FAILED {cell.name()}: {why}")
                continue
            claim.set_current(cell.name(), key)
            k += 1
            tc = time.time()
            try:
                session = _session(job, entry, ctx, cell)
                session.keep = _needed_prefixes(todo[i:])
                from llmmem.runner import run_cell

                payload = run_cell(session, cell, run_dir=run_dir, overwrite=True, log_samples=job.log_samples,
                                   tasks=ctx["tasks"], cache_dir=job.use_cache)
                session.forget_unneeded(_needed_prefixes(todo[i + 1:]))
            except Exception as e:  # noqa: BLE001 - recorded, and the other cells go on
                if ctx["session"] is not None:
                    ctx["session"].current = INVALID_WEIGHTS  # a half-applied step: restore from a snapshot
                record_failure(run_dir, key, cell.name(), e, traceback.format_exc(), me)
                failed_chains.append((tuple(cell.chain), cell.name()))
                out["failed"].append(cell.name())
                first = " ".join(str(e).split())[:300]
                print_fn(f"FAILED {cell.name()}: {type(e).__name__}: {first} "
                         f"(traceback: {run_dir / '.failed' / (key + '.traceback.txt')})")
                continue
            clear_failure(run_dir, key)
            out["done"].append(cell.name())
            head = f"[{k}/{total}] " if total else ""
            print_fn(f"{head}{cell.model.display_name} {cell.label()} seed {cell.seed}: "
                     f"{_summary_line(payload['_results'])} ({time.time() - tc:.1f}s)")
    finally:
        claim.release()
    return k


def _session(job: WorkerJob, entry, ctx, cell):
    """The worker's session for this model, loaded at its first cell (a worker whose units are all done or
    held by others never loads the model). A model that does not load fails every cell of it."""
    if ctx["session"] is None:
        if ctx["load_error"] is not None:
            raise RuntimeError(ctx["load_error"])
        from llmmem.evaluation import resolve_tasks
        from llmmem.runner import Session

        try:
            ctx["session"] = Session(entry.spec, batch_size=job.batch_size, quiet=job.quiet,
                                     include_path=entry.include_path, max_batch_size=job.max_batch_size)
        except Exception as e:  # noqa: BLE001
            ctx["load_error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            raise
        ctx["tasks"] = resolve_tasks(cell.eval.tasks, entry.include_path) if cell.eval.tasks else []
    return ctx["session"]


def worker_main(argv: list[str]) -> int:
    """``python -m llmmem.executors JOB.pkl``: a local worker process (its summary beside the job file)."""
    path = Path(argv[0])
    with open(path, "rb") as fh:
        job = pickle.load(fh)
    logging.basicConfig(level=logging.WARNING if job.quiet else logging.INFO, format="llmmem: %(message)s",
                        stream=sys.stderr)
    out = run_worker(job)
    from llmmem.results import atomic_write_json

    atomic_write_json(path.with_suffix(".result.json"), out)
    return 0


def run_slurm_task(job: WorkerJob) -> dict:
    """The function each Slurm array task runs (submitit pickles a reference to it)."""
    logging.basicConfig(level=logging.WARNING if job.quiet else logging.INFO, format="llmmem: %(message)s",
                        stream=sys.stderr)
    job = replace(job, worker=_slurm_worker_id(job.worker))
    return run_worker(job)


def _slurm_worker_id(default: str) -> str:
    jid, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if jid and task:
        return f"slurm-{jid}_{task}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return default


# ----------------------------------------------------------------------------- the coordinator
@dataclass
class Outcome:
    done: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)  # cell name -> error line
    left: list = field(default_factory=list)  # cell names held by other workers (not this command's)
    submitted: list = field(default_factory=list)  # Slurm job ids (not waited for)
    messages: list = field(default_factory=list)


def execute(spec, run_dir: Path, planned: list, ex: ExecutorSpec, *, overwrite: bool = False, quiet: bool = False,
            threads: int | None = None, print_fn=print) -> Outcome:
    """Run the planned cells that are not done with the executor ``ex`` (the caller holds the run lock)."""
    run_id = new_run_id()
    works = make_units(planned)
    job = WorkerJob(run_dir=str(run_dir), run_id=run_id, works=works, batch_size=spec.batch_size,
                    max_batch_size=spec.max_batch_size, log_samples=spec.log_samples, use_cache=spec.use_cache,
                    quiet=quiet, overwrite_before=time.time() if overwrite else None, threads=threads)
    outcome = Outcome()
    if not works:
        return outcome
    if ex.kind == "local" and not ex.workers:
        total = len(planned)
        job = replace(job, progress=(sum(c.done for c in planned), total), setup_torch=False)
        res = run_worker(job, print_fn=lambda line: (print_fn(line), sys.stdout.flush()))
        _merge(outcome, [res], run_dir, run_id)
    elif ex.kind == "local":
        _run_local_workers(job, ex.workers, threads, print_fn, outcome)
    else:
        _run_slurm(job, ex, print_fn, outcome)
    return outcome


def _merge(outcome: Outcome, results: list[dict], run_dir: Path, run_id: str) -> None:
    failures = read_failures(run_dir)
    for res in results:
        outcome.done += res.get("done", [])
        outcome.left += [n for n in res.get("skipped", []) if n not in outcome.left]
        for name in res.get("failed", []):
            outcome.failed[name] = (failures.get(name) or {}).get("error", "failed")
    # a cell one worker skipped (another held its unit) and another worker finished or failed is not left
    outcome.left = [n for n in outcome.left if n not in outcome.done and n not in outcome.failed]


def _run_local_workers(job: WorkerJob, n: int, threads: int | None, print_fn, outcome: Outcome) -> None:
    from llmmem.config import default_threads

    run_dir = Path(job.run_dir)
    jobdir = run_dir / EXECUTOR_DIR / job.run_id
    jobdir.mkdir(parents=True, exist_ok=True)
    gpus = visible_gpus()
    # --threads / $LLMMEM_THREADS are per worker; without them the cores are split between the workers
    per = threads or (default_threads() if os.environ.get("LLMMEM_THREADS") else max(1, (os.cpu_count() or 2) // n))
    where = (f"GPU {', '.join(gpus[i % len(gpus)] for i in range(n))}" if gpus
             else f"{per} CPU thread(s) each")
    print_fn(f"executor local: {n} workers ({where}); logs in {jobdir}")
    procs = []
    for i in range(n):
        wjob = replace(job, worker=f"w{i}", rotate=i, n_workers=n, threads=per)
        path = jobdir / f"w{i}.pkl"
        with open(path, "wb") as fh:
            pickle.dump(wjob, fh)
        env = dict(os.environ, LLMMEM_THREADS=str(per), PYTHONUNBUFFERED="1")
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        log_fh = open(jobdir / f"w{i}.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([sys.executable, "-m", "llmmem.executors", str(path)], env=env,
                                stdout=subprocess.PIPE, stderr=log_fh, text=True, bufsize=1)
        reader = threading.Thread(target=_echo, args=(proc.stdout, f"[w{i}] ", print_fn), daemon=True)
        reader.start()
        procs.append((i, proc, reader, log_fh, path))
    codes = {}
    try:
        for i, proc, reader, log_fh, _ in procs:
            codes[i] = proc.wait()
            reader.join(timeout=10)
            log_fh.close()
    except BaseException:
        for _, proc, _, _, _ in procs:  # interrupted: stop our workers (they release their claims)
            if proc.poll() is None:
                proc.terminate()
        raise
    results = []
    for i, _, _, _, path in procs:
        res_path = path.with_suffix(".result.json")
        if codes[i] == 0 and res_path.exists():
            results.append(json.loads(res_path.read_text()))
        else:
            why = (f"killed by signal {-codes[i]}" + (" (e.g. out of memory)" if codes[i] == -9 else "")
                   if codes[i] < 0 else f"exit code {codes[i]}")
            outcome.messages.append(f"worker w{i} died ({why}); its log: {jobdir / f'w{i}.log'}")
    pid_reason = {proc.pid: codes[i] for i, proc, _, _, _ in procs}

    def reason_for(doc):
        code = pid_reason.get(doc.get("pid"))
        if code is None:
            return "it exited"
        return f"killed by signal {-code}" if code < 0 else f"it exited with code {code}"

    claims = Claims(run_dir, Identity(worker="coordinator", run_id=job.run_id))
    for doc in claims.reap_run(job.run_id, reason_for):
        if doc.get("cell"):
            results.append({"failed": [doc["cell"]]})
        rest = [c for c in doc.get("cells", []) if c != doc.get("cell")]
        results.append({"skipped": rest})
    _merge(outcome, results, run_dir, job.run_id)
    outcome.left = [n for n in outcome.left if not _is_done_name(run_dir, n)]


def _is_done_name(run_dir: Path, name: str) -> bool:
    from llmmem.results import read_cell

    return read_cell(run_dir / name / "results.json", strict=False) is not None


def _echo(stream, prefix: str, print_fn) -> None:
    for line in stream:
        print_fn(prefix + line.rstrip("\n"))


def _submitit_executor(ex: ExecutorSpec, folder: Path):
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=ex.cluster)
    s = ex.slurm
    params = {"timeout_min": s.get("time_min", DEFAULT_TIME_MIN), "nodes": 1, "tasks_per_node": 1,
              "name": s.get("job_name", "llmmem")}
    for k, v in s.items():
        target = SLURM_KEYS.get(k)
        if target and k not in ("time_min", "job_name"):
            params[target] = v
    if ex.cluster == "local" and "setup" in s:
        params["local_setup"] = s["setup"]
    if ex.cluster == "local":  # the generic parameters LocalExecutor does not know are dropped by submitit
        params = {k: v for k, v in params.items() if k != "mem_gb"}
    executor.update_parameters(**params)
    return executor


def _run_slurm(job: WorkerJob, ex: ExecutorSpec, print_fn, outcome: Outcome) -> None:
    run_dir = Path(job.run_dir)
    queued = queued_units(run_dir)
    works = []
    for w in job.works:
        units = [u for u in w.units if u.key not in queued]
        skipped = [u for u in w.units if u.key in queued]
        for u in skipped:
            outcome.left += [c.name() for c in u.todo_cells()]
        if units:
            works.append(ModelWork(w.entry, units))
    if outcome.left:
        print_fn(f"{len(outcome.left)} cell(s) already queued in Slurm jobs of an earlier command: not submitted again")
    groups = group_units(works, ex.cells_per_task)
    if not groups:
        return
    folder = Path(ex.slurm.get("folder") or run_dir / ".submitit")
    executor = _submitit_executor(ex, folder)
    jobs_in = [replace(job, works=g, worker=f"task{i}") for i, g in enumerate(groups)]
    jobs = executor.map_array(run_slurm_task, jobs_in)
    ids = [j.job_id for j in jobs]
    outcome.submitted = ids
    from llmmem.results import append_jsonl

    (run_dir / EXECUTOR_DIR).mkdir(parents=True, exist_ok=True)
    append_jsonl(run_dir / EXECUTOR_DIR / SUBMISSIONS, [{
        "time": time.time(), "run_id": job.run_id, "cluster": ex.cluster,
        "tasks": [{"job_id": jid, "units": [u.key for w in g for u in w.units],
                   "cells": [c.name() for w in g for u in w.units for c in u.todo_cells()]}
                  for jid, g in zip(ids, groups)]}])
    first = ids[0].split("_")[0] if ids else "?"
    print_fn(f"executor slurm ({ex.cluster}): submitted {len(ids)} array task(s) as job {first} "
             f"({sum(len(u.todo) for g in groups for w in g for u in w.units)} cells); logs in {folder}")
    if not ex.wait:
        print_fn(f"follow it with: llmmem sweep --status {run_dir}")
        return
    results = []
    for j in jobs:
        try:
            res = j.result()
            results.append(res)
            print_fn(f"[task {j.job_id}] {len(res['done'])} cell(s) done, {len(res['failed'])} failed, "
                     f"{len(res['skipped'])} left to other workers (on {res['host']})")
        except Exception as e:  # noqa: BLE001 - the task died: its claims say which cell
            outcome.messages.append(f"array task {j.job_id} failed: {' '.join(str(e).split())[:300]}")
    claims = Claims(run_dir, Identity(worker="coordinator", run_id=job.run_id))
    for doc in claims.reap_run(job.run_id, lambda d: "its Slurm task ended without finishing it"):
        if doc.get("cell"):
            results.append({"failed": [doc["cell"]]})
    outcome.submitted = []
    _merge(outcome, results, run_dir, job.run_id)


def queued_units(run_dir: Path) -> dict[str, str]:
    """Units in Slurm array tasks still PENDING or RUNNING (``squeue``), from the run's submissions: unit key
    -> "Slurm task <id>, <state>". Empty without Slurm (or for submitit's local cluster, whose jobs end with their command)."""
    path = Path(run_dir) / EXECUTOR_DIR / SUBMISSIONS
    if not path.exists() or shutil.which("squeue") is None:
        return {}
    from llmmem.results import read_jsonl_tolerant

    by_job: dict[str, list] = {}
    for row in read_jsonl_tolerant(path):
        if row.get("cluster") != "slurm":
            continue
        for t in row.get("tasks", []):
            by_job[str(t["job_id"])] = t.get("units", [])
    if not by_job:
        return {}
    array_ids = sorted({j.split("_")[0] for j in by_job})
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(array_ids)], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    queued = {}
    for line in out.splitlines():
        jid, _, state = line.strip().partition("|")
        if state in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED") and jid in by_job:
            for u in by_job[jid]:
                queued[u] = f"Slurm task {jid}, {state.lower()}"
    return queued


# ----------------------------------------------------------------------------- plan notes and status
def annotate_plan(planned: list, run_dir: Path) -> None:
    """Notes on the plan's todo cells: failed in an earlier command (retried now), or held by a live worker."""
    failures = read_failures(run_dir)
    claims = Claims(run_dir, Identity(worker="planner", run_id="")).all()
    running = {}
    for doc in claims.values():
        alive, why = claim_liveness(doc)
        for name in doc.get("cells") or []:
            running[name] = (doc, alive, why)
    for pc in planned:
        if pc.done:
            continue
        name = pc.cell.name()
        held = running.get(name)
        if held and held[1]:
            doc = held[0]
            what = "computing it" if doc.get("cell") == name else "it is queued there"
            pc.redo_reason = (f"claimed by worker {doc.get('worker')} (pid {doc.get('pid')} on {doc.get('host')}, "
                              f"{held[2]}): {what}; left to it")
        elif name in failures:
            pc.redo_reason = f"failed before ({failures[name]['error'][:120]}): retried"


def plan_record(planned: list) -> list[dict]:
    """The plan as ``sweep.json`` records it (what ``llmmem sweep --status RUN_DIR`` reads)."""
    from llmmem.cells import Cell

    out = []
    for pc in planned:
        c = pc.cell
        root = Cell(c.model, tuple(c.chain[:1]), c.eval, c.seed)
        out.append({"name": c.name(), "key": cell_key(c), "unit": cell_key(root), "model": c.model.display_name,
                    "label": c.label(), "seed": c.seed})
    return out


STATES = ("done", "running", "queued", "failed", "pending")


def cell_states(run_dir: Path, cells: list[dict]) -> list[tuple[dict, str, str]]:
    """(cell, state, detail) for each cell of a plan record: done | running (a live claim is computing it) |
    queued (in a live claim's unit, or a Slurm task not started) | failed (its error) | pending."""
    run_dir = Path(run_dir)
    failures = read_failures(run_dir)
    claims = Claims(run_dir, Identity(worker="status", run_id="")).all()
    by_cell, by_unit = {}, {}
    for key, doc in claims.items():
        alive, why = claim_liveness(doc)
        by_unit[key] = (doc, alive, why)
        for name in doc.get("cells") or []:
            by_cell[name] = (doc, alive, why)
    queued = queued_units(run_dir)
    out = []
    for c in cells:
        name = c["name"]
        if _is_done_name(run_dir, name):
            out.append((c, "done", ""))
            continue
        held = by_cell.get(name) or by_unit.get(c.get("unit"))
        who = (f"worker {held[0].get('worker')}, pid {held[0].get('pid')} on {held[0].get('host')}, {held[2]}"
               if held else "")
        if held and held[1] and held[0].get("cell") == name:
            out.append((c, "running", who))
        elif held and held[1] and name in (held[0].get("cells") or []):
            out.append((c, "queued", f"next in {who}"))
        elif c.get("unit") in queued:
            out.append((c, "queued", queued[c["unit"]]))
        elif name in failures:
            f = failures[name]
            tb = f" (traceback: {run_dir / f['traceback']})" if f.get("traceback") else ""
            out.append((c, "failed", f"{f['error'].splitlines()[0][:300]}{tb}"))
        else:
            note = f"stale claim of {who}" if held and not held[1] else ""
            out.append((c, "pending", note))
    return out


def format_status(run_dir: Path, cells: list[dict], extra_done: int = 0) -> str:
    rows = cell_states(run_dir, cells)
    counts = {s: sum(1 for _, st, _ in rows if st == s) for s in STATES}
    head = (f"run {run_dir}: {len(rows)} cells: " + ", ".join(f"{counts[s]} {s}" for s in STATES))
    lines = [head]
    for c, st, detail in rows:
        lines.append(f"  {st:<8} {c['name']}" + (f"  ({detail})" if detail else ""))
    if extra_done:
        lines.append(f"  (and {extra_done} other finished cell(s) in the run directory, not in this plan)")
    return "\n".join(lines)


def status_of_run_dir(run_dir: Path) -> str:
    """``llmmem sweep --status RUN_DIR``: the plan recorded in ``sweep.json`` against the files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"--status: run directory {run_dir} does not exist")
    path = run_dir / "sweep.json"
    cells: list[dict] = []
    if path.exists():
        try:
            cells = json.loads(path.read_text()).get("cells") or []
        except (OSError, ValueError):
            raise ConfigError(f"--status: {path} is not valid JSON") from None
    names = {c["name"] for c in cells}
    others = []
    from llmmem.results import PARTIAL, RESULTS_FILE

    for p in sorted(run_dir.rglob(RESULTS_FILE)):
        if any(part.startswith(PARTIAL) for part in p.parts):
            continue
        name = str(p.parent.relative_to(run_dir))
        if name not in names:
            others.append(name)
    if not cells:  # no plan recorded (a run written by `llmmem eval`, or before plans were recorded)
        cells = [{"name": n} for n in others]
        others = []
    return format_status(run_dir, cells, extra_done=len(others))


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
