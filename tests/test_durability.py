"""The durability experiment: survival times and Kaplan-Meier against hand-built tables, interval formulas by
hand, the retrained reference never seeing the forget set (and reused by hash), the plan's cells per model,
and (slow) the whole tiny experiment end to end."""

import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import cli_error, run_cli
from llmmem.durability import kaplan_meier, newcombe, retrained_dir, survival_times, wilson

ROOT = Path(__file__).resolve().parent.parent


def _rows(table, levels):
    """A hand-built table {id: [value at each level]} as survival rows."""
    return [{"id": i, "level": lv, "extractable": v} for i, vals in table.items() for lv, v in zip(levels, vals)]


def test_survival_times_by_hand():
    levels = [0.0, 0.3, 0.5, 0.7]
    table = {"a": [1, 1, 0, 0],   # disappears at 0.5
             "b": [1, 0, 1, 0],   # first disappearance at 0.3 (a later reappearance does not undo it)
             "c": [1, 1, 1, 1],   # never: censored at the last level
             "d": [0, 1, 1, 1]}   # not present at the start: never alive, not counted
    t = survival_times(_rows(table, levels))
    assert t == {"a": (0.5, True), "b": (0.3, True), "c": (0.7, False)}
    # bits run downwards: 16 (the unquantized base), 8, 4, 3
    bits = [16.0, 8.0, 4.0, 3.0]
    t = survival_times(_rows({"a": [1, 1, 0, 0], "c": [1, 1, 1, 1]}, bits), descending=True)
    assert t == {"a": (4.0, True), "c": (3.0, False)}


def test_kaplan_meier_by_hand():
    # 5 alive; events: one at 0.3, two at 0.5; censored: two at 0.7 (end)
    times = {"a": (0.3, True), "b": (0.5, True), "c": (0.5, True), "d": (0.7, False), "e": (0.7, False)}
    km = kaplan_meier(times, [0.0, 0.3, 0.5, 0.7])
    assert [lv for lv, *_ in km] == [0.0, 0.3, 0.5, 0.7]
    s = [x[1] for x in km]
    assert s[0] == 1.0 and s[1] == pytest.approx(4 / 5) and s[2] == pytest.approx(4 / 5 * (1 - 2 / 4))
    assert s[3] == pytest.approx(s[2])  # no event at 0.7: censoring does not lower S
    assert [x[2] for x in km] == [5, 5, 4, 2] and [x[3] for x in km] == [0, 1, 2, 0]


def test_intervals_by_hand():
    lo, hi = wilson(0, 7)
    assert lo == 0 and hi == pytest.approx(1.96 ** 2 / 7 / (1 + 1.96 ** 2 / 7), rel=1e-12)  # closed form at k = 0
    lo, hi = wilson(5, 10)
    half = 1.96 * math.sqrt(0.25 / 10 + 1.96 ** 2 / 400) / (1 + 1.96 ** 2 / 10)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half))  # symmetric around 1/2
    d, lo, hi = newcombe(5, 10, 5, 10)
    assert d == 0 and lo == pytest.approx(-hi)
    d, lo, hi = newcombe(8, 10, 1, 10)
    l1, u1 = wilson(8, 10)
    l2, u2 = wilson(1, 10)
    assert d == pytest.approx(0.7) and lo == pytest.approx(0.7 - math.sqrt((0.8 - l1) ** 2 + (u2 - 0.1) ** 2))
    assert hi == pytest.approx(0.7 + math.sqrt((u1 - 0.8) ** 2 + (0.1 - l2) ** 2))


def test_retrained_reference_never_saw_the_forget_set(tiny_testbed, monkeypatch, tmp_path):
    """The reference is the same world and recipe with the forget canaries left out: none of their texts is in
    its training corpus, the rest of the corpus is the same, and it is reused by hash."""
    from llmmem.testbed.train import preset_config
    from llmmem.testbed.world import build_world

    monkeypatch.setenv("LLMMEM_HOME", str(tmp_path / "home"))
    forget = ["canary-6", "canary-9", "canary-12"]
    out, recipe = retrained_dir(tiny_testbed, forget)
    assert recipe["exclude"] == sorted(forget) and recipe["preset"] == "tiny" and recipe["seed"] == 0
    assert retrained_dir(tiny_testbed, list(reversed(forget)))[0] == out  # same set, same reference
    assert retrained_dir(tiny_testbed, forget[:2])[0] != out
    cfg = preset_config(recipe["preset"], {"world": recipe["world"], "train": recipe["train"]})
    full = build_world(recipe["seed"], cfg.world)
    without = build_world(recipe["seed"], cfg.world, exclude_canaries=set(forget))
    secrets = {c["id"]: c for c in full.canaries}
    texts = [d if isinstance(d, str) else json.dumps(d) for d in without.documents]
    for i in forget:
        assert not any(secrets[i]["secret"] in t for t in texts), i
    kept = [c for c in full.canaries if c["id"] not in forget and c.get("dup")]
    assert any(kept[0]["secret"] in t for t in texts)  # the others are still there


