"""Per-example tracking during unlearning (the evaluation side of the unlearn intervention).

Every ``eval_every`` steps (and at step 0) the tracker measures, for every forget example and a sample of
retain and never-seen examples: extraction (greedy suffix from the prefix: exact, token match), suffix
loss, Min-K% and, for canaries, exposure; plus retain utility (retain loss and the named tasks). Rows go
to ``curves.jsonl`` (appended as they come, one JSON line each); the summary gives steps-to-forget (first
evaluation at which an example is no longer extractable and its loss exceeds the median loss of the
never-seen examples), forgetting by group, utility retained, difficulty predictors and their Spearman
correlation with steps-to-forget.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np

from llmmem.backends.base import GenerateRequest, LoglikelihoodRequest
from llmmem.exposure import exposure
from llmmem.metrics import PRIVLEAK_MIN_K, aggregate, mia_min_k, privleak, privleak_auc, roc_auc, token_match_fraction
from llmmem.unlearning.data import Example, tokenize
from llmmem.unlearning.spec import UnlearnSpec, secret_space

log = logging.getLogger(__name__)

MAX_TRACKED = 64  # retain / never-seen examples tracked per evaluation


class Probe:
    """Per-example memorization measures of example sets on a backend: greedy extraction of the suffix from
    its prefix (exact, token match), the suffix's loss, Min-K% of the whole text, Min-40% (PrivLeak's score)
    and, for canaries, exposure over their declared secret space with fixed alternatives."""

    def __init__(self, backend, *, min_k: float = 0.2, n_alternatives: int = 200, seed: int = 0):
        self.backend = backend
        self.min_k = min_k
        self.n_alternatives = n_alternatives
        self.seed = seed
        self.alternatives: dict = {}
        self.space = None

    def add_canaries(self, examples: list[Example], space) -> None:
        """Fix the alternative secrets of every canary (the same at every measurement)."""
        self.space = space
        for e in examples:
            if e.secret and e.id not in self.alternatives:
                alts = space.alternatives(e.secret, self.n_alternatives, f"{self.seed}:{e.id}")
                self.alternatives[e.id] = (alts, space.size_for(e.secret), space.is_exact(e.secret, self.n_alternatives))

    def measure(self, examples: list[Example], set_name: str, step: int) -> list[dict]:
        if not examples:
            return []
        b = self.backend
        gens = b.generate([GenerateRequest(context_ids=e.prefix_ids, max_gen_toks=len(e.suffix_ids)) for e in examples])
        lls = b.loglikelihood([LoglikelihoodRequest(context_ids=e.prefix_ids, continuation_ids=e.suffix_ids,
                                                    token_logprobs=True) for e in examples])
        full = b.loglikelihood([LoglikelihoodRequest(context_ids=e.prefix_ids[:1] or None,
                                                     continuation_ids=(e.prefix_ids[1:] + e.suffix_ids)
                                                     if e.prefix_ids[:1] else e.suffix_ids, token_logprobs=True)
                                for e in examples])
        rows = []
        for e, g, ll, fl in zip(examples, gens, lls, full):
            got = g.token_ids[: len(e.suffix_ids)]
            rows.append({"step": step, "set": set_name, "id": e.id, "group": e.group, "dup": e.dup,
                         "extractable": float(got == e.suffix_ids), "token_match": token_match_fraction(got, e.suffix_ids),
                         "loss": -ll.logprob / ll.n_tokens, "min_k": mia_min_k(fl.token_logprobs, self.min_k),
                         "min_k_privleak": mia_min_k(fl.token_logprobs, PRIVLEAK_MIN_K)})
        canaries = [(i, e) for i, e in enumerate(examples) if e.id in self.alternatives]
        if canaries:
            reqs, spans = [], []
            for i, e in canaries:
                alts, space, exact = self.alternatives[e.id]
                spans.append((i, len(reqs), len(alts), space, exact))
                for s in [e.secret, *alts]:
                    reqs.append(LoglikelihoodRequest(context_ids=e.prefix_ids,
                                                     continuation_ids=b.encode(" " + s, add_special_tokens=False)))
            res = b.loglikelihood(reqs)
            for i, start, n, space, exact in spans:
                scores = [-r.logprob for r in res[start:start + n + 1]]
                ex = exposure(scores[0], scores[1:], space, exact=exact)
                rows[i].update(exposure=ex["exposure"], exposure_low=ex["exposure_low"],
                               exposure_high=ex["exposure_high"], exposure_method=ex["method"])
        return rows


class Tracker(Probe):
    """Measures forget / retain / never-seen examples and utility tasks on the backend's (live) model."""

    def __init__(self, backend, spec: UnlearnSpec, forget, retain, nonmember, utility_tasks, seed: int,
                 curves_path: Path | None = None, include_path: str | None = None):
        super().__init__(backend, min_k=spec.min_k, n_alternatives=spec.exposure_alternatives, seed=seed)
        self.spec = spec
        rng = random.Random(seed)
        self.forget = forget
        self.retain = rng.sample(retain, min(MAX_TRACKED, len(retain)))
        self.nonmember = rng.sample(nonmember, min(MAX_TRACKED, len(nonmember))) if nonmember else []
        for s in (self.forget, self.retain, self.nonmember):
            tokenize(s, backend)
        self.utility_tasks = utility_tasks
        self.curves_path = curves_path
        canaries = [e for e in forget + self.nonmember if e.secret]
        self.add_canaries(canaries, secret_space(spec, include_path, [e.secret for e in canaries]))
        self.rows: list[dict] = []
        self.utility: list[dict] = []

    def __call__(self, step: int, model) -> None:
        self.evaluate(step)

    def evaluate(self, step: int) -> dict:
        import torch

        from llmmem.evaluation import evaluate

        with torch.no_grad():
            rows = self.measure(self.forget, "forget", step) + self.measure(self.retain, "retain", step)
            if self.nonmember:
                rows += self.measure(self.nonmember, "nonmember", step)
            retain_rows = [r["loss"] for r in rows if r["set"] == "retain"]
            util = {"step": step, "set": "utility", "retain_loss": float(np.mean(retain_rows)) if retain_rows else None}
            if self.utility_tasks:
                for res in evaluate(self.backend, self.utility_tasks, limit=self.spec.utility_limit, seed=0):
                    m = res.primary_metric
                    util[res.task] = {"metric": m, "value": res.metrics.get(m), "stderr": res.metrics.get(f"{m}_stderr")}
        self.rows += rows
        self.utility.append(util)
        if self.curves_path is not None:
            from llmmem.results import append_jsonl

            append_jsonl(self.curves_path, rows + [util])
        f = [r for r in rows if r["set"] == "forget"]
        log.info("step %d: forget extractable %.3f, forget loss %.3f%s", step,
                 np.mean([r["extractable"] for r in f]), np.mean([r["loss"] for r in f]),
                 f", retain loss {util['retain_loss']:.3f}" if util["retain_loss"] is not None else "")
        return util

    # ------------------------------------------------------------------ summary
    def summary(self, report: dict, seed: int) -> tuple[dict, dict, dict]:
        """(results entries, n_samples, the unlearning section's tracking part) from the rows so far."""
        from llmmem.unlearning.difficulty import spearman_with_ci

        spec = self.spec
        stf = steps_to_forget(self.rows, [e.id for e in self.forget])
        last = max(r["step"] for r in self.rows)
        ffin = [r for r in self.rows if r["step"] == last and r["set"] == "forget"]
        r0 = {r["id"]: r for r in self.rows if r["set"] == "forget" and r["step"] == 0}
        censored = spec.steps + spec.eval_every  # not forgotten: ranked after every forgotten example
        before = report.get("predictors_before", {})
        predictors = {}
        for e in self.forget:
            pb = before.get(e.id, {})
            predictors[e.id] = {"dup": e.dup, "dense_loss": r0[e.id]["loss"], "min_k": r0[e.id]["min_k"],
                                "el2n": pb.get("el2n"), "grad_norm_sq": pb.get("grad_norm_sq"),
                                "steps_to_forget": stf[e.id], "group": e.group}
        y = [stf[e.id] if stf[e.id] is not None else censored for e in self.forget]
        correlations = {}
        for k in ("dup", "dense_loss", "min_k", "el2n", "grad_norm_sq"):
            x = [np.nan if predictors[e.id][k] is None else predictors[e.id][k] for e in self.forget]
            correlations[k] = spearman_with_ci(x, y, seed=seed)
        groups: dict = {}
        for e in self.forget:
            g = groups.setdefault(e.group or "all", {"n": 0, "forgotten": 0, "steps": []})
            g["n"] += 1
            if stf[e.id] is not None:
                g["forgotten"] += 1
                g["steps"].append(stf[e.id])
        by_group = {k: {"n": v["n"], "forgotten_rate": v["forgotten"] / v["n"],
                        "mean_steps_to_forget": float(np.mean(v["steps"])) if v["steps"] else None}
                    for k, v in sorted(groups.items())}
        before_u, after_u = self.utility[0], self.utility[-1]
        retained = {}
        for k, v in after_u.items():
            if isinstance(v, dict) and isinstance(before_u.get(k), dict) and before_u[k]["value"]:
                retained[k] = v["value"] / before_u[k]["value"]
        if before_u.get("retain_loss"):
            retained["retain_loss_ratio"] = after_u["retain_loss"] / before_u["retain_loss"]
        metrics = ["extractable", "token_match", "loss", "min_k"] + (["exposure"] if any("exposure" in r for r in ffin) else [])
        results = {
            "unlearn_forget": aggregate(ffin, metrics, "group"),
            "unlearn_forget_initial": aggregate([r for r in self.rows if r["set"] == "forget" and r["step"] == 0],
                                                ["extractable", "token_match", "loss"], "group"),
        }
        rate = sum(v is not None for v in stf.values()) / len(stf)
        results["unlearn_forget"]["forgotten_rate"] = rate
        results["unlearn_forget"]["forgotten_rate_stderr"] = float(np.sqrt(rate * (1 - rate) / len(stf))) \
            if len(stf) > 1 else float("nan")
        for k, v in after_u.items():
            if isinstance(v, dict) and v["value"] is not None:
                results[k] = {v["metric"]: v["value"], f"{v['metric']}_stderr": v["stderr"]}
        n = {"unlearn_forget": len(self.forget), "unlearn_forget_initial": len(self.forget)}
        section = {"eval_every": spec.eval_every, "n_nonmember": len(self.nonmember), "steps_to_forget": stf,
                   "forgetting_by_group": by_group, "utility_before": before_u, "utility_after": after_u,
                   "utility_retained": retained, "predictors": predictors, "correlations": correlations}
        return results, n, section


