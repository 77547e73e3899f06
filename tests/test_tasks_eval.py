"""Task loading, bad input, and every suite end to end through `llmmem eval` on a tiny random model."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_error, run_cli
from llmmem.config import ConfigError
from llmmem.results import validate_results
from llmmem.tasks import get_task, task_index

OFFLINE = ["capitals", "demonyms", "element_symbols", "state_capitals", "capitals_override", "openbook_invented",
           "linear_classification", "associative_recall", "famous_passages"]


def test_builtin_tasks_listed_and_valid(capsys):
    idx = task_index()
    for name in OFFLINE:
        assert name in idx
    assert run_cli(["validate"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("ok ") for line in out.splitlines()) == len(idx)
    assert run_cli(["ls", "tasks"]) == 0
    assert "famous_passages" in capsys.readouterr().out


def test_fewshot_never_uses_the_scored_row():
    task = get_task("capitals")
    docs = task.docs()
    prompts = task.prompts(docs, 3, seed=0)
    for d, prompt in zip(docs, prompts):
        shots = prompt.split("\n\n")[:-1]
        assert len(shots) == 3
        assert all(f"capital of {d['country']}?" not in s for s in shots)
        assert prompt.endswith(f"Q: What is the capital of {d['country']}?\nA:")
    # fixed shots (first_n): the first three rows, the scored row skipped; one block for all later docs
    block = prompts[3][: prompts[3].rindex("Q: ")]
    assert block == "".join(f"Q: What is the capital of {d['country']}?\nA: {d['capital']}\n\n" for d in docs[:3])
    assert all(p.startswith(block) for p in prompts[3:]) and not prompts[0].startswith(block)
    assert prompts == task.prompts(docs, 3, seed=1)  # the seed draws nothing
    drawn = get_task("associative_recall")  # lm-eval's default sampler: seeded draws per doc
    adocs = drawn.docs(limit=20)
    assert drawn.prompts(adocs, 2, seed=0) == drawn.prompts(adocs, 2, seed=0)
    assert drawn.prompts(adocs, 2, seed=0) != drawn.prompts(adocs, 2, seed=1)


def test_fewshot_prompt_does_not_depend_on_limit(tiny_backend):
    """A doc's prompt depends on the task, the doc, num_fewshot and the seed only (issue 14.7)."""
    from llmmem.suites import run_task
    from llmmem.suites.recall import RecallSuite

    task = get_task("capitals")
    everything = task.prompts(task.docs(), 3, seed=0)
    at40 = [r.context for r in RecallSuite().build(task, task.docs(limit=40), None, 3, 0).generate]
    at8 = [r["prompt"] for r in run_task(task, tiny_backend, limit=8, seed=0).rows]
    assert at8 == at40[:8] == everything[:8]
    assert everything[40:48] == task.prompts(task.docs()[40:48], 3, seed=0)  # any slice of the docs, same prompts
    assert len(set(everything[:8])) == 8


@pytest.mark.parametrize("kind", ["default", "first_n"])
def test_fewshot_sampler_is_lm_evals(kind):
    """llmmem's sampler draws exactly what lm_eval/api/samplers.py draws, duplicates of the doc included."""
    samplers = pytest.importorskip("lm_eval.api.samplers")
    from llmmem.tasks import FewshotSampler

    pool = [{"q": f"q{i % 9}", "a": str(i % 9)} for i in range(14)]  # rows 0-4 appear twice
    theirs = (samplers.ContextSampler if kind == "default" else samplers.FirstNSampler)(list(pool), rnd=1234)
    ours = FewshotSampler([dict(r, _row=i) for i, r in enumerate(pool)], 1234, kind)
    for step in range(60):
        doc = dict(pool[step % len(pool)])
        got = [{k: v for k, v in r.items() if k != "_row"} for r in ours.sample(4, dict(doc, _row=99))]
        assert got == theirs.sample(4, eval_doc=doc)
        assert doc not in got


def test_aliases_formats():
    task = get_task("triviaqa")
    row = {"question": "q", "answer": {"value": "Paris", "aliases": ["Paris", "City of Light"]}}
    assert task.answers(row) == ["Paris", "City of Light"]
    pop = get_task("popqa")
    row = {"question": "q", "obj": "Lyon", "possible_answers": '["Lyon", "Lyons"]', "s_pop": 5400}
    assert pop.answers(row) == ["Lyon", "Lyons"]
    assert pop.bucket_value(row) == "[1000, 10000)"
    assert pop.bucket_value({"s_pop": 50}) == "<100"


