"""Counterfactual memorization on the testbed: per-item memorization scores, and exact leave-one-out for a few.

Feldman & Zhang (2020, "What Neural Networks Memorize and Why") define the memorization of example i by a
training algorithm A on data S as ``mem(A, S, i) = Pr[h(x_i) = y_i | h ~ A(S)] - Pr[h(x_i) = y_i | h ~ A(S \\ i)]``
and estimate it from models trained on random subsets: the mean accuracy on i of the models whose subset held
i, minus that of the models whose subset did not. Zhang et al. (2021, "Counterfactual Memorization in Neural
Language Models") use the same estimator for LMs (random halves; accuracy or loss). Here the data are the
testbed's *planted items*: facts (``fact-i``, written ``count`` times) and member canaries (``canary-i``,
written ``dup`` times). Everything else in the corpus (in-context episodes) is in every model, so every model
keeps its in-context abilities.

Design (``balanced_design``): K models in complement pairs. For pair j, within each stratum (kind and
count/dup), a random half of the items goes to model 2j and the rest to model 2j+1, so every item is in
exactly K/2 models and every model sees half of each count/dup level (equal corpus sizes). Held-out canaries
(never written, ``dup`` 0) are assigned membership the same way but are never trained on -- in no model -- so
their scores are a placebo: acc_in and acc_out both come from models that never saw them, and their ``mem`` is
~0 by construction (the estimator's noise floor).

How an item is left out (``llmmem.testbed.train.training_stream``): its documents are blanked in place -- every
token replaced by ``<pad>``, no loss on them, and no loss on the token after them -- so the item's text never
reaches the model while the packing, the batches, the number of steps and the learning-rate schedule stay the
same. Every model here is trained with the same blanked loss (``blanked_loss``: divided by all target positions,
so blanked tokens do not re-weight the rest). With the default shared seed, models differ in nothing but their
items: same initialisation, same document order, same rows.

Leave-one-out (``--loo N``): the model trained on every planted item, and for each of N chosen items the model
trained on everything but that item, with the same seed (same initialisation and order; the item's documents
are blanked, nothing moves). In a batch that does not hold the item, the two models' gradients are
bit-identical (a test checks it). ``loo_mem`` = score of the full model - score of the model without the item.

Scores (llmmem's own suites on the HF backend, the definitions ``llmmem eval`` uses on the testbed tasks):

* facts: ``correct`` = the recall suite's ``exact_match`` on ``testbed_recall`` (greedy, up to 4 tokens, stop at
  ``.``, SQuAD-normalised exact match); ``loss`` = mean NLL per token of `` <answer>`` after the same prompt
  (the backend's ``loglikelihood``, lm-eval's context/continuation split);
* canaries: ``correct`` = the extraction suite's ``extractable`` on ``testbed_canaries`` (8 prefix tokens, greedy
  10 tokens, exact match of the secret); ``loss`` = its ``suffix_nll`` (mean NLL per secret token). Exposure is
  not computed (it is costly, and not needed here).

Estimator (``estimate``): ``acc_in``/``acc_out`` = mean ``correct`` over the models with / without the item,
``mem = acc_in - acc_out``; ``loss_in``/``loss_out`` likewise, ``mem_loss = loss_out - loss_in`` (positive = the
item is easier for models that saw it). Standard errors: two independent samples,
``se = sqrt(s_in^2 / n_in + s_out^2 / n_out)`` with sample variances (ddof 1); None when a side has < 2 models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

from llmmem.config import ConfigError

log = logging.getLogger(__name__)

SCHEMA = "llmmem-memscore/1"
WORK = ".memscore-partial"  # per-model results of an unfinished run (resumed with the same settings)


# ----------------------------------------------------------------------------- items and design
def planted_items(world) -> list[dict]:
    """Every fact and canary of ``world``: ``{"id", "kind", "level" (count / dup), "heldout"}``; held-out canaries
    (``dup`` 0) have no document and are never trained on."""
    items = [{"id": f["id"], "kind": "fact", "level": f["count"], "heldout": False} for f in world.facts]
    items += [{"id": c["id"], "kind": "canary", "level": c["dup"], "heldout": not c["member"]} for c in world.canaries]
    return items


def _strata(items: list[dict]) -> dict:
    out: dict = {}
    for it in items:
        out.setdefault((it["kind"], it["level"], it["heldout"]), []).append(it["id"])
    return out


def balanced_design(items: list[dict], models: int, seed: int) -> list[set[str]]:
    """The item ids "in" each of ``models`` models (an even number): complement pairs, stratified by kind and
    count/dup, so every item is in exactly ``models / 2`` models and each model gets half of every stratum. For
    pair j, each stratum is shuffled and split in halves; the items left over by odd-sized strata are pooled,
    shuffled and split the same way (so a stratum of one item does not always land on the same side, and the
    two models of a pair differ by at most one item). Held-out canaries get membership too (the placebo); the
    caller never trains on them."""
    if models < 2 or models % 2:
        raise ConfigError(f"--models {models}: must be an even number >= 2 (models come in complement pairs)")
    membership: list[set[str]] = [set() for _ in range(models)]
    strata = _strata(items)
    for j in range(models // 2):
        rng = random.Random(f"llmmem-memscore:{seed}:pair{j}")
        leftover = []
        for key in sorted(strata):
            ids = sorted(strata[key])
            rng.shuffle(ids)
            half = len(ids) // 2
            membership[2 * j].update(ids[:half])
            membership[2 * j + 1].update(ids[half:2 * half])
            leftover += ids[2 * half:]
        rng.shuffle(leftover)
        half = (len(leftover) + rng.randrange(2)) // 2  # an odd pool's extra item goes to either side
        membership[2 * j].update(leftover[:half])
        membership[2 * j + 1].update(leftover[half:])
    return membership


def _spread(n: int) -> list[int]:
    """0..n-1 in an order that covers the range early: last, first, then midpoints of the widest gaps."""
    if n <= 2:
        return list(range(n))[::-1]
    order = [n - 1, 0]
    while len(order) < n:
        s = sorted(order)
        gaps = [(b - a, a, b) for a, b in zip(s, s[1:]) if b - a > 1]
        _, a, b = max(gaps, key=lambda g: (g[0], -g[1]))
        order.append((a + b) // 2)
    return order


def choose_loo(items: list[dict], n: int, seed: int) -> list[str]:
    """``n`` trained items for exact leave-one-out, spread over the strata (the highest and lowest count/dup
    first, canaries and facts alternating) so their memorization spans a range; random within a stratum."""
    trained = [it for it in items if not it["heldout"]]
    if n > len(trained):
        raise ConfigError(f"--loo {n}: at most {len(trained)} (the planted items this world trains on)")
    if n <= 0:
        return []
    rng = random.Random(f"llmmem-memscore-loo:{seed}")
    by_kind: dict = {}
    for key, ids in sorted(_strata(trained).items()):
        pool = sorted(ids)
        rng.shuffle(pool)
        by_kind.setdefault(key[0], []).append(pool)
    ordered = {k: [strata[i] for i in _spread(len(strata))] for k, strata in by_kind.items()}
    chosen: list[str] = []
    while len(chosen) < n:
        for k in [k for k in ("canary", "fact") if k in ordered]:
            for pool in ordered[k]:
                if pool:
                    chosen.append(pool.pop())
                    break
            if len(chosen) == n:
                break
    return chosen


# ----------------------------------------------------------------------------- estimator
def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def two_sample(in_vals: list[float], out_vals: list[float]) -> dict:
    """Means of the two samples, their difference (in - out) and its standard error
    ``sqrt(s_in^2/n_in + s_out^2/n_out)`` (sample variances, ddof 1; None when a side has fewer than 2)."""
    m_in, m_out = _mean(in_vals), _mean(out_vals)
    diff = None if m_in is None or m_out is None else m_in - m_out
    se = None
    if len(in_vals) >= 2 and len(out_vals) >= 2:
        v_in = sum((x - m_in) ** 2 for x in in_vals) / (len(in_vals) - 1)
        v_out = sum((x - m_out) ** 2 for x in out_vals) / (len(out_vals) - 1)
        se = math.sqrt(v_in / len(in_vals) + v_out / len(out_vals))
    return {"n_in": len(in_vals), "n_out": len(out_vals), "mean_in": m_in, "mean_out": m_out, "diff": diff, "se": se}


def estimate(items: list[dict], models: list[dict]) -> list[dict]:
    """Per-item scores from subsampled models, each ``{"in": set of item ids, "scores": {id: {"correct", "loss"}}}``.

    ``mem = acc_in - acc_out`` and ``mem_loss = loss_out - loss_in``, with the standard errors of
    :func:`two_sample`."""
    rows = []
    for it in items:
        i = it["id"]
        ins = [m["scores"][i] for m in models if i in m["in"]]
        outs = [m["scores"][i] for m in models if i not in m["in"]]
        acc = two_sample([s["correct"] for s in ins], [s["correct"] for s in outs])
        loss = two_sample([s["loss"] for s in outs], [s["loss"] for s in ins])  # out - in
        row = {"id": i, "kind": it["kind"], ("count" if it["kind"] == "fact" else "dup"): it["level"]}
        if it["kind"] == "canary":
            row["heldout"] = it["heldout"]
        row.update(n_in=acc["n_in"], n_out=acc["n_out"], acc_in=acc["mean_in"], acc_out=acc["mean_out"],
                   mem=acc["diff"], mem_se=acc["se"], loss_in=loss["mean_out"], loss_out=loss["mean_in"],
                   mem_loss=loss["diff"], mem_loss_se=loss["se"])
        rows.append(row)
    return rows


def _spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    from scipy import stats

    return float(stats.spearmanr(x, y).statistic)


def loo_comparison(rows: list[dict]) -> dict:
    """Subsampled estimate against exact leave-one-out over the items that have both (``loo_mem`` set): per key,
    the mean absolute difference, the mean signed difference (subsampled - LOO), the Spearman rank correlation
    (None when fewer than 3 items or a side is constant) and the mean standard error of the subsampled estimate
    (to read the error against the estimator's own noise)."""
    out = {}
    for key in ("mem", "mem_loss"):
        pairs = [(r[key], r[f"loo_{key}"], r[f"{key}_se"]) for r in rows
                 if r.get(f"loo_{key}") is not None and r.get(key) is not None]
        if not pairs:
            continue
        sub, loo, se = [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs if p[2] is not None]
        out[key] = {"n": len(pairs), "mean_abs_diff": _mean([abs(a - b) for a, b in zip(sub, loo)]),
                    "mean_diff": _mean([a - b for a, b in zip(sub, loo)]), "spearman": _spearman(sub, loo),
                    "mean_se": _mean(se)}
    return out


def buckets(rows: list[dict]) -> dict:
    """Mean ``mem`` / ``mem_loss`` per kind and count/dup level (held-out canaries: ``heldout``)."""
    out: dict = {}
    for r in rows:
        level = "heldout" if r.get("heldout") else str(r.get("count", r.get("dup")))
        out.setdefault(r["kind"], {}).setdefault(level, []).append(r)
    return {kind: {level: {"n": len(rs), "mem": _mean([r["mem"] for r in rs if r["mem"] is not None]),
                           "mem_loss": _mean([r["mem_loss"] for r in rs if r["mem_loss"] is not None])}
                   for level, rs in sorted(levels.items(), key=lambda kv: (kv[0] == "heldout", kv[0].zfill(9)))}
            for kind, levels in out.items()}


# ----------------------------------------------------------------------------- scoring
def score_model(model, tok, tasks_dir: Path, seed: int = 0, batch_size: int = 32) -> dict:
    """``{item id: {"correct", "loss"}}`` for every fact and canary (definitions in the module docstring)."""
    from llmmem.backends.base import LoglikelihoodRequest
    from llmmem.backends.hf import HFBackend
    from llmmem.models import wrap_model
    from llmmem.suites import run_task
    from llmmem.tasks import load_task_file

    backend = HFBackend(wrap_model(model, tok, name="memscore"), batch_size=batch_size, quiet=True)
    out = {}
    recall = run_task(load_task_file(Path(tasks_dir) / "testbed_recall.yaml"), backend, seed=seed)
    lls = backend.loglikelihood([LoglikelihoodRequest(context=r["prompt"], continuation=" " + r["target"])
                                 for r in recall.rows])
    for r, ll in zip(recall.rows, lls):
        out[r["id"]] = {"correct": float(r["exact_match"]), "loss": -ll.logprob / max(1, ll.n_tokens)}
    task = load_task_file(Path(tasks_dir) / "testbed_canaries.yaml")
    task = dataclasses.replace(task, options={k: v for k, v in task.options.items() if k != "exposure"})
    for r in run_task(task, backend, seed=seed).rows:
        out[r["id"]] = {"correct": float(r["extractable"]), "loss": float(r["suffix_nll"])}
    return out


# ----------------------------------------------------------------------------- plan and run
def plan_memscore(preset: str, models: int, seed: int, loo: int = 0, config=None, vary_seed: bool = False) -> dict:
    """Check every input and lay out the models, before anything trains (bad input: ``ConfigError``)."""
    from llmmem.testbed.train import preset_config
    from llmmem.testbed.world import build_world

    for key, v in (("--models", models), ("--seed", seed), ("--loo", loo)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key} {v!r}: must be an integer")
    if models < 2 or models % 2:
        raise ConfigError(f"--models {models}: must be an even number >= 2 (models come in complement pairs, so "
                          "every item is in exactly half of them)")
    if seed < 0:
        raise ConfigError(f"--seed {seed}: must be >= 0")
    if loo < 0:
        raise ConfigError(f"--loo {loo}: must be >= 0 (the number of items for exact leave-one-out)")
    cfg = config or preset_config(preset)
    world = build_world(seed, cfg.world)
    items = planted_items(world)
    loo_ids = choose_loo(items, loo, seed)
    membership = balanced_design(items, models, seed)
    trained = {it["id"] for it in items if not it["heldout"]}
    runs = [{"name": f"sub-{i}", "role": "subsample", "seed": seed + i if vary_seed else seed,
             "in": sorted(membership[i] & trained), "placebo_in": sorted(membership[i] - trained)}
            for i in range(models)]
    if loo_ids:
        runs.append({"name": "loo-full", "role": "loo-full", "seed": seed, "in": sorted(trained), "placebo_in": []})
        runs += [{"name": f"loo-{i}", "role": "loo-without", "seed": seed, "item": i, "in": sorted(trained - {i}),
                  "placebo_in": []} for i in loo_ids]
    from dataclasses import asdict

    settings = {"schema": SCHEMA, "preset": preset, "seed": seed, "models": models, "loo": loo,
                "vary_seed": vary_seed, "train": {k: v for k, v in asdict(cfg).items() if k != "world"},
                "world": asdict(cfg.world)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()[:16]
    return {"settings": settings, "key": key, "config": cfg, "world": world, "items": items, "loo": loo_ids,
            "runs": runs}


def _check_output(out: Path, key: str, overwrite: bool) -> None:
    from llmmem.config import check_output_path

    check_output_path("--output", out)  # a directory that exists and is writable, or can be created
    if not out.is_dir():
        return
    others = [p for p in out.iterdir() if p.name != WORK and not p.name.startswith(".llmmem-partial-")]
    if others and not overwrite:
        raise ConfigError(f"--output {out} is not empty; pass --overwrite to replace it")
    work = out / WORK
    if work.is_dir():
        try:
            same = json.loads((work / "plan.json").read_text())["key"] == key
        except (OSError, ValueError, KeyError):
            same = False
        if not same:
            if not overwrite:
                raise ConfigError(f"--output {out} holds an unfinished memscore run with other settings; pass "
                                  "--overwrite to discard it")
            shutil.rmtree(work)


def run_memscore(output: str | Path, preset: str = "tiny", models: int = 4, seed: int = 0, loo: int = 0,
                 config=None, vary_seed: bool = False, overwrite: bool = False, threads: int | None = None) -> Path:
    """Train the planned models (resuming an interrupted run with the same settings), score them, and write
    ``memscore.jsonl`` + ``memscore.json`` (+ ``scores.jsonl``, ``world.json``) into ``output`` atomically."""
    from llmmem.results import atomic_directory, atomic_write_json, dumps, environment
    from llmmem.testbed.train import train, write_tasks
    from llmmem.testbed.world import world_json

    out = Path(output)
    plan = plan_memscore(preset, models, seed, loo, config, vary_seed)
    _check_output(out, plan["key"], overwrite)
    t_start = time.time()
    world, cfg, items = plan["world"], plan["config"], plan["items"]
    trained = {it["id"] for it in items if not it["heldout"]}
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "plan.json", {"key": plan["key"], "settings": plan["settings"]})
    write_tasks(world, work)  # what score_model reads (rewritten on resume: it is cheap)
    records = []
    for n, run in enumerate(plan["runs"], 1):
        path = work / f"model-{run['name']}.json"
        if path.is_file():
            rec = json.loads(path.read_text())
            log.info("memscore: model %d/%d (%s): done earlier, resumed", n, len(plan["runs"]), run["name"])
        else:
            t0 = time.time()
            model, tok, info = train(world, cfg, run["seed"], quiet=True, threads=threads,
                                     blank=trained - set(run["in"]), probe_curve=False)
            t1 = time.time()
            scores = score_model(model, tok, work / "tasks", seed=seed)
            del model
            final = next((pt["probe"] for pt in reversed(info["loss_curve"]) if "probe" in pt), {})
            rec = {**run, "steps": info["steps"], "blanked_documents": info["blanked_documents"],
                   "final_probe": final, "train_seconds": round(t1 - t0, 1),
                   "eval_seconds": round(time.time() - t1, 1), "scores": scores}
            atomic_write_json(path, rec)
            log.info("memscore: model %d/%d (%s): %d steps, trained %.0fs, scored %.0fs", n, len(plan["runs"]),
                     run["name"], info["steps"], rec["train_seconds"], rec["eval_seconds"])
        records.append(rec)

    subs = [{"in": set(r["in"]) | set(r["placebo_in"]), "scores": r["scores"]} for r in records
            if r["role"] == "subsample"]
    rows = estimate(items, subs)
    full = next((r for r in records if r["role"] == "loo-full"), None)
    without = {r["item"]: r for r in records if r["role"] == "loo-without"}
    for row in rows:
        w = without.get(row["id"])
        if full is None or w is None:
            row.update(loo_mem=None, loo_mem_loss=None)
            continue
        f, s = full["scores"][row["id"]], w["scores"][row["id"]]
        row.update(loo_mem=f["correct"] - s["correct"], loo_mem_loss=s["loss"] - f["loss"],
                   loo_acc_full=f["correct"], loo_acc_without=s["correct"], loo_loss_full=f["loss"],
                   loo_loss_without=s["loss"])
    by_id = {r["id"]: r for r in rows}
    summary = {
        "schema": SCHEMA,
        "settings": plan["settings"],
        "estimator": {
            "mem": "acc_in - acc_out: mean correctness (facts: recall exact_match; canaries: extractable) over the "
                   "models trained with the item minus over those without",
            "mem_loss": "loss_out - loss_in: mean NLL per answer/secret token, models without minus models with",
            "se": "sqrt(s_in^2/n_in + s_out^2/n_out), sample variances (ddof 1)",
            "loo_mem": "correct(model on every item) - correct(model on every item but this one), same seed",
            "loo_mem_loss": "loss(without the item) - loss(every item), same seed",
            "keys": "read with llmmem.testbed.memscore.load_memscores(dir): `mem` (accuracy-based) or `mem_loss` "
                    "(loss-based)",
        },
        "design": {
            "kind": "complement pairs, stratified by kind and count/dup: every planted item in exactly K/2 models",
            "models": models,
            "items": {"facts": sum(it["kind"] == "fact" for it in items),
                      "canaries": sum(it["kind"] == "canary" and not it["heldout"] for it in items),
                      "placebo": sum(it["heldout"] for it in items)},
            "placebo": "held-out canaries: assigned membership like the others but never trained on (mem ~ 0)",
            "seeds": "per model: seed + model index" if vary_seed else
                     "shared: every model (and the LOO pair) has the same initialisation and document order",
            "leaving_out": "an item's documents are blanked in place (<pad>, no loss); packing, steps and the "
                           "learning-rate schedule are the same for every model",
        },
        "corpus_sha256": world.corpus_hash(),
        "models": [{k: v for k, v in r.items() if k != "scores"} for r in records],
        "loo": {"items": plan["loo"],
                "rows": [{k: by_id[i].get(k) for k in ("id", "kind", "count", "dup", "mem", "mem_se", "loo_mem",
                                                        "mem_loss", "mem_loss_se", "loo_mem_loss") if k in by_id[i]}
                         for i in plan["loo"]],
                "error": loo_comparison(rows)},
        "buckets": buckets(rows),
        "timings": {"train_seconds": round(sum(r["train_seconds"] for r in records), 1),
                    "eval_seconds": round(sum(r["eval_seconds"] for r in records), 1),
                    "wall_seconds_this_call": round(time.time() - t_start, 1)},
        "environment": environment(),
    }
    with atomic_directory(out, marker="memscore.json") as tmp:
        (tmp / "memscore.jsonl").write_text("".join(dumps(r, indent=None) + "\n" for r in rows))
        (tmp / "scores.jsonl").write_text("".join(
            dumps({"model": r["name"], "role": r["role"], "id": i, "in": i in r["in"],
                   "placebo_in": i in r["placebo_in"], **s}, indent=None) + "\n"
            for r in records for i, s in r["scores"].items()))
        (tmp / "world.json").write_text(world_json(world))
        (tmp / "memscore.json").write_text(dumps(summary) + "\n")
    return out


def load_memscores(path: str | Path) -> dict[str, dict]:
    """``{item id: row}`` from a memscore output directory (or its ``memscore.jsonl``). Use ``row["mem"]`` for the
    accuracy-based score, ``row["mem_loss"]`` for the loss-based one (both None where undefined)."""
    p = Path(path)
    if p.is_dir():
        p = p / "memscore.jsonl"
    if not p.is_file():
        raise ConfigError(f"memscores {path}: no memscore.jsonl there (written by `llmmem testbed memscore`)")
    out = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[row["id"]] = row
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"memscores {p} line {n}: not a memscore row (JSON with an id)") from None
    return out
