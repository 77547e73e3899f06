"""Slow: the offline suites on the real SmolLM2-135M (numbers recorded in the closing note of the suites issue)."""

import json

import pytest

from conftest import REAL_HOME, run_cli

pytestmark = pytest.mark.slow


def test_smollm2_offline_suites(smollm2_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMMEM_HOME", REAL_HOME)
    rc = run_cli(["eval", "--model", "smollm2-135m", "--tasks",
                  "capitals,associative_recall,openbook_invented,famous_passages", "--batch_size", "16",
                  "--output_path", tmp_path, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(next(tmp_path.rglob("results.json")).read_text())
    res = doc["metrics"]
    assert res["capitals"]["exact_match"] >= 0.4
    # associative recall: chance is 1/n_pairs (4, 8, 16 pairs, equally many rows)
    chance = sum(1 / n for n in (4, 8, 16)) / 3
    ar = res["associative_recall"]
    assert ar["exact_match"] > chance + 3 * ar["exact_match_stderr"]
    ob = res["openbook_invented"]
    assert ob["exact_match"] > 0.3  # answers exist only in the passage; chance is ~0
    fam, ctl = res["famous_passages"]["buckets"]["famous"], res["famous_passages"]["buckets"]["control"]
    assert fam["n"] == 60 and ctl["n"] == 60
    assert fam["tf_accuracy"] > ctl["tf_accuracy"] + 2 * (fam["tf_accuracy_stderr"] + ctl["tf_accuracy_stderr"])
    assert fam["suffix_nll"] < ctl["suffix_nll"]
    assert fam["token_match"] >= ctl["token_match"]
