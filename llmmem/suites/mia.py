"""Membership inference: per-text scores over member and non-member sets, ROC-AUC and TPR at low FPR.

Scores follow MIMIR's formulas, and every one is "lower = more likely a member":
``loss`` (mean token NLL), ``zlib`` (loss / zlib-compressed byte length), ``min_k`` (minus the mean of the
k% lowest token log-probs, k = options.k, default 0.2), ``min_k_pp`` (Min-K%++: token log-probs
standardised by the mean and std of log p under the model's distribution at that position), and
``ref`` (loss minus a reference model's loss) when a reference backend is given.
Rows need a text field (options.text_field, default ``text``) and a 0/1 label (options.label_field,
default ``label``; 1 = member).

Scored tokens are MIMIR's (``mimir/models.py`` ``get_probabilities``) for every tokenizer: tokens
1..n-1 of ``tokenizer(text)`` (with its default special tokens), each predicted from the tokens
before it, the first token being context only. With a BOS-adding tokenizer that is every text token
after BOS; for GPT-2 / GPT-NeoX / Pythia / OPT-style tokenizers the first text token is not scored.
A text longer than the model is scored in MIMIR's windows (``max_length`` tokens every
``max_length // 2``; ``windows="strided"``), and counted in ``n_truncated``.
"""

from __future__ import annotations

import numpy as np

from llmmem.backends.base import LoglikelihoodRequest
from llmmem.config import ConfigError
from llmmem.metrics import mia_loss, mia_min_k, mia_min_k_plus_plus, mia_zlib, roc_auc, tpr_at_fpr
from llmmem.suites import Requests, Suite

SCORES = ("loss", "zlib", "min_k", "min_k_pp", "ref")


def mimir_request(backend, text: str, where: str = "", stats: bool = True) -> LoglikelihoodRequest:
    """The request that scores MIMIR's tokens of ``text``: tokens 1..n-1 of ``tokenizer(text)``."""
    ids = backend.encode(text)
    if len(ids) < 2:
        raise ConfigError(f"{where}: text {text[:40]!r} has {len(ids)} token(s); membership scores need at least 2")
    return LoglikelihoodRequest(context_ids=ids[:1], continuation_ids=ids[1:], token_logprobs=True, token_stats=stats,
                                windows="strided")


class MIASuite(Suite):
    name = "mia"
    default_metrics = ()
    ref_backend = None

    def build(self, task, docs, backend, num_fewshot, seed) -> Requests:
        tf = task.options.get("text_field", "text")
        lf = task.options.get("label_field", "label")
        labels = set()
        req = Requests()
        for d in docs:
            if tf not in d or lf not in d:
                raise ConfigError(f"task {task.name} row {d['_row'] + 1}: needs fields {tf!r} and {lf!r}")
            labels.add(int(d[lf]))
            req.loglikelihood.append(mimir_request(backend, str(d[tf]), f"task {task.name} row {d['_row'] + 1}"))
            req.meta.append(d)
        if labels != {0, 1}:
            raise ConfigError(f"task {task.name}: membership inference needs both members (1) and non-members (0)")
        return req

    def score(self, task, docs, req, resp, backend) -> list[dict]:
        k = float(task.options.get("k", 0.2))
        tf = task.options.get("text_field", "text")
        lf = task.options.get("label_field", "label")
        ref = None
        if self.ref_backend is not None:  # MIMIR's reference attack: the reference model's own tokens of the text
            ref = self.ref_backend.loglikelihood([mimir_request(self.ref_backend, str(d[tf]),
                                                                f"task {task.name} row {d['_row'] + 1}", stats=False)
                                                  for d in req.meta])
        rows = []
        for i, (d, r) in enumerate(zip(req.meta, resp.loglikelihood)):
            lp = r.token_logprobs
            row = {"id": task.doc_id(d), "label": int(d[lf]), "n_tokens": r.n_tokens, "truncated": r.truncated,
                   "loss": mia_loss(lp), "zlib": mia_zlib(lp, str(d[tf])), "min_k": mia_min_k(lp, k),
                   "min_k_pp": mia_min_k_plus_plus(lp, r.token_mu, r.token_sigma, k)}
            if ref is not None:
                row["ref"] = row["loss"] - mia_loss(ref[i].token_logprobs)
            if task.bucket_by:
                row[task.bucket_by] = task.bucket_value(d)
            rows.append(row)
        return rows

    def conventions(self, task, seed) -> dict:
        out = super().conventions(task, seed)
        out["mia_scored_tokens"] = "mimir: tokens 1..n-1 of tokenizer(text) (mimir/models.py get_probabilities)"
        out["mia_windows"] = "mimir: max_length-token windows every max_length // 2 tokens"
        return out

    def summarize(self, task, rows, seed) -> dict:
        out = {}
        rng = np.random.default_rng(seed + 99)
        mem = [r for r in rows if r["label"] == 1]
        non = [r for r in rows if r["label"] == 0]
        out["n_members"], out["n_nonmembers"] = len(mem), len(non)
        for s in SCORES:
            if s not in rows[0]:
                continue
            m = np.array([r[s] for r in mem])
            n = np.array([r[s] for r in non])
            stats = {"auc": lambda a, b: roc_auc(a, b), "tpr@1%fpr": lambda a, b: tpr_at_fpr(a, b, 0.01),
                     "tpr@0.1%fpr": lambda a, b: tpr_at_fpr(a, b, 0.001)}
            for name, fn in stats.items():
                out[f"{s}_{name}"] = fn(m, n)
                boots = [fn(m[rng.integers(0, len(m), len(m))], n[rng.integers(0, len(n), len(n))]) for _ in range(300)]
                out[f"{s}_{name}_stderr"] = float(np.std(boots, ddof=1))
        return out
