"""Unlearning: method losses by hand, the runner end to end on the tiny testbed, bad input."""

import json
import math

import pytest
import torch
import yaml

import tiny
from conftest import cli_error, run_cli
from llmmem.config import ConfigError
from llmmem.tracking import steps_to_forget
from llmmem.unlearning import METHODS
from llmmem.unlearning.methods import sequence_nll
from llmmem.unlearning.spec import UnlearnSpec


def _batch():
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 11, 0]])
    labels = torch.tensor([[-100, -100, 6, 7, 8], [-100, -100, 10, 11, -100]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}


def test_method_losses_by_hand():
    model = tiny.make_model("llama")
    b = _batch()
    nll, n = sequence_nll(model, b)
    assert n.tolist() == [3.0, 2.0]
    mean = nll.sum() / n.sum()  # open-unlearning: model(**inputs).loss, the token mean over the batch
    ga = METHODS.get("grad_ascent")().loss(model, b, b, None)
    assert torch.allclose(ga, -mean)
    gd = METHODS.get("grad_diff")(alpha=2.0).loss(model, b, b, None)
    assert torch.allclose(gd, mean)  # -1 * mean + 2 * mean
    npo = METHODS.get("npo")(beta=0.1, alpha=0.0).loss(model, b, b, model)  # policy == reference
    assert math.isclose(float(npo.detach()), 2 / 0.1 * math.log(2), rel_tol=1e-5)
    sim = METHODS.get("simnpo")(alpha=0.0, gamma=1.0).loss(model, b, b, None)
    expected = -2 / 4.5 * torch.nn.functional.logsigmoid(4.5 * (nll / n)).mean()
    assert torch.allclose(sim, expected)
    noisy = METHODS.get("noisy_ft")(noise_std=0.5)
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    torch.manual_seed(0)
    noisy.after_step(model, 1e-3)
    delta = model.model.layers[0].mlp.up_proj.weight.detach() - w
    assert 0.4 < float(delta.std()) < 0.6
    with pytest.raises(ConfigError, match="unknown argument"):
        METHODS.get("npo")(temperature=3)


def test_steps_to_forget_rule():
    rows = []
    for step, (ext_a, loss_a, ext_b, loss_b) in enumerate([(1, 0.1, 1, 0.1), (0, 0.5, 1, 3.0), (0, 2.5, 0, 3.5)]):
        rows += [{"step": step * 10, "set": "forget", "id": "a", "extractable": ext_a, "loss": loss_a},
                 {"step": step * 10, "set": "forget", "id": "b", "extractable": ext_b, "loss": loss_b},
                 {"step": step * 10, "set": "nonmember", "id": "n1", "extractable": 0, "loss": 2.0},
                 {"step": step * 10, "set": "nonmember", "id": "n2", "extractable": 0, "loss": 2.2}]
    # a: not extractable at 10 but loss 0.5 < median 2.1; at 20 loss 2.5 > 2.1 -> 20. b: extractable until 20
    assert steps_to_forget(rows, ["a", "b", "c"]) == {"a": 20, "b": 20, "c": None}


def _cfg(tmp_path, model, **over):
    cfg = {"model": str(model), "forget": "testbed_canaries", "forget_filter": {"group": ["dup004", "dup008", "dup016"]},
           "retain": "testbed_recall", "nonmember": "testbed_canaries", "nonmember_filter": {"group": ["heldout"]},
           "method": "grad_diff", "steps": 12, "lr": 3e-3, "batch_size": 8, "eval_every": 4,
           "utility_tasks": ["testbed_recall"], "utility_limit": 40, "exposure_alternatives": 30,
           "output_path": str(tmp_path / "ul")}
    cfg.update(over)
    p = tmp_path / "ul.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_unlearn_end_to_end(tmp_path, tiny_testbed, capsys):
    assert run_cli(["unlearn", _cfg(tmp_path, tiny_testbed), "--quiet", "--plot"]) == 0, capsys.readouterr().err
    (res,) = list((tmp_path / "ul").rglob("results.json"))
    doc = json.loads(res.read_text())
    u = doc["unlearning"]
    assert u["method"] == "grad_diff" and u["n_forget"] == 9 and u["args"] == {"gamma": 1.0, "alpha": 1.0, "retain_loss": "nll"}
    assert set(u["steps_to_forget"]) == {p for p in u["predictors"]}
    assert set(u["correlations"]) == {"dup", "dense_loss", "min_k", "el2n", "grad_norm_sq"}
    for c in u["correlations"].values():
        assert set(c) == {"spearman", "ci_low", "ci_high", "n"}
    assert {"dup004", "dup008", "dup016"} == set(u["forgetting_by_group"])
    assert "testbed_recall" in doc["metrics"] and "unlearn_forget" in doc["metrics"]
    assert "exposure" in doc["metrics"]["unlearn_forget"]
    assert doc["cell"]["label"] == "grad_diff-12steps" and res.parent.name.startswith("grad_diff-12steps-")
    rows = [json.loads(line) for line in (res.parent / "curves.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [0, 4, 8, 12]
    assert {r["set"] for r in rows} == {"forget", "retain", "nonmember", "utility"}
    f0 = [r for r in rows if r["set"] == "forget" and r["step"] == 0]
    f12 = [r for r in rows if r["set"] == "forget" and r["step"] == 12]
    assert len(f0) == 9 and all("exposure" in r for r in f0)
    assert sum(r["loss"] for r in f12) > sum(r["loss"] for r in f0)  # the forget loss went up
    for name in ("unlearn_curves", "unlearn_predictors", "unlearn_utility"):
        assert list((tmp_path / "ul" / "plots").glob(f"{name}_*.png"))


def test_reference_model_comparison(tmp_path, tiny_testbed):
    assert run_cli(["unlearn", _cfg(tmp_path, tiny_testbed, steps=4, eval_every=4, utility_tasks=[],
                                     reference_model=str(tiny_testbed)), "--quiet"]) == 0
    doc = json.loads(next((tmp_path / "ul").rglob("results.json")).read_text())
    ref = doc["unlearning"]["reference"]
    assert {"unlearned", "retrained", "loss_auc_gap"} <= set(ref)
    # the reference here is the same model before unlearning: its forget loss is the dense one, lower
    assert ref["retrained"]["forget_loss"] < ref["unlearned"]["forget_loss"]
    assert ref["loss_auc_gap"] == pytest.approx(ref["unlearned"]["loss_auc"] - ref["retrained"]["loss_auc"])
    # MUSE PrivLeak from the two Min-40% AUCs (forget labelled 0, holdout 1), in percent
    au, ar = ref["unlearned"]["privleak_auc"], ref["retrained"]["privleak_auc"]
    assert ref["privleak"] == pytest.approx(((1 - au) - (1 - ar)) / (1 - ar + 1e-10) * 100)


def _bad(capsys, args, *needles):
    cli_error(capsys, ["unlearn", *args], *needles)


def test_bad_input(tmp_path, tiny_testbed, capsys):
    cfg = _cfg(tmp_path, tiny_testbed)
    _bad(capsys, [cfg, "method=forgetful"], "unknown unlearning method 'forgetful'", "npo")
    _bad(capsys, [cfg, "steps=0"], "steps=0", ">= 1")
    _bad(capsys, [cfg, "lr=0"], "lr=0 is outside (0, inf]")
    _bad(capsys, [cfg, "lr=-1e-4"], "lr=-0.0001 is outside")
    _bad(capsys, [cfg, "lr=.nan"], "lr=nan is not a finite number")
    _bad(capsys, [cfg, "method_args={gamma: abc}"], "GradDiff: gamma='abc' is not a number")
    _bad(capsys, [cfg, "method_args={beta: 0.1}"], "GradDiff: unknown argument(s) beta", "allowed: gamma, alpha")
    _bad(capsys, [cfg, "method_args={retain_loss: l2}"], "GradDiff: retain_loss='l2' is not one of nll, kl")
    _bad(capsys, [cfg, "method_args={gamma: .inf}"], "method_args.gamma=inf is not a finite number")
    _bad(capsys, [cfg, "eval_every=50"], "eval_every=50 is larger than steps=12")
    _bad(capsys, [cfg, "nonmember_filter={group: [dup004]}"], "forget and nonmember sets overlap")
    _bad(capsys, [cfg, "forget_filter={group: [dup999]}"], "forget set is empty")
    _bad(capsys, [cfg, "retain=testbed_canaries", "retain_filter={group: [dup008, dup016, dup001]}"],
         "overlap", "6 example(s)")
    _bad(capsys, [cfg, "colour=blue"], "unknown key(s) colour")
    assert not (tmp_path / "ul").exists()


def test_spec_validation_direct():
    with pytest.raises(ConfigError, match="eval_every"):
        UnlearnSpec(forget="f", retain="r", steps=5, eval_every=10)
