import math

import pytest
import torch

import tiny
from llmmem.backends.base import GenerateRequest, LoglikelihoodRequest, RollingRequest, truncate_at_stops
from llmmem.backends.hf import HFBackend
from llmmem.models import wrap_model

PROMPTS = ["The capital of France is", "Alice was born in", "key1 = 17 ; key2 =",
           "Four score and seven years ago our fathers", "In the", "0 1 2 3 4 5 6 7 8 9 10 11"]


def backend(arch, bos=True, batch_size=4, seed=0):
    tok = tiny.make_tokenizer(bos=bos)
    model = tiny.make_model(arch, vocab=len(tok), seed=seed)
    return HFBackend(wrap_model(model, tok, arch), batch_size=batch_size)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "opt", "qwen2"])
def test_batched_generation_equals_one_at_a_time(arch):
    b = backend(arch, batch_size=4)
    reqs = [GenerateRequest(context=p, max_gen_toks=8) for p in PROMPTS]
    batched = b.generate(reqs)
    b.batch_size = 1
    single = b.generate(reqs)
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert all(len(r.token_ids) > 0 for r in batched)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "opt", "qwen2"])
def test_batched_loglikelihood_equals_one_at_a_time(arch):
    b = backend(arch, batch_size=3)
    reqs = [LoglikelihoodRequest(context=p, continuation=" Paris and Tokyo", token_logprobs=True) for p in PROMPTS]
    batched = b.loglikelihood(reqs)
    b.batch_size = 1
    single = b.loglikelihood(reqs)
    for x, y in zip(batched, single):
        assert abs(x.logprob - y.logprob) < 1e-4
        assert x.is_greedy == y.is_greedy
        assert max(abs(a - c) for a, c in zip(x.token_logprobs, y.token_logprobs)) < 1e-4


