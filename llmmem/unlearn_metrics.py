"""The unlearning benchmarks' metrics (TOFU, MUSE) as open-unlearning computes them: pure functions over
numbers, token ids and strings (no model, no torch), so they are tested against the reference formulas.

Sources (locuslab/open-unlearning): ``src/evals/metrics/memorization.py`` (probability,
probability_w_options, truth_ratio, rouge, exact_memorization, extraction_strength),
``src/evals/metrics/utils.py`` (evaluate_probability, eval_text_similarity), ``src/evals/metrics/privacy.py``
(ks_test = TOFU forget quality, privleak), ``src/evals/metrics/utility.py`` (hm_aggregate = TOFU model
utility), ``src/evals/metrics/mia/min_k.py`` and ``mia/utils.py`` (Min-K% score, MIA AUC). MUSE's own
code (swj0419/muse_bench ``metrics/*.py``) differs in two conventions, offered as options: ROUGE without
the Porter stemmer, and Min-K% over every token after the first.

Conventions (as the reference): an answer's *probability* is exp(-mean NLL of its tokens); the *truth
ratio* of an item is p(wrong) / (p(correct) + 1e-10) with p(wrong) = exp(-mean over the wrong answers of
their mean NLL); the MIA AUC labels forget 0 and holdout 1 over Min-K% scores (higher = less likely), so
an AUC near 1 means the forget set is recognisably more likely than the holdout set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from llmmem.config import ConfigError
from llmmem.metrics import mia_min_k, privleak, privleak_auc  # noqa: F401  (re-exported)

EPS = 1e-10  # the reference's guard in every ratio


# ----------------------------------------------------------------------------- likelihood-based
def avg_nll(token_logprobs: Sequence[float]) -> float:
    """Mean negative log-likelihood over an answer's tokens (``evaluate_probability``'s avg_loss)."""
    if not len(token_logprobs):
        raise ValueError("no scored tokens")
    return -float(np.mean(token_logprobs))


def probability(avg_loss: float) -> float:
    """exp(-avg_loss): the length-normalised probability of an answer."""
    return math.exp(-avg_loss)


def truth_ratio(correct_avg_loss: float, wrong_avg_losses: Sequence[float]) -> float:
    """TOFU's truth ratio of one item: p(wrong) / (p(correct) + 1e-10), p(wrong) from the mean avg loss of the
    wrong (perturbed) answers. Lower is better on retained data; near 1 means wrong and right are alike."""
    wrong = math.exp(-float(np.mean(wrong_avg_losses)))
    return wrong / (math.exp(-correct_avg_loss) + EPS)


def truth_ratio_score(tr: float, aggregator: str) -> float:
    """Per-item transform whose mean is the reference's aggregate: ``closer_to_1_better`` (forget set):
    min(tr, 1/(tr + 1e-10)); ``true_better`` (retain, real authors, world facts): max(0, 1 - tr)."""
    if aggregator == "closer_to_1_better":
        return min(tr, 1.0 / (tr + EPS))
    if aggregator == "true_better":
        return max(0.0, 1.0 - tr)
    raise ValueError(f"unknown truth-ratio aggregator {aggregator!r}")


def truth_ratio_prob_mean(correct_avg_loss: float, wrong_avg_losses: Sequence[float]) -> float:
    """open-unlearning's alternative definition p(correct) / (p(correct) + p(wrong) + 1e-10) (``prob_mean``)."""
    c = math.exp(-correct_avg_loss)
    w = math.exp(-float(np.mean(wrong_avg_losses)))
    return c / (c + w + EPS)


def probability_w_options(correct_prob: float, wrong_probs: Sequence[float]) -> float:
    """p(correct) / (p(correct) + sum p(wrong) + 1e-10): TOFU's normalised probability on real authors and
    world facts (``probability_w_options``)."""
    return correct_prob / (correct_prob + float(np.sum(wrong_probs)) + EPS)


