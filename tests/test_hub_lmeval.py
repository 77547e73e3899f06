"""Hub tasks that share a name with an lm-eval task give lm-eval's prompts and scores (issue 14, item 11).

lm-eval's own Task is built from its installed YAML (``lm_eval/tasks/triviaqa/default.yaml``,
``lm_eval/tasks/nq_open/nq_open.yaml``) over small local files in the upstream dataset schema, and
compared doc by doc with llmmem's task of the same name: few-shot prompts (``fewshot_context`` after
``set_fewshot_seed``), generation settings (``construct_requests`` arguments; ``HFLM.max_gen_toks``, its
default) and per-doc scores (its filter ensemble, then ``process_results``) on the same responses.
"""

import json
from pathlib import Path

import pytest

from llmmem.backends.base import GenerateResult
from llmmem.suites import Responses
from llmmem.suites.recall import RecallSuite
from llmmem.tasks import fewshot_seed, get_task

lm_eval = pytest.importorskip("lm_eval")

CITIES = ["Paris", "Tokyo", "Lyon", "Kyoto", "Rome", "Cairo", "Lima", "Oslo", "Bern", "Quito", "Dakar", "Hanoi"]


def triviaqa_row(i: int, split: str) -> dict:
    """mandarjoshi/trivia_qa rc.nocontext schema."""
    city = CITIES[i % len(CITIES)]
    return {"question": f"Which city is number {i} in the {split} list",
            "question_id": f"{split}_{i}", "question_source": "http://www.triviacountry.com/",
            "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
            "search_results": {"description": [], "filename": [], "rank": [], "title": [], "url": [],
                               "search_context": []},
            "answer": {"aliases": [city, f"{city} City", f"The {city}!"], "normalized_aliases": [city.lower()],
                       "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": "",
                       "normalized_value": city.lower(), "type": "WikipediaEntity", "value": city}}


def nq_row(i: int, split: str) -> dict:
    """google-research-datasets/nq_open schema."""
    city = CITIES[i % len(CITIES)]
    return {"question": f"where is landmark {i} of the {split} set", "answer": [f"the {city}", city]}


# responses as a model might give them; each case is scored by lm-eval and by llmmem
RESPONSES = [" Paris", " paris.", " The Tokyo", "Lyon City", "  kyoto  ", " Rome, Italy", "Cairo!", " London",
             " Oslo Norway", "bern", " the quito", "Dakar "]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lm_eval_task(name: str, files: dict):
    import yaml
    from lm_eval.api.task import ConfigurableTask

    sub = {"triviaqa": "triviaqa/default.yaml", "nq_open": "nq_open/nq_open.yaml"}[name]
    cfg = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / sub).read_text())
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {k: str(v) for k, v in files.items()}})
    return ConfigurableTask(config=cfg)


@pytest.mark.parametrize("name,shots", [("triviaqa", 0), ("triviaqa", 5), ("nq_open", 0), ("nq_open", 5)])
def test_hub_task_prompts_settings_and_scores_equal_lm_eval(name, shots, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    make = triviaqa_row if name == "triviaqa" else nq_row
    files = {"train": _write(tmp_path / "train.jsonl", [make(i, "train") for i in range(10)]),
             "validation": _write(tmp_path / "validation.jsonl", [make(i, "validation") for i in range(len(RESPONSES))])}
    theirs = lm_eval_task(name, files)
    theirs.set_fewshot_seed(fewshot_seed(0))
    their_docs = list(theirs.eval_docs)
    their_prompts = [theirs.fewshot_context(d, num_fewshot=shots) for d in their_docs]

    ours = get_task(name).with_data(files["validation"], fewshot_data=files["train"])
    docs = ours.docs()
    suite = RecallSuite()
    req = suite.build(ours, docs, None, shots, seed=0)
    assert [r.context for r in req.generate] == their_prompts
    if shots:
        assert their_prompts[0].count("\n") > 5  # shots really there

    insts = [theirs.construct_requests(doc=d, ctx=p, metadata=(name, i, 1))
             for i, (d, p) in enumerate(zip(their_docs, their_prompts))]
    gen = insts[0].arguments[1]
    from lm_eval.models.huggingface import HFLM

    assert req.generate[0].until == gen["until"]
    assert req.generate[0].max_gen_toks == gen.get("max_gen_toks", HFLM.max_gen_toks.fget(None))  # HFLM: 256
    assert req.generate[0].do_sample is False and gen["do_sample"] is False

    for inst, text in zip(insts, RESPONSES):
        inst.resps = [text]
    for f in theirs._filters:
        f.apply(insts)
    (fname,) = [f.name for f in theirs._filters]
    their_em = [theirs.process_results(d, [inst.filtered_resps[fname]])["exact_match"]
                for d, inst in zip(their_docs, insts)]
    rows = suite.score(ours, docs, req, Responses(generate=[GenerateResult(t, []) for t in RESPONSES]), None)
    assert [r["exact_match"] for r in rows] == their_em
    assert [r["prediction"] for r in rows] == [inst.filtered_resps[fname] for inst in insts]
    assert 0 < sum(their_em) < len(their_em)  # the cases split both ways
    assert suite.metrics(ours) == [m["metric"] for m in theirs.config.metric_list]
