"""Hugging Face transformers backend: evaluates an in-memory model (so a pruned model needs no save).

Tokenization follows the tokenizer's own default for special tokens (a tokenizer that adds BOS
gets BOS, as in ``model.generate(**tokenizer(prompt))``). For ``loglikelihood`` the context and
continuation are split as lm-evaluation-harness does: trailing whitespace of the context moves to
the continuation, the pair is encoded whole and the continuation is what follows the encoded
context. An empty context is replaced by the BOS (or EOS) token.

Two ways to run each call, with the same outputs (tested against each other):

* the plain path (``fast=False``): right-padded batches for log-likelihoods, ``model.generate`` on
  left-padded batches of the same settings for generation;
* the fast path (default), for what it pays on:
  - log-likelihoods of several continuations of one context (multiple choice, exposure alternatives):
    one prefill of the context, then only the continuation tokens, read through the KV cache
    (single-token continuations need no second pass at all);
  - greedy generation: a decoding loop over a KV cache with continuous batching — a row leaves the
    batch as soon as it hits EOS, a stop string or its token budget, and the next prompts (longest
    first) are prefilled into the free rows, so no step is spent on finished rows and no batch waits
    for its slowest member. Stop strings are checked on the decoded generated tokens of live rows.
  Left padding, explicit position ids and a full (unwindowed) cache keep every row's tokens at their
  positions; sliding-window layers get their window from the model's mask, as in the plain path.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter, deque
from collections.abc import Sequence

import torch

from llmmem.backends.base import (
    GenerateRequest,
    GenerateResult,
    LoglikelihoodResult,
    TokenizedBackend,
    truncate_at_stops,
)
from llmmem.config import ConfigError
from llmmem.models import LoadedModel, model_max_length
from llmmem.progress import progress

log = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 16  # tokens: a shorter common prefix is not worth its own forward pass

# model.generation_config settings that make model.generate do more than an argmax in greedy decoding
_PROCESSOR_SETTINGS = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "min_length": (None, 0),
    "min_new_tokens": (None, 0), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,), "renormalize_logits": (None, False),
    "remove_invalid_values": (None, False), "guidance_scale": (None, 1.0), "watermarking_config": (None,),
    "penalty_alpha": (None, 0.0), "max_time": (None,), "stop_strings": (None,),
}


def stop_hit(tok, gen: Sequence[int], until: Sequence[str]) -> bool:
    """Whether the decoded generated tokens contain a stop string (the rule of both generation paths)."""
    if not until:
        return False
    text = tok.decode(gen, skip_special_tokens=True)
    return any(s in text for s in until)


class _StopOnStrings:
    """Per-row stopping on stop strings for ``model.generate``; a row that hit one is not decoded again."""

    def __init__(self, tokenizer, until: Sequence[str], prompt_len: int):
        self.tok = tokenizer
        self.until = [s for s in until if s]
        self.prompt_len = prompt_len
        self.done: set[int] = set()

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        gen = input_ids[:, self.prompt_len:].tolist()
        for r, row in enumerate(gen):
            if r not in self.done and stop_hit(self.tok, row, self.until):
                self.done.add(r)
        return torch.tensor([r in self.done for r in range(len(gen))], dtype=torch.bool, device=input_ids.device)


class _Row:
    """A greedy generation in flight."""

    __slots__ = ("index", "gen", "max_new", "until", "done")

    def __init__(self, index: int, max_new: int, until: list[str]):
        self.index, self.gen, self.max_new, self.until, self.done = index, [], max_new, until, False


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s):] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0.. for the real tokens (pads get 0)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _ll_result(lp: torch.Tensor, target: list[int], want_tokens: bool, want_stats: bool) -> LoglikelihoodResult:
    """One request's result from the float32 log-probabilities ``lp`` [n_cont, vocab] of its positions."""
    tgt = torch.tensor(target, device=lp.device)
    tok_lp = lp.gather(-1, tgt[:, None])[:, 0]
    greedy = lp.argmax(-1)
    mu = sigma = None
    if want_stats:
        p = lp.exp()
        mu_t = (p * lp).sum(-1)
        sigma_t = ((p * lp.square()).sum(-1) - mu_t.square()).clamp_min(0).sqrt()
        mu, sigma = mu_t.tolist(), sigma_t.tolist()
    return LoglikelihoodResult(
        logprob=float(tok_lp.sum()),
        is_greedy=bool((greedy == tgt).all()),
        n_tokens=len(target),
        token_logprobs=tok_lp.tolist() if want_tokens else None,
        greedy_ids=greedy.tolist() if want_tokens else None,
        continuation_ids=list(target) if want_tokens else None,
        token_mu=mu, token_sigma=sigma,
    )