@pytest.fixture(scope="module")
def hub_fixtures(tmp_path_factory):
    """Small files in exactly the upstream formats of the hub tasks."""
    d = tmp_path_factory.mktemp("hub")
    rows = {
        "triviaqa": [{"question": f"Which city is number {i}?", "question_id": f"tc_{i}",
                      "answer": {"aliases": ["Paris", "Paree"], "normalized_aliases": ["paris", "paree"],
                                 "value": "Paris", "normalized_value": "paris", "type": "WikipediaEntity"},
                      "entity_pages": {"doc_source": ["TagMe"], "filename": ["Paris.txt"], "title": ["Paris"],
                                       "wiki_context": [f"Paris is the capital of France. Fact {i}."]},
                      "search_results": {"description": [], "filename": [], "rank": [], "title": [], "url": [],
                                         "search_context": []}} for i in range(8)],
        "nq_open": [{"question": f"who wrote book {i}", "answer": ["Jane Austen", "Austen"]} for i in range(8)],
        "webquestions": [{"url": "http://www.freebase.com/view/en/x", "question": f"what is {i}?",
                          "answers": ["Thing", "Other"]} for i in range(8)],
        "popqa": [{"id": i, "subj": "X", "prop": "occupation", "obj": "poet", "subj_id": 1, "prop_id": 22, "obj_id": 3,
                   "s_aliases": "[]", "o_aliases": '["bard"]', "s_uri": "u", "o_uri": "u", "s_wiki_title": "X",
                   "o_wiki_title": "Poet", "s_pop": 10 ** (i % 6), "o_pop": 1, "question": f"What is X{i}'s occupation?",
                   "possible_answers": '["poet", "bard"]'} for i in range(8)],
        "wikimia": [{"input": f"Event number {i} happened in the year {1900 + i} in a city.", "label": i % 2}
                    for i in range(8)],
    }
    paths = {}
    for name, rs in rows.items():
        p = d / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rs))
        paths[name] = p
    pre = np.random.default_rng(0).integers(0, 300, size=(6, 50)).astype(np.uint16)
    suf = np.random.default_rng(1).integers(0, 300, size=(6, 50)).astype(np.uint16)
    np.save(d / "train_prefix.npy", pre)
    np.save(d / "train_suffix.npy", suf)
    paths["lm_extraction_benchmark"] = {"prefix_npy": str(d / "train_prefix.npy"), "suffix_npy": str(d / "train_suffix.npy")}
    return paths


@pytest.mark.parametrize("name", ["triviaqa", "triviaqa_openbook", "nq_open", "webquestions", "popqa", "wikimia",
                                  "lm_extraction_benchmark"])
def test_hub_task_loaders_on_upstream_format_fixtures(name, hub_fixtures, tiny_backend):
    from llmmem.suites import run_task

    task = get_task(name)
    data = hub_fixtures["triviaqa" if name == "triviaqa_openbook" else name]
    shots = data if str(task.fewshot_data).startswith("hf:") else None  # lm-eval's train split, here the same file
    res = run_task(task, tiny_backend, data=data, fewshot_data=shots, limit=6, num_fewshot=min(task.num_fewshot, 2))
    assert res.n_samples == 6
    if name == "triviaqa_openbook":
        assert "Paris is the capital of France" in res.rows[0]["prompt"]
    if task.suite in ("recall", "icl"):
        assert res.rows[0]["target"] and "exact_match" in res.metrics
        if task.aliases:
            assert res.rows[0]["aliases"]
    if name == "popqa":
        assert set(res.metrics["buckets"]) <= {"<100", "[100, 1000)", "[1000, 10000)", "[10000, 100000)", ">=100000"}
    if name == "wikimia":
        assert 0.0 <= res.metrics["loss_auc"] <= 1.0
    if name == "lm_extraction_benchmark":
        assert res.rows[0]["prefix_match"] >= 0 and len(res.rows) == 6


@pytest.fixture(scope="module")
def tiny_backend():
    import tiny
    from llmmem.backends.hf import HFBackend
    from llmmem.models import wrap_model

    tok = tiny.make_tokenizer()
    return HFBackend(wrap_model(tiny.make_model("llama", vocab=len(tok)), tok, "tiny"), batch_size=8)


