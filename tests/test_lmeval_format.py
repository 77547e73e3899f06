"""llmmem cells in lm-eval's results shape, read back by lm-eval's own code (table maker, evaluation tracker,
W&B logger's result and sample readers, datasets on the samples jsonl)."""

import copy
import json
import math
from pathlib import Path

import pytest

from llmmem.lmeval_format import (
    date_id,
    dumps_record,
    llmmem_section,
    metric_names,
    results_filename,
    sample_records,
    samples_filename,
    task_hash,
    to_lm_eval,
    write_samples,
)

pytest.importorskip("lm_eval")

MIA_ROWS = [{"text": t, "label": i % 2} for i, t in enumerate([
    "The capital of France is Paris.", "Alice was born in Lyon and works for Acme.", "Bob was born in Kyoto.",
    "In the beginning God created the heaven and the earth.", "key1 = 17 ; key2 = 42 ; key3 = 99 .",
    "Four score and seven years ago our fathers brought forth.", "0 1 2 3 4 5 6 7 8 9", "The capital of Japan is Tokyo."])]


@pytest.fixture(scope="module")
def cell(tmp_path_factory, llama_dir):
    """A real llmmem cell (recall with buckets, extraction, membership inference) on the tiny model."""
    from llmmem.cells import Cell, EvalSpec
    from llmmem.config import ModelSpec
    from llmmem.runner import Session, run_cell
    from llmmem.tasks import get_task, load_task_file

    d = tmp_path_factory.mktemp("fmt")
    with open(d / "mia.jsonl", "w") as f:
        for r in MIA_ROWS:
            f.write(json.dumps(r) + "\n")
    (d / "tiny_mia.yaml").write_text("task: tiny_mia\nsuite: mia\ndata: mia.jsonl\nmetadata: {version: 2}\n")
    spec = ModelSpec(name=str(llama_dir), device="cpu")
    tasks = {"capitals": get_task("capitals"), "famous_passages": get_task("famous_passages"),
             "tiny_mia": load_task_file(d / "tiny_mia.yaml")}
    limits = {"capitals": 6, "famous_passages": 3, "tiny_mia": None}
    cell = Cell(spec, (), EvalSpec(tasks=list(tasks), limit=limits), 0)
    session = Session(spec, batch_size=4, include_path=str(d), keep_dense=False)
    out = run_cell(session, cell, run_dir=d / "run", tasks=list(tasks.values()))
    payload = json.loads((Path(out["_path"]) / "results.json").read_text())
    docs = {n: tasks[n].docs(limit=limits[n]) for n in tasks}
    return {"payload": payload, "results": {r.task: r for r in out["_results"]}, "tasks": tasks, "docs": docs,
            "dir": d}


def _records(cell):
    out = {}
    for name, r in cell["results"].items():
        out[name] = sample_records(r.rows, suite=r.suite, metrics=metric_names(r.metrics), task=cell["tasks"][name],
                                   docs=cell["docs"][name])
    return out


def _table_rows(md: str) -> list[list[str]]:
    lines = [line for line in md.strip().splitlines()[2:]]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]


def test_lm_evals_table_maker_prints_our_numbers(cell, tmp_path):
    from lm_eval.utils import get_latest_filename, get_results_filenames, make_table

    payload = cell["payload"]
    view = to_lm_eval(payload, tasks=cell["tasks"], samples=_records(cell))
    path = tmp_path / results_filename(date_id(view["date"]))
    path.write_text(json.dumps(view, indent=2))
    files = [str(p) for p in tmp_path.iterdir()]
    assert get_latest_filename(get_results_filenames(files)) == str(path)  # lm-eval's file discovery finds it
    doc = json.loads(path.read_text())
    rows = _table_rows(make_table(doc))
    seen, version = {}, {}
    task = None
    for r in rows:  # Tasks | Version | Filter | n-shot | Metric | dir | Value | ± | Stderr (task, version: first row)
        if r[0]:
            task, version[r[0]] = r[0], r[1]
        seen[(task, r[4])] = r
    expected = 0
    for t, metrics in payload["metrics"].items():
        for m in metric_names(metrics):
            expected += 1
            r = seen[(t, m)]
            assert r[2] == "none" and version[t] == str(payload["tasks"][t]["version"])
            assert abs(float(r[6]) - metrics[m]) <= 5e-5, (t, m, r)  # printed with 4 decimals
            se = metrics[f"{m}_stderr"]
            if isinstance(se, float) and math.isfinite(se):
                assert r[7] == "±" and abs(float(r[8]) - se) <= 5e-5, (t, m, r)
            else:
                assert r[8] == "N/A", (t, m, r)
    assert len(rows) == expected and expected >= 12
    assert seen[("capitals", "exact_match")][3] == "3"  # n-shot
    assert seen[("capitals", "exact_match")][5] == "↑" and seen[("famous_passages", "suffix_nll")][5] == "↓"
    assert "buckets" not in json.dumps(doc["results"])


