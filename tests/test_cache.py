"""Request cache: re-runs are answered without the model, pruned weights never get dense answers, and
several processes can share one cache file."""

import multiprocessing
import sqlite3

import pytest

from llmmem.backends.base import (
    Backend,
    GenerateRequest,
    GenerateResult,
    LoglikelihoodRequest,
    LoglikelihoodResult,
    RollingRequest,
    RollingResult,
)
from llmmem.backends.cache import CACHE_FILE, CachingBackend, cache_model_key
from llmmem.config import ConfigError, ModelSpec
from llmmem.pruning.spec import PruneSpec

PROMPTS = ["The capital of France is", "Alice was born in", "key1 = 17 ; key2 =", "In the beginning"]


# ----------------------------------------------------------------------------- helpers
class FakeBackend(Backend):
    """Answers are a pure function of the request; every call is recorded."""

    name = "fake"

    def __init__(self):
        self.calls: list[list] = []
        self.max_length = 64

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def generate(self, requests):
        self.calls.append(list(requests))
        return [GenerateResult(r.context[::-1][: r.max_gen_toks], [len(r.context), r.max_gen_toks]) for r in requests]

    def loglikelihood(self, requests):
        self.calls.append(list(requests))
        return [LoglikelihoodResult(-float(len(r.context) + 2 * len(r.continuation)), False, len(r.continuation))
                for r in requests]

    def loglikelihood_rolling(self, requests):
        self.calls.append(list(requests))
        return [RollingResult(-float(len(r.text)), len(r.text)) for r in requests]


class ForwardCounter:
    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _load(llama_dir):
    from llmmem.models import load_model

    return load_model(ModelSpec(name=str(llama_dir), device="cpu"))


def _requests():
    gen = [GenerateRequest(context=p, max_gen_toks=6) for p in PROMPTS]
    ll = [LoglikelihoodRequest(context=p, continuation=" Paris and Tokyo", token_logprobs=True) for p in PROMPTS]
    roll = [RollingRequest(text=p + " and the earth.") for p in PROMPTS]
    return gen, ll, roll


def _answer_all(b, reqs):
    gen, ll, roll = reqs
    return b.generate(gen), b.loglikelihood(ll), b.loglikelihood_rolling(roll)


# ----------------------------------------------------------------------------- on a tiny model
def test_rerun_is_answered_from_the_cache_without_the_model(tmp_path, llama_dir):
    from llmmem.backends.hf import HFBackend
    from llmmem.suites import run_task
    from llmmem.tasks import get_task

    lm = _load(llama_dir)
    tasks = [get_task("capitals"), get_task("famous_passages")]
    key = cache_model_key(lm.fingerprint)

    def run():
        cb = CachingBackend(HFBackend(lm, batch_size=4), tmp_path / "cache", key)
        with ForwardCounter(lm.model) as calls:
            results = [run_task(t, cb, limit=5) for t in tasks]
        cb.close()
        return results, calls.n, cb.stats

    first, n_first, s_first = run()
    second, n_second, s_second = run()
    assert n_first > 0 and s_first["misses"] > 0 and s_first["hits"] == 0
    assert n_second == 0, "the re-run called the model"
    assert s_second["misses"] == 0 and s_second["hits"] == s_first["misses"]
    assert [r.rows for r in second] == [r.rows for r in first]
    assert [r.metrics for r in second] == [r.metrics for r in first]
    uncached = [run_task(t, HFBackend(lm, batch_size=4), limit=5) for t in tasks]
    assert [r.rows for r in uncached] == [r.rows for r in first]


def test_pruned_weights_never_get_the_dense_answers(tmp_path, llama_dir):
    from llmmem.backends.hf import HFBackend
    from llmmem.pruning import prune

    lm = _load(llama_dir)
    reqs = _requests()
    dense_key = cache_model_key(lm.fingerprint)
    cb = CachingBackend(HFBackend(lm, batch_size=4), tmp_path, dense_key)
    dense = _answer_all(cb, reqs)

    spec = PruneSpec(method="magnitude", sparsity=0.5)
    prune(lm.model, spec)
    cb.model_key = cache_model_key(lm.fingerprint, [{"prune": spec}])  # same dense fingerprint, new chain
    assert cb.model_key != dense_key
    with ForwardCounter(lm.model) as calls:
        pruned = _answer_all(cb, reqs)
    assert calls.n > 0
    truth = _answer_all(HFBackend(lm, batch_size=4), reqs)
    assert pruned == truth
    assert [r.logprob for r in pruned[1]] != [r.logprob for r in dense[1]]
    assert [r.logprob for r in pruned[2]] != [r.logprob for r in dense[2]]
    # what the key prevents: keyed on the dense model alone, the pruned model would be served dense answers
    cb.model_key = dense_key
    assert _answer_all(cb, reqs) == dense
    assert cb.entries(dense_key) == cb.entries(cache_model_key(lm.fingerprint, [{"prune": spec}])) == 12


