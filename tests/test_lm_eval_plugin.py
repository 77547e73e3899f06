"""lm-eval model plugin: lm-eval's own CLI with ``--model llmmem --model_args pretrained=...,prune=...`` gives
llmmem's numbers for the same pruned model."""

import glob
import json
import math
import subprocess
import sys

import pytest

from conftest import run_cli

pytest.importorskip("lm_eval")

TEXTS = ["The capital of France is Paris. The capital of Japan is Tokyo.",
         "Alice was born in Lyon and works for Acme.", "In the beginning God created the heaven and the earth.",
         "key1 = 17 ; key2 = 42 ; key3 = 99 .", "Four score and seven years ago our fathers brought forth.",
         "Bob was born in Kyoto."]


@pytest.fixture
def tiny_tasks(tmp_path):
    """Two lm-eval tasks over local jsonl: rolling log-likelihood (perplexity) and multiple choice."""
    d = tmp_path / "lmeval_tasks"
    d.mkdir()
    with open(d / "ppl.jsonl", "w") as f:
        for i, t in enumerate(TEXTS):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
    with open(d / "mc.jsonl", "w") as f:
        for t in TEXTS:
            f.write(json.dumps({"q": t[:14], "choices": [t[14:], "banana split", "0 1 2 3"], "label": 0}) + "\n")
    (d / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {d / 'ppl.jsonl'}}}}}\ntest_split: test\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\nmetadata: {version: 1.0}\n")
    (d / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {d / 'mc.jsonl'}}}}}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\nmetadata: {version: 1.0}\n")
    return d


@pytest.fixture
def only_included_lm_eval_tasks(monkeypatch):
    """lm-eval indexes its ~15k built-in task YAMLs on every TaskManager (minutes on this machine); these tests
    only use tasks from --include_path, so skip the built-in index. Everything else is lm-eval's own code."""
    from lm_eval.tasks.manager import TaskManager

    orig = TaskManager.__init__

    def init(self, verbosity=None, include_path=None, include_defaults=True, metadata=None):
        orig(self, verbosity, include_path, include_defaults and not include_path, metadata)

    monkeypatch.setattr(TaskManager, "__init__", init)


def _lm_eval_cli(args, out):
    from llmmem.lm_eval_plugin import main

    rc = main([str(a) for a in args] + ["--output_path", str(out)])
    files = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    return rc, (json.loads(open(files[0]).read()) if files else None)


def test_lm_eval_cli_with_llmmem_model_gives_llmmem_numbers(tmp_path, llama_dir, tiny_tasks,
                                                          only_included_lm_eval_tasks, capsys):
    # llmmem's own path: prune and save with `llmmem prune`, then `llmmem eval --tasks lm_eval:...`
    pruned = tmp_path / "pruned"
    assert run_cli(["prune", "--model", llama_dir, "--method", "magnitude", "--sparsity", "0.5",
                    "--output", pruned, "--quiet"]) == 0, capsys.readouterr().err
    assert run_cli(["eval", "--model", pruned, "--tasks", "lm_eval:tiny_ppl,lm_eval:tiny_mc", "--include_path",
                    tiny_tasks, "--output_path", tmp_path / "run", "--quiet"]) == 0, capsys.readouterr().err
    ours = json.loads(next((tmp_path / "run").rglob("results.json")).read_text())["metrics"]

    # lm-eval's CLI with the plugin: prunes in memory from the dense checkpoint
    common = ["--model", "llmmem", "--include_path", tiny_tasks, "--tasks", "tiny_ppl,tiny_mc", "--device", "cpu",
              "--batch_size", "4"]
    rc, theirs = _lm_eval_cli([*common, "--model_args", f"pretrained={llama_dir},prune=magnitude:0.5"],
                              tmp_path / "lmeval_pruned")
    assert rc == 0, capsys.readouterr().err
    res = theirs["results"]
    for metric in ("word_perplexity", "bits_per_byte"):
        assert math.isclose(res["tiny_ppl"][f"{metric},none"], ours["lm_eval:tiny_ppl"][metric], rel_tol=1e-4)
    for metric in ("acc", "acc_norm"):
        assert res["tiny_mc"][f"{metric},none"] == ours["lm_eval:tiny_mc"][metric]
    info = theirs["config"]["llmmem"]
    assert info["interventions"][0]["kind"] == "prune" and info["interventions"][0]["method"] == "magnitude"
    assert abs(info["reports"][0]["prune"]["measured_sparsity"] - 0.5) < 0.01
    assert theirs["config"]["model"] == "llmmem" and theirs["model_name"] == str(llama_dir)

    # and the pruning was applied: the dense model scores differently
    rc, dense = _lm_eval_cli([*common, "--model_args", f"pretrained={llama_dir}"], tmp_path / "lmeval_dense")
    assert rc == 0
    dense_ppl = dense["results"]["tiny_ppl"]["bits_per_byte,none"]
    assert not math.isclose(dense_ppl, res["tiny_ppl"]["bits_per_byte,none"], rel_tol=1e-3)  # noise is ~1e-6
    assert dense["config"]["llmmem"]["interventions"] == []