def test_wandb_loggers_readers_get_our_numbers(cell):
    from lm_eval.loggers.wandb_logger import WandbLogger

    payload = cell["payload"]
    records = _records(cell)
    view = to_lm_eval(payload, tasks=cell["tasks"], samples=records)
    logger = WandbLogger.__new__(WandbLogger)  # the readers need no W&B run
    logger.post_init(json.loads(json.dumps(view)))
    summary, flat = logger._sanitize_results_dict()
    for t, metrics in payload["metrics"].items():
        for m in metric_names(metrics):
            assert flat[f"{t}/{m}"] == metrics[m]
    assert summary["capitals/alias"] == "capitals"
    configs = logger._get_config()["task_configs"]
    for t, recs in records.items():
        df = logger._generate_dataset(copy.deepcopy(recs), configs[t])
        assert len(df) == len(cell["results"][t].rows)
        for m in metric_names(payload["metrics"][t]):
            if t != "tiny_mia":
                assert list(df[m]) == [row[m] for row in cell["results"][t].rows]
    recall = logger._generate_dataset(records["capitals"], configs["capitals"])
    assert list(recall["raw_predictions"]) == [row["response"] for row in cell["results"]["capitals"].rows]
    assert list(recall["data"]) == [row["prompt"] for row in cell["results"]["capitals"].rows]


def test_samples_jsonl_is_what_lm_evals_tracker_writes(cell, tmp_path):
    from lm_eval.loggers import EvaluationTracker

    records = _records(cell)
    view = to_lm_eval(cell["payload"], tasks=cell["tasks"], samples=records)
    tracker = EvaluationTracker(output_path=str(tmp_path / "lm_eval"))
    tracker.general_config_tracker.log_experiment_args(model_source=view["model_source"],
                                                       model_args=view["config"]["model_args"],
                                                       system_instruction=None, chat_template=None,
                                                       fewshot_as_multiturn=None)
    tracker.save_results_aggregated(results=copy.deepcopy(view), samples=copy.deepcopy(records))
    stamp = tracker.date_id
    out = tmp_path / "lm_eval" / view["model_name_sanitized"]
    written = json.loads((out / results_filename(stamp)).read_text())
    assert written["task_hashes"] == view["task_hashes"] and len(view["task_hashes"]) == 3
    assert written["model_name"] == view["model_name"] and written["results"] == view["results"]
    for task, recs in records.items():
        tracker.save_results_samples(task_name=task, samples=copy.deepcopy(recs))
        theirs = (out / samples_filename(task, stamp)).read_text()
        ours = write_samples(tmp_path / "ours" / samples_filename(task, stamp), recs).read_text()
        assert ours == theirs
        assert task_hash(recs) == view["task_hashes"][task]
    first = json.loads(dumps_record(records["capitals"][0]))
    assert set(first["arguments"]["gen_args_0"]) == {"arg_0", "arg_1"}
    assert first["arguments"]["gen_args_0"]["arg_1"]["until"] == ["\n"]
    assert first["doc"]["country"] and first["filter"] == "none" and first["metrics"] == ["exact_match", "f1"]
    passage = records["famous_passages"][0]  # extraction skips short passages: docs are matched by id
    assert passage["llmmem"]["id"] == cell["results"]["famous_passages"].rows[0]["id"] and passage["doc"]["text"]


def test_datasets_loads_our_samples(cell, tmp_path):
    datasets = pytest.importorskip("datasets")
    records = _records(cell)
    for task, recs in records.items():
        path = write_samples(tmp_path / samples_filename(task, "2026-01-01T00-00-00"), recs)
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
        assert len(ds) == len(recs)
        assert ds[0]["prompt_hash"] == recs[0]["prompt_hash"] and ds[0]["doc_id"] == 0


def test_mia_samples_carry_their_aggregation_items(cell):
    from llmmem.metrics import roc_auc

    recs = _records(cell)["tiny_mia"]
    payload = cell["payload"]["metrics"]["tiny_mia"]
    assert recs[0]["metrics"] == metric_names(payload) and "loss_auc" in recs[0]["metrics"]
    items = [r["loss_auc"] for r in recs]
    members = [s for s, label in items if label == 1]
    non = [s for s, label in items if label == 0]
    assert math.isclose(roc_auc(members, non), payload["loss_auc"])
    assert recs[0]["arguments"] == [("", MIA_ROWS[0]["text"])]
    assert math.isclose(float(recs[0]["resps"][0][0][0]), -cell["results"]["tiny_mia"].rows[0]["loss"]
                        * cell["results"]["tiny_mia"].rows[0]["n_tokens"])


