"""The report's retention: a paired bootstrap over the docs of the cell and its dense cell, undefined (never a
number) near chance, and the recall-vs-ICL statement computed from the same per-doc rows."""

import json

import pytest

from llmmem.report import build_report, load_run, retention_of
from llmmem.results import CellDir
from llmmem.stats import retention


def _cell(run, name, label, chain, rows_by_task, chance=None, suites=None):
    cd = CellDir(run, f"m/{name}").prepare()
    for task, rows in rows_by_task.items():
        cd.write_samples(task, rows)
    metrics = {t: {"exact_match": sum(r["exact_match"] for r in rows) / len(rows), "exact_match_stderr": 0.1}
               for t, rows in rows_by_task.items()}
    steps = [{"kind": "prune", "label": label, "series": "wanda", "spec": {}, "axis": "sparsity",
              "axis_value": 0.5, "axis_base": 0.0}] if chain else []
    cd.finish({"cell_config": {"chain": chain, "eval": {"tasks": list(rows_by_task)}, "seed": 0},
               "cell": {"label": label, "steps": steps}, "model": {"name": "m"}, "metrics": metrics,
               "n_samples": {t: len(r) for t, r in rows_by_task.items()}, "seeds": {"seed": 0},
               "tasks": {t: {"suite": (suites or {}).get(t, "recall"), "primary_metric": "exact_match",
                             "chance": {"exact_match": (chance or {}).get(t, 0.0)}} for t in rows_by_task}})


def _rows(values):
    return [{"id": str(i), "exact_match": float(v)} for i, v in enumerate(values)]


def test_report_retention_is_the_paired_bootstrap(tmp_path):
    dense = [1, 1, 1, 1, 0, 1, 1, 0, 1, 1] * 4
    pruned = [1, 0, 1, 0, 0, 1, 0, 0, 1, 0] * 4
    assoc = [1 if i % 5 == 0 else 0 for i in range(40)]  # dense at chance (0.2) for a 5-way task
    _cell(tmp_path, "dense-1", "dense", [], {"capitals": _rows(dense), "assoc": _rows(assoc)},
          chance={"assoc": 0.2}, suites={"assoc": "icl"})
    _cell(tmp_path, "wanda-2", "wanda-unstructured-s0.5", [{"kind": "prune"}],
          {"capitals": _rows(pruned), "assoc": _rows(assoc[::-1])}, chance={"assoc": 0.2}, suites={"assoc": "icl"})
    cells = load_run(tmp_path)
    c = next(x for x in cells if x["kind"] != "dense")
    r = retention_of(cells, c, "capitals", "exact_match")
    expected = retention(_rows(pruned), _rows(dense), "exact_match", 0.0, seed=0)
    assert r == expected and r["value"] == pytest.approx(16 / 32)
    a = retention_of(cells, c, "assoc", "exact_match")
    assert not a["defined"] and a["value"] is None and "chance" in a["reason"]
    report = build_report(tmp_path)
    line = next(ln for ln in report.splitlines() if ln.startswith("| capitals |") and "±" in ln and "0.50" in ln)
    assert f"{expected['value']:.2f} ± {expected['stderr']:.2f}" in line
    assoc_norm = [ln for ln in report.splitlines() if ln.startswith("| assoc |")][1]
    assert assoc_norm.endswith("| - | - |")  # undefined, a gap: never a number
    assert "retention of assoc exact_match undefined" in report
    assert "closed-book recall vs in-context learning" in report


def test_unreadable_samples_do_not_become_numbers(tmp_path):
    _cell(tmp_path, "dense-1", "dense", [], {"capitals": _rows([1, 0] * 10)})
    _cell(tmp_path, "wanda-2", "wanda-unstructured-s0.5", [{"kind": "prune"}], {"capitals": _rows([1, 0] * 10)})
    (tmp_path / "m" / "wanda-2" / "samples_capitals.jsonl").unlink()
    cells = load_run(tmp_path)
    c = next(x for x in cells if x["kind"] != "dense")
    r = retention_of(cells, c, "capitals", "exact_match")
    assert not r["defined"] and "per-doc" in r["reason"]
    json.dumps(r)


def _bench_cell(run, name, label, chain, metrics, suites):
    cd = CellDir(run, f"m/{name}").prepare()
    steps = [{"kind": "unlearn", "label": label, "series": label.split("-")[0], "spec": {}, "axis": "steps",
              "axis_value": 10, "axis_base": 0.0}] if chain else []
    cd.finish({"cell_config": {"chain": chain, "eval": {"tasks": list(metrics)}, "seed": 0},
               "cell": {"label": label, "steps": steps}, "model": {"name": "m"}, "metrics": metrics,
               "n_samples": {t: 4 for t in metrics}, "seeds": {"seed": 0},
               "tasks": {t: {"suite": suites[t], "primary_metric": next(iter(metrics[t]))} for t in metrics}})