class HFBackend(TokenizedBackend):
    name = "hf"

    def __init__(self, lm: LoadedModel, batch_size: int = 8, max_length: int | None = None,
                 quiet: bool = True, fast: bool = True):
        if lm.tokenizer is None:
            raise ConfigError(f"model {lm.name!r} has no tokenizer; the HF backend needs one")
        self.lm = lm
        self.model = lm.model
        gc_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        super().__init__(lm.tokenizer, model_max_length(self.model, lm.tokenizer, max_length or lm.spec.max_length),
                         batch_size, quiet, gc_eos)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.fast = fast and self._cache_kw in params and "position_ids" in params
        self.share_prefixes = self.fast and not _has_local_attention(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------- model calls
    def _forward_logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int, **kw) -> torch.Tensor:
        """Logits of the last ``keep`` positions (all when ``keep`` is 0)."""
        try:
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep, **kw)
        except TypeError:  # a model without logits_to_keep
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
        logits = out.logits
        return logits[:, -keep:] if keep and logits.shape[1] != keep else logits

    def _call_cached(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, kw: dict,
                     keep: int) -> torch.Tensor:
        """One forward through the cache in ``kw`` (updated in place); logits of the last ``keep`` positions
        (0 = all)."""
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=keep, **kw)
        except TypeError:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kw)
        logits = out.logits
        return logits[:, -keep:] if keep and logits.shape[1] != keep else logits

    @staticmethod
    def _new_cache():
        from transformers import DynamicCache

        return DynamicCache()  # full layers: left-padded rows keep their windows through the model's masks

    def _shared_prefix(self, seqs: list[list[int]]) -> int:
        """Length of the token prefix all ``seqs`` share, when prefilling it once pays (0 otherwise)."""
        if not self.share_prefixes or len(seqs) < 2:
            return 0
        first, n = seqs[0], min(len(s) for s in seqs) - 1  # every row keeps >= 1 token of its own
        p = 0
        while p < n and all(s[p] == first[p] for s in seqs):
            p += 1
        return p if p >= MIN_SHARED_PREFIX and (len(seqs) - 1) * p >= 8 * MIN_SHARED_PREFIX else 0

    def _prefill(self, seqs: list[list[int]], memo: dict | None = None):
        """Run a batch of token sequences into a new cache -> (cache, attention mask, logits of each
        sequence's last token).

        Rows are left-padded so that they all end at the last column. A prefix shared by every row
        (a fixed few-shot block) is run once and its cache copied to every row; the rows' own tokens
        follow it after their padding, at the positions they would have without it (full attention
        only: a sliding window would count the padding). ``memo``: a dict owned by the caller for one
        call over one model state (one ``generate`` / ``loglikelihood``); the last prefix's cache is kept
        there, and the next batch reuses the part its own shared prefix starts with (computing only the
        rest), so a task's few-shot block is computed once, not once per batch or refill.
        """
        from transformers import DynamicCache

        dev = self.device
        n, p = len(seqs), self._shared_prefix(seqs)
        cache = self._new_cache()
        if p:
            key = tuple(seqs[0][:p])
            held, q = (memo or {}).get("prefix"), 0
            if held is not None:  # the longest start of this batch's shared prefix whose cache is held
                while q < min(p, len(held[0])) and held[0][q] == key[q]:
                    q += 1
            if q:  # causal attention: the first q positions' cache is the same whatever follows them
                layers = [(k[:, :, :q], v[:, :, :q]) for k, v in held[1]]
                cache = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in layers])
            if q < p:
                prefix = torch.tensor([key[q:]], dtype=torch.long, device=dev)
                self._call_cached(prefix, torch.ones((1, p), dtype=torch.long, device=dev),
                                  torch.arange(q, p, device=dev)[None], {self._cache_kw: cache}, 1)
            layers = _cache_tensors(cache)
            if memo is not None:
                memo["prefix"] = (key, layers)
            cache = DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1).contiguous(), v.expand(n, -1, -1, -1).contiguous())
                                                 for k, v in layers])
        ids, m = _left_pad([s[p:] for s in seqs], self.tok.pad_token_id)
        ids, m = ids.to(dev), m.to(dev)
        mask = torch.cat([torch.ones((n, p), dtype=m.dtype, device=dev), m], dim=1) if p else m
        logits = self._call_cached(ids, mask, p + _positions(m), {self._cache_kw: cache}, 1)
        return cache, mask, logits[:, -1]

    # ---------------------------------------------------------------- loglikelihood
    @torch.no_grad()
    def _loglikelihood_tokens(self, pairs: list[tuple[list[int], list[int]]], want_tokens: list[bool],
                              desc: str, want_stats: list[bool] | None = None) -> list[LoglikelihoodResult]:
        want_stats = want_stats or [False] * len(pairs)
        results: list[LoglikelihoodResult | None] = [None] * len(pairs)
        plain = list(range(len(pairs)))
        if self.fast and desc != "rolling":
            groups: dict[tuple, list[int]] = {}
            for i, (ctx, cont) in enumerate(pairs):
                if len(ctx) + len(cont) <= self.max_length + 1:  # no truncation
                    groups.setdefault(tuple(ctx), []).append(i)
            shared = [(list(c), ix) for c, ix in groups.items() if len(ix) > 1]
            if shared:
                in_shared = {i for _, ix in shared for i in ix}
                plain = [i for i in plain if i not in in_shared]
                self._ll_shared(shared, pairs, want_tokens, want_stats, results, desc)
        if plain:
            self._ll_plain(plain, pairs, want_tokens, want_stats, results, desc)
        return results  # type: ignore[return-value]

    def _ll_plain(self, todo: list[int], pairs, want_tokens, want_stats, results, desc) -> None:
        """Each (context, continuation) as one right-padded sequence; logits only where they are needed."""
        L = self.max_length
        seqs = {}
        for i in todo:
            ctx, cont = pairs[i]
            seq = (ctx + cont)[-(L + 1):]
            seqs[i] = (seq, min(len(cont), len(seq) - 1))
        order = sorted(todo, key=lambda i: -len(seqs[i][0]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        pad = self.tok.pad_token_id
        for batch in progress(batches, desc=desc, quiet=self.quiet):
            inputs = [seqs[i][0][:-1] for i in batch]
            width = max(len(x) for x in inputs)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, x in enumerate(inputs):  # right padding: real tokens keep positions 0..n-1
                ids[r, : len(x)] = torch.tensor(x)
                mask[r, : len(x)] = 1
            # logits are only needed from the earliest continuation start in the batch onwards
            first = min(len(inputs[r]) - seqs[i][1] for r, i in enumerate(batch))
            keep = width - first
            logits = self._forward_logits(ids.to(self.device), mask.to(self.device), keep)
            logp = torch.log_softmax(logits.float(), dim=-1)
            for r, i in enumerate(batch):
                seq, n_cont = seqs[i]
                start = len(seq) - 1 - n_cont - first  # index into the kept positions
                results[i] = _ll_result(logp[r, start:start + n_cont], seq[-n_cont:], want_tokens[i], want_stats[i])

    def _ll_shared(self, groups: list[tuple[list[int], list[int]]], pairs, want_tokens, want_stats, results,
                   desc) -> None:
        """Several continuations of one context: prefill the context once (left-padded batch of contexts,
        logits of its last token only), then feed only the continuations' tokens through the cache."""
        from transformers import DynamicCache

        groups = [groups[k] for k in _batch_order([c for c, _ in groups])]
        batches = [groups[i:i + self.batch_size] for i in range(0, len(groups), self.batch_size)]
        pad = self.tok.pad_token_id
        dev = self.device
        memo: dict = {}  # one shared few-shot prefix computed once for all batches of this call
        for batch in progress(batches, desc=desc, quiet=self.quiet):
            cache, mask, last = self._prefill([c for c, _ in batch], memo)
            first_lp = torch.log_softmax(last.float(), dim=-1)  # [contexts, vocab]: every first token
            n_ctx = mask.sum(-1)
            rows = [(b, i) for b, (_, members) in enumerate(batch) for i in members]
            for b, i in rows:
                if len(pairs[i][1]) == 1:
                    results[i] = _ll_result(first_lp[b:b + 1], pairs[i][1], want_tokens[i], want_stats[i])
            multi = [(b, i) for b, i in rows if len(pairs[i][1]) > 1]
            layers = _cache_tensors(cache)
            for k in range(0, len(multi), self.batch_size):
                chunk = multi[k:k + self.batch_size]
                sel = torch.tensor([b for b, _ in chunk], device=dev)
                sub = DynamicCache(ddp_cache_data=[(kk.index_select(0, sel), vv.index_select(0, sel))
                                                   for kk, vv in layers])
                conts = [pairs[i][1][:-1] for _, i in chunk]  # the last token is only scored
                width = max(len(c) for c in conts)
                cids = torch.full((len(chunk), width), pad, dtype=torch.long)
                cmask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, c in enumerate(conts):
                    cids[r, :len(c)] = torch.tensor(c, dtype=torch.long)
                    cmask[r, :len(c)] = 1
                cids, cmask = cids.to(dev), cmask.to(dev)
                full_mask = torch.cat([mask.index_select(0, sel), cmask], dim=1)
                positions = n_ctx.index_select(0, sel)[:, None] + torch.arange(width, device=dev)[None, :]
                lp = torch.log_softmax(self._call_cached(cids, full_mask, positions, {self._cache_kw: sub}, 0).float(),
                                       dim=-1)
                for r, (b, i) in enumerate(chunk):
                    cont = pairs[i][1]
                    rows_lp = torch.cat([first_lp[b:b + 1], lp[r, :len(cont) - 1]], dim=0)
                    results[i] = _ll_result(rows_lp, cont, want_tokens[i], want_stats[i])

    # ---------------------------------------------------------------- generation
    def _greedy_is_argmax(self) -> bool:
        gc = getattr(self.model, "generation_config", None)
        if gc is None:
            return True
        return all(getattr(gc, k, None) in ok for k, ok in _PROCESSOR_SETTINGS.items())

    @torch.no_grad()
    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        prompts = [self.prompt_ids(r) for r in requests]
        results: list[GenerateResult | None] = [None] * len(requests)
        todo = list(range(len(requests)))
        if self.fast and self._greedy_is_argmax():
            greedy = [i for i in todo if not requests[i].do_sample]
            if greedy:
                self._generate_greedy(requests, prompts, greedy, results)
                todo = [i for i in todo if requests[i].do_sample]
        if todo:
            self._generate_plain(requests, prompts, todo, results)
        return results  # type: ignore[return-value]

    def _result(self, gen: list[int], until: list[str]) -> GenerateResult:
        text = self.tok.decode(gen, skip_special_tokens=True)
        return GenerateResult(truncate_at_stops(text, until), gen)

    def _generate_plain(self, requests, prompts, todo, results) -> None:
        """``model.generate`` on left-padded batches of requests with the same settings."""
        from transformers import GenerationConfig, StoppingCriteriaList

        def key(i):
            r = requests[i]
            return (r.max_gen_toks, r.do_sample, r.temperature, r.top_p, r.seed, tuple(r.until))

        order = sorted(todo, key=lambda i: (key(i), -len(prompts[i])))
        batches: list[list[int]] = []
        for i in order:
            if batches and len(batches[-1]) < self.batch_size and key(batches[-1][0]) == key(i):
                batches[-1].append(i)
            else:
                batches.append([i])
        pad = self.tok.pad_token_id
        eos = self.stop_ids()
        for batch in progress(batches, desc="generate", quiet=self.quiet):
            r0 = requests[batch[0]]
            ids, mask = _left_pad([prompts[i] for i in batch], pad)  # every row ends at the same column
            width = ids.shape[1]
            gc = GenerationConfig(
                max_new_tokens=r0.max_gen_toks, do_sample=r0.do_sample, pad_token_id=pad,
                eos_token_id=eos or None, num_beams=1,
                **({"temperature": r0.temperature, "top_p": r0.top_p, "top_k": 0} if r0.do_sample else {}),
            )
            stops = StoppingCriteriaList([_StopOnStrings(self.tok, r0.until, width)]) if r0.until else None
            if r0.do_sample:
                torch.manual_seed(r0.seed if r0.seed is not None else 0)
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                generation_config=gc, stopping_criteria=stops,
            )
            for r, i in enumerate(batch):
                gen = out[r, width:].tolist()
                for j, t in enumerate(gen):  # finished rows are filled with pad after EOS/stop
                    if t in eos or t == pad:
                        gen = gen[:j]
                        break
                results[i] = self._result(gen, requests[i].until)

    def _generate_greedy(self, requests, prompts, todo, results) -> None:
        """Greedy decoding with continuous batching over one KV cache.

        Rows are left-padded so that every row's next token goes to the same cache column; a prefill of
        new prompts is merged into the running batch by left-padding the shorter of the two caches.
        A row ends, as in the plain path, on an EOS (or pad) token, when its generated text contains a
        stop string, or at its token budget; its tokens are those before any EOS / pad.
        """
        pad = self.tok.pad_token_id
        eos = set(self.stop_ids())
        dev = self.device
        pending = deque(todo[k] for k in _batch_order([prompts[i] for i in todo]))
        rows: list[_Row] = []
        cache = mask = last = pos = None
        memo: dict = {}  # the shared few-shot prefix's cache, computed once for every prefill of this call
        bar = progress(total=len(todo), desc="generate", quiet=self.quiet)

        def advance(new_rows: list[_Row], tokens: list[int]) -> None:
            for row, t in zip(new_rows, tokens):
                if t in eos or t == pad:
                    row.done = True
                    continue
                row.gen.append(t)
                if len(row.gen) >= row.max_new or stop_hit(self.tok, row.gen, row.until):
                    row.done = True

        while pending or rows:
            free = self.batch_size - len(rows)
            if pending and free > 0 and (not rows or free * 2 >= self.batch_size):
                take = [pending.popleft() for _ in range(min(free, len(pending)))]
                c, m, last_logits = self._prefill([prompts[i] for i in take], memo)
                first = last_logits.float().argmax(-1)
                new = [_Row(i, requests[i].max_gen_toks, [s for s in requests[i].until if s]) for i in take]
                advance(new, first.tolist())
                if rows:
                    cache, mask = _merge(cache, mask, c, m)
                    last = torch.cat([last, first])
                    pos = torch.cat([pos, m.sum(-1)])
                else:
                    cache, mask, last, pos = c, m, first, m.sum(-1)
                rows += new
            else:
                mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=dev)], dim=1)
                logits = self._call_cached(last[:, None], mask, pos[:, None], {self._cache_kw: cache}, 1)
                last = logits[:, -1].float().argmax(-1)
                pos = pos + 1
                advance(rows, last.tolist())
            if any(r.done for r in rows):
                for r in rows:
                    if r.done:
                        results[r.index] = self._result(r.gen, requests[r.index].until)
                        bar.update(1)
                keep = [k for k, r in enumerate(rows) if not r.done]
                rows = [rows[k] for k in keep]
                if not rows:
                    cache = mask = last = pos = None
                    continue
                sel = torch.tensor(keep, device=dev)
                cache, mask = _select(cache, mask, sel)
                last, pos = last.index_select(0, sel), pos.index_select(0, sel)
        bar.close()


