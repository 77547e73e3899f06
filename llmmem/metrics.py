"""Metric functions shared by the suites, and the aggregation every result goes through.

Pure Python + numpy (scipy only for the exposure extrapolation). Each function is small enough to
check by hand; the tests do.
"""

from __future__ import annotations

import math
import re
import string
import zlib
from collections import Counter
from collections.abc import Sequence

import numpy as np

# ----------------------------------------------------------------------------- answers
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"“", "”", "‘", "’", "—", "–"}


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, squeeze whitespace."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def first_line(text: str) -> str:
    """The answer part of a generation: its first non-empty line, stripped."""
    for line in str(text).strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Max over answers of the token-overlap F1 of the normalised strings."""
    best = 0.0
    p_toks = normalize_answer(prediction).split()
    for a in answers:
        a_toks = normalize_answer(a).split()
        if not p_toks or not a_toks:
            best = max(best, float(p_toks == a_toks))
            continue
        common = sum((Counter(p_toks) & Counter(a_toks)).values())
        if common == 0:
            continue
        prec, rec = common / len(p_toks), common / len(a_toks)
        best = max(best, 2 * prec * rec / (prec + rec))
    return best


def contains_answer(prediction: str, answers: Sequence[str]) -> float:
    p = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(a)} " in p for a in answers if normalize_answer(a)))


# ----------------------------------------------------------------------------- extraction
def matching_prefix_length(generated: Sequence[int], target: Sequence[int]) -> int:
    n = 0
    for g, t in zip(generated, target):
        if g != t:
            break
        n += 1
    return n


def token_match_fraction(generated: Sequence[int], target: Sequence[int]) -> float:
    """Share of positions where the generated token equals the true one (Biderman et al. 2023)."""
    if not target:
        return 0.0
    return sum(1 for g, t in zip(generated, target) if g == t) / len(target)


def bleu4(candidate: Sequence, reference: Sequence) -> float:
    """Sentence BLEU-4 (uniform weights, brevity penalty, no smoothing) over token sequences."""
    if not candidate or not reference:
        return 0.0
    log_p = 0.0
    for n in range(1, 5):
        cand = Counter(tuple(candidate[i:i + n]) for i in range(len(candidate) - n + 1))
        ref = Counter(tuple(reference[i:i + n]) for i in range(len(reference) - n + 1))
        total = sum(cand.values())
        if total == 0:
            return 0.0
        clipped = sum(min(c, ref[g]) for g, c in cand.items())
        if clipped == 0:
            return 0.0
        log_p += 0.25 * math.log(clipped / total)
    bp = 1.0 if len(candidate) > len(reference) else math.exp(1 - len(reference) / len(candidate))
    return bp * math.exp(log_p)


# Exposure (Carlini et al. 2019) lives in llmmem.exposure: a declared secret space, exact or sampled.


# ----------------------------------------------------------------------------- membership inference
# Convention (as MIMIR): every score is "lower = more likely a member".
def mia_loss(token_logprobs: Sequence[float]) -> float:
    """LOSS attack: mean negative log-likelihood per token."""
    return -float(np.mean(token_logprobs))


def mia_zlib(token_logprobs: Sequence[float], text: str) -> float:
    """zlib ratio: LOSS divided by the zlib-compressed length of the text in bytes."""
    return mia_loss(token_logprobs) / len(zlib.compress(text.encode("utf-8")))


def mia_reference(token_logprobs: Sequence[float], ref_token_logprobs: Sequence[float]) -> float:
    """Reference-model ratio: target LOSS minus reference-model LOSS."""
    return mia_loss(token_logprobs) - mia_loss(ref_token_logprobs)


def mia_min_k(token_logprobs: Sequence[float], k: float = 0.2) -> float:
    """Min-K%: minus the mean of the k% lowest token log-probs."""
    lp = np.sort(np.asarray(token_logprobs, dtype=np.float64))
    n = max(1, int(len(lp) * k))
    return -float(lp[:n].mean())


def mia_min_k_plus_plus(token_logprobs: Sequence[float], mu: Sequence[float], sigma: Sequence[float],
                        k: float = 0.2) -> float:
    """Min-K%++: standardise each token log-prob by the mean and std of log p under the model's
    next-token distribution at that position, then minus the mean of the k% lowest."""
    z = (np.asarray(token_logprobs) - np.asarray(mu)) / np.maximum(np.asarray(sigma), 1e-12)
    z = np.sort(z)
    n = max(1, int(len(z) * k))
    return -float(z[:n].mean())


def _finite_array(values: Sequence[float]) -> np.ndarray:
    """As MIMIR's ``filter_out_nan``: drop NaN scores before any curve is drawn."""
    a = np.asarray(values, dtype=np.float64).ravel()
    return a[~np.isnan(a)]


