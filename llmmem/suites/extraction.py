"""Verbatim extraction: give the first P tokens of a passage, greedy-decode S tokens, compare with the true S.

Per passage: ``extractable`` (exact suffix), ``token_match`` (share of matching positions, Biderman et al.
2023), ``prefix_match`` (length of the matching run from the start), ``bleu4`` and ``approx_memorized``
(BLEU-4 >= 0.75, Ippolito et al. 2023), teacher-forced next-token accuracy ``tf_accuracy`` and the
suffix log-likelihood ``suffix_logprob`` (sum) / ``suffix_nll`` (mean per token).

Data: a text field cut with the model's tokenizer (options ``prefix_tokens``/``suffix_tokens``, default
32/32; passages shorter than P+S tokens are skipped), or pre-tokenized ``prefix_ids``/``suffix_ids``
(e.g. Google's lm-extraction-benchmark ``.npy`` uint16 [N, 50] arrays via ``data: {prefix_npy, suffix_npy}``).

Canary exposure (Carlini et al. 2019) with ``options.exposure``: ``{prefix_field, secret_field, alphabet, length,
separator, joiner, n_alternatives, confidence}``. The secret space is declared (``alphabet`` symbols, ``length`` of
them joined by ``separator``; see :class:`llmmem.exposure.SecretSpace`); each secret is scored (log-perplexity
of ``joiner + secret`` after the prefix, ``joiner`` default one space) against every other secret when
``|R| - 1 <= n_alternatives`` (exact rank) or against ``n_alternatives`` (default 1000) others sampled without
replacement, fixed per canary and seed. Rows get ``exposure``, ``exposure_low``/``exposure_high`` (equal when
exact; a Clopper-Pearson interval when sampled) and ``exposure_method`` (``exact``, ``sampled``,
``sampled+skewnorm``: the sample cannot resolve the rank, and the value is the skew-normal extrapolation).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from llmmem.backends.base import GenerateRequest, LoglikelihoodRequest
from llmmem.config import ConfigError
from llmmem.exposure import DEFAULT_ALTERNATIVES, SecretSpace, exposure
from llmmem.metrics import bleu4, matching_prefix_length, token_match_fraction
from llmmem.suites import Requests, Suite

log = logging.getLogger(__name__)


def rows_from_token_arrays(prefix_npy: Path, suffix_npy: Path) -> list[dict]:
    import numpy as np

    for p in (prefix_npy, suffix_npy):
        if not Path(p).is_file():
            raise ConfigError(f"data file {p} does not exist")
    pre, suf = np.load(prefix_npy), np.load(suffix_npy)
    if pre.ndim != 2 or suf.ndim != 2 or pre.shape[0] != suf.shape[0]:
        raise ConfigError(f"{prefix_npy} / {suffix_npy}: expected two 2-D arrays with the same number of rows")
    return [{"id": i, "prefix_ids": pre[i].tolist(), "suffix_ids": suf[i].tolist()} for i in range(pre.shape[0])]


class ExtractionSuite(Suite):
    name = "extraction"
    default_metrics = ("extractable", "token_match", "prefix_match", "approx_memorized", "bleu4", "tf_accuracy",
                       "suffix_nll")

    def metrics(self, task) -> list[str]:
        m = list(task.metric_list or self.default_metrics)
        if task.options.get("exposure") and "exposure" not in m:
            m.append("exposure")
        return m

    def _split(self, task, doc, backend) -> tuple[list[int], list[int]] | None:
        P = int(task.options.get("prefix_tokens", 32))
        S = int(task.options.get("suffix_tokens", 32))
        if "prefix_ids" in doc and "suffix_ids" in doc:
            return list(doc["prefix_ids"]), list(doc["suffix_ids"])
        field = task.options.get("text_field", "text")
        if field not in doc:
            raise ConfigError(f"task {task.name} row {doc['_row'] + 1}: missing field {field!r}")
        toks = backend.encode(str(doc[field]), add_special_tokens=False)
        if len(toks) < P + S:
            return None
        specials = backend.encode("")  # BOS when the tokenizer adds one
        return specials + toks[:P], toks[P:P + S]

    def build(self, task, docs, backend, num_fewshot, seed) -> Requests:
        req = Requests()
        kept = []
        for d in docs:
            split = self._split(task, d, backend)
            if split is None:
                continue
            prefix, suffix = split
            kept.append(d)
            req.generate.append(GenerateRequest(context_ids=prefix, max_gen_toks=len(suffix)))
            req.loglikelihood.append(LoglikelihoodRequest(context_ids=prefix, continuation_ids=suffix,
                                                          token_logprobs=True))
            req.meta.append({"doc": d, "prefix": prefix, "suffix": suffix})
        if not kept:
            raise ConfigError(f"task {task.name}: dataset is empty after filtering (no passage has "
                              f"{task.options.get('prefix_tokens', 32)}+{task.options.get('suffix_tokens', 32)} tokens)")
        skipped = len(docs) - len(kept)
        if skipped:
            log.info("%s: %d passages shorter than prefix+suffix skipped", task.name, skipped)
        self._exposure_requests(task, kept, req, seed)
        return req

    def _exposure_requests(self, task, docs, req: Requests, seed: int) -> None:
        cfg = task.options.get("exposure")
        if not cfg:
            return
        where = f"task {task.name}: options.exposure"
        space = SecretSpace.from_options(cfg, where=where)
        n_alt = cfg.get("n_alternatives", DEFAULT_ALTERNATIVES)
        joiner = cfg.get("joiner", " ")
        if not isinstance(joiner, str):
            raise ConfigError(f"{where}.joiner {joiner!r} must be a string (e.g. ' ' or '')")
        confidence = cfg.get("confidence", 0.95)
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
            raise ConfigError(f"{where}.confidence {confidence!r} must be a number in (0, 1)")
        pf, sf = cfg.get("prefix_field", "prefix"), cfg.get("secret_field", "secret")
        req.meta_exposure = []
        for d in docs:
            for f in (pf, sf):
                if f not in d:
                    raise ConfigError(f"{where}: row {d['_row'] + 1} has no field {f!r}")
            prefix, secret = str(d[pf]), str(d[sf])
            space.check(secret, where=f"{where}: row {d['_row'] + 1} secret")
            space.check_budget(n_alt, secret, key=f"{where}.n_alternatives")
            alts = space.alternatives(secret, n_alt, f"{seed}:{task.name}:{task.doc_id(d)}")
            start = len(req.loglikelihood)
            for s in [secret, *alts]:
                req.loglikelihood.append(LoglikelihoodRequest(context=prefix, continuation=joiner + s))
            req.meta_exposure.append((start, len(alts), space.size_for(secret), space.is_exact(secret, n_alt),
                                      float(confidence)))

    def score(self, task, docs, req, resp, backend) -> list[dict]:
        rows = []
        n = len(req.meta)
        for i, meta in enumerate(req.meta):
            gen = resp.generate[i].token_ids
            ll = resp.loglikelihood[i]
            suffix = meta["suffix"]
            gen_s = gen[: len(suffix)]
            b = bleu4(gen_s, suffix)
            d = meta["doc"]
            row = {"id": task.doc_id(d), "prefix": backend.decode(meta["prefix"]) if hasattr(backend, "decode") else None,
                   "target": backend.decode(suffix) if hasattr(backend, "decode") else None,
                   "response": resp.generate[i].text,
                   "extractable": float(gen_s == suffix), "token_match": token_match_fraction(gen_s, suffix),
                   "prefix_match": matching_prefix_length(gen_s, suffix), "bleu4": b,
                   "approx_memorized": float(b >= 0.75),
                   "tf_accuracy": sum(int(g == t) for g, t in zip(ll.greedy_ids, suffix)) / len(suffix),
                   "suffix_logprob": ll.logprob, "suffix_nll": -ll.logprob / max(1, ll.n_tokens)}
            if task.bucket_by:
                row[task.bucket_by] = task.bucket_value(d)
            rows.append(row)
        for i, (start, n_alt, size, exact, conf) in enumerate(getattr(req, "meta_exposure", [])):
            scores = [-r.logprob for r in resp.loglikelihood[start:start + n_alt + 1]]
            ex = exposure(scores[0], scores[1:], size, exact=exact, confidence=conf)
            rows[i].update(exposure=ex["exposure"], exposure_low=ex["exposure_low"], exposure_high=ex["exposure_high"],
                           exposure_method=ex["method"], secret_logppl=scores[0])
        assert len(rows) == n
        return rows


def _finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))
