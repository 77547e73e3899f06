"""Exposure (Carlini et al. 2019) over a declared secret space: enumeration, sampling, estimates, task options."""

import itertools
import json
import math
import time
from collections import Counter

import numpy as np
import pytest

from llmmem.config import ConfigError
from llmmem.exposure import DEFAULT_ALTERNATIVES, MIN_SAMPLED, SecretSpace, exposure


# ----------------------------------------------------------------------------- the space
def test_space_size_index_and_round_trip():
    sp = SecretSpace(tuple("abc"), 3, "-")
    assert sp.size == 27
    all_secrets = ["-".join(p) for p in itertools.product("abc", repeat=3)]
    assert [sp.index(s) for s in all_secrets] == list(range(27))
    assert [sp.secret_at(i, 3) for i in range(27)] == all_secrets
    assert SecretSpace(tuple("01"), None, "").size_for("0110") == 16  # length from the secret


@pytest.mark.parametrize("opts, needles", [
    ({"alphabet": ["7"]}, ["alphabet", "one symbol"]),
    ({"alphabet": ["1", "1", "2"]}, ["alphabet", "repeats"]),
    ({"alphabet": 12}, ["alphabet", "12"]),
    ({"length": 0}, ["length", "0", ">= 1"]),
    ({"length": "ten"}, ["length", "'ten'"]),
    ({"length": True}, ["length", "True"]),
    ({"separator": 3}, ["separator", "3"]),
    ({"alphabet": ["ab", "c"], "separator": ""}, ["one-character"]),
    ({"alphabet": ["a b", "c"]}, ["separator", "inside"]),
    ({"n_alternative": 5}, ["unknown key", "n_alternative", "n_alternatives"]),
])
def test_from_options_rejects_bad_values_in_one_line(opts, needles):
    with pytest.raises(ConfigError) as e:
        SecretSpace.from_options(opts, where="task t: options.exposure")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("task t: options.exposure")
    for n in needles:
        assert n in msg, msg


def test_from_options_reads_the_declared_format():
    sp = SecretSpace.from_options({"alphabet": "0123456789", "length": 10, "separator": " "})
    assert sp == SecretSpace(tuple("0123456789"), 10, " ") and sp.size == 10 ** 10
    assert SecretSpace.from_options({"alphabet": [0, 1, 2]}).alphabet == ("0", "1", "2")  # YAML ints
    with pytest.raises(ConfigError, match="declared length is 10"):
        sp.check("1 2 3")
    with pytest.raises(ConfigError, match="'x' is not in the declared alphabet"):
        sp.check("1 2 3 4 5 6 7 8 9 x")


def test_budget_checks():
    big = SecretSpace(tuple("0123456789"), 10, " ")
    with pytest.raises(ConfigError, match=f"n_alternatives 5 is too small.*>= {MIN_SAMPLED}"):
        big.check_budget(5)
    with pytest.raises(ConfigError, match="exposure_alternatives 0 must be an integer >= 1"):
        big.check_budget(0, key="exposure_alternatives")
    assert big.check_budget(MIN_SAMPLED) == MIN_SAMPLED
    assert SecretSpace(tuple("01"), 2, " ").check_budget(3) == 3  # 4 secrets: 3 others, enumerated


# ----------------------------------------------------------------------------- alternatives
def test_small_space_is_enumerated_and_never_hangs():
    sp = SecretSpace(tuple("01"), 2, " ")
    t0 = time.time()
    alts = sp.alternatives("0 1", 200, seed=0)  # the old loop wanted 200 distinct of 3 and spun forever
    assert time.time() - t0 < 1
    assert alts == ["0 0", "1 0", "1 1"]
    assert sp.is_exact("0 1", 200) and sp.is_exact("0 1", 3) and not sp.is_exact("0 1", 2)


def test_sampled_alternatives_are_distinct_exclude_the_secret_and_are_seeded():
    sp = SecretSpace(tuple("0123456789"), 10, " ")
    secret = "3 1 4 1 5 9 2 6 5 3"
    a = sp.alternatives(secret, 1000, seed="0:task:canary-1")
    assert len(a) == len(set(a)) == 1000 and secret not in a
    assert all(len(sp.check(x)) == 10 for x in a)
    assert a == sp.alternatives(secret, 1000, seed="0:task:canary-1")
    assert a != sp.alternatives(secret, 1000, seed="0:task:canary-2")
    # sampling nearly the whole space is still exactly n draws
    small = SecretSpace(tuple("0123"), 3, "")
    b = small.alternatives("000", 62, seed=1)
    assert len(set(b)) == 62 and "000" not in b


