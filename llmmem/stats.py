"""Retention against the dense model, with uncertainty from a paired bootstrap over documents.

Retention of a metric in a cell (a pruned or unlearned model) is chance-corrected and normalised to the
dense cell of the same model:

    retention = (mean_cell - chance) / (mean_dense - chance)

over the documents both cells scored (rows of ``samples_<task>.jsonl``, paired by ``id``). Its standard
error and 95% interval come from a **paired bootstrap**: each replicate resamples document ids with
replacement and uses the *same* ids in the cell and in the dense run, so the correlation between the two
(same questions, same difficulty) is kept and nothing is counted twice.

**Undefined near chance.** When the dense model is not clearly above chance, the ratio says nothing (and
its bootstrap explodes). Rule: retention is undefined unless ``mean_dense - chance > min_z * SE_dense``
with ``SE_dense = std(dense values, ddof=1) / sqrt(n)`` and ``min_z = 2`` (and the gap is > 0). An
undefined retention has ``value=None`` and a ``reason``; report it as a gap, never as a number.
Replicates in which the resampled dense mean is at or below chance (rare once the rule holds: about
``P(Z < -min_z)``) are dropped, and their count is returned (``n_dropped``).

Pure numpy; the same inputs and seed give the same numbers.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

MIN_Z = 2.0


def _value(row: Mapping, metric: str) -> float | None:
    v = row.get(metric)
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _by_id(rows: Sequence[Mapping], metric: str, id_key: str, which: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        if id_key not in r:
            raise ValueError(f"{which} row has no {id_key!r}: {dict(list(r.items())[:4])}")
        k = str(r[id_key])
        if k in out:
            raise ValueError(f"{which} rows repeat {id_key} {k!r}; per-doc rows must have unique ids")
        v = _value(r, metric)
        if v is not None:
            out[k] = v
    return out


def paired_values(cell_rows: Sequence[Mapping], dense_rows: Sequence[Mapping], metric: str,
                  id_key: str = "id") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The metric of the docs both runs scored, aligned by id (sorted ids)."""
    c = _by_id(cell_rows, metric, id_key, "cell")
    d = _by_id(dense_rows, metric, id_key, "dense")
    ids = sorted(set(c) & set(d))
    return np.array([c[i] for i in ids], dtype=np.float64), np.array([d[i] for i in ids], dtype=np.float64), ids


def _rng(seed: int, name: str = "") -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode("utf-8"))])


def _undefined(reason: str, **extra) -> dict:
    return {"value": None, "stderr": None, "ci_low": None, "ci_high": None, "defined": False, "reason": reason,
            **extra}


def values_of(rows: Sequence[Mapping], metric: str, id_key: str = "id") -> np.ndarray:
    """One run's per-doc values of ``metric`` (docs without a value left out), in doc-id order."""
    v = _by_id(rows, metric, id_key, "run")
    return np.array([v[i] for i in sorted(v)], dtype=np.float64)


def chance_gap(d: np.ndarray, chance: float) -> tuple[float, float]:
    """(mean - chance, standard error of the mean) of the dense run's per-doc values: how far above chance a
    task is, the test a retention must pass (``min_z`` standard errors)."""
    return float(d.mean()) - chance, float(d.std(ddof=1)) / math.sqrt(len(d))


def _check(c: np.ndarray, d: np.ndarray, chance: float, min_z: float) -> str | None:
    n = len(d)
    if n < 2:
        return f"{n} doc(s) scored by both the cell and the dense run; need >= 2"
    gap, se = chance_gap(d, chance)
    if gap <= 0 or gap <= min_z * se:
        return (f"dense model not above chance: dense {d.mean():.4g} - chance {chance:.4g} = {gap:.3g} "
                f"<= {min_z:g} x SE {se:.3g} (n={n})")
    return None