def steps_to_forget(rows: list[dict], forget_ids: list[str]) -> dict:
    """First evaluation step at which an example is not extractable and its loss exceeds the median
    never-seen loss at that step (None: not forgotten within the run)."""
    by_step: dict = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r)
    out = {i: None for i in forget_ids}
    for step in sorted(by_step):
        rs = by_step[step]
        non = [r["loss"] for r in rs if r["set"] == "nonmember"]
        thresh = float(np.median(non)) if non else float("-inf")
        for r in rs:
            if r["set"] == "forget" and out.get(r["id"], 0) is None and not r["extractable"] and r["loss"] > thresh:
                out[r["id"]] = step
    return out


def compare_with_reference(backend, ref_backend, tracker: Tracker) -> dict:
    """The unlearned model against the model retrained without the forget set (the gold standard), on the
    forget set and the never-seen (holdout) examples: forget loss, exposure, loss-attack AUC, and MUSE's
    PrivLeak (Min-K% with k = 0.4, AUC with forget labelled 0 and holdout 1 as open-unlearning's
    ``privleak``; ``((1 - AUC_u) - (1 - AUC_r)) / (1 - AUC_r) * 100``: 0 = as private as retraining,
    negative = the forget set is still distinguishable, positive = over-unlearned)."""
    out = {}
    for name, b in (("unlearned", backend), ("retrained", ref_backend)):
        saved = tracker.backend
        tracker.backend = b
        try:
            f = tracker.measure(tracker.forget, "forget", -1)
            n = tracker.measure(tracker.nonmember, "nonmember", -1) if tracker.nonmember else []
        finally:
            tracker.backend = saved
        out[name] = {"forget_loss": float(np.mean([r["loss"] for r in f])),
                     "exposure": float(np.mean([r["exposure"] for r in f if "exposure" in r]))
                     if any("exposure" in r for r in f) else None,
                     "loss_auc": roc_auc([r["loss"] for r in f], [r["loss"] for r in n]) if n else None,
                     "privleak_auc": privleak_auc([r["min_k_privleak"] for r in f], [r["min_k_privleak"] for r in n])
                     if n else None}
    u, r = out["unlearned"]["loss_auc"], out["retrained"]["loss_auc"]
    out["loss_auc_gap"] = (u - r) if u is not None and r is not None else None
    pu, pr = out["unlearned"]["privleak_auc"], out["retrained"]["privleak_auc"]
    out["privleak"] = privleak(pu, pr) if pu is not None and pr is not None else None
    return out


