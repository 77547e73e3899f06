"""The durability experiment: does forgotten knowledge come back, and which examples disappear first?

One config (``llmmem durability CONFIG``) becomes a sweep over two models:

* the trained model (the testbed), unlearned with each method, then changed again by each intervention of
  ``after`` (quantize, prune) and ``relearn`` (fine-tuning steps on a held-apart share of the forget set, on
  the retain set, or on unrelated data); the same ``after`` interventions also on the model before
  unlearning (how examples disappear under compression);
* the gold standard: the same model **retrained without the forget set** (built once, reused by hash:
  ``llmmem testbed build --exclude``), under the same ``after`` and ``relearn`` interventions, so every number
  has its floor beside it.

Every cell measures the same example sets (``track``): the forget set (minus the share held apart for
relearning), that share, every other canary (by duplication, including never-trained ones), and the
planted facts (by count). ``durability.md`` / ``survival.jsonl`` / the plots are computed from those files:

* recovery: the share of the forget set extractable again after each intervention, unlearned beside
  retrained, with Wilson intervals and the difference's interval;
* survival: for each series (e.g. Wanda over sparsity, RTN over bits, unlearning over steps), the level at
  which each example present at the start first disappears (censored when it never does), Kaplan-Meier
  curves by duplication bucket, and the Spearman correlation of survival times between interventions
  ("do pruning and unlearning remove the same examples first?"), plus what predicts survival
  (duplication, dense loss, counterfactual memorization when a memscore file is given).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from llmmem.config import (
    ConfigError,
    load_config_doc,
    model_spec_from_args,
    parse_float,
    parse_int,
    parse_positive_int,
    read_id_file,
)

log = logging.getLogger(__name__)

KEYS = {"description", "model", "model_args", "retrained", "forget", "forget_ids", "retain", "retain_filter",
        "nonmember", "nonmember_filter", "unlearn", "after", "relearn", "relearn_fraction", "tasks", "limit",
        "seeds", "batch_size", "output_path", "facts", "facts_limit", "canaries_limit", "exposure_alternatives",
        "memscore", "use_cache", "log_samples", "include_path"}


@dataclass
class DurabilitySpec:
    model: object  # ModelSpec
    retrained: str  # "auto" (build without the forget set, reuse by hash) or a path / preset
    forget: str
    forget_ids: list
    retain: str
    unlearn: dict
    after: list = field(default_factory=list)
    relearn: list = field(default_factory=list)
    relearn_fraction: float = 0.1
    retain_filter: dict = field(default_factory=dict)
    nonmember: str | None = None
    nonmember_filter: dict = field(default_factory=dict)
    tasks: list = field(default_factory=list)
    limit: object = None
    seeds: list = field(default_factory=lambda: [0])
    batch_size: int = 32
    output_path: str = "results/durability"
    facts: str | None = None  # the planted facts' task (default: retain)
    facts_limit: int | None = 200
    canaries_limit: int | None = None
    exposure_alternatives: int = 100
    memscore: str | None = None
    description: str = ""
    use_cache: str | None = None
    log_samples: bool = False
    include_path: str | None = None

    @property
    def split(self) -> tuple[list, list]:
        """(evaluated forget ids, ids held apart for relearning): a seeded share of the forget set."""
        ids = sorted(self.forget_ids)
        k = max(1, math.ceil(self.relearn_fraction * len(ids))) if self.relearn_fraction > 0 else 0
        held = sorted(random.Random(f"relearn-split:{self.seeds[0]}").sample(ids, k)) if k else []
        return [i for i in ids if i not in held], held


def load_durability(path: str | None, overrides: list[str] | None = None, **cli) -> DurabilitySpec:
    doc = load_config_doc(path, "durability", KEYS, ("model", "forget", "forget_ids", "retain", "unlearn"),
                          overrides, cli)
    model = model_spec_from_args(str(doc.pop("model")), doc.pop("model_args", None))
    ids = doc.pop("forget_ids")
    ids = read_id_file(ids, "forget_ids file") if isinstance(ids, str) else ids
    if not isinstance(ids, list) or len(ids) < 2:
        raise ConfigError(f"forget_ids must name at least 2 examples (a list or a file), got {ids!r}")
    unlearn = doc.pop("unlearn")
    if not isinstance(unlearn, dict):
        raise ConfigError(f"unlearn must be a mapping of unlearning settings (lists are alternatives), got {unlearn!r}")
    for key in ("forget", "forget_ids", "retain", "nonmember"):
        if key in unlearn:
            raise ConfigError(f"unlearn.{key}: set it once at the top level of the durability config")
    after = doc.pop("after", []) or []
    relearn = doc.pop("relearn", []) or []
    if not isinstance(after, list) or not isinstance(relearn, list):
        raise ConfigError("after and relearn must be lists (of stages, and of relearning settings)")
    spec = DurabilitySpec(
        model=model, retrained=str(doc.pop("retrained", "auto")), forget=str(doc.pop("forget")),
        forget_ids=[str(i) for i in ids], retain=str(doc.pop("retain")), unlearn=unlearn, after=after,
        relearn=relearn,
        relearn_fraction=parse_float("relearn_fraction", doc.pop("relearn_fraction", 0.1), low=0.0, high=0.5),
        seeds=[parse_int("seeds", s, minimum=0) for s in (doc.get("seeds") if isinstance(doc.get("seeds"), list)
                                                          else [doc.get("seeds", 0)])],
        **{k: doc[k] for k in ("retain_filter", "nonmember", "nonmember_filter", "tasks", "limit", "output_path",
                               "facts", "memscore", "description", "use_cache", "log_samples", "include_path")
           if k in doc})
    if "seeds" in doc and not spec.seeds:
        raise ConfigError("seeds is empty")
    spec.batch_size = parse_positive_int("batch_size", doc.get("batch_size", 32))
    spec.exposure_alternatives = parse_positive_int("exposure_alternatives", doc.get("exposure_alternatives", 100))
    for key in ("facts_limit", "canaries_limit"):
        if doc.get(key) is not None:
            setattr(spec, key, parse_positive_int(key, doc[key]))
    if len(set(spec.forget_ids)) != len(spec.forget_ids):
        raise ConfigError("forget_ids names an example twice")
    if spec.memscore is not None and not Path(spec.memscore).exists():
        raise ConfigError(f"memscore: {spec.memscore} does not exist (a directory written by llmmem testbed memscore, or its memscore.jsonl)")
    return spec


# ----------------------------------------------------------------------------- the retrained reference
def retrained_dir(model_dir: Path, forget_ids: list[str]) -> tuple[Path, dict]:
    """Where the model retrained without ``forget_ids`` lives ($LLMMEM_HOME/models/<name>-retrained-<hash>) and
    how to build it (the trained model's preset, seed and configs, read from its world.json)."""
    from llmmem.config import llmmem_home

    wj = Path(model_dir) / "world.json"
    if not wj.is_file():
        raise ConfigError(f"retrained: auto needs a testbed model (a world.json in {model_dir}); give retrained: PATH "
                          f"to a model trained without the forget set")
    world = json.loads(wj.read_text())
    recipe = {"preset": world["preset"], "seed": world["seed"], "world": world["config"],
              "train": {k: v for k, v in world["train"].items() if k != "world"},
              "exclude": sorted(set(forget_ids) | set(world.get("excluded_canaries") or []))}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return llmmem_home() / "models" / f"{Path(model_dir).name}-retrained-{key}", recipe


def ensure_retrained(model_dir: Path, forget_ids: list[str], quiet: bool = True) -> Path:
    """Build (once) the testbed trained exactly as ``model_dir`` but without the forget set; reuse it by hash."""
    out, recipe = retrained_dir(model_dir, forget_ids)
    if (out / "world.json").is_file():
        return out
    from llmmem.testbed.train import build_testbed, preset_config

    log.info("building the retrained reference (the testbed without the %d forget examples) into %s",
             len(forget_ids), out)
    cfg = preset_config(recipe["preset"], {"world": recipe["world"], "train": recipe["train"]})
    build_testbed(out, preset=recipe["preset"], seed=recipe["seed"], overwrite=True, exclude=recipe["exclude"],
                  quiet=quiet, config=cfg)
    return out


# ----------------------------------------------------------------------------- the sweep
def build_sweep(spec: DurabilitySpec, model_dir: Path, retrained: Path):
    """The durability sweep: per-model chains for the trained and the retrained model, one evaluation with the
    tracked example sets."""
    from llmmem.cells import EvalSpec
    from llmmem.interventions import Step, _stage_alternatives, get
    from llmmem.sweep import ModelEntry, SweepSpec

    evaluated, held = spec.split
    unlearn_raw = dict(spec.unlearn, forget=spec.forget, forget_ids=spec.forget_ids, retain=spec.retain,
                       retain_filter=spec.retain_filter, nonmember=spec.nonmember,
                       nonmember_filter=spec.nonmember_filter)
    unlearn_raw = {k: v for k, v in unlearn_raw.items() if v not in (None, {}, [])}
    u_specs, warnings = get("unlearn").expand(unlearn_raw, "unlearn")
    unlearned = [Step("unlearn", s) for s in u_specs]
    after: list = []
    for i, stage in enumerate(spec.after):
        alts, w = _stage_alternatives(stage, f"after[{i}]")
        if any(a is None for a in alts):
            raise ConfigError(f"after[{i}]: none is implied (each cell without it exists); list interventions only")
        if any(a.kind in ("unlearn", "relearn") for a in alts):
            raise ConfigError(f"after[{i}]: put relearning under relearn:, and unlearning under unlearn:")
        after += alts
        warnings += w
    relearn: list = []
    for i, raw in enumerate(spec.relearn):
        where = f"relearn[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping {{data, steps, ...}}, got {raw!r}")
        raw = dict(raw)
        data = raw.get("data")
        if data == "forget":
            if not held:
                raise ConfigError(f"{where}: data forget needs relearn_fraction > 0 (a share held apart)")
            raw.update(data=spec.forget, ids=held)
            raw.setdefault("name", f"forget{round(100 * spec.relearn_fraction)}")
        elif data == "retain":
            raw.update(data=spec.retain)
            if spec.retain_filter:
                raw.setdefault("filter", spec.retain_filter)
            raw.setdefault("name", "retain")
        specs, w = get("relearn").expand(raw, where)
        relearn += [Step("relearn", s) for s in specs]
        warnings += w
    facts = spec.facts or spec.retain
    track = {"sets": {"forget": {"source": spec.forget, "ids": evaluated},
                      "canaries": {"source": spec.forget, "exclude_ids": spec.forget_ids,
                                   **({"limit": spec.canaries_limit} if spec.canaries_limit else {})},
                      "facts": {"source": facts, **({"limit": spec.facts_limit} if spec.facts_limit else {})}},
             "exposure_alternatives": spec.exposure_alternatives}
    if held:
        track["sets"]["forget_relearn"] = {"source": spec.forget, "ids": held}
    ev = EvalSpec(tasks=list(spec.tasks), limit=spec.limit, track=track)
    trained_chains = [(u,) for u in unlearned] + [(u, a) for u in unlearned for a in after + relearn] + \
        [(a,) for a in after]
    retrained_chains = [(a,) for a in after + relearn]
    trained = ModelEntry(spec.model, chains=trained_chains)
    reference = ModelEntry(model_spec_from_args(str(retrained), {k: v for k, v in spec.model.__dict__.items()
                                                                  if k in ("dtype", "device")}),
                           chains=retrained_chains)
    sweep = SweepSpec(models=[trained, reference], chains=[], eval=ev, seeds=spec.seeds, batch_size=spec.batch_size,
                      output_path=spec.output_path, include_path=spec.include_path, description=spec.description,
                      log_samples=spec.log_samples, use_cache=spec.use_cache, warnings=warnings,
                      doc={"durability": {k: v for k, v in spec.__dict__.items() if k != "model"},
                           "model": spec.model.identity(), "retrained": str(retrained)})
    return sweep