def test_eval_cli_writes_a_valid_cell(tmp_path, llama_dir, capsys):
    out = tmp_path / "run"
    rc = run_cli(["eval", "--model", llama_dir, "--tasks", ",".join(OFFLINE), "--limit", "6", "--output_path", out,
                  "--quiet", "--log_samples"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "| capitals | exact_match |" in printed
    (cell,) = [p.parent for p in out.rglob("results.json")]
    assert cell.parent.name == "tiny-llama" and cell.name.startswith("dense-")
    doc = json.loads((cell / "results.json").read_text())
    assert validate_results(doc) == []
    assert set(doc["metrics"]) == set(OFFLINE)
    assert doc["metrics"]["capitals"]["buckets"]  # bucket_by popularity
    assert "follows_context" in doc["metrics"]["capitals_override"]
    assert "parametric_stderr" in doc["metrics"]["capitals_override"]
    for m in ("extractable", "token_match", "prefix_match", "approx_memorized", "tf_accuracy", "suffix_nll"):
        assert m in doc["metrics"]["famous_passages"]
    assert set(doc["metrics"]["famous_passages"]["buckets"]) <= {"famous", "control"}
    for t in OFFLINE:
        rows = [json.loads(line) for line in (cell / f"samples_{t}.jsonl").read_text().splitlines()]
        assert len(rows) == doc["n_samples"][t] == 6
        assert "response" in rows[0] and "id" in rows[0]
    assert "prompt" in json.loads((cell / "samples_capitals.jsonl").read_text().splitlines()[0])
    assert doc["tasks"]["capitals"]["version"] == 3 and len(doc["tasks"]["capitals"]["hash"]) == 16
    assert doc["tasks"]["capitals"]["n_truncated"] == 6 and any("capitals: 6 request" in w for w in doc["warnings"])
    # a finished cell is not overwritten
    assert run_cli(["eval", "--model", llama_dir, "--tasks", ",".join(OFFLINE), "--limit", "6", "--output_path", out,
                    "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_same_seed_same_numbers(tmp_path, llama_dir):
    docs = []
    for i in range(2):
        out = tmp_path / f"r{i}"
        assert run_cli(["eval", "--model", llama_dir, "--tasks", "capitals,famous_passages", "--limit", "5",
                        "--output_path", out, "--quiet"]) == 0
        docs.append(json.loads(next(out.rglob("results.json")).read_text())["metrics"])
    assert docs[0] == docs[1]


def test_exposure_on_canaries(tmp_path, tiny_backend):
    from llmmem.suites import run_task
    from llmmem.tasks import load_task_file

    rows = [{"id": i, "prefix": "my secret code is", "secret": " ".join("0123456789"[(i + k) % 10] for k in range(4)),
             "text": "my secret code is " + " ".join("0123456789"[(i + k) % 10] for k in range(4)) * 20}
            for i in range(3)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.yaml").write_text(
        "task: canaries\nsuite: extraction\ndata: c.jsonl\noptions:\n  prefix_tokens: 8\n  suffix_tokens: 8\n"
        "  exposure: {prefix_field: prefix, secret_field: secret, alphabet: ['0','1','2','3','4','5','6','7','8','9'],"
        " separator: ' ', n_alternatives: 50}\n")
    res = run_task(load_task_file(tmp_path / "c.yaml"), tiny_backend)
    assert "exposure" in res.metrics and "exposure_stderr" in res.metrics
    for r in res.rows:
        assert 0 <= r["exposure"] <= np.log2(10 ** 4)


# ------------------------------------------------------------------ bad input
def _bad(capsys, args, *needles):
    cli_error(capsys, args, *needles)


def _task_dir(tmp_path, yaml_text, rows=None, name="t"):
    d = tmp_path / "mytasks"
    d.mkdir(exist_ok=True)
    (d / f"{name}.yaml").write_text(yaml_text)
    if rows is not None:
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_unknown_task_suggests(capsys, llama_dir):
    _bad(capsys, ["eval", "--model", llama_dir, "--tasks", "capitols"], "unknown task 'capitols'", "capitals")


def test_yaml_error_names_file_and_line(capsys, tmp_path, llama_dir):
    d = _task_dir(tmp_path, "task: broken\nsuite: recall\ndata: t.jsonl\ndoc_to_text: [unclosed\n", [])
    _bad(capsys, ["eval", "--model", llama_dir, "--tasks", str(d / "t.yaml")], "YAML error", "t.yaml", "line")


def test_row_missing_field_names_file_and_row(capsys, tmp_path, llama_dir):
    rows = [{"q": "a", "a": "b"}, {"q": "c"}, {"q": "d", "a": "e"}]
    d = _task_dir(tmp_path, "task: t\nsuite: recall\ndata: t.jsonl\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n", rows)
    _bad(capsys, ["eval", "--model", llama_dir, "--tasks", "t", "--include_path", d], "t.jsonl row 2", "'a'")


def test_template_field_that_does_not_exist(capsys, tmp_path, llama_dir):
    rows = [{"q": "a", "a": "b"}]
    d = _task_dir(tmp_path, "task: t\nsuite: recall\ndata: t.jsonl\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{a}}'\n",
                  rows)
    _bad(capsys, ["eval", "--model", llama_dir, "--tasks", "t", "--include_path", d], "'question' does not exist",
         "fields: a, q")


def test_empty_after_filter(capsys, tmp_path, llama_dir):
    rows = [{"q": "a", "a": "b", "kind": "x"}]
    d = _task_dir(tmp_path, "task: t\nsuite: recall\ndata: t.jsonl\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
                            "filter: {kind: [y]}\n", rows)
    _bad(capsys, ["eval", "--model", llama_dir, "--tasks", "t", "--include_path", d], "empty after filtering")


def test_limit_and_num_fewshot(capsys, llama_dir):
    _bad(capsys, ["eval", "--model", llama_dir, "--tasks", "capitals", "--limit", "0"], "limit=0")
    _bad(capsys, ["eval", "--model", llama_dir, "--tasks", "state_capitals", "--num_fewshot", "60"],
         "--num_fewshot 60", "shot pool")


def test_no_model_loaded_before_task_errors(capsys, tmp_path):
    # the model's config.json is garbage, but the unknown task is reported first (no load attempted)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("not json")
    _bad(capsys, ["eval", "--model", str(tmp_path / "m"), "--tasks", "nope_task"], "unknown task")


def test_tasks_dir_ships_in_wheel(tmp_path):
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(root)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (whl,) = tmp_path.glob("llmmem-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "llmmem/_tasks/recall/capitals.yaml" in names
    assert "llmmem/_tasks/recall/capitals.jsonl" in names
    assert "llmmem/_tasks/extraction/famous_passages.jsonl" in names


def test_config_error_for_bad_suite(tmp_path):
    from llmmem.tasks import load_task_file

    p = tmp_path / "x.yaml"
    p.write_text("task: x\nsuite: poetry\ndata: x.jsonl\n")
    with pytest.raises(ConfigError, match="x.yaml: unknown suite 'poetry'.*choose from: .*mia.*recall"):
        load_task_file(p)


def test_suite_registered_later_is_accepted(tmp_path):
    """Tasks validate their suite against the registry, so a suite registered by other code just works."""
    from llmmem.suites import SUITES, Suite
    from llmmem.tasks import load_task_file

    class Poetry(Suite):
        name = "poetry"

    SUITES.register("poetry", Poetry, "a suite registered after import")
    try:
        p = tmp_path / "x.yaml"
        p.write_text("task: x\nsuite: poetry\ndata: x.jsonl\n")
        assert load_task_file(p).suite == "poetry"
    finally:
        SUITES._entries.pop("poetry")


def test_ls_tasks_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from llmmem.cli import main; rc = main(['ls', 'tasks']); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().endswith("NO-TORCH 0"), proc.stdout[-500:] + proc.stderr[-2000:]
    assert "capitals" in proc.stdout and "(invalid:" not in proc.stdout


def test_truncated_generation_prompts_are_counted(tmp_path, tiny_backend, caplog):
    """A prompt longer than the model is left-truncated (as lm-eval): flagged per row, counted, warned once."""
    import logging

    from llmmem.suites import run_task
    from llmmem.tasks import load_task_file

    rows = [{"q": ("word " * (400 if i % 2 else 3)) + f"number {i}", "a": "x"} for i in range(6)]
    d = _task_dir(tmp_path, "task: t\nsuite: recall\ndata: t.jsonl\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
                            "generation_kwargs: {max_gen_toks: 4}\n", rows)
    with caplog.at_level(logging.WARNING, logger="llmmem.suites"):
        res = run_task(load_task_file(d / "t.yaml"), tiny_backend)
    assert res.n_truncated == 3
    assert [r["truncated"] for r in res.rows] == [False, True] * 3
    warnings = [r for r in caplog.records if "longer than the model" in r.getMessage()]
    assert len(warnings) == 1 and "3 of 6" in warnings[0].getMessage()


def test_mia_reference_model(tmp_path, tiny_testbed, capsys):
    """The reference-ratio score: with the model as its own reference every score is 0, so AUC is 0.5."""
    rc = run_cli(["eval", "--model", tiny_testbed, "--tasks", "testbed_mia", "--mia_reference", tiny_testbed,
                  "--output_path", tmp_path, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(next(tmp_path.rglob("results.json")).read_text())["metrics"]["testbed_mia"]
    assert res["ref_auc"] == pytest.approx(0.5)
    assert res["loss_auc"] > 0.5
