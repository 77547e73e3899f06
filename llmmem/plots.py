"""Figures from a run directory (reads results files only; matplotlib, no display needed).

* ``headline``: retention (metric / dense metric) against the intervention's axis (sparsity, bits, steps),
  one line per task family (closed-book recall, in-context learning, verbatim extraction), one panel per
  series (the chain without its last step's axis value: ``wanda``, ``npo -> rtn``), with bands of +/- one
  standard error (averaged over the family's tasks). A series' first point is the cell it extends.
* ``tasks``: every task's primary metric against the axis, one line per series.
* ``extraction_buckets``: extraction rate against the axis by bucket (duplication count, popularity, group).

Cells are read from their configs (never from their names); cells evaluated with different settings are
plotted apart.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from llmmem.config import ConfigError
from llmmem.report import FAMILY, base_of, family_pairs, family_tasks, groups_of, load_run, retention_of, task_metrics
from llmmem.stats import family_retention

FAMILY_COLORS = {"recall": "#c0392b", "icl": "#2471a3", "extraction": "#7d3c98", "mia": "#7f8c8d"}


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'llmmem[plot]'") from None


def _mpl():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(cells) -> list[str]:
    out = []
    for c in cells:
        if c["kind"] != "dense" and c["series"] not in out:
            out.append(c["series"])
    return out


def _axis(cells, series) -> str:
    return next((c["axis"] for c in cells if c["series"] == series and c["axis"]), "")


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = []
    for ext in ("png", "svg"):
        p = out / f"{name}.{ext}"
        fig.savefig(p, dpi=150, bbox_inches="tight")
        paths.append(p)
    return paths


def _band(ax, xs, ys, es, label, color=None, ms=None):
    """A line with a +/- one standard error band."""
    es = [0.0 if e is None or (isinstance(e, float) and math.isnan(e)) else e for e in es]
    kw = {"color": color} if color else {}
    ax.plot(xs, ys, "o-", label=label, **kw, **({"ms": ms} if ms else {}))
    ax.fill_between(xs, [y - e for y, e in zip(ys, es)], [y + e for y, e in zip(ys, es)], alpha=0.18, linewidth=0,
                    **kw)


def _finish(plt, fig, axes, out: Path, name: str, suptitle: str, **legend) -> list[Path]:
    """Legend (when anything is labelled), title, layout, PNG + SVG, close."""
    first = axes[0][0] if hasattr(axes[0], "__len__") else axes[0]
    if first.get_legend_handles_labels()[0]:
        first.legend(fontsize=8, **legend)
    fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    paths = _save(fig, out, name)
    plt.close(fig)
    return paths


def _points(cells, gcells, series, task, metric, normalised):
    """(x, value, se) of one series within one model's group of cells; its first point is the cell the series
    extends (the dense model for one-step chains) at the axis' base value."""
    members = [c for c in gcells if c["series"] == series]
    if not members:
        return []
    base = base_of(cells, members[0])
    pts = []
    for c in ([base] if base is not None else []) + members:
        res = c["doc"]["metrics"].get(task, {})
        m, se = res.get(metric), res.get(f"{metric}_stderr")
        if m is None:
            continue
        if normalised:
            r = retention_of(cells, c, task, metric)
            if not r["defined"]:
                continue  # undefined retention is a gap, never a number
            m, se = r["value"], r["stderr"]
        if m is None or math.isnan(m):
            continue
        x = members[0]["x_base"] if c is base else c["x"]
        pts.append((x, m, 0.0 if se is None or math.isnan(se) else se))
    # average seeds at the same x
    by_s: dict = {}
    for s, m, se in pts:
        by_s.setdefault(s, []).append((m, se))
    return [(s, sum(m for m, _ in v) / len(v), math.sqrt(sum(se ** 2 for _, se in v)) / len(v))
            for s, v in sorted(by_s.items())]


def _units(cells):
    """(model, title suffix, cells) per model and evaluation settings (settings apart, labelled)."""
    groups = groups_of(cells)
    per_model: dict = {}
    for (model, _g) in groups:
        per_model[model] = per_model.get(model, 0) + 1
    seen: dict = {}
    for (model, _g), gcells in groups.items():
        tag = ""
        if per_model[model] > 1:
            seen[model] = seen.get(model, 0) + 1
            tag = f"_settings{chr(64 + seen[model])}"
        yield model, tag, gcells