def _boot_ratios(c: np.ndarray, d: np.ndarray, chance: float, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """Paired bootstrap replicates of the retention; NaN where the replicate's dense mean is <= chance."""
    idx = rng.integers(0, len(c), size=(n_boot, len(c)))
    num = c[idx].mean(axis=1) - chance
    den = d[idx].mean(axis=1) - chance
    out = np.full(n_boot, np.nan)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def _summary(value: float, boots: np.ndarray, **extra) -> dict:
    ok = boots[~np.isnan(boots)]
    se = float(np.std(ok, ddof=1)) if len(ok) > 1 else float("nan")
    lo, hi = (float(x) for x in np.percentile(ok, [2.5, 97.5])) if len(ok) else (float("nan"),) * 2
    return {"value": float(value), "stderr": se, "ci_low": lo, "ci_high": hi, "defined": True, "reason": None,
            "n_dropped": int(len(boots) - len(ok)), **extra}


def retention(cell_rows: Sequence[Mapping], dense_rows: Sequence[Mapping], metric: str, chance: float = 0.0, *,
              id_key: str = "id", n_boot: int = 1000, seed: int = 0, min_z: float = MIN_Z) -> dict:
    """Chance-corrected retention of ``metric`` in a cell against the dense run, paired over doc ids.

    Returns ``value, stderr, ci_low, ci_high`` (95% percentile interval), ``defined`` (False -> the
    four numbers are None), ``reason`` (why undefined, else None), ``n`` (paired docs) and
    ``n_dropped`` (bootstrap replicates dropped because their dense mean was at or below chance).
    """
    c, d, ids = paired_values(cell_rows, dense_rows, metric, id_key)
    why = _check(c, d, chance, min_z)
    if why:
        return _undefined(why, n=len(ids))
    value = (c.mean() - chance) / (d.mean() - chance)
    return _summary(value, _boot_ratios(c, d, chance, _rng(seed, metric), n_boot), n=len(ids))


def _family(tasks: Mapping[str, Mapping], id_key: str, n_boot: int, seed: int, min_z: float):
    per_task, boots, used, dropped = {}, [], [], {}
    for name in sorted(tasks):
        t = tasks[name]
        missing = {"cell", "dense", "metric"} - set(t)
        if missing:
            raise ValueError(f"family task {name!r} lacks {sorted(missing)} (needs cell, dense, metric, chance)")
        chance = float(t.get("chance") or 0.0)
        c, d, ids = paired_values(t["cell"], t["dense"], t["metric"], id_key)
        why = _check(c, d, chance, min_z)
        if why:
            per_task[name] = _undefined(why, n=len(ids))
            dropped[name] = why
            continue
        b = _boot_ratios(c, d, chance, _rng(seed, name), n_boot)
        per_task[name] = _summary((c.mean() - chance) / (d.mean() - chance), b, n=len(ids))
        boots.append(b)
        used.append(name)
    return per_task, (np.vstack(boots) if boots else None), used, dropped


def _family_retention(tasks, id_key, n_boot, seed, min_z) -> tuple[dict, np.ndarray | None]:
    per_task, boots, used, dropped = _family(tasks, id_key, n_boot, seed, min_z)
    if not used:
        return _undefined("no task of the family has a defined retention" if tasks else "no tasks",
                          tasks=[], dropped=dropped, per_task=per_task), None
    value = float(np.mean([per_task[n]["value"] for n in used]))
    fam = boots.mean(axis=0)  # NaN where any task's replicate was dropped
    return _summary(value, fam, tasks=used, dropped=dropped, per_task=per_task), fam


def family_retention(tasks: Mapping[str, Mapping], *, id_key: str = "id", n_boot: int = 1000, seed: int = 0,
                     min_z: float = MIN_Z) -> dict:
    """Mean retention over a family's tasks (e.g. recall, icl, extraction).

    ``tasks`` maps a task name to ``{"cell": rows, "dense": rows, "metric": name, "chance": float}``.
    Tasks whose retention is undefined drop out (listed in ``dropped`` with their reasons). Each task is
    bootstrapped over its own docs (tasks are independent samples); a family replicate is the mean of
    the tasks' replicates (replicates where any task's dense mean fell to chance are dropped). Returns the
    keys of :func:`retention` plus ``tasks`` (used names), ``dropped`` and ``per_task``.
    """
    return _family_retention(tasks, id_key, n_boot, seed, min_z)[0]


def retention_difference_test(closed_book: Mapping[str, Mapping], in_context: Mapping[str, Mapping], *,
                              id_key: str = "id", n_boot: int = 1000, seed: int = 0, min_z: float = MIN_Z) -> dict:
    """Is closed-book retention below in-context retention (in the same cell)?

    Both arguments are family mappings as in :func:`family_retention` (one entry for a single task).
    ``difference = R_closed - R_in_context``; its replicates pair each family's own bootstrap (docs
    resampled within each task; the two families' docs are different sets, so they are resampled
    independently). One-sided ``p_value`` for H0: difference >= 0 against H1: difference < 0, as
    ``(1 + #{replicates >= 0}) / (1 + #replicates)``; ``ci_low``/``ci_high``: 95% percentile interval of
    the difference. Undefined (``defined=False``, ``reason``) when either family's retention is.
    """
    a, ba = _family_retention(closed_book, id_key, n_boot, seed, min_z)
    b, bb = _family_retention(in_context, id_key, n_boot, seed + 1, min_z)
    base = {"alternative": "closed_book < in_context", "closed_book": a, "in_context": b}
    if not a["defined"] or not b["defined"]:
        why = "; ".join(f"{k}: {v['reason']}" for k, v in (("closed_book", a), ("in_context", b)) if not v["defined"])
        return {"difference": None, "stderr": None, "ci_low": None, "ci_high": None, "p_value": None,
                "defined": False, "reason": why, **base}
    diff = ba - bb
    ok = diff[~np.isnan(diff)]
    lo, hi = (float(x) for x in np.percentile(ok, [2.5, 97.5]))
    return {"difference": a["value"] - b["value"], "stderr": float(np.std(ok, ddof=1)), "ci_low": lo, "ci_high": hi,
            "p_value": float((1 + np.sum(ok >= 0)) / (1 + len(ok))), "defined": True, "reason": None,
            "n_dropped": int(len(diff) - len(ok)), **base}