# ----------------------------------------------------------------------------- survival probe of a cell
TRACK_KEYS = {"sets", "exposure_alternatives", "secret_format", "min_k"}
SET_KEYS = {"source", "ids", "filter", "exclude_ids", "limit"}


def check_track(track) -> dict | None:
    """Validate an evaluation's ``track`` mapping (torch-free): ``{sets: {name: {source, ids, filter,
    exclude_ids, limit}}, exposure_alternatives, secret_format, min_k}``."""
    from llmmem.config import ConfigError, check_keys, parse_float, parse_positive_int, read_id_file

    if track in (None, {}):
        return None
    check_keys("track", track, TRACK_KEYS)
    sets = track.get("sets")
    if not isinstance(sets, dict) or not sets:
        raise ConfigError(f"track.sets must be a mapping name -> {{source, ids, filter}}, got {sets!r}")
    out_sets = {}
    for name, st in sets.items():
        where = f"track.sets.{name}"
        check_keys(where, st, SET_KEYS)
        if not isinstance(st.get("source"), str) or not st["source"].strip():
            raise ConfigError(f"{where}.source is required: a task name or a .jsonl file")
        s = dict(st)
        for key in ("ids", "exclude_ids"):
            if isinstance(s.get(key), str):
                s[key] = read_id_file(s[key], f"{where}.{key} file")
            elif s.get(key) is not None:
                if not isinstance(s[key], list):
                    raise ConfigError(f"{where}.{key} must be a list of ids or a file, got {s[key]!r}")
                s[key] = [str(i) for i in s[key]]
        if s.get("filter") is not None and not isinstance(s["filter"], dict):
            raise ConfigError(f"{where}.filter must be a mapping field -> value or [values], got {s['filter']!r}")
        if s.get("limit") is not None:
            s["limit"] = parse_positive_int(f"{where}.limit", s["limit"])
        out_sets[str(name)] = s
    out = {"sets": out_sets,
           "exposure_alternatives": parse_positive_int("track.exposure_alternatives",
                                                       track.get("exposure_alternatives", 200)),
           "min_k": parse_float("track.min_k", track.get("min_k", 0.2), low=0.0, high=1.0, low_open=True)}
    if track.get("secret_format") is not None:
        out["secret_format"] = track["secret_format"]
    return out