def test_lm_eval_cache_file_is_refused_for_other_weights(tmp_path, llama_dir, tiny_tasks, only_included_lm_eval_tasks,
                                                         capsys):
    """lm-eval's --use_cache keys on the request only; the plugin stamps the file with its model key."""
    cache = tmp_path / "lmeval_cache" / "c"
    args = ["--model", "llmmem", "--include_path", tiny_tasks, "--tasks", "tiny_ppl", "--device", "cpu",
            "--use_cache", cache]
    rc, dense = _lm_eval_cli([*args, "--model_args", f"pretrained={llama_dir}"], tmp_path / "a")
    assert rc == 0
    rc, again = _lm_eval_cli([*args, "--model_args", f"pretrained={llama_dir}"], tmp_path / "b")
    assert rc == 0 and again["results"]["tiny_ppl"] == dense["results"]["tiny_ppl"]
    capsys.readouterr()
    rc, _ = _lm_eval_cli([*args, "--model_args", f"pretrained={llama_dir},prune=magnitude:0.5"], tmp_path / "c")
    err = capsys.readouterr().err
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("llmmem lm_eval: error:") and "--use_cache" in line and "other weights" in line


@pytest.mark.parametrize("model_args, needles", [
    ("prune=wanda:0.5", ["pretrained"]),
    ("pretrained={m},prune=pruney:0.5", ["prune='pruney:0.5'", "magnitude, sparsegpt, wanda"]),
    ("pretrained={m},prune=wanda", ["prune='wanda'", "METHOD:SPARSITY"]),
    ("pretrained={m},prune=magnitude:1.5", ["prune='magnitude:1.5'", "outside [0, 1)"]),
    ("pretrained={m},prune=magnitude:0.5:3:2", ["N:M needs 0 < N < M"]),
    ("pretrained={m},nsamples=4", ["without prune="]),
    ("pretrained={m},sparsity=0.5", ["unknown key 'sparsity'", "prune", "dtype"]),
    ("pretrained={m},dtype=float8", ["dtype='float8'", "float32"]),
])
def test_bad_model_args_are_one_line(llama_dir, model_args, needles):
    from lm_eval.api.registry import get_model

    import llmmem.lm_eval_plugin  # noqa: F401  (registers "llmmem")
    from llmmem.config import ConfigError

    cls = get_model("llmmem")
    with pytest.raises(ConfigError) as e:
        cls.create_from_arg_string(model_args.format(m=llama_dir), {"device": "cpu"})
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_prune_spec_parsing():
    from llmmem.lm_eval_plugin import parse_interventions

    chain = parse_interventions({"pretrained": "m", "prune": "sparsegpt:0.5:2:4", "calibration": "self",
                                 "nsamples": 8, "seqlen": "16", "prune_seed": 3})
    assert [s.kind for s in chain] == ["prune"]
    spec = chain[0].spec
    assert (spec.method, spec.sparsity, spec.structure, spec.calibration, spec.nsamples, spec.seqlen) == \
        ("sparsegpt", 0.5, "2:4", "self", 8, 16)  # prune_seed is the cell seed, not part of the spec
    assert parse_interventions({"pretrained": "m"}) == []


def test_wanda_with_self_calibration_prunes_as_llmmem_prune(tmp_path, llama_dir, capsys):
    """The calibration plumbing: the plugin's pruning equals `llmmem prune` with the same options."""
    import torch
    from safetensors.torch import load_file

    from llmmem.config import ModelSpec
    from llmmem.lm_eval_plugin import load_cell, parse_interventions

    assert run_cli(["prune", "--model", llama_dir, "--method", "wanda", "--sparsity", "0.5", "--calibration", "self",
                    "--nsamples", "4", "--seqlen", "16", "--output", tmp_path / "p", "--quiet"]) == 0, \
        capsys.readouterr().err
    chain = parse_interventions({"prune": "wanda:0.5", "calibration": "self", "nsamples": 4, "seqlen": 16})
    session, _cell, reports = load_cell(ModelSpec(name=str(llama_dir), device="cpu"), chain)
    lm, report = session.lm, reports[0]
    assert report["calibration"]["source"] == "self" and report["calibration"]["nsamples"] == 4
    saved = load_file(str(tmp_path / "p" / "model.safetensors"))
    state = lm.model.state_dict()
    assert len(saved) > 10 and all(torch.equal(state[k], v) for k, v in saved.items())
    assert (state["model.layers.0.mlp.up_proj.weight"] == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_registered_under_llmmem_without_hiding_lm_evals_models():
    from lm_eval.api.registry import get_model

    import llmmem.lm_eval_plugin as plugin

    assert get_model("llmmem") is plugin.LlmmemLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models are still there


@pytest.mark.slow
def test_python_m_wrapper_runs_lm_evals_cli(tmp_path, llama_dir, tiny_tasks):
    """The real command line, lm-eval's full task index included (minutes on a small machine)."""
    proc = subprocess.run([sys.executable, "-m", "llmmem.lm_eval_plugin", "--model", "llmmem", "--model_args",
                           f"pretrained={llama_dir},prune=magnitude:0.5", "--include_path", str(tiny_tasks),
                           "--tasks", "tiny_ppl", "--device", "cpu"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny_ppl" in proc.stdout and "bits_per_byte" in proc.stdout and "llmmem (" in proc.stdout