def _batch_order(seqs: list[list[int]]) -> list[int]:
    """Indices of ``seqs`` in batching order: longest first, except that when most sequences start with one
    block (a fixed few-shot prefix; lm-eval's ``first_n`` sampler skips the scored doc, so the first few docs
    get other shots), those that leave it come last, so that they never break the sharing of a batch's prefix."""
    group, t = list(range(len(seqs))), 0
    out = [False] * len(seqs)
    while group:
        tokens = Counter(seqs[k][t] for k in group if len(seqs[k]) > t)
        if not tokens:
            break
        tok, count = tokens.most_common(1)[0]
        if count * 2 <= len(seqs):  # no majority continues the block: it ends here
            break
        for k in group:
            out[k] = out[k] or len(seqs[k]) <= t or seqs[k][t] != tok
        group = [k for k in group if not out[k]]
        t += 1
    if t < MIN_SHARED_PREFIX:
        out = [False] * len(seqs)
    return sorted(range(len(seqs)), key=lambda k: (out[k], -len(seqs[k])))


def _has_local_attention(config) -> bool:
    """Sliding-window / chunked / local attention layers (their windows count cache columns)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = {str(k) for k in (getattr(cfg, "layer_types", None) or [])}
    if kinds - {"full_attention"}:
        return True
    return any(getattr(cfg, a, None) for a in ("sliding_window", "attention_chunk_size", "local_attention",
                                                "attention_window")) and getattr(cfg, "use_sliding_window", True)


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _select(cache, mask: torch.Tensor, sel: torch.Tensor):
    """Keep the rows ``sel``; drop the leading columns that are padding in every kept row."""
    from transformers import DynamicCache

    mask = mask.index_select(0, sel)
    lead = int((mask.sum(0) == 0).long().cumprod(0).sum())
    data = [(k.index_select(0, sel)[:, :, lead:], v.index_select(0, sel)[:, :, lead:])
            for k, v in _cache_tensors(cache)]
    return DynamicCache(ddp_cache_data=data), mask[:, lead:]


def _merge(cache_a, mask_a: torch.Tensor, cache_b, mask_b: torch.Tensor):
    """Stack two batches' caches (rows of a, then rows of b), left-padding the shorter one."""
    from transformers import DynamicCache

    ta, tb = mask_a.shape[1], mask_b.shape[1]
    width = max(ta, tb)

    def padded(x: torch.Tensor, t: int) -> torch.Tensor:
        if t == width:
            return x
        shape = list(x.shape)
        shape[-2] = width - t
        return torch.cat([x.new_zeros(shape), x], dim=-2)

    data = [(torch.cat([padded(ka, ta), padded(kb, tb)]), torch.cat([padded(va, ta), padded(vb, tb)]))
            for (ka, va), (kb, vb) in zip(_cache_tensors(cache_a), _cache_tensors(cache_b))]
    mask = torch.cat([torch.nn.functional.pad(mask_a, (width - ta, 0)), torch.nn.functional.pad(mask_b, (width - tb, 0))])
    return DynamicCache(ddp_cache_data=data), mask
