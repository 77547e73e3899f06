"""Metric functions against hand-computed values."""

import math
import re
import string
import zlib
from collections import Counter

import numpy as np
import pytest

from llmmem import metrics as M


def test_normalisation_exact_match_and_f1():
    assert M.normalize_answer("  The Paris!! ") == "paris"
    assert M.normalize_answer("An apple, a day") == "apple day"
    assert M.exact_match("the Paris.", ["Paris"]) == 1.0
    assert M.exact_match("Lyon", ["Paris", "lyon"]) == 1.0
    assert M.exact_match("Paris France", ["Paris"]) == 0.0
    # "new york city" vs "new york": precision 2/3, recall 1 -> F1 = 0.8
    assert M.token_f1("New York City", ["new york"]) == pytest.approx(0.8)
    assert M.token_f1("Boston", ["new york", "boston"]) == 1.0
    assert M.token_f1("", ["x"]) == 0.0
    assert M.first_line("\n  Paris\nQ: next") == "Paris"


def test_bleu4_by_hand():
    assert M.bleu4([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]) == pytest.approx(1.0)
    # p1=4/5, p2=3/4, p3=2/3, p4=1/2, equal lengths -> (0.2)^(1/4)
    assert M.bleu4([1, 2, 3, 4, 5], [1, 2, 3, 4, 6]) == pytest.approx(0.2 ** 0.25)
    # brevity penalty: candidate of 4 against reference of 8 -> exp(1 - 2)
    assert M.bleu4([1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(math.exp(-1))
    assert M.bleu4([9, 9, 9, 9], [1, 2, 3, 4]) == 0.0


def test_extraction_token_metrics():
    assert M.matching_prefix_length([1, 2, 9, 4], [1, 2, 3, 4]) == 2
    assert M.token_match_fraction([1, 2, 9, 4], [1, 2, 3, 4]) == 0.75
    assert M.token_match_fraction([1], [1, 2, 3, 4]) == 0.25


def test_mia_scores_by_hand():
    lp = [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert M.mia_loss(lp) == pytest.approx(3.0)
    text = "hello world"
    assert M.mia_zlib(lp, text) == pytest.approx(3.0 / len(zlib.compress(text.encode())))
    assert M.mia_min_k(lp, 0.4) == pytest.approx(4.5)  # lowest two: -5, -4
    assert M.mia_min_k(lp, 0.01) == pytest.approx(5.0)  # at least one token
    assert M.mia_reference(lp, [-1.0] * 5) == pytest.approx(2.0)
    mu, sigma = [-2.0] * 5, [1.0, 1.0, 2.0, 2.0, 4.0]
    # z = (lp - mu)/sigma = [1, 0, -0.5, -1, -0.75]; lowest 40% (2): -1, -0.75 -> 0.875
    assert M.mia_min_k_plus_plus(lp, mu, sigma, 0.4) == pytest.approx(0.875)


def test_auc_and_tpr_by_hand():
    assert M.roc_auc([1, 2], [3, 1.5]) == pytest.approx(0.75)
    assert M.roc_auc([1], [1]) == 0.5
    assert M.roc_auc([1, float("nan")], [2]) == 1.0  # NaN scores dropped, as MIMIR's filter_out_nan
    non = np.arange(1, 101, dtype=float)
    members = np.array([0.5, 1.5, 3.0, 50.0])
    # MIMIR counts FPR strictly below the bound: at 1% no non-member may be flagged (1/100 is not < 0.01),
    # so the threshold sits below 1.0 and only 0.5 is flagged
    assert M.tpr_at_fpr(members, non, 0.01) == pytest.approx(0.25)
    assert M.tpr_at_fpr(members, non, 0.011) == pytest.approx(0.5)  # one non-member (1.0) allowed: 0.5 and 1.5
    assert M.tpr_at_fpr(members, non, 0.001) == pytest.approx(0.25)
    assert M.tpr_at_fpr([5.0], [1.0, 2.0], 0.4) == 0.0  # nothing flagged below the lowest non-member


def test_aggregate_buckets_and_bootstrap():
    rows = [{"em": 1.0, "b": "x"}, {"em": 0.0, "b": "x"}, {"em": 1.0, "b": "y"}, {"em": 1.0, "b": "y"}]
    agg = M.aggregate(rows, ["em"], "b")
    assert agg["em"] == 0.75
    # the bootstrap SE of a mean converges to the plug-in sd / sqrt(n): sqrt(0.75 * 0.25 / 4) = 0.2165
    assert agg["em_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4), rel=0.1)
    assert agg["buckets"]["x"]["em"] == 0.5 and agg["buckets"]["y"]["n"] == 2
    assert agg["buckets"]["y"]["em_stderr"] == 0.0  # both rows 1: every resample has mean 1
    assert M.aggregate(rows, ["em"], "b")["em_stderr"] == agg["em_stderr"]  # seeded
    assert M.aggregate(rows, ["em"], "b", seed=7)["em_stderr"] != agg["em_stderr"]
    se = M.bootstrap_stderr([0.0, 1.0] * 200)
    assert se == pytest.approx(0.5 / math.sqrt(400), rel=0.15)  # bootstrap ~ analytic for a mean


# ----------------------------------------------------------------------------- references
# Each reference below is re-implemented from its source, line for line, and compared with llmmem on
# the same inputs.
def _mimir_roc(preds_member, preds_nonmember):
    """MIMIR mimir/attacks/attack_utils.py get_roc_metrics: NaN filtered, scores negated, members label 1."""
    from sklearn.metrics import auc, roc_curve

    def filter_out_nan(x):
        return [e for e in x if not math.isnan(e)]

    m, n = filter_out_nan(list(preds_member)), filter_out_nan(list(preds_nonmember))
    total_preds = np.array(m + n) * -1
    total_labels = [1] * len(m) + [0] * len(n)
    fpr, tpr, _ = roc_curve(total_labels, total_preds)
    return fpr, tpr, auc(fpr, tpr)


def _mimir_tpr_at_low_fpr(preds_member, preds_nonmember, upper_bound):
    """MIMIR run.py compute_metrics_from_scores: tpr[np.where(np.array(fpr) < upper_bound)[0][-1]]."""
    fpr, tpr, _ = _mimir_roc(preds_member, preds_nonmember)
    return tpr[np.where(np.array(fpr) < upper_bound)[0][-1]]


def _score_sets(rng, kind, n_mem, n_non):
    if kind == "continuous":
        return rng.normal(2.0, 1.0, n_mem), rng.normal(2.5, 1.0, n_non)
    if kind == "tied":  # a handful of distinct values: thresholds fall inside runs of ties
        return rng.integers(0, 4, n_mem).astype(float), rng.integers(1, 5, n_non).astype(float)
    return np.round(rng.normal(2.0, 1.0, n_mem), 1), np.round(rng.normal(2.3, 1.0, n_non), 1)


@pytest.mark.parametrize("kind", ["continuous", "tied", "rounded"])
def test_roc_curve_auc_and_tpr_equal_sklearn_and_mimir(kind):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng({"continuous": 0, "tied": 1, "rounded": 2}[kind])
    for _ in range(15):
        n_mem, n_non = (int(x) for x in rng.integers(1, 400, 2))
        mem, non = _score_sets(rng, kind, n_mem, n_non)
        labels = np.r_[np.ones(n_mem, int), np.zeros(n_non, int)]
        scores = -np.r_[mem, non]
        for ours, ref in zip(M.roc_curve(labels, scores), sklearn_metrics.roc_curve(labels, scores)):
            np.testing.assert_array_equal(ours, ref)
        assert M.roc_auc(mem, non) == sklearn_metrics.roc_auc_score(labels, scores)
        assert M.roc_auc(mem, non) == _mimir_roc(mem, non)[2]
        for bound in (0.001, 0.01, 0.05, 0.1, 0.5):
            assert M.tpr_at_fpr(mem, non, bound) == _mimir_tpr_at_low_fpr(mem, non, bound), (bound, n_mem, n_non)


def test_tpr_at_fpr_differs_from_the_old_inclusive_count_on_ties():
    """The case the old "<= fpr" rule got wrong: 1 non-member in 100 ties with the best members."""
    non = np.r_[0.0, np.full(99, 10.0)]
    mem = np.r_[np.zeros(30), np.full(70, 5.0)]
    # flagging the 30 members at score 0 also flags 1 non-member: FPR = 0.01, not < 0.01 -> TPR at 1% is 0
    assert M.tpr_at_fpr(mem, non, 0.01) == 0.0 == _mimir_tpr_at_low_fpr(mem, non, 0.01)
    assert M.tpr_at_fpr(mem, non, 0.02) == 1.0 == _mimir_tpr_at_low_fpr(mem, non, 0.02)


def test_tpr_at_fpr_rejects_a_zero_bound():
    with pytest.raises(ValueError, match="> 0"):
        M.tpr_at_fpr([1.0], [2.0], 0.0)


# open-unlearning src/evals/metrics/mia/min_k.py MinKProbAttack.compute_score
def _ou_min_k(lp, k):
    lp = np.asarray(lp, dtype=np.float32)
    if lp.size == 0:
        return 0
    num_k = max(1, int(len(lp) * k))
    sorted_vals = np.sort(lp)
    return -np.mean(sorted_vals[:num_k])


# open-unlearning src/evals/metrics/mia/utils.py mia_auc (forget 0, holdout 1, raw scores)
def _ou_mia_auc(forget_scores, holdout_scores):
    from sklearn.metrics import roc_auc_score

    scores = np.array(list(forget_scores) + list(holdout_scores))
    labels = np.array([0] * len(forget_scores) + [1] * len(holdout_scores))
    return roc_auc_score(labels, scores)


# open-unlearning src/evals/metrics/privacy.py privleak
def _ou_privleak(score, ref):
    score = 1 - score
    ref = 1 - ref
    return (score - ref) / (ref + 1e-10) * 100


# MUSE metrics/privleak.py sweep + eval (split0 = forget labelled 0, split1 = holdout labelled 1), eval.py privleak
def _muse_auc(forget_ppl, holdout_ppl):
    from sklearn.metrics import auc as get_auc
    from sklearn.metrics import roc_curve as get_roc_curve

    ppl = np.array(list(forget_ppl) + list(holdout_ppl))
    y = np.array([0] * len(forget_ppl) + [1] * len(holdout_ppl))
    fpr, tpr, _ = get_roc_curve(y, -ppl)
    return get_auc(fpr, tpr)


def _muse_privleak(auc, auc_retrain):
    return (auc - auc_retrain) / auc_retrain * 100


def _token_logprobs(rng, n_docs, shift):
    return [rng.normal(-3.0 + shift, 1.5, int(rng.integers(5, 60))) for _ in range(n_docs)]


def test_privleak_matches_open_unlearning_and_muse():
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(3)
    k = M.PRIVLEAK_MIN_K
    assert k == 0.4
    holdout = _token_logprobs(rng, 60, 0.0)
    cases = {"unlearned (still remembers)": _token_logprobs(rng, 50, 0.6),
             "retrained (never saw it)": _token_logprobs(rng, 50, 0.0),
             "over-unlearned": _token_logprobs(rng, 50, -0.5)}
    aucs = {}
    for name, forget in cases.items():
        f = [M.mia_min_k(lp, k) for lp in forget]
        h = [M.mia_min_k(lp, k) for lp in holdout]
        assert f == pytest.approx([_ou_min_k(lp, k) for lp in forget], rel=1e-5)
        aucs[name] = M.privleak_auc(f, h)
        assert aucs[name] == _ou_mia_auc(f, h)
        assert 1 - aucs[name] == pytest.approx(_muse_auc(f, h), abs=1e-12)  # MUSE's AUC is the complement
    r = aucs["retrained (never saw it)"]
    for name in cases:
        ours = M.privleak(aucs[name], r)
        assert ours == _ou_privleak(aucs[name], r)
        assert ours == pytest.approx(_muse_privleak(1 - aucs[name], 1 - r), rel=1e-8)
    assert M.privleak(aucs["unlearned (still remembers)"], r) < -20  # under-unlearning is negative
    assert M.privleak(aucs["over-unlearned"], r) > 20
    assert M.privleak(r, r) == 0.0
    assert math.isnan(M.privleak(0.7, 1.0))


# SQuAD v1.1 official evaluate-v1.1.py: normalize_answer, f1_score, exact_match_score, metric_max_over_ground_truths
def _squad_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _squad_f1(prediction, ground_truth):
    prediction_tokens = _squad_normalize_answer(prediction).split()
    ground_truth_tokens = _squad_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def _squad_max(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def test_exact_match_and_f1_equal_the_squad_script_on_ascii():
    rng = np.random.default_rng(0)
    words = ["the", "a", "an", "Paris", "paris", "New", "York", "city", "of", "1,000", "U.S.", "Mr.", "don't", "(x)",
             "Bob's", "two", "2", "-", "The"]
    for _ in range(400):
        pred = " ".join(rng.choice(words, int(rng.integers(1, 6))))
        golds = [" ".join(rng.choice(words, int(rng.integers(1, 5)))) for _ in range(int(rng.integers(1, 4)))]
        if not _squad_normalize_answer(pred) and any(not _squad_normalize_answer(g) for g in golds):
            continue  # both empty after normalisation: llmmem gives F1 1 (as SQuAD v2), v1.1 gives 0
        assert M.normalize_answer(pred) == _squad_normalize_answer(pred)
        assert M.exact_match(pred, golds) == float(_squad_max(
            lambda p, g: _squad_normalize_answer(p) == _squad_normalize_answer(g), pred, golds))
        assert M.token_f1(pred, golds) == pytest.approx(_squad_max(_squad_f1, pred, golds), abs=1e-12)


def test_bleu4_equals_nltk_sentence_bleu_without_smoothing():
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    rng = np.random.default_rng(1)
    import warnings

    for _ in range(300):
        ref = rng.integers(0, 6, int(rng.integers(1, 40))).tolist()
        cand = [t if rng.uniform() < 0.7 else int(rng.integers(0, 6)) for t in ref][: int(rng.integers(1, 45))]
        cand += rng.integers(0, 6, int(rng.integers(0, 5))).tolist()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NLTK warns when an n-gram order has no overlap (BLEU = 0)
            ref_value = bleu_score.sentence_bleu([ref], cand)
        assert M.bleu4(cand, ref) == pytest.approx(ref_value, abs=1e-12), (cand, ref)


def test_bleu4_equals_sacrebleu_without_smoothing_or_effective_order():
    bleu_mod = pytest.importorskip("sacrebleu.metrics")
    import logging

    logging.getLogger("sacrebleu").setLevel(logging.ERROR)  # it recommends effective_order for sentences
    bleu = bleu_mod.BLEU(smooth_method="none", tokenize="none", effective_order=False)
    rng = np.random.default_rng(2)
    for _ in range(200):
        ref = rng.integers(0, 6, int(rng.integers(1, 40))).tolist()
        cand = [t if rng.uniform() < 0.7 else int(rng.integers(0, 6)) for t in ref][: int(rng.integers(1, 45))]
        value = bleu.sentence_score(" ".join(map(str, cand)), [" ".join(map(str, ref))]).score / 100
        assert M.bleu4(cand, ref) == pytest.approx(value, abs=1e-9), (cand, ref)