def roc_curve(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``sklearn.metrics.roc_curve(labels, scores)`` with its defaults (``drop_intermediate=True``), in numpy.

    Label 1 is the positive class and a *higher* score means "more likely positive" (scikit-learn's
    orientation). Returns ``fpr, tpr, thresholds``; the curve starts at (0, 0) with threshold ``inf``.
    ``tests/test_metrics.py`` checks it equal to scikit-learn's on continuous and tied scores.
    """
    y = np.asarray(labels).ravel() == 1
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"roc_curve: {y.size} labels for {s.size} scores")
    order = np.argsort(-s, kind="stable")  # descending; ties in any order give the same curve
    s, y = s[order], y[order].astype(np.float64)
    idx = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]  # last position of each distinct score
    tps = np.cumsum(y)[idx]
    fps = 1 + idx.astype(np.float64) - tps
    thresholds = s[idx]
    if fps.shape[0] > 2:  # drop points collinear with their neighbours (not corners of the curve)
        keep = np.nonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    thresholds = np.r_[np.inf, thresholds]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thresholds


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float((np.diff(x) * (y[1:] + y[:-1]) / 2.0).sum())


def _member_curve(member_scores, nonmember_scores):
    """MIMIR's orientation (``mimir/attacks/attack_utils.py``, ``get_roc_metrics``): members are label 1,
    and the scores (lower = member) are negated so that members are the high-score class."""
    m, n = _finite_array(member_scores), _finite_array(nonmember_scores)
    if m.size == 0 or n.size == 0:
        return None
    labels = np.r_[np.ones(m.size, dtype=int), np.zeros(n.size, dtype=int)]
    return roc_curve(labels, -np.r_[m, n])


def roc_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of a "lower = member" score: ``sklearn.metrics.roc_auc_score(labels, -scores)`` with members
    labelled 1 (= MIMIR's ``auc(fpr, tpr)``) = P(member < non-member) + P(tie) / 2. NaN scores are dropped;
    NaN when either set is empty."""
    curve = _member_curve(member_scores, nonmember_scores)
    if curve is None:
        return float("nan")
    fpr, tpr, _ = curve
    return _trapezoid(fpr, tpr)


def tpr_at_fpr(member_scores: Sequence[float], nonmember_scores: Sequence[float], fpr: float) -> float:
    """TPR at FPR strictly below ``fpr``, exactly as MIMIR (``run.py``, compute_metrics_from_scores):
    ``tpr[np.where(fpr_curve < fpr)[0][-1]]`` on the ROC curve of :func:`roc_auc`'s orientation
    (Carlini et al. 2022's "TPR at low FPR"). NaN when either set is empty."""
    if not fpr > 0:
        raise ValueError(f"tpr_at_fpr: the FPR bound must be > 0, got {fpr}")
    curve = _member_curve(member_scores, nonmember_scores)
    if curve is None:
        return float("nan")
    f, t, _ = curve
    return float(t[np.nonzero(f < fpr)[0][-1]])


# ----------------------------------------------------------------------------- unlearning: PrivLeak
PRIVLEAK_MIN_K = 0.4  # MUSE (metrics/privleak.py, key "forget_holdout_Min-40%") and open-unlearning (mia_min_k k: 0.4)


def privleak_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """The MIA AUC that PrivLeak compares, in open-unlearning's labelling (``src/evals/metrics/mia/utils.py``,
    ``mia_auc``): ``roc_auc_score(labels, scores)`` with forget labelled 0, holdout 1 and the raw
    "lower = member" score (Min-K% with k = 0.4, :data:`PRIVLEAK_MIN_K`). It is 1 when the forget set is
    far more likely than the holdout set and 0.5 when the two are indistinguishable; MUSE's own AUC
    (``metrics/privleak.py``, ``sweep``: ``roc_curve(y, -ppl)``, same labels) is ``1 -`` this."""
    f, h = _finite_array(forget_scores), _finite_array(holdout_scores)
    if f.size == 0 or h.size == 0:
        return float("nan")
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(f.size, dtype=int), np.ones(h.size, dtype=int)], np.r_[f, h])
    return _trapezoid(fpr, tpr)


