"""What a dense testbed must show, read from an llmmem ``results.json`` of the testbed tasks.

Used by ``benchmarks/testbed.py`` (the table in benchmarks/README.md) and the slow acceptance test, so the
targets live in one place.
"""

from __future__ import annotations

TASKS = ["testbed_recall", "testbed_canaries", "testbed_mia", "testbed_assoc", "testbed_override",
         "testbed_openbook"]

# name -> (comparison, threshold): the testbed issue's acceptance for the dense `small` preset
TARGETS = {
    "recall@>=16": (">=", 0.9),
    "extract@>=16": (">=", 0.9),
    "extract held-out": ("<=", 0.05),
    "assoc": (">=", 0.9),
    "override": (">=", 0.8),
    "mia auc": (">=", 0.9),
}


def summarize(results: dict) -> dict:
    """Acceptance numbers from the ``metrics`` section of a results.json holding the testbed tasks."""
    recall = {int(k): v["exact_match"] for k, v in results["testbed_recall"]["buckets"].items()}
    extract = {k: v["extractable"] for k, v in results["testbed_canaries"]["buckets"].items()}
    by_dup = {int(k[3:]): v for k, v in extract.items() if k.startswith("dup")}
    return {
        "recall@1": recall[min(recall)],
        "recall@>=16": min(v for k, v in recall.items() if k >= 16),
        "extract@1": by_dup[min(by_dup)],
        "extract@>=16": min(v for k, v in by_dup.items() if k >= 16),
        "extract held-out": extract["heldout"],
        "assoc": results["testbed_assoc"]["exact_match"],
        "override": results["testbed_override"]["follows_context"],
        "openbook": results["testbed_openbook"]["exact_match"],
        "mia auc": results["testbed_mia"]["loss_auc"],
    }


def failures(summary: dict) -> list[str]:
    """The targets a summary misses, as readable lines (empty when all are met)."""
    out = []
    for name, (op, thr) in TARGETS.items():
        v = summary[name]
        if not (v >= thr if op == ">=" else v <= thr):
            out.append(f"{name} = {v:.3f} (target {op} {thr})")
    if not summary["recall@1"] < summary["recall@>=16"]:
        out.append(f"recall of facts seen once ({summary['recall@1']:.3f}) is not below frequent facts")
    return out
