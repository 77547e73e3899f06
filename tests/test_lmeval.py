"""lm-evaluation-harness interoperability: lm_eval: tasks on in-memory models, and llmmem tasks exported to lm-eval."""

import json
import math
import subprocess
import sys

import pytest

from conftest import run_cli

pytest.importorskip("lm_eval")


def _cell(path):
    return json.loads(next(path.rglob("results.json")).read_text())


@pytest.mark.slow  # ~1.5 min: two full evaluations through both harnesses
def test_export_and_same_numbers_within_error(tmp_path, tiny_testbed, capsys):
    out = tmp_path / "exported"
    assert run_cli(["export-lm-eval", out, "--include_path", tiny_testbed / "tasks",
                    "--tasks", "testbed_recall,testbed_override"]) == 0
    assert (out / "llmmem_testbed_recall.yaml").exists() and (out / "llmmem_lmeval_utils.py").exists()
    assert (out / "testbed_recall.jsonl").exists()
    run = tmp_path / "run"
    rc = run_cli(["eval", "--model", tiny_testbed, "--tasks",
                  "testbed_recall,lm_eval:llmmem_testbed_recall,testbed_override,lm_eval:llmmem_testbed_override",
                  "--include_path", out, "--limit", "120", "--output_path", run, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    res = _cell(run)["metrics"]
    for ours, theirs, metric in (("testbed_recall", "lm_eval:llmmem_testbed_recall", "exact_match"),
                                 ("testbed_override", "lm_eval:llmmem_testbed_override", "follows_context"),
                                 ("testbed_override", "lm_eval:llmmem_testbed_override", "parametric")):
        a, b = res[ours], res[theirs]
        se = math.sqrt(a[f"{metric}_stderr"] ** 2 + b[f"{metric}_stderr"] ** 2)
        assert abs(a[metric] - b[metric]) <= 3 * se + 1e-9, (ours, metric, a[metric], b[metric], se)
    assert _cell(run)["n_samples"]["lm_eval:llmmem_testbed_recall"] == 120


def test_lm_eval_cli_runs_exported_tasks(tmp_path, tiny_testbed):
    out = tmp_path / "exported"
    assert run_cli(["export-lm-eval", out, "--include_path", tiny_testbed / "tasks", "--tasks", "testbed_recall"]) == 0
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={tiny_testbed},dtype=float32", "--include_path", str(out), "--tasks",
                           "llmmem_testbed_recall", "--limit", "20", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llmmem_testbed_recall" in proc.stdout and "exact_match" in proc.stdout


@pytest.mark.slow  # ~1 min: lm-eval tasks in a two-cell sweep
def test_lm_eval_task_in_a_sweep(tmp_path, tiny_testbed, capsys):
    import yaml

    out = tmp_path / "exported"
    assert run_cli(["export-lm-eval", out, "--include_path", tiny_testbed / "tasks", "--tasks", "testbed_recall"]) == 0
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"models": [str(tiny_testbed)], "methods": ["wanda"], "sparsities": [0.5],
                                   "calibration": "self", "nsamples": 4, "seqlen": 16,
                                   "tasks": ["lm_eval:llmmem_testbed_recall"], "include_path": str(out),
                                   "limit": 20, "output_path": str(tmp_path / "run")}))
    assert run_cli(["sweep", cfg, "--quiet"]) == 0, capsys.readouterr().err
    docs = [json.loads(p.read_text()) for p in (tmp_path / "run").rglob("results.json")]
    assert len(docs) == 2 and all("lm_eval:llmmem_testbed_recall" in d["metrics"] for d in docs)
    assert "lm_eval:llmmem_testbed_recall" in (tmp_path / "run" / "report.md").read_text()