def run_durability(spec: DurabilitySpec, *, quiet: bool = False, dry_run: bool = False, overwrite: bool = False,
                   print_fn=print) -> Path:
    from llmmem.models import resolve
    from llmmem.sweep import run_sweep

    src = resolve(spec.model)  # a local preset (the testbed) is built first, saying so
    model_dir = Path(src.path)
    if spec.retrained == "auto":
        if dry_run:
            retrained, _ = retrained_dir(model_dir, spec.forget_ids)
            if not (retrained / "world.json").is_file():
                print_fn(f"(dry run: the retrained reference would be built into {retrained})")
                retrained = model_dir  # plan with the trained model's tasks; nothing runs
        else:
            retrained = ensure_retrained(model_dir, spec.forget_ids, quiet=quiet)
    else:
        retrained = Path(spec.retrained)
    sweep = build_sweep(spec, model_dir, retrained)
    run_dir = Path(spec.output_path)
    cells = run_sweep(sweep, run_dir, overwrite=overwrite, quiet=quiet, dry_run=dry_run, print_fn=print_fn)
    failed = [c for c in cells if c.failed]
    if failed:  # recorded in <run>/.failed/; the findings would be drawn from a partial run
        from llmmem.errors import CellsFailed

        raise CellsFailed(f"{len(failed)} cell(s) failed (e.g. {failed[0].cell.name()}: {failed[0].failed[:200]}); "
                          f"see llmmem sweep --status {run_dir}, and rerun the command to retry them")
    return run_dir