def _kinds_title(gcells, series) -> str:
    names = {"prune": "pruning", "quantize": "quantization", "unlearn": "unlearning"}
    kinds = []
    for c in gcells:
        if c["series"] in series and names.get(c["kind"], c["kind"]) not in kinds:
            kinds.append(names.get(c["kind"], c["kind"]))
    return " and ".join(kinds) or "interventions"


def headline(cells, out: Path) -> list[Path]:
    plt = _mpl()
    paths = []
    for model, tag, gcells in _units(cells):
        series_list = _series(gcells)
        if not series_list:
            continue
        fig, axes = plt.subplots(1, len(series_list), figsize=(4.6 * len(series_list), 3.8), sharey=True, squeeze=False)
        fams = family_pairs(gcells)
        for ax, series in zip(axes[0], series_list):
            members = [c for c in gcells if c["series"] == series]
            base = base_of(cells, members[0])
            for fam, pairs in fams.items():
                pts, used = [], set()
                for c in ([base] if base is not None else []) + members:
                    r = family_retention(family_tasks(cells, c, pairs), seed=0)
                    if r["defined"]:  # a family the dense model cannot do is a gap, never a number
                        pts.append((members[0]["x_base"] if c is base else c["x"], r["value"], r["stderr"]))
                        used.update(r["tasks"])
                if not pts:
                    continue
                pts.sort()
                _band(ax, [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts],
                      f"{FAMILY[fam]} ({len(used)} task{'s' * (len(used) > 1)})", color=FAMILY_COLORS[fam])
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")
            ax.set_title(series)
            ax.set_xlabel(_axis(gcells, series))
            if _axis(gcells, series) == "bits":
                ax.invert_xaxis()
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("retention: (metric - chance) / (dense - chance)")
        paths += _finish(plt, fig, axes, out, f"headline_{_fname(model)}{tag}",
                         f"{model}: what survives {_kinds_title(gcells, series_list)} ({', '.join(series_list)})",
                         loc="lower left")
    return paths


def per_task(cells, out: Path) -> list[Path]:
    plt = _mpl()
    paths = []
    for model, tag, mc in _units(cells):
        tm = []
        for c in mc:
            for x in task_metrics(c["doc"]):
                if x not in tm:
                    tm.append(x)
        if not tm or not _series(mc):
            continue
        ncol = min(3, len(tm))
        nrow = math.ceil(len(tm) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
        for ax, (task, metric, suite) in zip(axes.flat, tm):
            for series in _series(mc):
                pts = _points(cells, mc, series, task, metric, False)
                if not pts:
                    continue
                _band(ax, *zip(*pts), series)
            ax.set_title(f"{task} ({FAMILY.get(suite, suite)})", fontsize=9)
            ax.set_xlabel(" / ".join(dict.fromkeys(_axis(mc, s) for s in _series(mc))))
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(tm):]:
            ax.axis("off")
        paths += _finish(plt, fig, axes, out, f"tasks_{_fname(model)}{tag}", f"{model}: every task against each intervention")
    return paths


def extraction_buckets(cells, out: Path) -> list[Path]:
    plt = _mpl()
    paths = []
    for model, tag, mc in _units(cells):
        ext = []
        for c in mc:
            for task, metric, suite in task_metrics(c["doc"]):
                if suite == "extraction" and c["doc"]["metrics"].get(task, {}).get("buckets") and (task, metric) not in ext:
                    ext.append((task, metric))
        series_list = _series(mc)
        if not series_list:
            continue
        for task, metric in ext:
            fig, axes = plt.subplots(1, len(series_list), figsize=(4.6 * len(series_list), 3.6), sharey=True,
                                     squeeze=False)
            for ax, series in zip(axes[0], series_list):
                members = [c for c in mc if c["series"] == series]
                base = base_of(cells, members[0])
                buckets = sorted({b for c in mc for b in (c["doc"]["metrics"].get(task, {}).get("buckets") or {})})
                for b in buckets:
                    pts = []
                    for c in ([base] if base else []) + members:
                        bv = (c["doc"]["metrics"].get(task, {}).get("buckets") or {}).get(b)
                        if bv and bv.get(metric) is not None:
                            x = members[0]["x_base"] if c is base else c["x"]
                            pts.append((x, bv[metric], bv.get(f"{metric}_stderr") or 0.0))
                    pts.sort()
                    if pts:
                        _band(ax, *zip(*pts), str(b))
                ax.set_title(series)
                ax.set_xlabel(_axis(mc, series))
                ax.grid(alpha=0.3)
            axes[0][0].set_ylabel(metric)
            paths += _finish(plt, fig, axes, out, f"extraction_{_fname(model)}{tag}_{task}",
                             f"{model}: {task} {metric} by bucket", title="bucket")
    return paths