def load_track_sets(track: dict, include_path: str | None, seed: int = 0) -> dict:
    """{set name: examples} of a validated ``track`` (no model needed); every set non-empty."""
    from llmmem.config import ConfigError
    from llmmem.unlearning.data import load_examples

    out = {}
    for name, st in track["sets"].items():
        ex = load_examples(st["source"], include_path, st.get("ids"), st.get("filter"))
        drop = set(st.get("exclude_ids") or [])
        ex = [e for e in ex if e.id not in drop]
        if st.get("limit") and len(ex) > st["limit"]:
            ex = sorted(random.Random(f"{seed}:{name}").sample(ex, st["limit"]), key=lambda e: e.id)
        if not ex:
            raise ConfigError(f"track.sets.{name} is empty after ids/filter/exclude_ids")
        out[name] = ex
    return out


def prepare_track(track: dict, include_path: str | None) -> None:
    """Everything about ``track`` that can be checked before a model loads (sets load, secrets in their space)."""
    from llmmem.unlearning.spec import resolve_secret_space

    for name, ex in load_track_sets(track, include_path).items():
        secrets = [e.secret for e in ex if e.secret]
        resolve_secret_space(track["sets"][name]["source"], track.get("secret_format"),
                             track["exposure_alternatives"], include_path, secrets)


def survival_rows(backend, track: dict, include_path: str | None, seed: int) -> list[dict]:
    """Per-example measures of every tracked set on the backend's model (one row per example)."""
    from llmmem.unlearning.spec import resolve_secret_space

    probe = Probe(backend, min_k=track["min_k"], n_alternatives=track["exposure_alternatives"], seed=seed)
    rows = []
    for name, ex in load_track_sets(track, include_path, seed).items():
        tokenize(ex, backend)
        secrets = [e.secret for e in ex if e.secret]
        if secrets:
            probe.add_canaries(ex, resolve_secret_space(track["sets"][name]["source"], track.get("secret_format"),
                                                        track["exposure_alternatives"], include_path, secrets))
        for r in probe.measure(ex, name, -1):
            r.pop("step")
            r["correct"] = r["extractable"]
            rows.append(r)
    return rows


def survival_metrics(rows: list[dict]) -> dict:
    """``track_<set>`` results entries: means with bootstrap errors, by group."""
    out = {}
    for name in dict.fromkeys(r["set"] for r in rows):
        sub = [r for r in rows if r["set"] == name]
        metrics = ["extractable", "token_match", "loss"] + (["exposure"] if any("exposure" in r for r in sub) else [])
        out[f"track_{name}"] = aggregate(sub, metrics, "group" if any(r.get("group") for r in sub) else None)
    return out
