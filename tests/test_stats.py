"""Retention against dense with a paired bootstrap over docs: known answers on hand-built rows."""

import math

import numpy as np
import pytest

from llmmem.stats import family_retention, paired_values, retention, retention_difference_test


def _rows(values, metric="em", start=0):
    return [{"id": f"d{i + start}", metric: v} for i, v in enumerate(values)]


def test_identical_cell_and_dense_retain_everything_with_no_spread():
    rng = np.random.default_rng(0)
    dense = _rows(rng.integers(0, 2, 80).astype(float))
    r = retention(dense, dense, "em", chance=0.25)
    assert r["defined"] and r["reason"] is None
    assert r["value"] == 1.0 and r["stderr"] == 0.0 and r["ci_low"] == r["ci_high"] == 1.0
    assert r["n"] == 80


def test_dense_at_chance_is_undefined_with_a_reason():
    # the associative-recall case: chance 0.25, dense 0.30 on 40 docs (SE 0.07): not clearly above chance
    dense = _rows([1.0] * 12 + [0.0] * 28)
    cell = _rows([1.0] * 3 + [0.0] * 37)
    r = retention(cell, dense, "em", chance=0.25)
    assert not r["defined"] and r["value"] is None and r["stderr"] is None
    assert "not above chance" in r["reason"] and "n=40" in r["reason"]
    # the same dense score on 4000 docs is clearly above chance: defined
    big = retention(_rows([1.0] * 300 + [0.0] * 3700), _rows([1.0] * 1200 + [0.0] * 2800), "em", chance=0.25)
    assert big["defined"] and big["value"] == pytest.approx((0.075 - 0.25) / (0.30 - 0.25))
    below = retention(dense, _rows([0.0] * 40), "em", chance=0.0)
    assert not below["defined"]


def test_known_shift_value_and_paired_standard_error():
    rng = np.random.default_rng(1)
    n = 400
    d = rng.uniform(0.4, 1.0, n)
    c = d - 0.1 + rng.normal(0, 0.02, n)  # every doc loses about 0.1
    r = retention(_rows(c, "f1"), _rows(d, "f1"), "f1", chance=0.0, n_boot=2000, seed=3)
    ratio = c.mean() / d.mean()
    assert r["value"] == pytest.approx(ratio, abs=1e-12)
    # first-order propagation for a paired ratio: SE = sd(c_i - R d_i) / (sqrt(n) * mean(d))
    se = np.std(c - ratio * d, ddof=1) / (math.sqrt(n) * d.mean())
    assert r["stderr"] == pytest.approx(se, rel=0.1)
    assert r["ci_low"] < ratio < r["ci_high"]
    # unpaired errors (dense SE counted on its own) would be ~10x wider here: the pairing is what shrinks it
    unpaired = ratio * math.sqrt((c.std(ddof=1) / c.mean()) ** 2 + (d.std(ddof=1) / d.mean()) ** 2) / math.sqrt(n)
    assert r["stderr"] < unpaired / 5


def test_pairing_by_id_and_determinism():
    dense = _rows([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    cell = [{"id": "d5", "em": 1.0}, {"id": "d0", "em": 0.0}, {"id": "d2", "em": None}, {"id": "d9", "em": 1.0},
            {"id": "d3", "em": 1.0}, {"id": "d1", "em": float("nan")}]
    c, d, ids = paired_values(cell, dense, "em")
    assert ids == ["d0", "d3", "d5"] and c.tolist() == [0.0, 1.0, 1.0] and d.tolist() == [1.0, 1.0, 1.0]
    rng = np.random.default_rng(2)
    dv = rng.uniform(0.5, 1, 50)
    cv = dv * rng.uniform(0.3, 1, 50)
    a = retention(_rows(cv), _rows(dv), "em", seed=5)
    assert a == retention(_rows(cv), _rows(dv), "em", seed=5)
    assert a["stderr"] != retention(_rows(cv), _rows(dv), "em", seed=6)["stderr"]
    with pytest.raises(ValueError, match="repeat"):
        retention(_rows([1.0, 1.0]) * 2, _rows([1.0, 1.0]), "em")


def test_family_retention_drops_undefined_tasks_and_averages_the_rest():
    rng = np.random.default_rng(4)
    d1, d2 = rng.uniform(0.5, 1, 60), rng.uniform(0.5, 1, 30)
    tasks = {
        "a": {"cell": _rows(d1 * 0.5), "dense": _rows(d1), "metric": "em", "chance": 0.0},
        "b": {"cell": _rows(d2 * 0.9), "dense": _rows(d2), "metric": "em", "chance": 0.0},
        "at_chance": {"cell": _rows([1.0] * 5 + [0.0] * 15), "dense": _rows([1.0] * 6 + [0.0] * 14),
                      "metric": "em", "chance": 0.25},
    }
    fam = family_retention(tasks, seed=1)
    assert fam["defined"] and fam["tasks"] == ["a", "b"] and set(fam["dropped"]) == {"at_chance"}
    assert fam["value"] == pytest.approx((0.5 + 0.9) / 2)
    assert fam["per_task"]["a"]["value"] == pytest.approx(0.5) and not fam["per_task"]["at_chance"]["defined"]
    assert fam["stderr"] == pytest.approx(0.0, abs=1e-12)  # constant per-doc ratios: every replicate is the same
    only = family_retention({"a": tasks["a"]}, seed=1)
    assert only["value"] == fam["per_task"]["a"]["value"]
    none = family_retention({"at_chance": tasks["at_chance"]})
    assert not none["defined"] and none["value"] is None and "no task" in none["reason"]


def test_retention_difference_test_detects_closed_book_below_in_context():
    rng = np.random.default_rng(5)
    dq, di = rng.integers(0, 2, 200).astype(float), rng.integers(0, 2, 200).astype(float)
    dq[:20], di[:20] = 1.0, 1.0  # dense well above chance (0)
    lose = dq * (rng.uniform(size=200) < 0.5)  # closed-book keeps about half of what dense knew
    closed = {"recall": {"cell": _rows(lose), "dense": _rows(dq), "metric": "em", "chance": 0.0}}
    icl = {"assoc": {"cell": _rows(di), "dense": _rows(di), "metric": "em", "chance": 0.0}}
    t = retention_difference_test(closed, icl, seed=0)
    assert t["defined"] and t["alternative"] == "closed_book < in_context"
    assert t["difference"] == pytest.approx(lose.sum() / dq.sum() - 1.0)
    assert t["ci_high"] < 0 and t["p_value"] < 0.01
    back = retention_difference_test(icl, closed, seed=0)  # in the other direction: no evidence
    assert back["p_value"] > 0.9 and back["ci_low"] > 0
    same = retention_difference_test(icl, icl, seed=0)
    assert same["difference"] == 0.0 and same["p_value"] == 1.0  # all replicates tie at 0 (counted as >= 0)
    flat = {"x": {"cell": _rows([0.0] * 10), "dense": _rows([0.0] * 10), "metric": "em", "chance": 0.0}}
    u = retention_difference_test(flat, icl)
    assert not u["defined"] and u["p_value"] is None and u["reason"].startswith("closed_book:")