def _fname(s: str) -> str:
    from llmmem.results import safe_name

    return safe_name(s)


def unlearning(cells, run_dir: Path, out: Path) -> list[Path]:
    """Per unlearning cell: forgetting curves by group, predictors vs steps-to-forget, utility vs steps."""
    from llmmem.results import read_jsonl_tolerant

    plt = _mpl()
    paths = []
    for c in cells:
        u = c["doc"].get("unlearning")
        curves = Path(run_dir) / c["path"] / "curves.jsonl"
        if not u or not curves.exists():
            continue
        rows = read_jsonl_tolerant(curves)
        tag = _fname(f"{c['model']}_{u['method']}")
        # 1. forgetting curves
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        groups = sorted({r.get("group") or "all" for r in rows if r["set"] == "forget"})
        steps = sorted({r["step"] for r in rows if r["set"] == "forget"})
        for g in groups:
            for ax, metric in zip(axes, ("extractable", "loss")):
                ys = [np.mean([r[metric] for r in rows if r["set"] == "forget" and (r.get("group") or "all") == g
                               and r["step"] == s]) for s in steps]
                ax.plot(steps, ys, "o-", ms=3, label=g)
        for ax, metric in zip(axes, ("extractable", "loss")):
            non = [np.median([r[metric] for r in rows if r["set"] == "nonmember" and r["step"] == s] or [np.nan])
                   for s in steps]
            if metric == "loss" and not all(np.isnan(non)):
                ax.plot(steps, non, "k--", lw=1, label="never seen (median)")
            ax.set_xlabel("unlearning step")
            ax.set_ylabel(f"forget-set {metric}")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, title="group")
        fig.suptitle(f"{c['model']}: forgetting curves under {u['method']} (lr {u['lr']:g})", fontsize=11)
        fig.tight_layout()
        paths += _save(fig, out, f"unlearn_curves_{tag}")
        plt.close(fig)
        # 2. predictors vs steps-to-forget
        preds = u["predictors"]
        names = [k for k in ("dup", "dense_loss", "min_k", "el2n", "grad_norm_sq")
                 if any(v.get(k) is not None for v in preds.values())]
        censored = u["steps"] + u["eval_every"]
        fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.2), squeeze=False)
        for ax, k in zip(axes[0], names):
            xs = [v[k] for v in preds.values() if v.get(k) is not None]
            ys = [v["steps_to_forget"] if v["steps_to_forget"] is not None else censored
                  for v in preds.values() if v.get(k) is not None]
            ax.scatter(xs, ys, s=14)
            corr = u["correlations"].get(k, {})
            rho = corr.get("spearman")
            ax.set_title(f"{k}: rho={rho:.2f} [{corr.get('ci_low', float('nan')):.2f}, {corr.get('ci_high', float('nan')):.2f}]"
                         if rho is not None and not math.isnan(rho) else k, fontsize=8)
            ax.set_xlabel(k)
            if k in ("dup", "grad_norm_sq"):
                ax.set_xscale("symlog")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"steps to forget (not forgotten = {censored})")
        fig.suptitle(f"{c['model']}: what predicts forgetting ({u['method']})", fontsize=11)
        fig.tight_layout()
        paths += _save(fig, out, f"unlearn_predictors_{tag}")
        plt.close(fig)
        # 3. utility vs steps
        util = [r for r in rows if r["set"] == "utility"]
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        base = util[0]
        for key in [k for k in base if isinstance(base[k], dict)]:
            if base[key]["value"]:
                ax.plot([r["step"] for r in util], [r[key]["value"] / base[key]["value"] for r in util], "o-", ms=3,
                        label=f"{key} ({base[key]['metric']})")
        if base["retain_loss"]:
            ax.plot([r["step"] for r in util], [base["retain_loss"] / r["retain_loss"] for r in util], "k--",
                    label="retain likelihood (loss0/loss)")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("unlearning step")
        ax.set_ylabel("utility retained (vs step 0)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{c['model']}: utility under {u['method']}", fontsize=10)
        fig.tight_layout()
        paths += _save(fig, out, f"unlearn_utility_{tag}")
        plt.close(fig)
    return paths


def plot_run(run_dir, out_dir=None) -> list[Path]:
    cells = load_run(run_dir)
    if not cells:
        raise ConfigError(f"{run_dir} has no finished cells (no results.json found)")
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    return headline(cells, out) + per_task(cells, out) + extraction_buckets(cells, out) + unlearning(cells, Path(run_dir), out)