@pytest.mark.parametrize("bos", [True, False])
def test_loglikelihood_equals_hand_computed_sum(bos):
    b = backend("llama", bos=bos)
    tok, model = b.tok, b.model
    ctx, cont = "The capital of France is", " Paris."
    ctx_ids = tok(ctx)["input_ids"]
    whole = tok(ctx + cont)["input_ids"]
    assert (ctx_ids[0] == tok.bos_token_id) == bos  # BOS only when the tokenizer adds it
    cont_ids = whole[len(ctx_ids):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    expected = sum(float(logp[len(ctx_ids) - 1 + k, t]) for k, t in enumerate(cont_ids))
    res = b.loglikelihood([LoglikelihoodRequest(context=ctx, continuation=cont, token_logprobs=True)])[0]
    assert res.n_tokens == len(cont_ids)
    assert math.isclose(res.logprob, expected, abs_tol=1e-5)
    greedy = [int(logp[len(ctx_ids) - 1 + k].argmax()) for k in range(len(cont_ids))]
    assert res.is_greedy == (greedy == cont_ids)
    assert res.greedy_ids == greedy


def test_loglikelihood_from_token_ids_and_trailing_space():
    b = backend("llama")
    a = b.loglikelihood([LoglikelihoodRequest(context="The capital of France is ", continuation="Paris")])[0]
    c = b.loglikelihood([LoglikelihoodRequest(context="The capital of France is", continuation=" Paris")])[0]
    assert math.isclose(a.logprob, c.logprob, abs_tol=1e-6)  # trailing space moves to the continuation
    ids = b.encode("The capital of France is")
    cont = b.encode(" Paris", add_special_tokens=False)
    d = b.loglikelihood([LoglikelihoodRequest(context_ids=ids, continuation_ids=cont)])[0]
    assert d.n_tokens == len(cont)


def test_greedy_generation_matches_manual_argmax():
    b = backend("llama")
    ids = b.encode("Alice was born in")
    out = b.generate([GenerateRequest(context="Alice was born in", max_gen_toks=5)])[0]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(5):
            nxt = int(b.model(torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == b.tok.eos_token_id:
                break
            seq.append(nxt)
    assert out.token_ids == seq[len(ids):]


def test_stop_strings_and_seeded_sampling():
    b = backend("llama")
    greedy = b.generate([GenerateRequest(context="The capital", max_gen_toks=12)])[0].text
    assert greedy
    stop = greedy.strip()[:2]
    cut = b.generate([GenerateRequest(context="The capital", max_gen_toks=12, until=[stop])])[0].text
    assert stop not in cut and len(cut) < len(greedy)
    s1 = b.generate([GenerateRequest(context="The", max_gen_toks=10, do_sample=True, seed=5)])[0]
    s2 = b.generate([GenerateRequest(context="The", max_gen_toks=10, do_sample=True, seed=5)])[0]
    assert s1.token_ids == s2.token_ids
    others = [b.generate([GenerateRequest(context="The", max_gen_toks=10, do_sample=True, seed=s)])[0].token_ids
              for s in range(6, 10)]
    assert any(o != s1.token_ids for o in others)


def test_rolling_equals_sum_of_token_logprobs_and_windows():
    b = backend("llama")
    text = "In the beginning God created the heaven and the earth. " * 3
    toks = b.encode(text, add_special_tokens=False)
    full = [b.prefix_id] + toks
    with torch.no_grad():
        logp = torch.log_softmax(b.model(torch.tensor([full[:-1]])).logits[0].float(), -1)
    expected = sum(float(logp[i, t]) for i, t in enumerate(full[1:]))
    res = b.loglikelihood_rolling([RollingRequest(text=text)])[0]
    assert res.n_tokens == len(toks)
    assert math.isclose(res.logprob, expected, abs_tol=1e-4)
    # short windows: every token still scored exactly once
    b.max_length = 16
    windowed = b.loglikelihood_rolling([RollingRequest(text=text)])[0]
    assert windowed.n_tokens == len(toks)
    assert windowed.logprob != pytest.approx(expected, abs=1e-6)  # less context, different numbers


def test_bf16_model_logprobs_are_float32():
    b = backend("llama")
    b.model.to(torch.bfloat16)
    res = b.loglikelihood([LoglikelihoodRequest(context="The", continuation=" capital", token_logprobs=True)])[0]
    assert isinstance(res.logprob, float) and math.isfinite(res.logprob)


def test_results_in_request_order_with_mixed_lengths():
    b = backend("gpt2", bos=False, batch_size=2)
    reqs = [LoglikelihoodRequest(context=p, continuation=" x") for p in PROMPTS]
    res = b.loglikelihood(reqs)
    for r, single in zip(res, [b.loglikelihood([q])[0] for q in reqs]):
        assert abs(r.logprob - single.logprob) < 1e-4


def test_truncate_at_stops():
    assert truncate_at_stops("Paris.\nQ: next", ["\n", "Q:"]) == "Paris."
    assert truncate_at_stops("abc", []) == "abc"


# ------------------------------------------------------------------ long requests (nothing cut silently)
def lm_eval_rolling_windows(token_list, prefix_token, max_seq_len, context_len=1):
    """lm_eval/utils.py get_rolling_token_windows + make_disjoint_window, re-implemented from the source."""
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first_seq_len = min(max_seq_len, len(token_list))
    windows = [([prefix_token] + token_list[: first_seq_len - 1], token_list[:first_seq_len])]
    predicted += first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        windows.append((token_list[window_end - max_seq_len - 1: window_end - 1],
                        token_list[window_end - window_pred_len: window_end]))
        predicted += window_pred_len
    return [(a[: len(a) - (len(b) - 1)], b) for a, b in windows]  # make_disjoint_window


def lm_eval_window_logprob(model, ctx, cont, max_length):
    """lm_eval/models/huggingface.py HFLM._loglikelihood_tokens for one pair: the model reads
    (ctx + cont)[-(max_length + 1):][:-1] and the last len(cont) logits score cont."""
    inp = (ctx + cont)[-(max_length + 1):][:-1]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([inp])).logits[0].float(), -1)
    logp = logp[len(inp) - len(cont):]
    return [float(logp[i, t]) for i, t in enumerate(cont)]


LONG_TEXT = " ".join(tiny.CORPUS) * 5


@pytest.mark.parametrize("bos", [True, False])
def test_long_texts_scored_in_lm_eval_rolling_windows(bos):
    b = backend("llama", bos=bos)
    L = b.max_length
    toks = b.encode(LONG_TEXT, add_special_tokens=False)
    assert len(toks) > 2 * L  # three windows at least
    windows = lm_eval_rolling_windows(toks, b.prefix_id, L)
    expected = [lp for ctx, cont in windows for lp in lm_eval_window_logprob(b.model, ctx, cont, L)]
    rolling = b.loglikelihood_rolling([RollingRequest(text=LONG_TEXT), RollingRequest(text="In the beginning")])
    assert rolling[0].n_tokens == len(toks) and rolling[0].truncated and not rolling[1].truncated
    assert math.isclose(rolling[0].logprob, sum(expected), rel_tol=1e-5, abs_tol=1e-3)
    # a loglikelihood request with a continuation longer than the model: the same windows, every token scored
    res = b.loglikelihood([LoglikelihoodRequest(context_ids=[b.prefix_id], continuation_ids=toks, token_logprobs=True),
                           LoglikelihoodRequest(context="In the", continuation=" beginning")])
    assert res[0].truncated and not res[1].truncated
    assert res[0].n_tokens == len(toks) == len(res[0].token_logprobs) and res[0].continuation_ids == toks
    assert max(abs(a - c) for a, c in zip(res[0].token_logprobs, expected)) < 1e-3
    assert math.isclose(res[0].logprob, sum(expected), rel_tol=1e-5, abs_tol=1e-3)


def test_long_context_left_truncated_as_lm_eval():
    b = backend("gpt2", bos=False)
    ctx = b.encode(LONG_TEXT)
    cont = b.encode(" Paris and Tokyo", add_special_tokens=False)
    res = b.loglikelihood([LoglikelihoodRequest(context_ids=ctx, continuation_ids=cont, token_logprobs=True)])[0]
    assert res.truncated and res.n_tokens == len(cont)
    expected = lm_eval_window_logprob(b.model, ctx, cont, b.max_length)
    assert max(abs(a - c) for a, c in zip(res.token_logprobs, expected)) < 1e-4


def test_no_pair_longer_than_the_model_reaches_the_forward():
    """hf.py cuts (ctx + cont)[-(L + 1):]; base.py's windows must make that cut a no-op."""
    b = backend("llama")
    seen = []
    real = b._loglikelihood_tokens

    def spy(pairs, *args, **kwargs):
        seen.extend(len(c) + len(x) for c, x in pairs)
        return real(pairs, *args, **kwargs)

    b._loglikelihood_tokens = spy
    toks = b.encode(LONG_TEXT)
    b.loglikelihood([LoglikelihoodRequest(context_ids=toks[:1], continuation_ids=toks[1:], windows=w)
                     for w in ("rolling", "strided")])
    b.loglikelihood_rolling([RollingRequest(text=LONG_TEXT)])
    assert len(seen) > 6 and max(seen) <= b.max_length + 1


def test_generation_prompt_truncation_is_flagged():
    b = backend("llama")
    long = GenerateRequest(context=LONG_TEXT, max_gen_toks=8)
    short = GenerateRequest(context="The capital of", max_gen_toks=8)
    assert b.prompt_truncated(long) and not b.prompt_truncated(short)
    assert len(b.prompt_ids(long)) == b.max_length - 8