def test_benchmark_tables_in_their_own_layouts(tmp_path):
    """TOFU: forget quality vs model utility per split; MUSE: its criteria C1-C4 per cell (C4 also as a share
    of the dense cell's) and the note on C5/C6; one table per benchmark task, one row per cell."""
    suites = {"tofu_forget01": "tofu", "muse_news": "muse"}
    dense = {"tofu_forget01": {"forget_quality": 0.0012, "model_utility": 0.62, "forget_truth_ratio": 0.51,
                               "extraction_strength": 0.9, "privleak": -99.0},
             "muse_news": {"verbmem_f": 0.58, "knowmem_f": 0.64, "knowmem_r": 0.55, "privleak": -99.8}}
    npo = {"tofu_forget01": {"forget_quality": 0.9188, "model_utility": 0.59, "forget_truth_ratio": 0.66,
                             "extraction_strength": 0.05, "privleak": 3.1},
           "muse_news": {"verbmem_f": 0.0, "knowmem_f": 0.1, "knowmem_r": 0.44, "privleak": 12.0}}
    _bench_cell(tmp_path, "dense-1", "dense", [], dense, suites)
    _bench_cell(tmp_path, "npo-2", "npo-10steps", [{"kind": "unlearn"}], npo, suites)
    report = build_report(tmp_path).splitlines()
    i = report.index("### TOFU: forget quality vs model utility — tofu_forget01")
    assert report[i + 2].startswith("| cell | forget quality ↑ | model utility ↑ |")
    assert "forget ROUGE-L" not in report[i + 2]  # a metric no cell has is not a column
    assert report[i + 4] == "| dense | 0.0012 | 0.620 | 0.510 | 0.900 | -99.000 |"
    assert report[i + 5] == "| npo-10steps | 0.9188 | 0.590 | 0.660 | 0.050 | 3.100 |"
    j = report.index("### MUSE: the six criteria — muse_news")
    head = report[j + 2]
    for c in ("C1 no verbatim memorization", "C2 no knowledge memorization", "C3 no privacy leakage",
              "C4 utility preserved", "C4 as share of dense"):
        assert c in head
    assert report[j + 4] == "| dense | 0.580 | 0.640 | -99.800 | 0.550 | 1.00 |"
    assert report[j + 5] == "| npo-10steps | 0.000 | 0.100 | 12.000 | 0.440 | 0.80 |"
    assert any("C5 (scalability" in ln and "C6 (sustainability" in ln for ln in report[j:])


def test_report_states_family_retention_dense_gap_and_the_paired_test(tmp_path):
    """Issue 21: the report gives the headline's numbers - each family's retention ± SE per cell, the largest
    SE, each headline task's distance from chance on the dense model in standard errors - and the recall-vs-ICL
    statement with both families' SEs; all computed by llmmem.stats from the same per-doc rows."""
    import math

    import numpy as np

    from llmmem.stats import family_retention, retention_difference_test

    dense_cap = [1, 1, 1, 1, 0, 1, 1, 0, 1, 1] * 4
    cut_cap = [1, 0, 1, 0, 0, 1, 0, 0, 1, 0] * 4
    dense_ctx = [1, 1, 0, 1, 1] * 8
    cut_ctx = [1, 1, 0, 1, 0] * 8
    suites = {"capitals": "recall", "override": "icl"}
    _cell(tmp_path, "dense-1", "dense", [], {"capitals": _rows(dense_cap), "override": _rows(dense_ctx)},
          suites=suites)
    _cell(tmp_path, "wanda-2", "wanda-unstructured-s0.5", [{"kind": "prune"}],
          {"capitals": _rows(cut_cap), "override": _rows(cut_ctx)}, suites=suites)
    report = build_report(tmp_path).splitlines()

    rec = family_retention({"capitals": {"cell": _rows(cut_cap), "dense": _rows(dense_cap), "metric": "exact_match"}})
    icl = family_retention({"override": {"cell": _rows(cut_ctx), "dense": _rows(dense_ctx), "metric": "exact_match"}})
    i = report.index("### headline: retention by task family")
    assert report[i + 4] == "| cell | closed-book recall | in-context learning |"
    assert report[i + 6] == (f"| wanda-unstructured-s0.5 | {rec['value']:.2f} ± {rec['stderr']:.3f} | "
                             f"{icl['value']:.2f} ± {icl['stderr']:.3f} |")
    assert rec["value"] == pytest.approx(16 / 32) and icl["value"] == pytest.approx(24 / 32)
    assert f"Largest standard error: {max(rec['stderr'], icl['stderr']):.3f} (wanda-unstructured-s0.5)." in report

    j = report.index("### headline tasks on the dense model")
    d = np.array(dense_cap, dtype=float)
    z = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))  # chance 0
    assert f"| closed-book recall | capitals | exact_match | 0.800 | 0 | 40 | {z:.1f} |" in report[j:j + 8]

    t = retention_difference_test({"capitals": {"cell": _rows(cut_cap), "dense": _rows(dense_cap), "metric": "exact_match"}},
                                  {"override": {"cell": _rows(cut_ctx), "dense": _rows(dense_ctx), "metric": "exact_match"}},
                                  seed=0)
    row = next(ln for ln in report if ln.startswith("| wanda-unstructured-s0.5 |") and "[" in ln)
    assert row == (f"| wanda-unstructured-s0.5 | {rec['value']:.2f} | {icl['value']:.2f} | {t['difference']:+.2f} "
                   f"[{t['ci_low']:+.2f}, {t['ci_high']:+.2f}] | {t['p_value']:.3f} | yes |")
    assert t["p_value"] < 0.05  # 0.50 against 0.75 over 40 docs each
