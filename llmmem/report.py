"""Tables from results (read from files or from in-memory task results); never needs a model."""

from __future__ import annotations

import math


def _fmt(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def metrics_table(results: dict, n_samples: dict | None = None) -> str:
    """Markdown table: task | metric | value | stderr | n, for a cell's ``results`` mapping."""
    lines = ["| task | metric | value | ± stderr | n |", "|---|---|---:|---:|---:|"]
    for task, metrics in results.items():
        for name, value in metrics.items():
            if name.endswith("_stderr") or name == "buckets" or not isinstance(value, (int, float)):
                continue
            if name.startswith("n_"):
                continue
            se = metrics.get(f"{name}_stderr")
            n = (n_samples or {}).get(task, "")
            lines.append(f"| {task} | {name} | {_fmt(value)} | {_fmt(se)} | {n} |")
    return "\n".join(lines)


def buckets_table(results: dict) -> str:
    """Per-bucket values of every task that has buckets."""
    lines = []
    for task, metrics in results.items():
        buckets = metrics.get("buckets")
        if not buckets:
            continue
        names = [k for k in next(iter(buckets.values())) if k != "n" and not k.endswith("_stderr")]
        lines.append(f"\n{task}: " + ", ".join(names))
        lines.append("| bucket | n | " + " | ".join(names) + " |")
        lines.append("|---|---:|" + "---:|" * len(names))
        for b, vals in buckets.items():
            cells = [f"{_fmt(vals[m], 3)} ± {_fmt(vals.get(m + '_stderr'), 3)}" for m in names]
            lines.append(f"| {b} | {vals['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- run reports
FAMILY = {"recall": "closed-book recall", "icl": "in-context learning", "extraction": "verbatim extraction",
          "mia": "membership inference"}


def samples_of(cell: dict, task: str) -> list[dict] | None:
    """A cell's per-doc rows of a task (``samples_<task>.jsonl``), read once and kept on the record."""
    from pathlib import Path

    from llmmem.results import read_jsonl_tolerant, safe_name

    cache = cell.setdefault("_samples", {})
    if task not in cache:
        p = Path(cell["run_dir"]) / cell["path"] / f"samples_{safe_name(task)}.jsonl"
        cache[task] = read_jsonl_tolerant(p) if p.is_file() else None
    return cache[task]


def retention_of(cells: list[dict], cell: dict, task: str, metric: str) -> dict:
    """Chance-corrected retention of ``metric`` in ``cell`` against its dense cell, by a paired bootstrap over
    docs (``llmmem.stats.retention``); undefined, with the reason, near chance or without per-doc values."""
    from llmmem.stats import retention

    d = dense_of(cells, cell)
    if d is None:
        return {"value": None, "defined": False, "reason": "no dense cell"}
    rows, drows = samples_of(cell, task), samples_of(d, task)
    if not rows or not drows or not any(r.get(metric) is not None for r in rows):
        return {"value": None, "defined": False, "reason": f"{metric} has no per-doc values"}
    return retention(rows, drows, metric, chance_of(cell["doc"], task, metric), seed=0)


def family_tasks(cells: list[dict], cell: dict, pairs: list[tuple[str, str]]) -> dict:
    """The mapping ``llmmem.stats.family_retention`` takes, for a family's (task, metric) pairs."""
    d = dense_of(cells, cell)
    out = {}
    for task, metric in pairs:
        rows, drows = samples_of(cell, task), (samples_of(d, task) if d else None)
        if rows and drows and any(r.get(metric) is not None for r in rows):
            out[task] = {"cell": rows, "dense": drows, "metric": metric, "chance": chance_of(cell["doc"], task, metric)}
    return out


def load_run(run_dir) -> list[dict]:
    """Every finished cell of a run as a flat record, read from its config (never from its name).

    ``group`` separates cells evaluated with different settings (tasks, limits, shots, backend): they are
    reported apart, labelled, never mixed in one table. ``series`` is the chain with the last step's axis
    value left out (``wanda``, ``npo -> rtn g32``), ``x`` that value (sparsity, bits, steps), ``base`` the
    chain it extends (the dense model for one-step chains)."""
    import json

    from llmmem.results import iter_cells

    cells = []
    for rel, doc in iter_cells(run_dir):
        cfg = doc.get("cell_config") or {}
        steps = (doc.get("cell") or {}).get("steps") or []
        chain = cfg.get("chain") or []
        group = json.dumps(cfg.get("eval") or {}, sort_keys=True)
        last = steps[-1] if steps else None
        series = " -> ".join([s["label"] for s in steps[:-1]] + ([last["series"]] if last else [])) or "dense"
        cells.append({
            "path": rel, "doc": doc, "run_dir": str(run_dir),
            "model": (doc.get("model") or {}).get("name") or rel.split("/")[0],
            "seed": (doc.get("seeds") or {}).get("seed", 0),
            "label": (doc.get("cell") or {}).get("label") or "dense",
            "steps": steps, "group": group,
            "key": json.dumps(chain, sort_keys=True), "base": json.dumps(chain[:-1], sort_keys=True) if chain else None,
            "series": series, "kind": last["kind"] if last else "dense",
            "axis": last["axis"] if last else None,
            "x": float(last["axis_value"]) if last and last.get("axis_value") is not None else 0.0,
            "x_base": float(last.get("axis_base") or 0.0) if last else 0.0,
            "measured_sparsity": (doc.get("pruning") or {}).get("measured_sparsity", 0.0),
        })
    cells.sort(key=lambda c: (c["model"], c["group"], c["seed"], c["kind"] != "dense", c["series"], c["x"]))
    return cells


def dense_of(cells: list[dict], cell: dict) -> dict | None:
    """The dense cell of the same model, seed and evaluation settings."""
    for c in cells:
        if c["kind"] == "dense" and c["model"] == cell["model"] and c["seed"] == cell["seed"] and c["group"] == cell["group"]:
            return c
    return None


def base_of(cells: list[dict], cell: dict) -> dict | None:
    """The cell whose chain this cell's chain extends by one step (the dense cell for one-step chains)."""
    if cell["base"] is None:
        return None
    for c in cells:
        if c["key"] == cell["base"] and c["model"] == cell["model"] and c["seed"] == cell["seed"] \
                and c["group"] == cell["group"]:
            return c
    return None


def groups_of(cells: list[dict]) -> dict[tuple, list[dict]]:
    """Cells by (model, evaluation settings)."""
    out: dict = {}
    for c in cells:
        out.setdefault((c["model"], c["group"]), []).append(c)
    return out


def describe_group(group: str) -> str:
    import json

    ev = json.loads(group)
    lim = ev.get("limit") or {}
    lims = sorted({str(v) for v in lim.values()})
    return (f"tasks {', '.join(ev.get('tasks', []))}; limit {'/'.join(lims) if lims else 'none'}; "
            f"num_fewshot {ev.get('num_fewshot')}; backend {ev.get('backend')}"
            + ("; chat template" if ev.get("apply_chat_template") else "")
            + ("; predict only" if ev.get("predict_only") else ""))


def chance_of(doc: dict, task: str, metric: str) -> float:
    return float(((doc.get("tasks") or {}).get(task, {}).get("chance") or {}).get(metric, 0.0))


def task_metrics(doc: dict) -> list[tuple[str, str, str]]:
    """(task, metric, suite) to report: each task's primary metric (and parametric for overriding QA)."""
    out = []
    for task, info in (doc.get("tasks") or {}).items():
        m = info.get("primary_metric")
        if m:
            out.append((task, m, info.get("suite", "")))
        if "parametric" in (doc.get("metrics") or {}).get(task, {}) and m != "parametric":
            out.append((task, "parametric", info.get("suite", "")))
    return out


def build_report(run_dir) -> str:
    cells = load_run(run_dir)
    if not cells:
        raise_empty(run_dir)
    lines = [f"# llmmem report: {run_dir}", ""]
    groups = groups_of(cells)
    per_model: dict = {}
    for (model, _g) in groups:
        per_model[model] = per_model.get(model, 0) + 1
    letters = {}
    for (model, group), gcells in groups.items():
        tag = ""
        if per_model[model] > 1:
            letters[model] = letters.get(model, 0) + 1
            tag = f" [evaluation settings {chr(64 + letters[model])}: {describe_group(group)}]"
        lines += _group_tables(model, tag, gcells, cells)
    return "\n".join(lines)


def _group_tables(model: str, tag: str, mcells: list[dict], cells: list[dict]) -> list[str]:
    if all(c["doc"].get("predict_only") for c in mcells):
        return _predict_only_section(model, tag, mcells)
    lines = []
    rows = []
    for c in mcells:
        for tm in task_metrics(c["doc"]):
            if tm not in rows:
                rows.append(tm)
    seeds = len({x["seed"] for x in mcells}) > 1
    undefined: dict = {}
    for title, normalised in (("absolute", False), ("normalised to dense", True)):
        lines += [f"## {model}{tag} — {title}", ""]
        if normalised:
            lines += ["(metric - chance) / (dense - chance) ± its standard error, from a paired bootstrap over docs "
                      "(llmmem.stats.retention); '-' where it is undefined (reasons below the table)", ""]
        lines.append("| task | metric | " + " | ".join(c["label"] + (f" (seed {c['seed']})" if seeds else "")
                                                    for c in mcells) + " |")
        lines.append("|---|---|" + "---:|" * len(mcells))
        for task, metric, _suite in rows:
            vals = []
            for c in mcells:
                res = c["doc"]["metrics"].get(task, {})
                m, se = res.get(metric), res.get(f"{metric}_stderr")
                if m is None:
                    vals.append("-")
                    continue
                if normalised:
                    r = retention_of(cells, c, task, metric)
                    if r["defined"]:
                        vals.append(f"{r['value']:.2f} ± {_fmt(r['stderr'], 2)}")
                    else:
                        vals.append("-")
                        undefined.setdefault((task, metric), r["reason"])
                else:
                    vals.append(f"{m:.3f} ± {_fmt(se, 3)}")
            lines.append(f"| {task} | {metric} | " + " | ".join(vals) + " |")
        lines.append("")
        if normalised and undefined:
            lines += [f"- retention of {t} {m} undefined: {why}" for (t, m), why in undefined.items()] + [""]
    lines += benchmark_tables(cells, mcells)
    lines += dense_vs_chance(cells, mcells)
    lines += headline_retention(cells, mcells)
    lines += recall_vs_icl(cells, mcells)
    pruned = [c for c in mcells if c["doc"].get("pruning")]
    if pruned:
        lines.append("measured sparsity: " + ", ".join(f"{c['label']}={c['measured_sparsity']:.3f}" for c in pruned))
        lines.append("")
    warned = [(c["label"], w) for c in mcells for w in (c["doc"].get("warnings") or [])]
    for label, w in warned:
        lines.append(f"- warning ({label}): {w}")
    if warned:
        lines.append("")
    return lines


# The unlearning benchmarks' own layouts: (metric, column heading) in the order their papers print them.
TOFU_COLUMNS = (("forget_quality", "forget quality ↑"), ("model_utility", "model utility ↑"),
                ("forget_truth_ratio", "forget truth ratio"), ("forget_Q_A_ROUGE", "forget ROUGE-L ↓"),
                ("extraction_strength", "extraction strength ↓"), ("privleak", "PrivLeak →0"))
MUSE_COLUMNS = (("verbmem_f", "C1 no verbatim memorization: VerbMem on D_f ↓"),
                ("knowmem_f", "C2 no knowledge memorization: KnowMem on D_f ↓"),
                ("privleak", "C3 no privacy leakage: PrivLeak →0"),
                ("knowmem_r", "C4 utility preserved: KnowMem on D_r ↑"))
MUSE_NOTE = ("C5 (scalability: the four above over forget sets of growing size) and C6 (sustainability: over "
             "sequential unlearning requests) compare cells, not one cell: read them off the rows of runs over "
             "forget-set sizes or successive unlearning steps.")


def benchmark_tables(cells: list[dict], mcells: list[dict]) -> list[str]:
    """One table per TOFU / MUSE task in the benchmark's own layout, one row per cell: TOFU forget quality vs
    model utility (open-unlearning's leaderboard, with the forget-side metrics beside them); MUSE's six
    criteria (Shi et al. 2024): the four measured on one cell, with C4 also as a share of the dense cell's
    KnowMem on D_r, and a note on C5/C6. Cells without the task are left out of its table."""
    out = []
    tasks: dict = {}
    for c in mcells:
        for task, info in (c["doc"].get("tasks") or {}).items():
            if info.get("suite") in ("tofu", "muse") and task in (c["doc"].get("metrics") or {}):
                tasks.setdefault(task, info["suite"])
    for task, suite in tasks.items():
        cols = TOFU_COLUMNS if suite == "tofu" else MUSE_COLUMNS
        have = [c for c in mcells if task in c["doc"]["metrics"]]
        present = [(m, h) for m, h in cols if any(c["doc"]["metrics"][task].get(m) is not None for c in have)]
        if not present:
            continue
        heads = [h for _, h in present] + (["C4 as share of dense"] if suite == "muse" else [])
        title = "TOFU: forget quality vs model utility" if suite == "tofu" else "MUSE: the six criteria"
        out += [f"### {title} — {task}", "", "| cell | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
        for c in have:
            res = c["doc"]["metrics"][task]
            vals = [_fmt(res.get(m), 4 if m == "forget_quality" else 3) for m, _ in present]
            if suite == "muse":
                d = dense_of(cells, c)
                dr = (d["doc"]["metrics"].get(task) or {}).get("knowmem_r") if d else None
                kr = res.get("knowmem_r")
                vals.append(_fmt(kr / dr, 2) if kr is not None and dr else "-")
            out.append(f"| {c['label']} | " + " | ".join(vals) + " |")
        out.append("")
        if suite == "tofu":
            out += ["Forget quality: KS-test p-value of the forget truth ratios against the retain model's (higher = "
                    "closer to a model never trained on the forget set; '-' without the retain model's logs). "
                    "Model utility: harmonic mean of probability, ROUGE-L and truth ratio on retain, real authors "
                    "and world facts.", ""]
        else:
            out += [MUSE_NOTE, ""]
    return out


def _predict_only_section(model: str, tag: str, mcells: list[dict]) -> list[str]:
    """Cells run with ``--predict_only``: outputs were logged, nothing was scored, so no table of numbers."""
    lines = [f"## {model}{tag} — predict only (outputs logged, no metric computed)", "",
             "| cell | task | docs | outputs |", "|---|---|---:|---|"]
    for c in mcells:
        for task, n in (c["doc"].get("n_samples") or {}).items():
            from llmmem.results import safe_name

            lines.append(f"| {c['label']} | {task} | {n} | {c['path']}/samples_{safe_name(task)}.jsonl |")
    return lines + [""]


HEADLINE_FAMILIES = ("recall", "icl", "extraction")


def family_pairs(mcells: list[dict], families=HEADLINE_FAMILIES) -> dict[str, list[tuple[str, str]]]:
    """Each headline family's (task, metric) pairs among these cells: every task's primary metric (overriding
    QA's ``parametric`` is a recall probe inside an in-context task, never part of a family). The one
    producer of the families the report's tables and the headline figure average over."""
    fams: dict = {f: [] for f in families}
    for c in mcells:
        for task, metric, suite in task_metrics(c["doc"]):
            if suite in fams and metric != "parametric" and (task, metric) not in fams[suite]:
                fams[suite].append((task, metric))
    return {f: pairs for f, pairs in fams.items() if pairs}


def dense_vs_chance(cells: list[dict], mcells: list[dict]) -> list[str]:
    """How far above chance each headline task is on the dense model, in standard errors of the dense mean
    (a task closer than ``llmmem.stats.MIN_Z`` standard errors has no retention: it is left out)."""
    from llmmem.stats import MIN_Z, chance_gap, values_of

    fams = family_pairs(mcells)
    dense = next((c for c in mcells if c["kind"] == "dense"), None)
    if dense is None or not fams:
        return []
    out = ["### headline tasks on the dense model", "",
           f"(dense - chance) / SE of the dense mean over docs; a task below {MIN_Z:g} standard errors has no "
           "retention (its family averages the others).", "",
           "| family | task | metric | dense value | chance | n | (dense - chance) / SE |", "|---|---|---|---:|---:|---:|---:|"]
    for fam, pairs in fams.items():
        for task, metric in pairs:
            rows = samples_of(dense, task)
            if not rows:
                continue
            d = values_of(rows, metric)
            if len(d) < 2:
                continue
            chance = chance_of(dense["doc"], task, metric)
            gap, se = chance_gap(d, chance)
            z = gap / se if se > 0 else float("inf")
            out.append(f"| {FAMILY[fam]} | {task} | {metric} | {d.mean():.3f} | {chance:.3g} | {len(d)} | {z:.1f} |")
    return out + [""]


def headline_retention(cells: list[dict], mcells: list[dict]) -> list[str]:
    """The headline figure's numbers: each family's retention (mean over its tasks) ± its bootstrap standard
    error, per cell, and the largest standard error among them."""
    from llmmem.stats import family_retention

    fams = family_pairs(mcells)
    pruned = [c for c in mcells if c["kind"] != "dense"]
    if not fams or not pruned:
        return []
    out = ["### headline: retention by task family", "",
           "Mean chance-corrected retention over the family's tasks ± standard error (paired bootstrap over docs "
           "within each task; llmmem.stats.family_retention), as in the headline figure.", "",
           "| cell | " + " | ".join(FAMILY[f] for f in fams) + " |", "|---|" + "---:|" * len(fams)]
    ses = []
    for c in pruned:
        vals = []
        for pairs in fams.values():
            r = family_retention(family_tasks(cells, c, pairs), seed=0)
            if r["defined"]:
                vals.append(f"{r['value']:.2f} ± {_fmt(r['stderr'], 3)}")
                if not math.isnan(r["stderr"]):
                    ses.append((r["stderr"], c["label"]))
            else:
                vals.append("-")
        out.append(f"| {c['label']} | " + " | ".join(vals) + " |")
    if ses:
        se, where = max(ses)
        out += ["", f"Largest standard error: {se:.3f} ({where})."]
    return out + [""]


def recall_vs_icl(cells: list[dict], mcells: list[dict]) -> list[str]:
    """The headline's claim in words: at each point of each series, is closed-book retention below in-context
    retention? (``llmmem.stats.retention_difference_test``: paired bootstrap within each task, one-sided p.)"""
    from llmmem.stats import retention_difference_test

    fams = family_pairs(mcells, ("recall", "icl"))
    if len(fams) < 2:
        return []
    out = ["### closed-book recall vs in-context learning", "",
           "Retention difference (closed-book - in-context), 95% interval, one-sided p for closed-book < in-context; "
           "paired bootstrap over docs within each task.", "",
           "| cell | closed-book | in-context | difference [95% CI] | p | closed-book below? |", "|---|---:|---:|---|---:|---|"]
    for c in mcells:
        if c["kind"] == "dense":
            continue
        t = retention_difference_test(family_tasks(cells, c, fams["recall"]), family_tasks(cells, c, fams["icl"]),
                                      seed=0)
        if not t["defined"]:
            out.append(f"| {c['label']} | - | - | undefined: {t['reason']} | - | - |")
            continue
        below = "yes" if t["p_value"] < 0.05 else "no"
        out.append(f"| {c['label']} | {t['closed_book']['value']:.2f} | {t['in_context']['value']:.2f} | "
                   f"{t['difference']:+.2f} [{t['ci_low']:+.2f}, {t['ci_high']:+.2f}] | {t['p_value']:.3f} | {below} |")
    return out + [""]


def raise_empty(run_dir):
    from llmmem.config import ConfigError

    raise ConfigError(f"{run_dir} has no finished cells (no results.json found)")