# ----------------------------------------------------------------------------- set-level
def forget_quality(unlearned_truth_ratios: Sequence[float], retain_truth_ratios: Sequence[float]) -> float:
    """TOFU forget quality: the p-value of the two-sample KS test between the per-item forget-set truth ratios
    of the unlearned model and of the model trained without the forget set (``ks_test``)."""
    from scipy.stats import ks_2samp

    if not len(unlearned_truth_ratios) or not len(retain_truth_ratios):
        raise ValueError("forget quality needs truth ratios from both models")
    return float(ks_2samp(np.asarray(unlearned_truth_ratios, float), np.asarray(retain_truth_ratios, float)).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """TOFU model utility: the harmonic mean of its nine components (``hm_aggregate``, scipy.stats.hmean)."""
    from scipy.stats import hmean

    vals = np.asarray(values, float)
    if not len(vals) or np.any(np.isnan(vals)):
        return float("nan")
    if np.any(vals == 0):
        return 0.0
    return float(hmean(vals))


# ----------------------------------------------------------------------------- token ids
def exact_memorization(greedy_ids: Sequence[int], target_ids: Sequence[int]) -> float:
    """Fraction of target tokens that are the teacher-forced argmax (``exact_memorization``)."""
    n = len(target_ids)
    if n == 0:
        raise ValueError("no target tokens")
    return sum(int(g == t) for g, t in zip(greedy_ids, target_ids)) / n


def extraction_strength(greedy_ids: Sequence[int], target_ids: Sequence[int], strict: bool = False) -> float:
    """1 - k/n with k the shortest target prefix after which every later token is the teacher-forced argmax
    (Carlini et al. 2021 / ``extraction_strength``). As the reference's loop, when no suffix matches (not even
    the last token) k ends at n - 1 and the score is 1/n; ``strict=True`` scores that case 0."""
    n = len(target_ids)
    if n == 0:
        return 0.0  # the reference's value for an answer with no scored tokens
    g, t = list(greedy_ids), list(target_ids)
    for k in range(n):
        if g[k:] == t[k:]:
            return 1.0 - k / n
    return 0.0 if strict else 1.0 - (n - 1) / n


# ----------------------------------------------------------------------------- membership / privacy
def min_k_score(token_logprobs: Sequence[float], k: float = 0.4) -> float:
    """Min-K% Prob score (:func:`llmmem.metrics.mia_min_k`: minus the mean of the lowest ``max(1, int(n*k))``
    token log-probs, higher = less likely; ``mia/min_k.py``), 0 for no tokens as the reference. MUSE's own
    code takes ``int(n*k)`` tokens (no floor of 1)."""
    return mia_min_k(token_logprobs, k) if len(token_logprobs) else 0.0


# MIA AUC with forget labelled 0 and holdout 1 over Min-K% scores, and PrivLeak in percent: one definition
# each, in llmmem.metrics (also used by the MIA suite); re-exported under the names the suites use.
mia_auc = privleak_auc


# ----------------------------------------------------------------------------- text
_SCORERS: dict = {}


def rouge(ground_truth: str, generation: str, stemmer: bool = True) -> dict:
    """ROUGE-1 recall, ROUGE-L F1 and ROUGE-L recall of ``generation`` against ``ground_truth`` with Google's
    ``rouge_score`` (``eval_text_similarity``: ``RougeScorer(["rouge1", "rougeL"], use_stemmer=True)``; MUSE's
    own logger uses no stemmer: ``stemmer=False``)."""
    if stemmer not in _SCORERS:
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise ConfigError("ROUGE needs the rouge-score package: pip install rouge-score") from None
        _SCORERS[stemmer] = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=stemmer)
    s = _SCORERS[stemmer].score(ground_truth, generation)
    return {"rouge1_recall": s["rouge1"].recall, "rougeL_f1": s["rougeL"].fmeasure, "rougeL_recall": s["rougeL"].recall}


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """The generation up to the earliest stop string, stripped (the reference cuts at the EOS string and the
    task's stopwords in turn, ``raw_text.split(word)[0]``, which keeps the same prefix); the cut is the
    backends' :func:`llmmem.backends.base.truncate_at_stops`."""
    from llmmem.backends.base import truncate_at_stops

    return truncate_at_stops(text, list(stops)).strip()
