"""lm-evaluation-harness interoperability: lm_eval: tasks on in-memory models, and llmmem tasks exported to lm-eval."""

import json
import math
import subprocess
import sys

import pytest

from conftest import run_cli

pytest.importorskip("lm_eval")


def _cell(path):
    return json.loads(next(path.rglob("results.json")).read_text())


def test_export_and_same_numbers_within_error(tmp_path, tiny_testbed, capsys):
    out = tmp_path / "exported"
    assert run_cli(["export-lm-eval", out, "--include_path", tiny_testbed / "tasks",
                    "--tasks", "testbed_recall,testbed_override"]) == 0
    assert (out / "llmmem_testbed_recall.yaml").exists() and (out / "llmmem_lmeval_utils.py").exists()
    assert (out / "testbed_recall.jsonl").exists()
    run = tmp_path / "run"
    rc = run_cli(["eval", "--model", tiny_testbed, "--tasks",
                  "testbed_recall,lm_eval:llmmem_testbed_recall,testbed_override,lm_eval:llmmem_testbed_override",
                  "--include_path", out, "--limit", "120", "--output_path", run, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    res = _cell(run)["metrics"]
    for ours, theirs, metric in (("testbed_recall", "lm_eval:llmmem_testbed_recall", "exact_match"),
                                 ("testbed_override", "lm_eval:llmmem_testbed_override", "follows_context"),
                                 ("testbed_override", "lm_eval:llmmem_testbed_override", "parametric")):
        a, b = res[ours], res[theirs]
        se = math.sqrt(a[f"{metric}_stderr"] ** 2 + b[f"{metric}_stderr"] ** 2)
        assert abs(a[metric] - b[metric]) <= 3 * se + 1e-9, (ours, metric, a[metric], b[metric], se)
    assert _cell(run)["n_samples"]["lm_eval:llmmem_testbed_recall"] == 120


def test_lm_eval_cli_runs_exported_tasks(tmp_path, tiny_testbed):
    out = tmp_path / "exported"
    assert run_cli(["export-lm-eval", out, "--include_path", tiny_testbed / "tasks", "--tasks", "testbed_recall"]) == 0
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={tiny_testbed},dtype=float32", "--include_path", str(out), "--tasks",
                           "llmmem_testbed_recall", "--limit", "20", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llmmem_testbed_recall" in proc.stdout and "exact_match" in proc.stdout


def test_lm_eval_task_in_a_sweep(tmp_path, tiny_testbed, capsys):
    import yaml

    out = tmp_path / "exported"
    assert run_cli(["export-lm-eval", out, "--include_path", tiny_testbed / "tasks", "--tasks", "testbed_recall"]) == 0
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"models": [str(tiny_testbed)], "methods": ["wanda"], "sparsities": [0.5],
                                   "calibration": "self", "nsamples": 4, "seqlen": 16,
                                   "tasks": ["lm_eval:llmmem_testbed_recall"], "include_path": str(out),
                                   "limit": 20, "output_path": str(tmp_path / "run")}))
    assert run_cli(["sweep", cfg, "--quiet"]) == 0, capsys.readouterr().err
    docs = [json.loads(p.read_text()) for p in (tmp_path / "run").rglob("results.json")]
    assert len(docs) == 2 and all("lm_eval:llmmem_testbed_recall" in d["metrics"] for d in docs)
    assert "lm_eval:llmmem_testbed_recall" in (tmp_path / "run" / "report.md").read_text()


def test_unknown_lm_eval_task(capsys, llama_dir):
    rc = run_cli(["eval", "--model", llama_dir, "--tasks", "lm_eval:no_such_task_xyz"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "no_such_task_xyz" in err and "lm_eval --tasks list" in err


def test_lm_eval_not_installed(capsys, llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    rc = run_cli(["eval", "--model", llama_dir, "--tasks", "lm_eval:anything"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'llmmem[lm_eval]'" in err


@pytest.mark.slow
def test_smollm2_llmmem_and_lm_eval_agree(smollm2_dir, tmp_path, monkeypatch, capsys):
    from conftest import REAL_HOME

    monkeypatch.setenv("LLMMEM_HOME", REAL_HOME)
    out = tmp_path / "exported"
    assert run_cli(["export-lm-eval", out, "--tasks", "capitals,capitals_override"]) == 0
    rc = run_cli(["eval", "--model", "smollm2-135m", "--tasks",
                  "capitals,lm_eval:llmmem_capitals,capitals_override,lm_eval:llmmem_capitals_override",
                  "--include_path", out, "--limit", "100", "--batch_size", "16", "--output_path", tmp_path / "run",
                  "--quiet"])
    assert rc == 0, capsys.readouterr().err
    res = _cell(tmp_path / "run")["metrics"]
    for ours, theirs, metric in (("capitals", "lm_eval:llmmem_capitals", "exact_match"),
                                 ("capitals_override", "lm_eval:llmmem_capitals_override", "follows_context")):
        a, b = res[ours], res[theirs]
        se = math.sqrt(a[f"{metric}_stderr"] ** 2 + b[f"{metric}_stderr"] ** 2)
        assert abs(a[metric] - b[metric]) <= 3 * se, (ours, a[metric], b[metric], se)