def test_layout_keys_and_merge(cell):
    from lm_eval.utils import make_table

    payload = cell["payload"]
    view = to_lm_eval(payload, tasks=cell["tasks"])
    for key in ("results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
                "config", "git_hash", "date", "model_source", "model_name", "model_name_sanitized", "chat_template",
                "chat_template_sha", "system_instruction", "fewshot_as_multiturn", "task_hashes"):
        assert key in view, key
    assert "groups" not in view  # lm-eval writes it only when a group aggregates
    assert view["n-samples"]["capitals"] == {"original": len(cell["tasks"]["capitals"].docs()), "effective": 6}
    assert view["config"]["model"] == "llmmem" and view["config"]["model_args"]["dtype"] == "float32"
    assert view["config"]["random_seed"] == 0
    assert view["config"]["limit"] == {"capitals": 6, "famous_passages": 3, "tiny_mia": None}  # per task
    assert view["configs"]["capitals"]["output_type"] == "generate_until"
    assert view["configs"]["capitals"]["dataset_path"] == "json"
    assert view["configs"]["tiny_mia"]["metric_list"][0]["aggregation"] == "roc_auc"
    assert view["configs"]["famous_passages"]["metadata"]["llmmem"]["suite"] == "extraction"
    assert abs(view["date"] - (json.loads(json.dumps(view))["date"])) < 1e-6 and view["date"] > 1.7e9

    doc = payload  # the written results.json: lm-eval's keys at the top, llmmem's sections beside them
    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config", "model_name"):
        assert doc[key] == json.loads(json.dumps(view[key])), key
    assert set(doc["task_hashes"]) == set(cell["tasks"])  # the writer hashed the samples it built
    assert doc["schema_version"] == 2 and doc["environment"]["llmmem"] and doc["cell_config"]["layout"] == 2
    assert llmmem_section(doc, "results") == doc["metrics"] and llmmem_section(doc, "config") == doc["cell_config"]
    assert llmmem_section(view, "results") is None
    assert to_lm_eval(doc, tasks=cell["tasks"])["results"] == view["results"]  # the converter reads the merged file
    assert make_table(doc) == make_table(json.loads(json.dumps(view)))


def test_lm_eval_metric_filters_map_back():
    payload = {
        "config": {"model": "m", "model_args": {"dtype": "float32"}, "seed": 1, "limit": {"a": 5, "b": 5}},
        "model": {"name": "m", "fingerprint": "fp"},
        "results": {
            "lm_eval:gsm": {"exact_match@strict-match": 0.5, "exact_match@strict-match_stderr": 0.1,
                            "exact_match@flexible-extract": 0.6, "exact_match@flexible-extract_stderr": None,
                            "acc": 0.25, "acc_stderr": 0.05},
            "mia": {"loss_tpr@1%fpr": 0.3, "loss_tpr@1%fpr_stderr": 0.02, "n_members": 4, "loss_auc": 0.7,
                    "loss_auc_stderr": 0.04},
        },
        "n_samples": {"lm_eval:gsm": 5, "mia": 8},
        "tasks": {"lm_eval:gsm": {"version": 3, "suite": "lm_eval", "num_fewshot": 5},
                  "mia": {"version": 1, "suite": "mia", "num_fewshot": 0}},
        "timings": {"finished_at": "2026-01-02T03:04:05+0000", "total_seconds": 5.0, "eval_seconds": 4.0},
    }
    view = to_lm_eval(payload)
    gsm = view["results"]["gsm"]
    assert gsm["exact_match,strict-match"] == 0.5 and gsm["exact_match_stderr,strict-match"] == 0.1
    assert gsm["exact_match,flexible-extract"] == 0.6 and gsm["exact_match_stderr,flexible-extract"] == "N/A"
    assert gsm["acc,none"] == 0.25 and gsm["alias"] == "gsm"
    mia = view["results"]["mia"]
    assert mia["loss_tpr@1%fpr,none"] == 0.3 and "n_members,none" not in mia
    assert view["higher_is_better"]["mia"] == {"loss_tpr@1%fpr": True, "loss_auc": True}
    assert view["n-shot"]["gsm"] == 5 and view["versions"]["gsm"] == 3 and view["config"]["limit"] == 5
    assert view["date"] == 1767323040.0 and view["total_evaluation_time_seconds"] == "4.0"


