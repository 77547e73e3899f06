"""Slow: the default `small` testbed, built from scratch, meets the testbed issue's acceptance targets."""

import json

import pytest

from conftest import run_cli
from llmmem.testbed.acceptance import TASKS, failures, summarize

pytestmark = pytest.mark.slow


def test_small_testbed_meets_its_acceptance_targets(tmp_path, capsys):
    out = tmp_path / "small"
    rc = run_cli(["testbed", "build", "--preset", "small", "--seed", "0", "--output", out, "--threads", "1",
                  "--quiet"])
    assert rc == 0, capsys.readouterr().err
    world = json.loads((out / "world.json").read_text())
    probes = [p["probe"] for p in world["training"]["loss_curve"] if "probe" in p]
    assert probes[0]["assoc"] < 0.5 <= probes[-1]["assoc"]  # in-context recall appears during training
    rc = run_cli(["eval", "--model", out, "--tasks", ",".join(TASKS), "--batch_size", "64",
                  "--output_path", tmp_path / "eval", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    summary = summarize(json.loads(next((tmp_path / "eval").rglob("results.json")).read_text())["metrics"])
    assert failures(summary) == [], summary