# ----------------------------------------------------------------------------- analysis (files only)
def survival_table(run_dir) -> list[dict]:
    """One row per tracked example x cell, with the cell's model role, chain and level."""
    from llmmem.report import load_run
    from llmmem.results import read_jsonl_tolerant

    rows = []
    cells = load_run(run_dir)
    trained = _trained_model(cells)
    for c in cells:
        p = Path(run_dir) / c["path"] / "survival.jsonl"
        if not p.is_file():
            continue
        role = "trained" if c["model"] == trained else "retrained"
        for r in read_jsonl_tolerant(p):
            rows.append({"id": r["id"], "set": r["set"], "group": r.get("group"), "dup": r.get("dup"),
                         "model": role, "chain": c["label"], "series": c["series"], "kind": c["kind"],
                         "axis": c["axis"], "level": c["x"], "base_level": c["x_base"],
                         "extractable": r["extractable"], "correct": r.get("correct", r["extractable"]),
                         "loss": r["loss"], "exposure": r.get("exposure")})
    return rows


def _trained_model(cells: list[dict]) -> str | None:
    """The trained model of a durability run: the one with unlearning cells."""
    for c in cells:
        if any(s["kind"] == "unlearn" for s in c["steps"]):
            return c["model"]
    return None


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def newcombe(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float, float]:
    """Difference of two proportions p1 - p2 with Newcombe's hybrid score interval (method 10)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1)
    l2, u2 = wilson(k2, n2)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def survival_times(rows: list[dict], *, key: str = "extractable", descending: bool = False) -> dict:
    """Survival time of each example along ordered levels: {id: (time, event)}.

    ``rows``: one series' rows (id, level, value of ``key``), base level included. Only examples present at
    the first level are alive; time = the first level at which the value is 0 (event), else the last level
    (censored, event False). ``descending`` orders levels from high to low (bits: 16, 8, 4, 3)."""
    levels = sorted({r["level"] for r in rows}, reverse=descending)
    by_id: dict = {}
    for r in rows:
        by_id.setdefault(r["id"], {})[r["level"]] = r[key]
    out = {}
    for i, vals in by_id.items():
        if vals.get(levels[0]) != 1:
            continue  # not present at the start: never alive
        t, event = levels[-1], False
        for lv in levels[1:]:
            if lv in vals and not vals[lv]:
                t, event = lv, True
                break
        out[i] = (t, event)
    return out


def kaplan_meier(times: dict, levels: list, descending: bool = False) -> list[tuple]:
    """Kaplan-Meier survival S at each level (ordered as ``levels``): [(level, S, at_risk, events)]."""
    order = sorted(levels, reverse=descending)
    rank = {lv: i for i, lv in enumerate(order)}
    s, out = 1.0, [(order[0], 1.0, len(times), 0)]
    for lv in order[1:]:
        at_risk = sum(1 for t, e in times.values() if rank[t] >= rank[lv])
        events = sum(1 for t, e in times.values() if e and t == lv)
        if at_risk:
            s *= 1 - events / at_risk
        out.append((lv, s, at_risk, events))
    return out


def _rank_time(t, event, levels_desc: bool, last):
    """A sortable survival time (censored examples rank after every event, at the last level + 1)."""
    return (-t if levels_desc else t) if event else ((-last if levels_desc else last) + 1e6)


def analyse(run_dir) -> dict:
    """Everything durability.md and the plots show, from the run's files."""
    from llmmem.unlearning.difficulty import spearman_with_ci

    rows = survival_table(run_dir)
    if not rows:
        raise ConfigError(f"{run_dir} has no survival.jsonl in its cells: not a durability run")
    out: dict = {"recovery": [], "survival": {}, "correlations": [], "predictors": {}}
    # ---------------------------------------------------------------- recovery of the forget set
    forget = [r for r in rows if r["set"] == "forget"]
    by_cell: dict = {}
    for r in forget:
        by_cell.setdefault((r["model"], r["chain"]), []).append(r)

    def share(model, chain):
        rs = by_cell.get((model, chain))
        if not rs:
            return None
        k, n = int(sum(r["extractable"] for r in rs)), len(rs)
        lo, hi = wilson(k, n)
        return {"k": k, "n": n, "share": k / n, "ci": [lo, hi]}

    chains = sorted({(r["chain"], r["series"], r["kind"], r["level"]) for r in forget if r["model"] == "trained"})
    for chain, series, kind, level in chains:
        parts = chain.split("+")
        if kind == "unlearn" or len(parts) < 2:
            continue
        after = "+".join(parts[1:])
        u = share("trained", chain)
        ref = share("retrained", after)
        unl = share("trained", parts[0])
        dense_after = share("trained", after)
        entry = {"unlearn": parts[0], "after": after, "series": series.split(" -> ", 1)[-1], "kind": kind,
                 "level": level, "unlearned": u, "retrained": ref, "unlearned_before": unl, "dense": dense_after}
        if u and ref:
            d, lo, hi = newcombe(u["k"], u["n"], ref["k"], ref["n"])
            entry["difference"] = {"value": d, "ci": [lo, hi]}
        out["recovery"].append(entry)
    out["unlearned"] = {c: share("trained", c) for c in sorted({r["chain"] for r in forget if r["kind"] == "unlearn"})}
    out["dense"] = share("trained", "dense")
    out["retrained_dense"] = share("retrained", "dense")
    # ---------------------------------------------------------------- survival on the trained model
    trained = [r for r in rows if r["model"] == "trained" and r["set"] in ("forget", "forget_relearn", "canaries",
                                                                           "facts")]
    dense_rows = {(r["id"], r["set"]): r for r in trained if r["chain"] == "dense"}
    series_times: dict = {}
    for series in sorted({r["series"] for r in trained if r["kind"] in ("prune", "quantize")
                          and "->" not in r["series"]}):
        sub = [r for r in trained if r["series"] == series]
        kind, base = sub[0]["kind"], sub[0]["base_level"]
        desc = kind == "quantize"
        for st in ("canaries", "facts", "forget"):
            srows = [dict(r, level=r["level"]) for r in sub if r["set"] in ((st,) if st != "forget" else
                                                                           ("forget", "forget_relearn"))]
            srows += [dict(dense_rows[(r_id, s)], level=base) for (r_id, s) in dense_rows
                      if s in ((st,) if st != "forget" else ("forget", "forget_relearn"))]
            if not srows:
                continue
            key = "correct" if st == "facts" else "extractable"
            times = survival_times(srows, key=key, descending=desc)
            levels = sorted({r["level"] for r in srows}, reverse=desc)
            buckets: dict = {}
            meta = {r["id"]: r for r in srows}
            for i, te in times.items():
                b = str(meta[i].get("group") or meta[i].get("dup") or "all")
                buckets.setdefault(b, {})[i] = te
            out["survival"].setdefault(series, {})[st] = {
                "kind": kind, "levels": levels, "n_alive": len(times),
                "times": {i: list(te) for i, te in times.items()},
                "km": {b: kaplan_meier(t, levels, desc) for b, t in sorted(buckets.items())},
                "km_all": kaplan_meier(times, levels, desc)}
            if st == "forget":
                series_times[series] = (times, desc, levels[-1])
    # unlearning steps (the tracker's steps-to-forget of each unlearning cell)
    from llmmem.report import load_run
    from llmmem.results import read_jsonl_tolerant

    for c in load_run(run_dir):
        u = c["doc"].get("unlearning")
        if not u or len(c["steps"]) != 1 or "steps_to_forget" not in u:
            continue
        curves = Path(run_dir) / c["path"] / "curves.jsonl"
        alive = {r["id"] for r in read_jsonl_tolerant(curves) if r.get("set") == "forget" and r.get("step") == 0
                 and r.get("extractable") == 1} if curves.is_file() else set(u["steps_to_forget"])
        stf = {i: s for i, s in u["steps_to_forget"].items() if i in alive}  # present before unlearning
        last = u["steps"]
        times = {i: ((s, True) if s is not None else (last, False)) for i, s in stf.items()}
        series_times[f"unlearn {u['method']} (steps)"] = (times, False, last)
        levels = sorted({0, *[s for s in stf.values() if s is not None], last})
        out["survival"].setdefault(f"unlearn {u['method']} (steps)", {})["forget"] = {
            "kind": "unlearn", "levels": levels, "n_alive": len(times), "times": {i: list(t) for i, t in times.items()},
            "km_all": kaplan_meier(times, levels)}
    # ---------------------------------------------------------------- do interventions remove the same examples first?
    names = sorted(series_times)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ta, da, la = series_times[a]
            tb, db, lb = series_times[b]
            ids = sorted(set(ta) & set(tb))
            if len(ids) < 4:
                continue
            x = [_rank_time(*ta[k], da, la) for k in ids]
            y = [_rank_time(*tb[k], db, lb) for k in ids]
            out["correlations"].append({"a": a, "b": b, **spearman_with_ci(x, y, seed=0)})
    # ---------------------------------------------------------------- what predicts survival (forget + canaries)
    memscores = None
    spec_doc = _sweep_doc(run_dir)
    ms_path = (spec_doc.get("durability") or {}).get("memscore")
    if ms_path and Path(ms_path).exists():  # a memscore directory or its memscore.jsonl
        from llmmem.testbed.memscore import load_memscores

        memscores = load_memscores(ms_path)
    for series, sets in out["survival"].items():
        info = sets.get("canaries") or sets.get("forget")
        if not info or "times" not in info:
            continue
        desc, last = info["kind"] == "quantize", info["levels"][-1]
        ids = list(info["times"])
        y = [_rank_time(*info["times"][i], desc, last) for i in ids]
        preds = {"duplication": [_num(dense_rows.get((i, "canaries"), dense_rows.get((i, "forget"), {})).get("dup"))
                                 for i in ids],
                 "dense_loss": [_num(dense_rows.get((i, "canaries"), dense_rows.get((i, "forget"), {})).get("loss"))
                                for i in ids]}
        if memscores:
            preds["memorization"] = [_num((memscores.get(i) or {}).get("mem")) for i in ids]
        out["predictors"][series] = {k: spearman_with_ci(v, y, seed=0) for k, v in preds.items()}
    return out