def test_pruning_cell_config_becomes_plugin_model_args():
    """config.model_args re-runs the cell with lm-eval's CLI: --model llmmem --model_args <those>."""
    from llmmem.cells import Cell, EvalSpec
    from llmmem.config import ModelSpec
    from llmmem.interventions import Step
    from llmmem.lm_eval_plugin import parse_interventions
    from llmmem.pruning.spec import PruneSpec

    spec = PruneSpec(method="wanda", sparsity=0.5, structure="2:4", calibration="self", nsamples=16, seqlen=32)
    cell = Cell(ModelSpec(name="smollm2-135m", dtype="bfloat16", device="cuda"), (Step("prune", spec),),
                EvalSpec(tasks=["capitals"]), 3)
    payload = {"cell_config": cell.config(), "model": {"name": "smollm2-135m", "fingerprint": "fp"},
               "run": {"batch_size": 16, "device": "cuda:0"},
               "pruning": {"method": "wanda", "structure": "2:4", "target_sparsity": 0.5,
                           "calibration": {"source": "self", "nsamples": 16, "seqlen": 32, "seed": 3}},
               "metrics": {"capitals": {"exact_match": 0.1, "exact_match_stderr": 0.01}}, "n_samples": {"capitals": 10}}
    view = to_lm_eval(payload)
    args = view["config"]["model_args"]
    assert args == {"pretrained": "smollm2-135m", "dtype": "bfloat16", "prune": "wanda:0.5:2:4",
                    "calibration": "self", "nsamples": 16, "seqlen": 32, "prune_seed": 3}
    assert view["config"]["device"] == "cuda:0" and view["config"]["batch_size"] == 16
    (step,) = parse_interventions(args)
    assert step.kind == "prune" and step.spec == spec


@pytest.fixture
def only_included_lm_eval_tasks(monkeypatch):
    """Skip lm-eval's index of its ~15k built-in tasks (minutes here); only --include_path tasks are used."""
    from lm_eval.tasks.manager import TaskManager

    orig = TaskManager.__init__

    def init(self, verbosity=None, include_path=None, include_defaults=True, metadata=None):
        orig(self, verbosity, include_path, include_defaults and not include_path, metadata)

    monkeypatch.setattr(TaskManager, "__init__", init)


def test_lm_eval_task_round_trip_matches_lm_evals_own_results(tmp_path, llama_dir, only_included_lm_eval_tasks):
    """lm_eval:<task> through llmmem (metric@filter keys) -> converter -> the numbers lm-eval itself returns."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from llmmem.backends.hf import HFBackend
    from llmmem.config import ModelSpec
    from llmmem.lmeval import _task_manager, resolve_lm_eval, run_lm_eval
    from llmmem.models import load_model

    d = tmp_path / "t"
    d.mkdir()
    with open(d / "mc.jsonl", "w") as f:
        for r in MIA_ROWS:
            f.write(json.dumps({"q": r["text"][:12], "choices": [r["text"][12:], "banana", "0 1 2"], "label": 0}) + "\n")
    (d / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {d / 'mc.jsonl'}}}}}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\nmetadata: {version: 1.0}\n")
    lm = load_model(ModelSpec(name=str(llama_dir), device="cpu"))
    backend = HFBackend(lm, batch_size=4)
    res = run_lm_eval(resolve_lm_eval("lm_eval:tiny_mc", str(d)), backend, seed=0)
    payload = {"config": {"model": "m", "seed": 0}, "model": {"name": "m"},
               "results": {r.task: r.metrics for r in res}, "n_samples": {r.task: r.n_samples for r in res},
               "tasks": {r.task: {"version": r.version, "suite": r.suite, "num_fewshot": r.num_fewshot} for r in res}}
    ours = to_lm_eval(json.loads(json.dumps(payload)))
    theirs = simple_evaluate(model=HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=4,
                                        max_length=backend.max_length),
                             tasks=["tiny_mc"], task_manager=_task_manager(str(d)), bootstrap_iters=1000,
                             random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    t, o = theirs["results"]["tiny_mc"], ours["results"]["tiny_mc"]
    assert set(t) == set(o)
    for k, v in t.items():
        assert o[k] == pytest.approx(v) if isinstance(v, float) else o[k] == v, k
    assert ours["versions"]["tiny_mc"] == theirs["versions"]["tiny_mc"]
    assert ours["n-samples"]["tiny_mc"]["effective"] == theirs["n-samples"]["tiny_mc"]["effective"]
    real_only = set(theirs) - set(ours)
    assert real_only <= {"pretty_env_info", "tokenizer_pad_token", "tokenizer_eos_token", "tokenizer_bos_token",
                         "eot_token_id", "max_length", "samples"}, real_only