def privleak(auc_unlearned: float, auc_retrained: float) -> float:
    """PrivLeak in percent, as open-unlearning (``src/evals/metrics/privacy.py``, ``privleak``) and MUSE
    (``eval.py``: ``(AUC - AUC_RETRAIN) / AUC_RETRAIN * 100`` on MUSE's AUC, which is 1 - ours):

        ((1 - auc_unlearned) - (1 - auc_retrained)) / (1 - auc_retrained + 1e-10) * 100

    with both AUCs from :func:`privleak_auc`. 0 = the unlearned model leaks as much as a model never
    trained on the forget set; negative = it still tells forget from holdout (under-unlearning);
    positive = over-unlearning. NaN when ``auc_retrained`` is 1 (the ratio is undefined; the reference's
    1e-10 would give +-1e12)."""
    if auc_retrained >= 1.0:
        return float("nan")
    score, ref = 1.0 - auc_unlearned, 1.0 - auc_retrained
    return (score - ref) / (ref + 1e-10) * 100.0


# ----------------------------------------------------------------------------- aggregation
def bootstrap_stderr(values: Sequence[float], n_boot: int = 1000, seed: int = 1234, statistic=np.mean) -> float:
    """Standard deviation of ``statistic`` over bootstrap resamples (seeded)."""
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))],
                   dtype=np.float64)
    if len(v) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    return float(np.std([statistic(v[i]) for i in idx], ddof=1))


def aggregate(rows: list[dict], metrics: Sequence[str], bucket_by: str | None = None, seed: int = 1234) -> dict:
    """Mean of each per-sample metric with bootstrap stderr, overall and per bucket."""
    out: dict = {}
    for m in metrics:
        vals = [r[m] for r in rows if r.get(m) is not None]
        out[m] = float(np.mean(vals)) if vals else float("nan")
        out[f"{m}_stderr"] = bootstrap_stderr(vals, seed=seed)
    if bucket_by:
        buckets: dict = {}
        for key in _bucket_order(rows, bucket_by):
            sub = [r for r in rows if str(r.get(bucket_by)) == key]
            b = {"n": len(sub)}
            for m in metrics:
                vals = [r[m] for r in sub if r.get(m) is not None]
                b[m] = float(np.mean(vals)) if vals else float("nan")
                b[f"{m}_stderr"] = bootstrap_stderr(vals, seed=seed)
            buckets[key] = b
        out["buckets"] = buckets
    return out


def _bucket_order(rows, key):
    vals = {str(r.get(key)) for r in rows}

    def sort_key(v):
        try:
            return (0, float(v), v)
        except ValueError:
            return (1, 0.0, v)

    return sorted(vals, key=sort_key)