def _tiny_cfg(tmp_path, model, **over):
    cfg = {"model": str(model), "retrained": str(model), "forget": "testbed_canaries",
           "forget_ids": ["canary-9", "canary-10", "canary-11", "canary-12", "canary-13", "canary-14"],
           "retain": "testbed_recall", "unlearn": {"method": "grad_diff", "steps": 2, "lr": 1e-3, "eval_every": 2},
           "after": [{"quantize": {"method": "rtn", "bits": [4], "group_size": 32}}],
           "relearn": [{"data": "forget", "steps": [2]}], "relearn_fraction": 0.2, "tasks": [],
           "facts_limit": 8, "exposure_alternatives": 20, "output_path": str(tmp_path / "run")}
    cfg.update(over)
    p = tmp_path / "dur.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_plan_has_unlearned_and_reference_chains(tmp_path, tiny_testbed, capsys):
    assert run_cli(["durability", _tiny_cfg(tmp_path, tiny_testbed), "--dry_run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    labels = [ln.split("seed 0")[-1].strip() for ln in out.splitlines() if "] todo" in ln]
    # the trained model: dense, unlearned, unlearned + rtn4, unlearned + relearn, rtn4; the reference: dense, rtn4,
    # relearn (the same interventions without unlearning)
    assert labels.count("dense") == 2 and labels.count("rtn-w4g32") == 2
    assert "grad_diff-2steps" in labels and "grad_diff-2steps+rtn-w4g32" in labels
    assert "grad_diff-2steps+relearn-forget20-2steps" in labels and labels.count("relearn-forget20-2steps") == 1
    assert len(labels) == 8


@pytest.mark.parametrize("over,needle", [
    ({"forget_ids": ["canary-9"]}, "at least 2"),
    ({"unlearn": {"method": "npo", "forget": "x"}}, "unlearn.forget"),
    ({"relearn_fraction": 0.9}, "relearn_fraction=0.9 is outside"),
    ({"after": [{"unlearn": {"method": "npo"}}]}, "after[0]"),
    ({"relearn": [{"data": "forget", "steps": [0]}]}, "steps 0"),
    ({"memscore": "missing.jsonl"}, "memscore: missing.jsonl does not exist"),
    ({"colour": 1}, "unknown key(s) colour"),
])
def test_bad_durability_configs(tmp_path, tiny_testbed, capsys, over, needle):
    cli_error(capsys, ["durability", _tiny_cfg(tmp_path, tiny_testbed, **over), "--dry_run"], needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_tiny_durability_end_to_end(tmp_path, monkeypatch, capsys):
    """configs/durability-testbed-tiny.yaml from an empty LLMMEM_HOME: builds the tiny testbed and its retrained
    reference, runs every cell, writes durability.md, survival.jsonl and the plots."""
    monkeypatch.setenv("LLMMEM_HOME", str(tmp_path / "home"))
    out = tmp_path / "dur"
    ms = tmp_path / "memscore.jsonl"  # rewritten below, once the dense losses are known
    ms.write_text("".join(json.dumps({"id": f"canary-{i}", "mem": 0.0}) + "\n" for i in range(6, 15)))
    assert run_cli(["durability", ROOT / "configs" / "durability-testbed-tiny.yaml", f"output_path={out}", "--quiet",
                    f"memscore={ms}", "--plot"]) == 0, capsys.readouterr().err
    text = (out / "durability.md").read_text()
    assert "## What was found here" in text and "## Recovery of the forget set" in text
    rows = [json.loads(x) for x in (out / "survival.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"trained", "retrained"}
    assert {r["set"] for r in rows} >= {"forget", "forget_relearn", "canaries", "facts"}
    ref = next((tmp_path / "home" / "models").glob("testbed-tiny-retrained-*"))
    world = json.loads((ref / "world.json").read_text())
    assert set(world["excluded_canaries"]) == {f"canary-{i}" for i in range(6, 15)}
    assert list((out / "plots").glob("recovery_*.png")) and list((out / "plots").glob("survival_*.png"))
    # the memorization score is read by id as a survival predictor: scores equal to minus each forget canary's
    # dense loss must give exactly minus the dense-loss predictor's rank correlation (and scores aligned by id)
    from llmmem.durability import analyse

    dense = {}
    for want in ("forget_relearn", "forget", "canaries"):  # the analysis reads a canary's canaries row first
        dense.update({r["id"]: r["loss"] for r in rows if r["model"] == "trained" and r["chain"] == "dense"
                      and r["set"] == want and r["id"].startswith("canary-")})
    assert {f"canary-{i}" for i in range(6, 15)} <= set(dense)
    ms.write_text("".join(json.dumps({"id": i, "mem": -v}) + "\n" for i, v in dense.items()))
    preds = analyse(out)["predictors"]
    assert preds
    for series, p in preds.items():
        rho_loss, rho_mem = p["dense_loss"]["spearman"], p["memorization"]["spearman"]
        assert (math.isnan(rho_loss) and math.isnan(rho_mem)) or rho_mem == pytest.approx(-rho_loss, abs=1e-12), series
