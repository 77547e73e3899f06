"""Executors: local worker processes and submitit job arrays give the serial run's numbers; claims keep two
workers off one cell; a killed worker's cell (only it) is redone by the next command; a failing cell is
recorded and the others finish; --status; bad executor configs; units keep shared prefixes together."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import cli_error, run_cli
from llmmem.claims import Claims, Identity, claim_liveness, read_failures

ROOT = Path(__file__).resolve().parent.parent


def write_cfg(path: Path, model_dir, run: Path, **over) -> Path:
    cfg = {"models": [str(model_dir)], "methods": ["magnitude", "wanda"], "sparsities": [0.3, 0.6],
           "calibration": "self", "nsamples": 4, "seqlen": 16, "tasks": ["capitals", "famous_passages"], "limit": 4,
           "batch_size": 4, "output_path": str(run)}
    cfg.update(over)
    path.write_text(yaml.safe_dump(cfg))
    return path


def results_of(run: Path) -> dict:
    return {str(p.parent.relative_to(run)): json.loads(p.read_text())["metrics"]
            for p in sorted(run.rglob("results.json"))}


def mtimes(run: Path) -> dict:
    return {str(p.parent.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("results.json")}


def cli_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                LLMMEM_THREADS="1")


@pytest.fixture(scope="module")
def serial(tmp_path_factory, llama_dir):
    """The 5-cell tiny sweep run serially in this process (1 thread): the reference numbers."""
    d = tmp_path_factory.mktemp("serial")
    cfg = write_cfg(d / "sweep.yaml", llama_dir, d / "run")
    assert run_cli(["sweep", cfg, "--quiet", "--threads", "1"]) == 0
    res = results_of(d / "run")
    assert len(res) == 5
    return res


# ----------------------------------------------------------------------------- same numbers, any executor
def test_two_local_workers_equal_serial(tmp_path, llama_dir, serial, capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", cli_env()["PYTHONPATH"])
    run = tmp_path / "run"
    cfg = write_cfg(tmp_path / "sweep.yaml", llama_dir, run)
    assert run_cli(["sweep", cfg, "--quiet", "--executor", "local", "--workers", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "executor local: 2 workers (1 CPU thread(s) each)" in out
    # each worker claimed a unit at once (they start at different units), so both computed cells
    assert "[w0] tiny-llama " in out and "[w1] tiny-llama " in out
    assert sum(line.startswith(("[w0] tiny-llama ", "[w1] tiny-llama ")) for line in out.splitlines()) == 5
    assert results_of(run) == serial
    assert not list((run / ".claims").glob("*.json"))  # every claim released
    assert run_cli(["sweep", "--status", run]) == 0
    assert "5 cells: 5 done, 0 running, 0 queued, 0 failed, 0 pending" in capsys.readouterr().out
    # --overwrite redoes every cell once: a worker never redoes what its sibling finished in this command
    before = mtimes(run)
    assert run_cli(["sweep", cfg, "--quiet", "--executor", "local", "--workers", "2", "--threads", "1",
                    "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith(("[w0] tiny-llama ", "[w1] tiny-llama ")) for line in out.splitlines()) == 5
    after = mtimes(run)
    assert after.keys() == before.keys() and all(after[k] > before[k] for k in before)
    assert results_of(run) == serial


def test_submitit_local_executor_equal_serial(tmp_path, llama_dir, serial, capsys, monkeypatch):
    """The Slurm path through submitit's real code (pickled jobs, submitit's job runner in subprocesses),
    on its LocalExecutor: groups of >= 3 cells of one model -> 2 tasks."""
    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", cli_env()["PYTHONPATH"])
    monkeypatch.setenv("LLMMEM_THREADS", "1")
    run = tmp_path / "run"
    cfg = write_cfg(tmp_path / "sweep.yaml", llama_dir, run, executor="slurm",
                    slurm={"cluster": "local", "cells_per_task": 3, "time_min": 20})
    assert run_cli(["sweep", cfg, "--quiet", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "executor slurm (local): submitted 2 array task(s)" in out
    assert out.count("[task ") == 2 and "5 cell(s)" not in out
    assert results_of(run) == serial
    (row,) = [json.loads(x) for x in (run / ".executor" / "submissions.jsonl").read_text().splitlines()]
    assert [len(t["cells"]) for t in row["tasks"]] == [3, 2]  # dense + magnitude x2 | wanda x2
    assert len(list((run / ".submitit").glob("*/*_result.pkl"))) == 2
    # rerun: nothing missing, nothing submitted
    assert run_cli(["sweep", cfg, "--quiet", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "plan: 5 cells, 5 already done" in out and "submitted" not in out


# ----------------------------------------------------------------------------- a killed worker
def test_kill_one_worker_mid_cell_then_rerun_redoes_only_its_cell(tmp_path, llama_dir, serial, capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", cli_env()["PYTHONPATH"])
    run = tmp_path / "run"
    cfg = write_cfg(tmp_path / "sweep.yaml", llama_dir, run)
    result = {}
    coordinator = threading.Thread(target=lambda: result.setdefault("rc", run_cli(
        ["sweep", cfg, "--quiet", "--executor", "local", "--workers", "2", "--threads", "1"])))
    coordinator.start()
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline and coordinator.is_alive():
        for p in (run / ".claims").glob("*.json"):
            try:
                doc = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if doc.get("cell") and not (run / doc["cell"] / "results.json").exists():
                victim = doc
                os.kill(doc["pid"], signal.SIGKILL)  # one worker, mid-cell; the coordinator and the other go on
                break
        time.sleep(0.01)
    coordinator.join(timeout=300)
    out = capsys.readouterr().out
    assert victim is not None, "no cell was caught running"
    assert result["rc"] == 1, out
    assert f"worker {victim['worker']} died (killed by signal 9" in out
    planned = [c["name"] for c in json.loads((run / "sweep.json").read_text())["cells"]]
    finished = mtimes(run)
    # what is missing is the victim's cell (and, at most, the rest of its unit: here units are single cells)
    assert [n for n in planned if n not in finished] == [victim["cell"]], victim
    failure = read_failures(run)[victim["cell"]]
    assert failure["error"].startswith("WorkerDied: worker " + victim["worker"]) and "signal 9" in failure["error"]
    assert not list((run / ".claims").glob("*.json"))  # the dead worker's claim was reaped by the coordinator
    # the next command (serial here) computes only that cell; the others are untouched
    assert run_cli(["sweep", cfg, "--quiet", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "plan: 5 cells, 4 already done" in out and "failed before (WorkerDied" in out
    after = mtimes(run)
    assert {k: v for k, v in after.items() if k in finished} == finished
    assert sorted(set(after) - set(finished)) == [victim["cell"]]
    assert results_of(run) == serial  # 4 cells from two worker processes, 1 from this one: the serial numbers
    assert victim["cell"] not in read_failures(run)  # cleared when the cell finished


# ----------------------------------------------------------------------------- a failing cell, --status
def test_failing_cell_is_recorded_and_the_others_finish(tmp_path, llama_dir, capsys):
    bad = tmp_path / "calib.npy"
    np.save(bad, np.full((4, 16), 5000, dtype=np.int64))  # token ids beyond the model's vocabulary: found late
    run = tmp_path / "run"
    cfg = write_cfg(tmp_path / "sweep.yaml", llama_dir, run, sparsities=[0.5], calibration=str(bad))
    assert run_cli(["sweep", cfg, "--quiet", "--threads", "1"]) == 1
    out = capsys.readouterr().out
    assert "1 cell(s) failed:" in out and "wanda-unstructured-s0.5" in out
    assert "ConfigError: calibration token ids must be in [0, 320)" in out
    assert "rerun the same command to retry them" in out
    done = mtimes(run)
    assert sorted(n.split("/")[1].rsplit("-", 1)[0] for n in done) == ["dense", "magnitude-unstructured-s0.5"]
    (fail,) = read_failures(run).values()
    assert fail["error"].startswith("ConfigError: calibration token ids must be in [0, 320)") and fail["run_id"]
    tb = (run / fail["traceback"]).read_text()
    assert "Traceback" in tb and "load_calibration" in tb
    assert (run / "report.md").exists()  # the report of the finished cells
    # --status RUN_DIR: the plan recorded in sweep.json against the files
    assert run_cli(["sweep", "--status", run]) == 0
    status = capsys.readouterr().out
    assert "3 cells: 2 done, 0 running, 0 queued, 1 failed, 0 pending" in status
    assert f"  failed   {fail['cell']}  (ConfigError: calibration token ids must be in [0, 320)" in status
    # a live claim (this process) on the failed cell's unit shows it running; a new sparsity is pending
    claims = Claims(run, Identity(worker="test", run_id="test-run"))
    from llmmem.claims import cell_key  # noqa: F401 - the unit key is the root cell's (here the cell itself)

    unit = next(c["unit"] for c in json.loads((run / "sweep.json").read_text())["cells"] if c["name"] == fail["cell"])
    claim = claims.acquire(unit, fail["cell"], [fail["cell"]])
    claim.set_current(fail["cell"])
    try:
        assert run_cli(["sweep", cfg, "sparsities=[0.5,0.7]", "--status"]) == 0
        status = capsys.readouterr().out
        assert "5 cells: 2 done, 1 running, 0 queued, 0 failed, 2 pending" in status
        assert f"  running  {fail['cell']}  (worker test, pid {os.getpid()} on {socket.gethostname()}" in status
        # and a sweep meanwhile leaves that cell to its holder
        assert run_cli(["sweep", cfg, "--quiet", "--threads", "1"]) == 0
        out = capsys.readouterr().out
        assert "claimed by worker test" in out and "1 cell(s) are being computed by other workers" in out
    finally:
        claim.release()
    # fixed input: the next command retries the failed cell only; the record is cleared
    np.save(bad, np.arange(64, dtype=np.int64).reshape(4, 16) % 300 + 3)
    assert run_cli(["sweep", cfg, "--quiet", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "failed before (ConfigError" in out
    after = mtimes(run)
    assert {k: after[k] for k in done} == done and len(after) == 3
    assert read_failures(run) == {}


# ----------------------------------------------------------------------------- bad executor configs
@pytest.mark.parametrize("args,needles", [
    (["--executor", "mpi"], ["executor='mpi' is not valid; choose from: local, slurm"]),
    (["--workers", "0"], ["workers=0 must be >= 1"]),
    (["--workers", "two"], ["workers='two' is not an integer"]),
    (["--executor", "slurm", "slurm={partitoin: gpu}"], ["slurm: unknown key(s) partitoin; allowed:"]),
    (["--executor", "slurm", "slurm={mem_gb: -4}"], ["slurm.mem_gb=-4 is outside (0, inf]"]),
    (["--executor", "slurm", "slurm={cluster: aws}"], ["slurm.cluster='aws' is not valid"]),
    (["--executor", "slurm", "--workers", "2"], ["workers=2 applies to executor local"]),
])
def test_bad_executor_configs(tmp_path, llama_dir, capsys, args, needles):
    cfg = write_cfg(tmp_path / "sweep.yaml", llama_dir, tmp_path / "run")
    cli_error(capsys, ["sweep", cfg, *args], *needles)
    assert not (tmp_path / "run").exists()


def test_slurm_needs_submitit_and_slurm(tmp_path, llama_dir, capsys, monkeypatch):
    cfg = write_cfg(tmp_path / "sweep.yaml", llama_dir, tmp_path / "run", executor="slurm")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "submitit", None)  # as if not installed: `import submitit` raises ImportError
        cli_error(capsys, ["sweep", cfg], "executor=slurm needs submitit", "pip install 'llmmem[slurm]'")
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    cli_error(capsys, ["sweep", cfg], "sbatch/srun are not on PATH", "slurm.cluster=local")
    assert not (tmp_path / "run").exists()


def test_status_bad_input(tmp_path, capsys):
    cli_error(capsys, ["sweep", "--status", tmp_path / "nope"], "run directory", "does not exist")
    cli_error(capsys, ["sweep"], "give a config file", "--status RUN_DIR")


# ----------------------------------------------------------------------------- claims
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_claims_are_exclusive_under_a_race(tmp_path):
    wins = []

    def grab(i):
        c = Claims(tmp_path, Identity(worker=f"t{i}", run_id=f"run{i}")).acquire("unit", "u")
        if c is not None:
            wins.append(i)

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    doc = json.loads((tmp_path / ".claims" / "unit.json").read_text())
    assert doc["worker"] == f"t{wins[0]}" and doc["pid"] == os.getpid() and doc["host"] == socket.gethostname()


def test_dead_claims_are_taken_over_except_by_their_own_command(tmp_path):
    dead = Claims(tmp_path, Identity(worker="old", run_id="A", pid=_dead_pid()))
    assert dead.acquire("u1", "unit 1") is not None
    assert claim_liveness(dead.read("u1"))[0] is False
    # the same command's other workers leave it (its coordinator records the cell as failed)
    assert Claims(tmp_path, Identity(worker="w1", run_id="A")).acquire("u1", "unit 1") is None
    # a later command takes it over
    new = Claims(tmp_path, Identity(worker="new", run_id="B")).acquire("u1", "unit 1")
    assert new is not None and new.claims.read("u1")["worker"] == "new"
    # another host's claim: dead only once its heartbeat is older than the timeout
    far = Claims(tmp_path, Identity(worker="far", run_id="C", host="elsewhere", pid=1))
    assert far.acquire("u2", "unit 2") is not None
    assert Claims(tmp_path, Identity(worker="x", run_id="D"), timeout_s=60).acquire("u2", "unit 2") is None
    time.sleep(0.3)
    late = Claims(tmp_path, Identity(worker="x", run_id="D"), timeout_s=0.2).acquire("u2", "unit 2")
    assert late is not None
    # the old holder notices it lost the claim and does not remove the new one
    old = far._held["u2"]
    assert old.heartbeat() is False and old.lost
    old.release()
    assert late.claims.read("u2")["worker"] == "x"


def test_heartbeat_thread_refreshes_and_release_removes(tmp_path):
    claims = Claims(tmp_path, Identity(worker="w", run_id="R"), heartbeat_s=0.05)
    with claims:
        c = claims.acquire("u", "unit")
        t0 = claims.read("u")["heartbeat"]
        time.sleep(0.4)
        assert claims.read("u")["heartbeat"] > t0
        c.set_current("m/cell-1", "k1")
        assert claims.read("u")["cell"] == "m/cell-1"
    assert not (tmp_path / ".claims" / "u.json").exists()  # released on exit


# ----------------------------------------------------------------------------- units and groups
def _planned(models=("m1",), seeds=(0,), done=()):
    from llmmem.cells import Cell, EvalSpec
    from llmmem.config import ModelSpec
    from llmmem.interventions import expand_stages, with_prefixes
    from llmmem.sweep import ModelEntry, PlannedCell

    chains, _ = expand_stages([
        {"unlearn": {"method": ["npo", "grad_diff"], "forget": "f", "retain": "r", "steps": 10, "eval_every": 5}},
        [None, {"prune": {"method": "magnitude", "sparsity": [0.3, 0.5]}}],
    ])
    out = []
    for m in models:
        entry = ModelEntry(ModelSpec(m))
        for s in seeds:
            for chain in with_prefixes(chains):
                pc = PlannedCell(Cell(entry.spec, chain, EvalSpec(tasks=["t"]), s), entry)
                pc.done = pc.cell.label() in done
                out.append(pc)
    return out


def test_units_keep_prefixes_with_the_chains_extending_them():
    from llmmem.executors import group_units, make_units

    planned = _planned(models=("m1", "m2"), seeds=(0, 1))
    works = make_units(planned)
    assert [w.entry.spec.name for w in works] == ["m1", "m2"]
    for w in works:
        assert len(w.units) == 6  # per seed: dense, npo (+2 prunes), grad_diff (+2 prunes)
        for u in w.units:
            root = u.cells[0]
            assert u.name == root.name() and len(root.chain) <= 1
            for c in u.cells:  # every cell extends the root, same model and seed, prefixes first
                assert tuple(c.chain[:len(root.chain)]) == tuple(root.chain) and c.seed == root.seed
            assert [len(c.chain) for c in u.cells] == sorted(len(c.chain) for c in u.cells)
    assert sum(len(u.cells) for w in works for u in w.units) == len(planned) == 28
    # one task per unit by default; bigger groups never mix models, never split a unit
    assert len(group_units(works, 1)) == 12
    groups = group_units(works, 4)
    assert all(len(g) == 1 for g in groups)
    assert [sum(len(u.todo) for u in g[0].units) for g in groups] == [4, 4, 6, 4, 4, 6]
    # done cells are not todo; a unit with nothing to do is dropped
    works = make_units(_planned(done=("dense", "npo-10steps", "npo-10steps+magnitude-unstructured-s0.3",
                                      "npo-10steps+magnitude-unstructured-s0.5")))
    assert [u.name.split("/")[1].rsplit("-", 1)[0] for u in works[0].units] == ["grad_diff-10steps"]


# ----------------------------------------------------------------------------- a real Slurm (slow)
@pytest.fixture(scope="module")
def slurm_conf(tmp_path_factory):
    """A single-node Slurm cluster started for these tests (tests/slurm_single_node.sh: root, slurm-wlm,
    munge), or the one $SLURM_CONF points to."""
    import shutil

    pytest.importorskip("submitit")
    if os.environ.get("SLURM_CONF") and subprocess.run(["sinfo"], capture_output=True).returncode == 0:
        yield os.environ["SLURM_CONF"]
        return
    if os.geteuid() != 0 or not all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch", "squeue")):
        pytest.skip("no Slurm here (needs root and slurm-wlm to start a single-node cluster)")
    d = tmp_path_factory.mktemp("slurm")
    script = ROOT / "tests" / "slurm_single_node.sh"
    env = dict(os.environ, SLURM_TEST_PORT="16917")
    started = subprocess.run([str(script), "start", str(d)], capture_output=True, text=True, env=env)
    if started.returncode != 0:
        pytest.skip(f"single-node Slurm did not start: {started.stderr.strip()[-300:]}")
    try:
        yield str(d / "slurm.conf")
    finally:
        subprocess.run([str(script), "stop", str(d)], capture_output=True)


@pytest.mark.slow
def test_real_slurm_single_node(tmp_path, llama_dir, serial, slurm_conf, capsys, monkeypatch):
    """sbatch job array on a real (single-node) Slurm: --status while it runs, a rerun while tasks are queued
    submits nothing (squeue), the numbers are the serial run's, a rerun after it finished submits nothing."""
    monkeypatch.setenv("SLURM_CONF", slurm_conf)
    monkeypatch.setenv("PYTHONPATH", cli_env()["PYTHONPATH"])
    run = tmp_path / "run"
    cfg = write_cfg(tmp_path / "sweep.yaml", llama_dir, run, executor="slurm",
                    slurm={"cells_per_task": 3, "cpus_per_task": 1, "mem_gb": 2, "time_min": 20,
                           "array_parallelism": 1, "setup": ["export LLMMEM_THREADS=1"]})
    assert run_cli(["sweep", cfg, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "executor slurm (slurm): submitted 2 array task(s)" in out and "--status" in out
    # while the array runs (one task at a time: array_parallelism 1), the same command submits nothing more
    assert run_cli(["sweep", cfg, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "5 cell(s) already queued in Slurm jobs of an earlier command: not submitted again" in out
    assert "submitted" not in out.replace("not submitted again", "")
    seen = set()
    deadline = time.time() + 900
    while time.time() < deadline:
        assert run_cli(["sweep", "--status", run]) == 0
        status = capsys.readouterr().out
        seen |= {s for s in ("queued", "running") if f"  {s} " in status}
        if "5 done" in status:
            break
        time.sleep(1)
    assert "5 cells: 5 done" in status, status
    assert "queued" in seen
    assert results_of(run) == serial
    assert run_cli(["sweep", cfg, "--quiet"]) == 0
    assert "plan: 5 cells, 5 already done" in capsys.readouterr().out