def _rho_cells(c: dict) -> str:
    """'rho | [lo, hi]' for a table row, or 'undefined' when one side is constant (no ranking to correlate)."""
    if math.isnan(c["spearman"]):
        return "undefined | -"
    return f"{c['spearman']:.2f} | [{c['ci_low']:.2f}, {c['ci_high']:.2f}]"


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def _sweep_doc(run_dir) -> dict:
    p = Path(run_dir) / "sweep.json"
    try:
        return json.loads(p.read_text()).get("config") or {}
    except (OSError, ValueError):
        return {}


def _pct(s) -> str:
    if not s:
        return "-"
    return f"{100 * s['share']:.0f}% [{100 * s['ci'][0]:.0f}, {100 * s['ci'][1]:.0f}] ({s['k']}/{s['n']})"


def findings(a: dict) -> list[str]:
    """What was found here, in sentences computed from the numbers (never tuned toward a published effect)."""
    lines = []
    for u, s in sorted(a["unlearned"].items()):
        if not s:
            continue
        lines.append(f"After {u}, {100 * s['share']:.0f}% of the evaluated forget canaries were extractable "
                     f"(before unlearning: {100 * a['dense']['share']:.0f}%; retrained without them: "
                     f"{100 * a['retrained_dense']['share']:.0f}%)." if a["dense"] and a["retrained_dense"] else
                     f"After {u}, {100 * s['share']:.0f}% of the evaluated forget canaries were extractable.")
        rec = [r for r in a["recovery"] if r["unlearn"] == u and "difference" in r]
        worse = [r for r in rec if r["difference"]["ci"][0] > 0]
        if worse:
            best = max(worse, key=lambda r: r["difference"]["value"])
            lines.append(f"  Knowledge came back above the retrained floor under {len(worse)} of {len(rec)} "
                         f"interventions, most under {best['after']}: {_pct(best['unlearned'])} vs retrained "
                         f"{_pct(best['retrained'])}.")
        elif rec:
            lines.append(f"  No intervention brought it back above the retrained model's level (all {len(rec)} "
                         f"differences' 95% intervals include or lie below 0).")
    strong = [c for c in a["correlations"] if c["spearman"] == c["spearman"] and c["ci_low"] > 0]
    if strong:
        c = max(strong, key=lambda c: c["spearman"])
        lines.append(f"Interventions removed the same forget examples first where the survival times correlate: "
                     f"strongest {c['a']} vs {c['b']}, Spearman {c['spearman']:.2f} [{c['ci_low']:.2f}, "
                     f"{c['ci_high']:.2f}] over {c['n']} examples.")
    elif a["correlations"]:
        defined = [c for c in a["correlations"] if c["spearman"] == c["spearman"]]
        undefined = len(a["correlations"]) - len(defined)
        lines.append(f"No pair of interventions showed a survival-time correlation whose 95% interval excludes 0 "
                     f"({len(defined)} pairs with a correlation, forget set)"
                     + (f"; for {undefined} pairs none exists: under one of the two no forget example disappeared "
                        f"(or all at once) at the levels run." if undefined else "."))
    return lines