def test_sampling_is_uniform_without_replacement():
    sp = SecretSpace(tuple("0123456789"), 1, "")
    counts = Counter()
    for seed in range(3000):
        counts.update(sp.alternatives("4", 3, seed=seed))
    assert set(counts) == set("012356789")
    # each of the 9 others is drawn with probability 3/9: 1000 expected, sd ~26
    assert all(abs(c - 1000) < 110 for c in counts.values()), counts


# ----------------------------------------------------------------------------- exposure values
def _brute_force_exposure(scores: dict, secret) -> float:
    """Carlini et al. 2019, Definitions 3-4: rank = |{r in R : Px(r) <= Px(s)}|, exposure = log2|R| - log2 rank."""
    rank = sum(1 for v in scores.values() if v <= scores[secret])
    return math.log2(len(scores)) - math.log2(rank)


def test_exact_exposure_equals_brute_force_rank_value_with_ties():
    sp = SecretSpace(tuple("abc"), 3, "")
    rng = np.random.default_rng(0)
    every = ["".join(p) for p in itertools.product("abc", repeat=3)]
    for trial in range(50):
        scores = {s: float(rng.integers(0, 6)) for s in every}  # heavy ties
        secret = every[trial % 27]
        alts = sp.alternatives(secret, 100, seed=trial)
        ex = exposure(scores[secret], [scores[a] for a in alts], sp.size)
        assert ex["method"] == "exact" and ex["exact"]
        assert ex["exposure"] == pytest.approx(_brute_force_exposure(scores, secret), abs=1e-12)
        assert ex["exposure_low"] == ex["exposure"] == ex["exposure_high"]
    best = exposure(0.0, [1.0] * 26, 27)
    assert best["exposure"] == pytest.approx(math.log2(27)) and best["rank"] == 1
    worst = exposure(9.0, [1.0] * 26, 27)
    assert worst["exposure"] == 0.0 and worst["rank"] == 27


def test_sampled_exposure_estimate_and_clopper_pearson_interval():
    from scipy.stats import beta

    size, n = 10 ** 10, 200
    alts = np.arange(n, dtype=float)  # 0, 1, ..., 199
    ex = exposure(19.5, alts, size)  # k = 20 of 200 score <= the secret
    q = 20 / 200
    assert ex["method"] == "sampled" and not ex["exact"] and ex["n_below"] == 20
    assert ex["exposure"] == pytest.approx(math.log2(size) - math.log2(1 + (size - 1) * q))
    lo_q, hi_q = beta.ppf(0.025, 20, 181), beta.ppf(0.975, 21, 180)
    assert ex["exposure_low"] == pytest.approx(math.log2(size) - math.log2(1 + (size - 1) * hi_q))
    assert ex["exposure_high"] == pytest.approx(math.log2(size) - math.log2(1 + (size - 1) * lo_q))
    assert ex["exposure_low"] < ex["exposure"] < ex["exposure_high"]


def test_unresolved_sample_uses_the_labelled_skewnorm_extrapolation():
    from scipy.stats import skewnorm

    rng = np.random.default_rng(0)
    refs = rng.normal(100, 5, size=400)
    # tensorflow_privacy privacy_tests/secret_sharer/exposures.py compute_exposure_extrapolation
    reference = -np.log2(skewnorm.cdf(70.0, *skewnorm.fit(refs)))
    ex = exposure(70.0, refs, 10 ** 10)  # 6 sigma below every alternative
    assert ex["method"] == "sampled+skewnorm" and ex["n_below"] == 0
    assert ex["exposure_skewnorm"] == pytest.approx(reference)
    assert ex["exposure"] == pytest.approx(min(max(reference, ex["exposure_low"]), ex["exposure_high"]))
    # the sample alone says: at most a 1 - 0.025^(1/400) share of secrets beat it (95%)
    q_hi = 1 - 0.025 ** (1 / 400)
    assert ex["exposure_low"] == pytest.approx(math.log2(1e10) - math.log2(1 + (1e10 - 1) * q_hi))
    assert ex["exposure_high"] == pytest.approx(math.log2(1e10))


