"""The backend contract: three calls over plain request dataclasses (as lm-evaluation-harness).

* ``generate(requests)``: greedy unless a request asks for sampling (then seeded).
* ``loglikelihood(requests)``: log p(continuation | context) summed over continuation tokens,
  whether the continuation is the greedy one, and per-token log-probs on request.
* ``loglikelihood_rolling(requests)``: log p(text) with no context, over windows of the model's
  maximum length.

A request carries text, or token ids (for pre-tokenized data such as extraction benchmarks);
token ids win when both are given. Results come back in request order. Log-probabilities are
float32 whatever the model's dtype.

Requests longer than the model (``TokenizedBackend``): nothing is cut silently. A log-likelihood
request that does not fit one forward pass is split into windows that each fit, and the window
results are merged (sums added, per-token lists concatenated), so every continuation token is
scored exactly once. Two window rules:

* ``windows="rolling"`` (default): lm-evaluation-harness's rolling windows
  (``lm_eval/utils.py`` ``get_rolling_token_windows`` with ``context_len=1`` +
  ``make_disjoint_window``, as ``HFLM.loglikelihood_rolling``): each window predicts up to
  ``max_length`` tokens, the last one with as much context as fits. A pair that fits whole is
  one window; a long context with a short continuation is left-truncated (lm-eval's
  ``(context + continuation)[-(max_length + 1):]``).
* ``windows="strided"``: MIMIR's sliding window (``mimir/models.py`` ``get_probabilities``, the
  Hugging Face perplexity guide's strided scheme): windows of ``max_length`` tokens every
  ``max_length // 2`` tokens, each token scored in the window where it is among the last
  ``stride`` tokens.

A result's ``truncated`` flag says that some scored token saw less than its whole context (the
request needed more than one window, or its context was cut); a generation result's, that its
prompt was left-truncated to ``max_length - max_gen_toks`` tokens (as lm-eval does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from llmmem.config import ConfigError
from llmmem.registry import Registry


@dataclass
class GenerateRequest:
    context: str = ""
    context_ids: list[int] | None = None
    max_gen_toks: int = 32
    until: list[str] = field(default_factory=list)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    truncated: bool = False  # the prompt was left-truncated to fit max_length - max_gen_toks


@dataclass
class LoglikelihoodRequest:
    context: str = ""
    continuation: str = ""
    context_ids: list[int] | None = None
    continuation_ids: list[int] | None = None
    token_logprobs: bool = False
    token_stats: bool = False  # also mean and std of log p over the vocabulary at each position (Min-K%++)
    windows: str = "rolling"  # how a request longer than the model is split: "rolling" (lm-eval) | "strided" (MIMIR)


@dataclass
class LoglikelihoodResult:
    logprob: float
    is_greedy: bool
    n_tokens: int
    token_logprobs: list[float] | None = None
    greedy_ids: list[int] | None = None
    continuation_ids: list[int] | None = None
    token_mu: list[float] | None = None
    token_sigma: list[float] | None = None
    truncated: bool = False  # scored in more than one window, or with its context left-cut


@dataclass
class RollingRequest:
    text: str = ""
    token_ids: list[int] | None = None


@dataclass
class RollingResult:
    logprob: float
    n_tokens: int
    truncated: bool = False  # longer than one window (lm-eval's rolling windows)


class Backend(ABC):
    """Evaluates requests against one model. Subclasses implement the three calls."""

    name: str = "base"

    @classmethod
    def check_available(cls) -> None:
        """Raise ConfigError when what this backend needs is not installed (checked before a model loads)."""
        return None

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]: ...

    @abstractmethod
    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[LoglikelihoodResult]: ...

    @abstractmethod
    def loglikelihood_rolling(self, requests: list[RollingRequest]) -> list[RollingResult]: ...


BACKENDS: Registry[type[Backend]] = Registry("backend")
BACKENDS.register("hf", "llmmem.backends.hf:HFBackend", "Hugging Face transformers, in-memory models")
BACKENDS.register("vllm", "llmmem.backends.vllm:VLLMBackend", "vLLM engine (pruned weights pushed in place)")


def truncate_at_stops(text: str, until: list[str]) -> str:
    """Cut ``text`` at the earliest stop string (the stop string itself is dropped)."""
    cut = len(text)
    for s in until:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def check_batch_size(n) -> int:
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"--batch_size {n} must be an integer >= 1")
    return n


WINDOWS = ("rolling", "strided")


def rolling_windows(full: list[int], start: int, limit: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's rolling windows over ``full[start:]`` (the tokens to score), each pair at most ``limit`` tokens.

    ``lm_eval/utils.py`` ``get_rolling_token_windows(context_len=1)`` + ``make_disjoint_window``: a window
    predicts up to ``limit - 1`` tokens; when it is the last one, it takes as much context as fits."""
    out, a = [], start
    while a < len(full):
        b = min(a + limit - 1, len(full))
        c = max(0, b - limit)
        out.append((full[c:a], full[a:b]))
        a = b
    return out