def write_report(run_dir) -> Path:
    """durability.md and survival.jsonl (run level) from the run's files."""
    from llmmem.results import atomic_write_text, dumps

    run_dir = Path(run_dir)
    a = analyse(run_dir)
    rows = survival_table(run_dir)
    atomic_write_text(run_dir / "survival.jsonl", "".join(dumps(r, indent=None) + "\n" for r in rows))
    lines = [f"# Durability: {run_dir}", "", "## What was found here", ""] + [f"- {s}" if not s.startswith("  ")
                                                                            else f"  {s.strip()}"
                                                                            for s in findings(a)] + [""]
    lines += ["## Recovery of the forget set", "",
              "Share of the evaluated forget canaries extractable (greedy suffix = secret), 95% Wilson interval; "
              "difference unlearned - retrained with Newcombe's interval.", "",
              "| unlearning | then | unlearned | retrained (same intervention) | difference | trained, not unlearned |",
              "|---|---|---|---|---|---|"]
    for u, s in sorted(a["unlearned"].items()):
        lines.append(f"| {u} | (nothing) | {_pct(s)} | {_pct(a['retrained_dense'])} | | {_pct(a['dense'])} |")
        for r in sorted((r for r in a["recovery"] if r["unlearn"] == u), key=lambda r: (r["series"], r["level"])):
            d = r.get("difference")
            ds = f"{100 * d['value']:+.0f} [{100 * d['ci'][0]:+.0f}, {100 * d['ci'][1]:+.0f}]" if d else "-"
            lines.append(f"| {u} | {r['after']} | {_pct(r['unlearned'])} | {_pct(r['retrained'])} | {ds} | "
                         f"{_pct(r['dense'])} |")
    lines += ["", "## Which examples disappear first (the trained model)", "",
              "Kaplan-Meier share of examples still present (extractable canaries / correctly recalled facts) at "
              "each level, by duplication or count bucket.", ""]
    for series, sets in sorted(a["survival"].items()):
        for st, info in sets.items():
            km = info.get("km") or {"all": info["km_all"]}
            lines.append(f"**{series}**, {st} ({info['n_alive']} present at the start)")
            lines.append("")
            lines.append("| bucket | " + " | ".join(str(lv) for lv in info["levels"]) + " |")
            lines.append("|---|" + "---:|" * len(info["levels"]))
            for b, curve in km.items():
                lines.append(f"| {b} | " + " | ".join(f"{s:.2f}" for _, s, _, _ in curve) + " |")
            lines.append("")
    if a["correlations"]:
        lines += ["## Do interventions remove the same examples first?", "",
                  "Spearman correlation of survival times on the forget set (censored examples rank last), "
                  "bootstrap 95% interval.", "", "| a | b | rho | 95% CI | n |", "|---|---|---:|---|---:|"]
        for c in a["correlations"]:
            lines.append(f"| {c['a']} | {c['b']} | {_rho_cells(c)} | {c['n']} |")
        lines += ["", "undefined: under one of the two, every example had the same survival time at these levels "
                  "(e.g. none disappeared), so no ranking exists.", ""]
    if a["predictors"]:
        lines += ["## What predicts survival", "", "| series | predictor | rho | 95% CI | n |",
                  "|---|---|---:|---|---:|"]
        for series, preds in sorted(a["predictors"].items()):
            for k, c in preds.items():
                lines.append(f"| {series} | {k} | {_rho_cells(c)} | {c['n']} |")
        lines.append("")
    path = run_dir / "durability.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def plot(run_dir, out_dir=None) -> list[Path]:
    """recovery_<unlearning>.png (forget share extractable vs level per intervention series, unlearned beside
    retrained) and survival_<series>.png (Kaplan-Meier by bucket)."""
    from llmmem.plots import _finish, _mpl

    plt = _mpl()
    a = analyse(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for u in sorted(a["unlearned"]):
        rec = [r for r in a["recovery"] if r["unlearn"] == u]
        series = sorted({r["series"] for r in rec})
        if not series:
            continue
        fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.5), sharey=True, squeeze=False)
        for ax, s in zip(axes[0], series):
            pts = sorted((r for r in rec if r["series"] == s), key=lambda r: r["level"])
            for who, color in (("unlearned", "#c0392b"), ("retrained", "#2471a3"), ("dense", "#7f8c8d")):
                xs = [r["level"] for r in pts if r[who]]
                ys = [r[who]["share"] for r in pts if r[who]]
                lo = [r[who]["ci"][0] for r in pts if r[who]]
                hi = [r[who]["ci"][1] for r in pts if r[who]]
                if xs:
                    ax.plot(xs, ys, "o-", color=color, label=who, ms=3)
                    ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
            ax.set_title(s, fontsize=9)
            ax.set_xlabel(pts[0]["kind"] if pts else "")
            if pts and pts[0]["kind"] == "quantize":
                ax.invert_xaxis()
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("forget canaries extractable")
        paths += _finish(plt, fig, axes, out, f"recovery_{u}", f"does {u}'s forgetting survive?", loc="upper left")
    for series, sets in sorted(a["survival"].items()):
        info = sets.get("canaries") or sets.get("forget")
        if not info:
            continue
        km = info.get("km") or {"all": info["km_all"]}
        fig, ax = plt.subplots(figsize=(4.8, 3.5))
        for b, curve in km.items():
            ax.step([lv for lv, *_ in curve], [s for _, s, _, _ in curve], where="post", label=b)
        if info["kind"] == "quantize":
            ax.invert_xaxis()
        ax.set_xlabel(info["kind"])
        ax.set_ylabel("still present (Kaplan-Meier)")
        ax.grid(alpha=0.3)
        from llmmem.results import safe_name

        paths += _finish(plt, fig, [[ax]], out, f"survival_{safe_name(series)}", f"{series}: which examples go first",
                         title="bucket")
    return paths
