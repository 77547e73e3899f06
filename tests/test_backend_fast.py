"""The HF backend's fast paths give the plain path's outputs (``HFBackend(fast=False)``), on tiny random models
of every architecture: greedy generation with continuous batching (stop strings, EOS, mixed budgets, padding,
batch sizes 1 and > 1), prompts sharing a few-shot prefix, and log-likelihoods of several continuations of
one context read through one prefill."""

import pytest

import llmmem.backends.hf as hf
import tiny
from llmmem.backends.base import GenerateRequest, LoglikelihoodRequest, RollingRequest
from llmmem.backends.hf import HFBackend
from llmmem.models import wrap_model

ARCHS = tiny.available_archs()
SLIDING = {"gemma2", "gemma3_text"}  # sliding_window=8 in tests/tiny.py: windows are exercised

PROMPTS = ["The capital of France is", "Alice was born in", "key1 = 17 ; key2 =", "In the",
           "Four score and seven years ago our fathers brought forth on this continent",
           "0 1 2 3 4 5 6 7 8 9 10 11", "In the beginning God created the heaven and the earth. The capital of Japan is"]
SHOTS = ("Q: What is the capital of France?\nA: Paris\n\nQ: What is the capital of Japan?\nA: Tokyo\n\n"
         "Q: Where was Alice born?\nA: Lyon\n\n")
QUESTIONS = ["Q: Where was Bob born?\nA:", "Q: What is key2?\nA:", "Q: What is the capital of Acme?\nA:",
             "Q: 0 1 2 3?\nA:", "Q: In the beginning?\nA:"]


def backends(arch, batch_size, bos=True, seed=0):
    tok = tiny.make_tokenizer(bos=bos)
    model = tiny.make_model(arch, vocab=len(tok), seed=seed)
    lm = wrap_model(model, tok, arch)
    return HFBackend(lm, batch_size=batch_size), HFBackend(lm, batch_size=batch_size, fast=False)


def gen_requests(prompts):
    settings = [(8, []), (12, ["."]), (6, [" the", "\n"]), (3, ["e"]), (10, ["Paris", ","])]
    return [GenerateRequest(context=p, max_gen_toks=n, until=u) for p in prompts for n, u in settings]


def assert_same_generations(fast, plain, reqs):
    a, b = fast.generate(reqs), plain.generate(reqs)
    for r, x, y in zip(reqs, a, b):
        assert x.token_ids == y.token_ids, (r.context, r.until)
        assert x.text == y.text


