"""Sweeps: plan, resume after kill -9, determinism, dense restore, lock, bad configs; report and plots."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import cli_error, run_cli


def write_cfg(tmp_path, model_dir, **over):
    cfg = {"models": [str(model_dir)], "methods": ["magnitude", "wanda"], "sparsities": [0.3, 0.6],
           "calibration": "self", "nsamples": 4, "seqlen": 16, "tasks": ["capitals", "famous_passages"], "limit": 4,
           "batch_size": 4, "output_path": str(tmp_path / "run")}
    cfg.update(over)
    p = tmp_path / f"sweep-{len(list(tmp_path.glob('sweep-*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def results_of(run: Path) -> dict:
    return {str(p.parent.relative_to(run)): json.loads(p.read_text())["metrics"] for p in sorted(run.rglob("results.json"))}


def test_sweep_runs_reports_and_plots(tmp_path, llama_dir, capsys):
    cfg = write_cfg(tmp_path, llama_dir)
    assert run_cli(["sweep", cfg, "--quiet", "--plot"]) == 0
    out = capsys.readouterr().out
    assert "plan: 5 cells, 0 already done" in out
    assert out.count("] tiny-llama ") == 5
    run = tmp_path / "run"
    cells = results_of(run)
    assert len(cells) == 5
    names = sorted(cells)
    assert any(n.startswith("tiny-llama/dense-") for n in names)
    assert any(n.startswith("tiny-llama/wanda-unstructured-s0.6-") for n in names)
    doc = json.loads(next(run.rglob("wanda-unstructured-s0.6-*/results.json")).read_text())
    assert abs(doc["pruning"]["measured_sparsity"] - 0.6) < 0.01
    assert doc["timings"]["restore_seconds"] >= 0 and doc["cell"]["label"] == "wanda-unstructured-s0.6"
    report = (run / "report.md").read_text()
    assert "normalised to dense" in report and "| famous_passages | tf_accuracy |" in report
    for name in ("headline_tiny-llama", "tasks_tiny-llama", "extraction_tiny-llama_famous_passages"):
        for ext in ("png", "svg"):
            assert (run / "plots" / f"{name}.{ext}").stat().st_size > 1000
    # rerun: everything is done, nothing recomputed
    mtimes = {p: p.stat().st_mtime_ns for p in run.rglob("results.json")}
    assert run_cli(["sweep", cfg, "--quiet"]) == 0
    assert "plan: 5 cells, 5 already done" in capsys.readouterr().out
    assert mtimes == {p: p.stat().st_mtime_ns for p in run.rglob("results.json")}
    # report and plot commands read files only
    assert run_cli(["report", run]) == 0
    assert "tiny-llama" in capsys.readouterr().out
    assert run_cli(["plot", run, "--out", tmp_path / "figs"]) == 0
    assert (tmp_path / "figs" / "headline_tiny-llama.png").exists()


def test_dense_weights_restored_between_cells(tmp_path, llama_dir):
    """A wanda cell run after magnitude cells equals the same cell run alone."""
    full = write_cfg(tmp_path, llama_dir, output_path=str(tmp_path / "full"))
    alone = write_cfg(tmp_path, llama_dir, methods=["wanda"], sparsities=[0.6], output_path=str(tmp_path / "alone"))
    assert run_cli(["sweep", full, "--quiet"]) == 0
    assert run_cli(["sweep", alone, "--quiet"]) == 0
    a, b = results_of(tmp_path / "full"), results_of(tmp_path / "alone")
    (wanda,) = [k for k in b if "wanda" in k]
    assert a[wanda] == b[wanda]
    (dense,) = [k for k in b if "dense" in k]
    assert a[dense] == b[dense]


def test_same_config_same_numbers(tmp_path, llama_dir):
    c1 = write_cfg(tmp_path, llama_dir, methods=["sparsegpt"], sparsities=[0.5], output_path=str(tmp_path / "r1"))
    c2 = write_cfg(tmp_path, llama_dir, methods=["sparsegpt"], sparsities=[0.5], output_path=str(tmp_path / "r2"))
    assert run_cli(["sweep", c1, "--quiet"]) == 0 and run_cli(["sweep", c2, "--quiet"]) == 0
    assert results_of(tmp_path / "r1") == results_of(tmp_path / "r2")


def test_kill_dash_nine_then_resume(tmp_path, llama_dir):
    run = tmp_path / "run"
    cfg = write_cfg(tmp_path, llama_dir, sparsities=[0.2, 0.4, 0.6], tasks=["famous_passages", "capitals"], limit=12,
                    output_path=str(run))
    env = dict(os.environ, LLMMEM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "llmmem.cli", "sweep", str(cfg), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(run.rglob("results.json"))) < 2:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in run.rglob("results.json")}
    assert 2 <= len(finished) < 7, "the sweep should have been killed mid-run"
    for p in finished:
        json.loads(p.read_text())  # no corrupt file
    partial = [d for d in run.glob("tiny-llama/*") if d.is_dir() and not (d / "results.json").exists()]
    assert (run / ".llmmem.lock").exists()  # left behind by the killed process: a stale lock
    # resume: finished cells untouched, the rest (incl. the killed one) computed
    assert subprocess.run([sys.executable, "-m", "llmmem.cli", "sweep", str(cfg), "--quiet"], env=env,
                          capture_output=True).returncode == 0
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    assert len(list(run.rglob("results.json"))) == 7
    for d in partial:
        assert (d / "results.json").exists()
    # equal to an uninterrupted run
    ref = write_cfg(tmp_path, llama_dir, sparsities=[0.2, 0.4, 0.6], tasks=["famous_passages", "capitals"], limit=12,
                    output_path=str(tmp_path / "ref"))
    assert subprocess.run([sys.executable, "-m", "llmmem.cli", "sweep", str(ref), "--quiet"], env=env,
                          capture_output=True).returncode == 0
    assert results_of(run) == results_of(tmp_path / "ref")


def test_lock_held_by_live_process(tmp_path, llama_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (run / ".llmmem.lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                      "started": "2026-01-01T00:00:00"}))
        rc = run_cli(["sweep", write_cfg(tmp_path, llama_dir), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and f"locked by pid {sleeper.pid}" in err and len(err.strip().splitlines()) == 1
        assert not list(run.rglob("results.json"))
    finally:
        sleeper.kill()


def test_dry_run_plans_only(tmp_path, llama_dir, capsys):
    assert run_cli(["sweep", write_cfg(tmp_path, llama_dir), "--dry_run", "structures=[unstructured,2:4]"]) == 0
    out = capsys.readouterr().out
    assert "plan: 7 cells" in out and "wanda-2of4-s0.5" in out
    assert not (tmp_path / "run").exists()


def _bad(capsys, tmp_path, cfg, *needles):
    cli_error(capsys, ["sweep", cfg, "--quiet"], *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("over,needles", [
    ({"colour": "red"}, ["unknown key(s) colour"]),
    ({"sparsities": [0.3, 1.5]}, ["sweep", "sparsity=1.5 is outside [0, 1)"]),
    ({"sparsities": [0.3, "half"]}, ["sparsity='half' is not a number"]),
    ({"tasks": ["capitals", "capitols"]}, ["unknown task 'capitols'"]),
    ({"methods": ["wanda", "lottery"]}, ["unknown pruning method 'lottery'"]),
    ({"sparsities": []}, ["grid is empty"]),
    ({"models": []}, ["'models' is empty"]),
])
def test_bad_configs(capsys, tmp_path, llama_dir, over, needles):
    _bad(capsys, tmp_path, write_cfg(tmp_path, llama_dir, **over), *needles)


def test_unknown_model_before_loading(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from llmmem import presets

    presets.hub_reachable.cache_clear()
    _bad(capsys, tmp_path, write_cfg(tmp_path, "no-such-model"), "unknown model 'no-such-model'")


def test_override_syntax(capsys, tmp_path, llama_dir):
    rc = run_cli(["sweep", write_cfg(tmp_path, llama_dir), "sparsities", "--dry_run"])
    assert rc == 2 and "not key=value" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["quickstart.yaml", "testbed.yaml", "pythia.yaml", "unlearn-testbed.yaml",
                                  "durability-testbed.yaml", "durability-testbed-tiny.yaml"])
def test_shipped_configs_parse(name):
    """The configs the README points users to load as specs (their values validated, nothing run)."""
    from pathlib import Path

    from llmmem.durability import load_durability
    from llmmem.sweep import load_sweep_spec
    from llmmem.unlearning.spec import load_unlearn_config

    path = Path(__file__).resolve().parent.parent / "configs" / name
    loader = load_unlearn_config if name.startswith("unlearn") else load_durability if name.startswith(
        "durability") else load_sweep_spec
    spec = loader(str(path))
    assert spec.model.name if not name.startswith(("quickstart", "testbed", "pythia")) else spec.models