def test_generation_settings_are_part_of_the_key_and_unseeded_sampling_is_never_cached(tmp_path, llama_dir):
    from llmmem.backends.hf import HFBackend

    lm = _load(llama_dir)
    cb = CachingBackend(HFBackend(lm, batch_size=4), tmp_path, cache_model_key(lm.fingerprint))
    greedy = [GenerateRequest(context=p, max_gen_toks=4) for p in PROMPTS]
    longer = [GenerateRequest(context=p, max_gen_toks=7) for p in PROMPTS]
    sampled = [GenerateRequest(context=p, max_gen_toks=4, do_sample=True) for p in PROMPTS]
    seeded = [GenerateRequest(context=p, max_gen_toks=4, do_sample=True, seed=3) for p in PROMPTS]
    a = cb.generate(greedy)
    b = cb.generate(longer)
    assert cb.stats["misses"] == 8 and cb.stats["hits"] == 0
    assert any(len(y.token_ids) > len(x.token_ids) for x, y in zip(a, b))
    with ForwardCounter(lm.model) as calls:
        cb.generate(sampled)
        cb.generate(sampled)
    assert calls.n > 0 and cb.stats["uncacheable"] == 8 and cb.entries() == 8
    cb.generate(seeded)
    with ForwardCounter(lm.model) as calls:
        cb.generate(seeded)
    assert calls.n == 0 and cb.entries() == 12


def test_passes_through_what_suites_and_sweeps_use(tmp_path, llama_dir):
    from llmmem.backends.hf import HFBackend

    lm = _load(llama_dir)
    inner = HFBackend(lm, batch_size=3)
    cb = CachingBackend(inner, tmp_path, "fp+dense")
    assert cb.name == "hf" and cb.model is lm.model and cb.tok is inner.tok
    assert cb.batch_size == 3 and cb.max_length == inner.max_length
    assert cb.encode("The capital") == inner.encode("The capital") and cb.decode([5, 6]) == inner.decode([5, 6])
    assert not hasattr(cb, "update_weights")  # as the HF backend: a sweep must not push weights to it
    assert isinstance(cb, Backend)
    # the fingerprint hashes files: a bfloat16 load of the same checkpoint must not share float32 answers
    import torch

    req = LoglikelihoodRequest(context="The capital", continuation=" of France")
    assert cb.settings["dtype"] == "float32" and cb.settings["device"] == "cpu"
    lm.model.to(torch.bfloat16)
    assert CachingBackend(HFBackend(lm), tmp_path, "fp+dense").key("loglikelihood", req) != cb.key("loglikelihood", req)


# ----------------------------------------------------------------------------- batching, order, keys
def test_hits_come_from_the_cache_and_misses_go_in_one_batch_in_order(tmp_path):
    inner = FakeBackend()
    cb = CachingBackend(inner, tmp_path, "fp+dense")
    a, b, c, d = (GenerateRequest(context=x, max_gen_toks=3) for x in ("alpha", "beta", "gamma", "delta"))
    first = cb.generate([a, b, a, c])
    assert [r.text for r in first] == ["ahp", "ate", "ahp", "amm"]
    assert inner.calls == [[a, b, c]]  # one batch, the repeated request computed once
    first[0].token_ids.append(99)
    assert first[2].token_ids == [5, 3]  # a repeat is its own object
    assert cb.reset_stats()["misses"] == 3 and cb.stats["misses"] == 0
    second = cb.generate([c, d, a])
    assert inner.calls[-1] == [d] and (cb.stats["hits"], cb.stats["misses"]) == (2, 1)
    assert [r.text for r in second] == ["amm", "atl", "ahp"]
    assert cb.loglikelihood([LoglikelihoodRequest("ab", "c")])[0].logprob == -4.0
    assert cb.loglikelihood([LoglikelihoodRequest("ab", "c", token_logprobs=True)])[0].logprob == -4.0
    assert len(inner.calls) == 4  # token_logprobs=True is another request (its answer carries more)
    assert cb.loglikelihood_rolling([]) == [] and len(inner.calls) == 4