def test_unknown_lm_eval_task(capsys, llama_dir):
    rc = run_cli(["eval", "--model", llama_dir, "--tasks", "lm_eval:no_such_task_xyz"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "no_such_task_xyz" in err and "lm_eval --tasks list" in err


def test_lm_eval_not_installed(capsys, llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    rc = run_cli(["eval", "--model", llama_dir, "--tasks", "lm_eval:anything"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'llmmem[lm_eval]'" in err


@pytest.mark.slow
def test_smollm2_llmmem_and_lm_eval_agree(smollm2_dir, tmp_path, monkeypatch, capsys):
    from conftest import REAL_HOME

    monkeypatch.setenv("LLMMEM_HOME", REAL_HOME)
    out = tmp_path / "exported"
    assert run_cli(["export-lm-eval", out, "--tasks", "capitals,capitals_override"]) == 0
    rc = run_cli(["eval", "--model", "smollm2-135m", "--tasks",
                  "capitals,lm_eval:llmmem_capitals,capitals_override,lm_eval:llmmem_capitals_override",
                  "--include_path", out, "--limit", "100", "--batch_size", "16", "--output_path", tmp_path / "run",
                  "--quiet"])
    assert rc == 0, capsys.readouterr().err
    res = _cell(tmp_path / "run")["metrics"]
    for ours, theirs, metric in (("capitals", "lm_eval:llmmem_capitals", "exact_match"),
                                 ("capitals_override", "lm_eval:llmmem_capitals_override", "follows_context")):
        a, b = res[ours], res[theirs]
        se = math.sqrt(a[f"{metric}_stderr"] ** 2 + b[f"{metric}_stderr"] ** 2)
        assert abs(a[metric] - b[metric]) <= 3 * se, (ours, a[metric], b[metric], se)


def _tb_backend(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmmem.backends.hf import HFBackend
    from llmmem.models import wrap_model

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    return HFBackend(wrap_model(model, tok, "testbed"), batch_size=1)


def _arg_context(sample) -> str:
    """The prompt of a logged generate_until sample, whatever the nesting of lm-eval's `arguments`."""
    args = sample["arguments"]
    while not isinstance(args, str):
        args = args[0] if isinstance(args, (list, tuple)) else next(iter(args.values()))
    return args


def test_exported_task_same_prompts_and_scores_under_lm_eval(tmp_path, tiny_testbed):
    """Issue 19.6: lm-eval on the exported task (its default fewshot seed 1234) = llmmem with its default seed 0,
    doc by doc: prompt, response, exact match."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llmmem.lmeval import export_tasks
    from llmmem.suites import run_task
    from llmmem.tasks import get_task

    inc = str(tiny_testbed / "tasks")
    out = tmp_path / "exported"
    export_tasks(out, ["testbed_recall"], include_path=inc)
    b = _tb_backend(tiny_testbed)
    ours = run_task(get_task("testbed_recall", inc), b, limit=24, num_fewshot=2, seed=0)
    res = simple_evaluate(model=HFLM(pretrained=b.model, tokenizer=b.tok, batch_size=1, max_length=b.max_length),
                          tasks=["llmmem_testbed_recall"], num_fewshot=2, limit=24, log_samples=True,
                          task_manager=TaskManager(include_path=[str(out)], include_defaults=False), bootstrap_iters=0)
    samples = sorted(res["samples"]["llmmem_testbed_recall"], key=lambda s: s["doc_id"])
    assert [_arg_context(s) for s in samples] == [r["prompt"] for r in ours.rows]
    assert [s["resps"][0][0] for s in samples] == [r["response"] for r in ours.rows]
    assert [s["exact_match"] for s in samples] == [r["exact_match"] for r in ours.rows]
    assert 0 < sum(r["exact_match"] for r in ours.rows) < len(ours.rows)  # the testbed answers some, not all
    assert res["results"]["llmmem_testbed_recall"]["exact_match,none"] == pytest.approx(ours.metrics["exact_match"])


def _lm_eval_prompts(out, names, n_docs, num_fewshot=None, seed=1234):
    """lm-eval's own prompts for exported tasks: TaskManager load, set_fewshot_seed, fewshot_context in doc order."""
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=[str(out)], include_defaults=False).load_task_or_group(list(names))
    prompts = {}
    for name in names:
        task = loaded[name]
        task.set_fewshot_seed(seed)
        k = task.config.num_fewshot if num_fewshot is None else num_fewshot
        prompts[name] = [task.fewshot_context(d, num_fewshot=k or 0) for _, d in zip(range(n_docs), task.eval_docs)]
    return prompts


def test_exported_prompts_equal_lm_evals(tmp_path):
    """Exported built-in task: lm-eval builds, doc by doc, the prompts llmmem builds (default seeds of both)."""
    from llmmem.lmeval import export_tasks
    from llmmem.tasks import get_task

    out = tmp_path / "exported"
    export_tasks(out, ["capitals"])
    export_tasks(out, ["associative_recall"])  # a second export into the same directory keeps the first working
    theirs = _lm_eval_prompts(out, ["llmmem_capitals", "llmmem_associative_recall"], 60)
    for name in ("capitals", "associative_recall"):
        task = get_task(name)
        assert theirs[f"llmmem_{name}"] == task.prompts(task.docs(limit=60), task.num_fewshot, seed=0)


@pytest.mark.parametrize("sampler", ["default", "first_n"])
def test_exported_prompts_with_fewshot_file_filter_and_description(tmp_path, sampler):
    from llmmem.lmeval import export_tasks
    from llmmem.tasks import load_task_file

    d = tmp_path / "src"
    d.mkdir()
    (d / "t.jsonl").write_text("".join(json.dumps({"q": f"question {i}", "a": [f"ans{i}", f"alt{i}"],
                                                   "kind": "keep" if i % 3 else "drop"}) + "\n" for i in range(30)))
    (d / "f.jsonl").write_text("".join(json.dumps({"q": f"question {i}", "a": [f"shot{i}"], "kind": "keep"}) + "\n"
                                       for i in range(5, 17)))  # rows 5..16: some equal a doc's question, not content
    (d / "t.yaml").write_text(
        "task: t\nsuite: recall\ndata: t.jsonl\nfewshot_data: f.jsonl\nfilter: {kind: [keep]}\n"
        "prompt_description: \"Answer {{kind}} questions:\\n\\n\"\ndoc_to_text: 'Q: {{q}}?\\nA:'\ndoc_to_target: '{{a}}'\n"
        f"fewshot_delimiter: \"\\n\"\nnum_fewshot: 4\nfewshot_config: {{sampler: {sampler}}}\n")
    task = load_task_file(d / "t.yaml")
    export_tasks(tmp_path / "out", ["t"], include_path=str(d))
    ours = task.prompts(task.docs(), 4, seed=0)
    assert len(ours) == 20 and ours[0].startswith("Answer keep questions:\n\nQ: question ")
    assert _lm_eval_prompts(tmp_path / "out", ["llmmem_t"], 20)["llmmem_t"] == ours
    other = _lm_eval_prompts(tmp_path / "out", ["llmmem_t"], 20, num_fewshot=2, seed=1241)["llmmem_t"]
    assert other == task.prompts(task.docs(), 2, seed=7) != ours
