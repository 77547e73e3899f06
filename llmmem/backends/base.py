"""The backend contract: three calls over plain request dataclasses (as lm-evaluation-harness).

* ``generate(requests)``: greedy unless a request asks for sampling (then seeded).
* ``loglikelihood(requests)``: log p(continuation | context) summed over continuation tokens,
  whether the continuation is the greedy one, and per-token log-probs on request.
* ``loglikelihood_rolling(requests)``: log p(text) with no context, over windows of the model's
  maximum length.

A request carries text, or token ids (for pre-tokenized data such as extraction benchmarks);
token ids win when both are given. Results come back in request order. Log-probabilities are
float32 whatever the model's dtype.
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


@dataclass
class LoglikelihoodRequest:
    context: str = ""
    continuation: str = ""
    context_ids: list[int] | None = None
    continuation_ids: list[int] | None = None
    token_logprobs: bool = False
    token_stats: bool = False  # also mean and std of log p over the vocabulary at each position (Min-K%++)


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


@dataclass
class RollingRequest:
    text: str = ""
    token_ids: list[int] | None = None


@dataclass
class RollingResult:
    logprob: float
    n_tokens: int


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


class TokenizedBackend(Backend):
    """Shared request-to-token logic, so every backend tokenizes (and truncates) the same way.

    Subclasses implement ``_loglikelihood_tokens(pairs, want_tokens, desc, want_stats)`` over
    (context ids, continuation ids) pairs, and ``generate``.
    """

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

    # ---------------------------------------------------------------- loglikelihood
    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        pairs = [self._split_pair(r) for r in requests]
        want_tokens = [r.token_logprobs or r.token_stats for r in requests]
        want_stats = [r.token_stats for r in requests]
        return self._loglikelihood_tokens(pairs, want_tokens, desc="loglikelihood", want_stats=want_stats)

    def prompt_ids(self, r: GenerateRequest) -> list[int]:
        """A generation request's prompt ids, left-truncated to leave room for the generated tokens."""
        ids = list(r.context_ids) if r.context_ids is not None else self.encode(r.context)
        if not ids:
            ids = [self.prefix_id]
        room = max(1, self.max_length - r.max_gen_toks)
        return ids[-room:]

    def stop_ids(self) -> list[int]:
        eos = self.eos_ids if isinstance(self.eos_ids, list) else [self.eos_ids]
        return [e for e in eos if e is not None]

    def loglikelihood_rolling(self, requests: list[RollingRequest]) -> list[RollingResult]:
        L = self.max_length
        pairs, owner = [], []
        for k, req in enumerate(requests):
            toks = list(req.token_ids) if req.token_ids is not None else self.encode(req.text, add_special_tokens=False)
            if not toks:
                raise ValueError("loglikelihood_rolling: empty text")
            full = [self.prefix_id] + toks
            a = 1
            while a < len(full):
                b = min(a + L, len(full))
                c = max(0, b - 1 - L)
                pairs.append((full[c:a], full[a:b]))
                owner.append(k)
                a = b
        res = self._loglikelihood_tokens(pairs, [False] * len(pairs), desc="rolling")
        totals = [0.0] * len(requests)
        counts = [0] * len(requests)
        for k, r in zip(owner, res):
            totals[k] += r.logprob
            counts[k] += r.n_tokens
        return [RollingResult(t, n) for t, n in zip(totals, counts)]