def assert_same_loglikelihoods(a, b):
    for x, y in zip(a, b):
        assert abs(x.logprob - y.logprob) <= 1e-4
        assert x.is_greedy == y.is_greedy and x.n_tokens == y.n_tokens
        if y.token_logprobs is not None:
            assert x.continuation_ids == y.continuation_ids and x.greedy_ids == y.greedy_ids
            assert max(abs(u - v) for u, v in zip(x.token_logprobs, y.token_logprobs)) <= 1e-4
        if y.token_mu is not None:
            assert max(abs(u - v) for u, v in zip(x.token_mu + x.token_sigma, y.token_mu + y.token_sigma)) <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_generation_fast_equals_plain(arch, batch_size):
    fast, plain = backends(arch, batch_size)
    assert fast.fast and not plain.fast
    assert_same_generations(fast, plain, gen_requests(PROMPTS))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_generation_without_bos_and_pre_tokenized_prompts(arch):
    fast, plain = backends(arch, 4, bos=False, seed=1)
    reqs = gen_requests(PROMPTS[:3]) + [GenerateRequest(context_ids=fast.encode(p)[:5], max_gen_toks=7)
                                        for p in PROMPTS]
    assert_same_generations(fast, plain, reqs)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_fewshot_prefix_fast_equals_plain(arch, monkeypatch):
    monkeypatch.setattr(hf, "MIN_SHARED_PREFIX", 4)
    fast, plain = backends(arch, 3)
    shared = []
    real = HFBackend._shared_prefix
    monkeypatch.setattr(HFBackend, "_shared_prefix", lambda self, seqs: shared.append(real(self, seqs)) or shared[-1])
    prompts = [SHOTS + q for q in QUESTIONS]
    assert_same_generations(fast, plain, gen_requests(prompts))
    reqs = [LoglikelihoodRequest(context=SHOTS + q, continuation=c, token_logprobs=True)
            for q in QUESTIONS for c in (" Paris", " Lyon and Tokyo", " 42.")]
    assert_same_loglikelihoods(fast.loglikelihood(reqs), plain.loglikelihood(reqs))
    if arch in SLIDING:  # a window would count the padding between the shared prefix and a row's own tokens
        assert not fast.share_prefixes and not any(shared)
    else:
        assert fast.share_prefixes and max(shared) > 20


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prefix_is_computed_once_per_call(arch, monkeypatch):
    """Issue 21: a task's few-shot block is prefilled once per generate / loglikelihood call, not once per
    batch or refill (the prefix cache lives in the call; outputs stay the plain path's)."""
    monkeypatch.setattr(hf, "MIN_SHARED_PREFIX", 4)
    fast, plain = backends(arch, 4)
    events = []
    real_p, real_call = HFBackend._shared_prefix, HFBackend._call_cached

    def spy_p(self, seqs):
        events.append(("p", real_p(self, seqs)))
        return events[-1][1]

    def spy_call(self, ids, mask, positions, kw, keep):
        cached = next(iter(kw.values())).get_seq_length()
        events.append(("call", ids.shape[0], ids.shape[1], cached))
        return real_call(self, ids, mask, positions, kw, keep)

    monkeypatch.setattr(HFBackend, "_shared_prefix", spy_p)
    monkeypatch.setattr(HFBackend, "_call_cached", spy_call)

    def prefix_runs():
        return sum(1 for a, b in zip(events, events[1:])
                   if a[0] == "p" and a[1] > 0 and b[0] == "call" and b[1:] == (1, a[1], 0))

    prompts = [SHOTS + q + " " + str(k) for k in range(4) for q in QUESTIONS]  # 20 prompts, batches of 4
    reqs = [GenerateRequest(context=p, max_gen_toks=n, until=["\n"]) for p, n in zip(prompts, [2, 5, 9, 3] * 5)]
    assert_same_generations(fast, plain, reqs)
    shared = [e for e in events if e[0] == "p" and e[1] > 0]
    assert len(shared) >= 3 and prefix_runs() == 1  # several prefills shared the block; it ran once
    events.clear()
    ll = [LoglikelihoodRequest(context=p, continuation=c) for p in prompts for c in (" Paris", " Lyon and Tokyo")]
    assert_same_loglikelihoods(fast.loglikelihood(ll), plain.loglikelihood(ll))
    assert len([e for e in events if e[0] == "p" and e[1] > 0]) >= 3 and prefix_runs() == 1


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_loglikelihood_of_shared_contexts_fast_equals_plain(arch, batch_size):
    fast, plain = backends(arch, batch_size)
    reqs = [LoglikelihoodRequest(context=p, continuation=c, token_logprobs=True, token_stats=(k % 2 == 0))
            for p in PROMPTS for k, c in enumerate((" Paris", " Paris and Tokyo", " the earth.", " 42", "!"))]
    reqs += [LoglikelihoodRequest(context="", continuation=c) for c in (" Paris", " Lyon is far")]  # empty context
    reqs += [LoglikelihoodRequest(context="Only one continuation here", continuation=" and there")]
    assert_same_loglikelihoods(fast.loglikelihood(reqs), plain.loglikelihood(reqs))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_token_id_requests_and_rolling(arch):
    fast, plain = backends(arch, 3)
    ctx = fast.encode(PROMPTS[4])
    reqs = [LoglikelihoodRequest(context_ids=ctx, continuation_ids=cont, token_logprobs=True)
            for cont in ([5], [5, 9, 11], [40, 41], [7])]
    assert_same_loglikelihoods(fast.loglikelihood(reqs), plain.loglikelihood(reqs))
    rolling = [RollingRequest(text=" ".join(PROMPTS) * 3), RollingRequest(text=PROMPTS[0])]
    for x, y in zip(fast.loglikelihood_rolling(rolling), plain.loglikelihood_rolling(rolling)):
        assert abs(x.logprob - y.logprob) <= 1e-4 and x.n_tokens == y.n_tokens


def test_fast_generation_runs_no_more_forward_passes_than_plain():
    fast, plain = backends("llama", 8)
    calls = []
    fast.model.register_forward_hook(lambda *_: calls.append(1))
    reqs = gen_requests(PROMPTS[:4])[:8]  # one batch: the plain path runs until its slowest row is done
    fast.generate(reqs)
    n_fast = len(calls)
    calls.clear()
    plain.generate(reqs)
    assert 0 < n_fast <= len(calls)


def test_sampling_and_logit_processors_take_the_plain_path():
    fast, plain = backends("llama", 3)
    sampled = [GenerateRequest(context=p, max_gen_toks=6, do_sample=True, temperature=0.9, seed=3) for p in PROMPTS]
    assert [r.token_ids for r in fast.generate(sampled)] == [r.token_ids for r in plain.generate(sampled)]
    fast.model.generation_config.repetition_penalty = 1.5  # model.generate would apply it: so must we
    assert not fast._greedy_is_argmax()
    assert_same_generations(fast, plain, gen_requests(PROMPTS[:3]))