def test_sampled_estimate_noise_matches_the_documented_figures():
    """The module docstring's noise table (n = 1000): sd ~0.12 bits at exposure 3, ~0.3 at 5."""
    from scipy.stats import norm

    rng = np.random.default_rng(1)
    for true_e, sd_max in ((3, 0.16), (5, 0.36)):
        t = norm.ppf(2.0 ** -true_e)
        est = [exposure(t, rng.normal(size=DEFAULT_ALTERNATIVES), 10 ** 10)["exposure"] for _ in range(150)]
        assert abs(np.mean(est) - true_e) < 0.1
        assert np.std(est) < sd_max


# ----------------------------------------------------------------------------- through the extraction suite
@pytest.fixture(scope="module")
def tiny_backend():
    import tiny
    from llmmem.backends.hf import HFBackend
    from llmmem.models import wrap_model

    tok = tiny.make_tokenizer()
    return HFBackend(wrap_model(tiny.make_model("llama", vocab=len(tok)), tok, "tiny"), batch_size=16)


def _canary_task(tmp_path, exposure_yaml: str, secrets=("0 1 1 0", "1 1 1 1", "0 0 1 0")):
    from llmmem.tasks import load_task_file

    rows = [{"id": f"c{i}", "prefix": "my secret code is", "secret": s, "text": f"my secret code is {s} ." * 12}
            for i, s in enumerate(secrets)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.yaml").write_text("task: canaries\nsuite: extraction\ndata: c.jsonl\noptions:\n  prefix_tokens: 8\n"
                                     f"  suffix_tokens: 8\n  exposure: {exposure_yaml}\n")
    return load_task_file(tmp_path / "c.yaml")


def test_suite_exposure_is_the_brute_force_rank_on_a_small_space(tmp_path, tiny_backend):
    from llmmem.backends.base import LoglikelihoodRequest
    from llmmem.suites import run_task

    task = _canary_task(tmp_path, "{alphabet: ['0','1'], length: 4, separator: ' ', n_alternatives: 200}")
    res = run_task(task, tiny_backend)
    every = [" ".join(p) for p in itertools.product("01", repeat=4)]
    lls = tiny_backend.loglikelihood([LoglikelihoodRequest(context="my secret code is", continuation=" " + s)
                                      for s in every])
    scores = {s: -r.logprob for s, r in zip(every, lls)}
    for row, secret in zip(res.rows, ("0 1 1 0", "1 1 1 1", "0 0 1 0")):
        assert row["exposure_method"] == "exact"
        assert row["exposure"] == pytest.approx(_brute_force_exposure(scores, secret), abs=1e-9)
        assert row["secret_logppl"] == pytest.approx(scores[secret])


@pytest.mark.parametrize("yaml_opts, needles", [
    ("{alphabet: ['0','1'], length: 0}", ["options.exposure.length", "0", ">= 1"]),
    ("{alphabet: ['0','1'], length: 3}", ["row 1 secret", "declared length is 3"]),
    ("{alphabet: ['0','1','2','3','4','5','6','7','8','9'], length: 4, n_alternatives: 5}",
     ["options.exposure.n_alternatives 5 is too small", f">= {MIN_SAMPLED}"]),
    ("{alphabet: ['0','2'], length: 4}", ["row 1 secret", "'1' is not in the declared alphabet"]),
    ("{alphabet: ['0','1'], confidence: 1.5}", ["confidence", "1.5", "(0, 1)"]),
])
def test_suite_bad_exposure_options_are_one_line_config_errors(tmp_path, tiny_backend, yaml_opts, needles):
    from llmmem.suites import run_task

    task = _canary_task(tmp_path, yaml_opts)
    with pytest.raises(ConfigError) as e:
        run_task(task, tiny_backend)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("task canaries")
    for n in needles:
        assert n in msg, msg


def test_testbed_canary_task_declares_its_secret_format(tmp_path):
    from llmmem.tasks import load_task_file
    from llmmem.testbed.train import preset_config, write_tasks
    from llmmem.testbed.world import build_world

    cfg = preset_config("tiny")
    world = build_world(0, cfg.world)
    write_tasks(world, tmp_path)
    task = load_task_file(tmp_path / "tasks" / "testbed_canaries.yaml")
    opts = task.options["exposure"]
    assert opts["length"] == cfg.world.secret_digits and opts["n_alternatives"] == DEFAULT_ALTERNATIVES
    space = SecretSpace.from_options(opts)
    assert space.size == 10 ** cfg.world.secret_digits
    for c in world.eval_sets["canaries"]:
        space.check(c["secret"])  # every canary's secret lies in the declared space
    assert all(c["text"].startswith(c["prefix"] + " " + c["secret"]) for c in world.eval_sets["canaries"])