def test_token_ids_and_backend_settings_are_in_the_key(tmp_path):
    inner = FakeBackend()
    cb = CachingBackend(inner, tmp_path, "fp+dense")
    cb.loglikelihood([LoglikelihoodRequest(context_ids=[1, 2], continuation_ids=[3])])
    cb.loglikelihood([LoglikelihoodRequest(context_ids=[1, 2], continuation_ids=[4])])
    assert len(inner.calls) == 2
    inner.max_length = 32  # truncation changes answers: another key
    other = CachingBackend(inner, tmp_path, "fp+dense")
    other.loglikelihood([LoglikelihoodRequest(context_ids=[1, 2], continuation_ids=[3])])
    assert len(inner.calls) == 3


def test_cache_model_key():
    """The model key is the dense fingerprint plus the cell's weights key (model identity + chain + seed)."""
    from llmmem.cells import Cell, EvalSpec
    from llmmem.interventions import Step

    m = ModelSpec(name="m")

    def key(*steps, seed=0):
        return cache_model_key("abc", Cell(m, tuple(Step("prune", s) for s in steps), EvalSpec(), seed).weights_key())

    k = key(PruneSpec(method="wanda", sparsity=0.5))
    assert k.startswith("abc+") and k != cache_model_key("abc") != cache_model_key("abd")
    assert k == key(PruneSpec(method="wanda", sparsity=0.5))
    assert k != key(PruneSpec(method="wanda", sparsity=0.6))
    assert k != key(PruneSpec(method="wanda", sparsity=0.5, calibration="self"))
    assert k != key(PruneSpec(method="wanda", sparsity=0.5), seed=1)  # calibration is drawn with the cell seed
    assert key() != k
    with pytest.raises(ConfigError, match="fingerprint"):
        cache_model_key("", None)


# ----------------------------------------------------------------------------- sharing and damage
def _writer(path, start, out):
    try:
        inner = FakeBackend()
        cb = CachingBackend(inner, path, "fp+dense", timeout=30)
        for k in range(30):
            reqs = [RollingRequest(text=f"doc {(start + k * 7 + j) % 120}") for j in range(8)]
            got = cb.loglikelihood_rolling(reqs)
            if [g.logprob for g in got] != [-float(len(r.text)) for r in reqs]:
                out.put("wrong answer")
                return
        out.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the parent
        out.put(f"{type(e).__name__}: {e}")


def test_two_processes_share_one_cache(tmp_path):
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(tmp_path, s, out)) for s in (0, 3, 5)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [out.get(timeout=5) for _ in procs] == ["ok"] * 3
    assert all(p.exitcode == 0 for p in procs)
    inner = FakeBackend()
    cb = CachingBackend(inner, tmp_path, "fp+dense")
    assert cb.entries() == 120
    cb.loglikelihood_rolling([RollingRequest(text=f"doc {i}") for i in range(120)])
    assert inner.calls == []


def _single_line(e: ConfigError) -> str:
    msg = str(e)
    assert "\n" not in msg
    return msg


def test_damaged_cache_file_is_one_clear_line(tmp_path):
    (tmp_path / CACHE_FILE).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError) as e:
        CachingBackend(FakeBackend(), tmp_path, "fp+dense")
    msg = _single_line(e.value)
    assert str(tmp_path / CACHE_FILE) in msg and "damaged" in msg and "delete" in msg


def test_locked_cache_file_is_one_clear_line(tmp_path):
    db = tmp_path / CACHE_FILE
    holder = sqlite3.connect(str(db), isolation_level=None)
    holder.execute("CREATE TABLE t (x)")  # a rollback-journal database some other process is writing
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(ConfigError) as e:
            CachingBackend(FakeBackend(), tmp_path, "fp+dense", timeout=0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    msg = _single_line(e.value)
    assert "locked" in msg and str(db) in msg
    CachingBackend(FakeBackend(), tmp_path, "fp+dense", timeout=0.2).loglikelihood_rolling([RollingRequest("x")])


def test_a_failed_write_keeps_the_answers(tmp_path, caplog):
    inner = FakeBackend()
    cb = CachingBackend(inner, tmp_path, "fp+dense", timeout=0.2)
    holder = sqlite3.connect(str(tmp_path / CACHE_FILE), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    try:
        got = cb.loglikelihood_rolling([RollingRequest("abc")])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert got[0].logprob == -3.0 and cb.entries() == 0
    assert "not cached" in caplog.text


@pytest.mark.parametrize("bad", ["", None])
def test_bad_model_key(tmp_path, bad):
    with pytest.raises(ConfigError, match="model_key"):
        CachingBackend(FakeBackend(), tmp_path, bad)


def test_cache_path_that_is_a_file(tmp_path):
    f = tmp_path / "cache.db"
    f.write_text("")
    with pytest.raises(ConfigError, match="give a directory"):
        CachingBackend(FakeBackend(), f, "fp+dense")
