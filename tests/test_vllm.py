"""vLLM backend (marker vllm: runs in the vLLM environment that .ci/run builds; see DEVELOPERS.md).

Engines run in this process; vLLM's CPU backend needs head_dim >= 32 (the testbed presets have it).
"""

import json
import os
import sys

import pytest

from conftest import run_cli

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def test_backend_vllm_without_vllm_names_the_extra(capsys, llama_dir, monkeypatch):
    """Runs in the main environment too: a clear message when vLLM is missing."""
    monkeypatch.setitem(sys.modules, "vllm", None)
    rc = run_cli(["eval", "--model", llama_dir, "--tasks", "capitals", "--backend", "vllm"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'llmmem[vllm]'" in err and len(err.strip().splitlines()) == 1


vllm_only = pytest.mark.vllm


def _backends(path):
    from llmmem.backends import make_backend
    from llmmem.config import ModelSpec
    from llmmem.models import load_model

    lm = load_model(ModelSpec(str(path), device="cpu", dtype="float32"))
    return lm, make_backend("hf", lm, batch_size=16), make_backend("vllm", lm, batch_size=16)


PROMPTS_TB = ["question : where was Vipel Lunbelis born ? answer :", "recall : k1 v3 ; k2 v4 . k1",
              "the access code for account", "passage : Athka Peljorjor works for Mernescorp . question :"]


def _compare(hf, vb, prompts, n=8):
    from llmmem.backends.base import GenerateRequest, LoglikelihoodRequest

    g1 = hf.generate([GenerateRequest(context=p, max_gen_toks=n) for p in prompts])
    g2 = vb.generate([GenerateRequest(context=p, max_gen_toks=n) for p in prompts])
    assert [g.token_ids for g in g1] == [g.token_ids for g in g2]
    reqs = [LoglikelihoodRequest(context=p, continuation=" Paris is a city .", token_logprobs=True) for p in prompts]
    for a, b in zip(hf.loglikelihood(reqs), vb.loglikelihood(reqs)):
        assert abs(a.logprob - b.logprob) < 1e-3
        assert a.is_greedy == b.is_greedy
        assert max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs)) < 1e-3
    return [g.token_ids for g in g2]


@vllm_only
def test_testbed_greedy_and_loglikelihood_match_hf_and_in_place_update(tiny_testbed):
    from llmmem.models import prunable_parameter_names
    from llmmem.pruning import prune
    from llmmem.pruning.spec import PruneSpec

    lm, hf, vb = _backends(tiny_testbed)
    dense = _compare(hf, vb, PROMPTS_TB)
    prune(lm.model, PruneSpec("magnitude", 0.7))
    info = vb.update_weights(lm.model, prunable_parameter_names(lm.model))
    assert info["mode"] == "in_place"
    pruned = _compare(hf, vb, PROMPTS_TB)  # the engine now serves the pruned weights
    assert pruned != dense
    vb.close()


@vllm_only
@pytest.mark.slow
def test_smollm2_matches_hf(smollm2_dir):
    _, hf, vb = _backends(smollm2_dir)
    _compare(hf, vb, ["The capital of France is", "Four score and seven years ago", "Q: What is 2+2?\nA:"])


@vllm_only
def test_sweep_same_metrics_on_both_backends(tiny_testbed, tmp_path, capsys):
    import yaml

    runs = {}
    for backend in ("hf", "vllm"):
        cfg = tmp_path / f"{backend}.yaml"
        cfg.write_text(yaml.safe_dump({"models": [str(tiny_testbed)], "methods": ["wanda"], "sparsities": [0.3, 0.6],
                                       "calibration": "self", "nsamples": 4, "seqlen": 32, "backend": backend,
                                       "tasks": ["testbed_recall", "testbed_override"], "limit": 60,
                                       "output_path": str(tmp_path / backend)}))
        assert run_cli(["sweep", cfg, "--quiet"]) == 0, capsys.readouterr().err
        runs[backend] = {json.loads(p.read_text())["sweep"]["label"]: json.loads(p.read_text())["metrics"]
                         for p in (tmp_path / backend).rglob("results.json")}
    assert set(runs["hf"]) == set(runs["vllm"]) == {"dense", "wanda-unstructured-s0.3", "wanda-unstructured-s0.6"}
    for label in runs["hf"]:
        for task in ("testbed_recall", "testbed_override"):
            a, b = runs["hf"][label][task], runs["vllm"][label][task]
            for m in (k for k in a if not k.endswith("_stderr") and k != "buckets"):
                assert a[m] == pytest.approx(b[m], abs=1e-9), (label, task, m)
    vdoc = [json.loads(p.read_text()) for p in (tmp_path / "vllm").rglob("results.json")]
    assert any(d["timings"].get("engine_update", {}).get("mode") == "in_place" for d in vdoc)


@vllm_only
def test_bad_input_head_size_and_max_model_len(tmp_path, tiny_testbed, llama_dir, capsys):
    rc = run_cli(["eval", "--model", llama_dir, "--tasks", "capitals", "--backend", "vllm", "--limit", "2"])
    err = capsys.readouterr().err  # tiny llama has head_dim 16
    assert rc == 2 and "head size 16" in err and "32, 64" in err
    rc = run_cli(["eval", "--model", tiny_testbed, "--tasks", "testbed_override", "--backend", "vllm", "--limit", "2",
                  "--model_args", "max_model_len=12", "--output_path", tmp_path])
    err = capsys.readouterr().err
    assert rc == 2 and "max_model_len 12" in err