def strided_windows(full: list[int], start: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """MIMIR's windows over ``full[start:]`` (``mimir/models.py`` ``get_probabilities``).

    ``stride = max_length // 2``; for ``i`` in ``range(0, len(full), stride)`` the model reads
    ``full[max(i + stride - max_length, 0) : min(i + stride, len(full))]`` and scores its tokens from
    position ``i`` on. Consecutive windows that start at the same token have the same logits
    (causal attention), so they are merged into one pair."""
    stride = max(1, max_length // 2)
    groups: list[list[int]] = []  # [begin, first scored, end]
    for i in range(0, len(full), stride):
        begin = max(i + stride - max_length, 0)
        end = min(i + stride, len(full))
        first = max(i, start, 1)
        if first >= end:
            continue
        if groups and groups[-1][0] == begin and groups[-1][2] == first:
            groups[-1][2] = end
        else:
            groups.append([begin, first, end])
    return [(full[b:f], full[f:e]) for b, f, e in groups]


def merge_windows(parts: list[LoglikelihoodResult], truncated: bool) -> LoglikelihoodResult:
    """One result from the results of a request's windows (in order)."""
    if len(parts) == 1:
        parts[0].truncated = truncated
        return parts[0]

    def cat(name):
        lists = [getattr(r, name) for r in parts]
        return None if any(x is None for x in lists) else [v for x in lists for v in x]

    return LoglikelihoodResult(
        logprob=float(sum(r.logprob for r in parts)), is_greedy=all(r.is_greedy for r in parts),
        n_tokens=sum(r.n_tokens for r in parts), token_logprobs=cat("token_logprobs"), greedy_ids=cat("greedy_ids"),
        continuation_ids=cat("continuation_ids"), token_mu=cat("token_mu"), token_sigma=cat("token_sigma"),
        truncated=truncated)


class TokenizedBackend(Backend):
    """Shared request-to-token logic, so every backend tokenizes (and splits long requests) the same way.

    Subclasses implement ``_loglikelihood_tokens(pairs, want_tokens, desc, want_stats)`` over
    (context ids, continuation ids) pairs, and ``generate``. Every pair handed to
    ``_loglikelihood_tokens`` holds at most ``max_length + pair_extra`` tokens: the last token is only
    predicted, never read, so a backend that feeds ``context + continuation[:-1]`` takes
    ``max_length + 1`` (``pair_extra = 1``, the HF backend, as lm-eval's HFLM); one that must read every
    token of the pair (vLLM prompt log-probs) sets ``pair_extra = 0``.
    """

    pair_extra: int = 1

    def __init__(self, tokenizer, max_length: int, batch_size: int, quiet: bool, eos_ids=None):
        self.tok = tokenizer
        self.max_length = max_length
        self.batch_size = check_batch_size(batch_size)
        self.quiet = quiet
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.eos_ids = eos_ids if eos_ids is not None else self.tok.eos_token_id
        self.prefix_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _split_pair(self, req: LoglikelihoodRequest) -> tuple[list[int], list[int]]:
        if req.context_ids is not None or req.continuation_ids is not None:
            ctx = list(req.context_ids) if req.context_ids is not None else []
            cont = (list(req.continuation_ids) if req.continuation_ids is not None
                    else self.encode(req.continuation, add_special_tokens=False))
            if not ctx:
                ctx = [self.prefix_id]
        else:
            context, continuation = req.context, req.continuation
            n = len(context) - len(context.rstrip())
            if n:
                continuation = context[-n:] + continuation
                context = context[:-n]
            whole = self.encode(context + continuation)
            ctx = self.encode(context) if context else []
            if not context and whole and whole[0] == self.tok.bos_token_id and self.tok.bos_token_id is not None:
                ctx = [whole[0]]
            cont = whole[len(ctx):]
            if not ctx:
                ctx = [self.prefix_id]
        if not cont:
            raise ValueError(f"continuation {req.continuation!r} encodes to no tokens")
        return ctx, cont

    def windows(self, ctx: list[int], cont: list[int], rule: str = "rolling") -> list[tuple[list[int], list[int]]]:
        """The pairs that score ``cont`` after ``ctx``, each short enough for one forward pass."""
        if rule not in WINDOWS:
            raise ConfigError(f"windows {rule!r} is not a window rule; choose from: {', '.join(WINDOWS)}")
        full = ctx + cont
        if rule == "strided":
            return strided_windows(full, len(ctx), self.max_length)
        limit = self.max_length + self.pair_extra
        if len(full) <= limit:
            return [(ctx, cont)]
        return rolling_windows(full, len(ctx), limit)

    # ---------------------------------------------------------------- loglikelihood
    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        pairs, owner, want_tokens, want_stats, cut = [], [], [], [], []
        for k, r in enumerate(requests):
            ctx, cont = self._split_pair(r)
            ws = self.windows(ctx, cont, r.windows)
            cut.append(len(ws) > 1 or len(ws[0][0]) < len(ctx))
            for w in ws:
                pairs.append(w)
                owner.append(k)
                want_tokens.append(r.token_logprobs or r.token_stats)
                want_stats.append(r.token_stats)
        res = self._loglikelihood_tokens(pairs, want_tokens, desc="loglikelihood", want_stats=want_stats)
        parts: list[list[LoglikelihoodResult]] = [[] for _ in requests]
        for k, r in zip(owner, res):
            parts[k].append(r)
        return [merge_windows(p, c) for p, c in zip(parts, cut)]

    def prompt_ids(self, r: GenerateRequest) -> list[int]:
        """A generation request's prompt ids, left-truncated to leave room for the generated tokens."""
        ids = self._prompt_ids_full(r)
        return ids[-self._prompt_room(r):]

    def prompt_truncated(self, r: GenerateRequest) -> bool:
        """Whether :meth:`prompt_ids` drops tokens of this request's prompt."""
        return len(self._prompt_ids_full(r)) > self._prompt_room(r)

    def _prompt_ids_full(self, r: GenerateRequest) -> list[int]:
        ids = list(r.context_ids) if r.context_ids is not None else self.encode(r.context)
        return ids or [self.prefix_id]

    def _prompt_room(self, r: GenerateRequest) -> int:
        return max(1, self.max_length - r.max_gen_toks)

    def stop_ids(self) -> list[int]:
        eos = self.eos_ids if isinstance(self.eos_ids, list) else [self.eos_ids]
        return [e for e in eos if e is not None]

    def loglikelihood_rolling(self, requests: list[RollingRequest]) -> list[RollingResult]:
        """lm-eval's convention: the prefix token (BOS, or EOS without one) then every text token scored,
        in lm-eval's disjoint rolling windows (``HFLM.loglikelihood_rolling``)."""
        lls = []
        for req in requests:
            toks = list(req.token_ids) if req.token_ids is not None else self.encode(req.text, add_special_tokens=False)
            if not toks:
                raise ValueError("loglikelihood_rolling: empty text")
            lls.append(LoglikelihoodRequest(context_ids=[self.prefix_id], continuation_ids=toks))
        return [RollingResult(r.logprob, r.n_tokens, r.truncated) for r in self.loglikelihood(lls)]
