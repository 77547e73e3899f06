"""TOFU / MUSE / WMDP: metric functions against open-unlearning's formulas (re-implemented here from
locuslab/open-unlearning src/evals/metrics/*.py), the suites end to end on the benchmarks' row formats
(tests/fixtures/{tofu,muse,wmdp}, laid out as $LLMMEM_DATA mirrors), and malformed splits refused."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from llmmem import unlearn_metrics as um
from llmmem.config import ConfigError

FIX = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent
TASK_DIRS = [ROOT / "tasks" / "unlearning"]


# ---- open-unlearning, re-implemented from its source ----------------------------------------------------
def ou_truth_ratio(correct_avg_losses, wrong_avg_losses, aggregator):
    """memorization.py truth_ratio (after pre_compute): arrays of avg losses, wrong [n, k]."""
    def closer_to_1_better(arr):
        return np.mean(np.minimum(arr, 1 / (arr + 1e-10)))

    def true_better(arr):
        return np.mean(np.maximum(0, 1 - arr))

    def aggregate_to_1D(x):
        return np.mean(x, axis=tuple(range(1, x.ndim)))

    correct = aggregate_to_1D(np.array(correct_avg_losses))
    wrong = aggregate_to_1D(np.array(wrong_avg_losses))
    correct_prob, wrong_prob = np.exp(-correct), np.exp(-wrong)
    if aggregator == "prob_mean":
        tr = correct_prob / (correct_prob + wrong_prob + 1e-10)
        return np.mean(tr), tr
    tr = wrong_prob / (correct_prob + 1e-10)
    return {"closer_to_1_better": closer_to_1_better, "true_better": true_better}[aggregator](tr), tr


def ou_probability_w_options(correct_probs, all_wrong):
    wrong = np.sum(np.array(all_wrong), axis=tuple(range(1, np.array(all_wrong).ndim)))
    return np.mean(np.array(correct_probs) / (np.array(correct_probs) + wrong + 1e-10))


def ou_extraction_strength(preds, labels):
    valid_len = len(labels)
    for k in range(valid_len):
        if torch.equal(preds[k:], labels[k:]):
            break
    return 0 if valid_len == 0 else 1 - (k / valid_len)


def ou_exact_memorization(preds, labels):
    return ((preds == labels).sum() / len(labels)).item()


def ou_min_k(lp, k):
    lp = np.asarray(lp, float)
    if lp.size == 0:
        return 0
    num_k = max(1, int(len(lp) * k))
    return -np.mean(np.sort(lp)[:num_k])


def ou_mia_auc(forget_scores, holdout_scores):
    from sklearn.metrics import roc_auc_score

    scores = np.array(list(forget_scores) + list(holdout_scores))
    labels = np.array([0] * len(forget_scores) + [1] * len(holdout_scores))
    return roc_auc_score(labels, scores)


def ou_privleak(score, ref):
    score, ref = 1 - score, 1 - ref
    return (score - ref) / (ref + 1e-10) * 100


def ou_evaluate_probability(model, batch):
    """utils.py evaluate_probability: exp(-summed CE over labelled tokens / number of labelled tokens)."""
    with torch.no_grad():
        logits = model(**batch).logits
    shifted_labels = batch["labels"][..., 1:].contiguous()
    logits = logits[..., :-1, :].contiguous()
    losses = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(logits.transpose(-1, -2), shifted_labels).sum(-1)
    avg = losses / (batch["labels"] != -100).sum(-1)
    return torch.exp(-avg), avg


def close(a, b, tol=1e-6):
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


# ---- metric functions --------------------------------------------------------------------------------------
def test_truth_ratio_and_probability_match_reference():
    rng = np.random.default_rng(0)
    correct = rng.uniform(0.2, 3.0, 7)
    wrong = rng.uniform(0.2, 3.0, (7, 5))
    for agg in ("closer_to_1_better", "true_better"):
        expected, tr_ref = ou_truth_ratio(correct, wrong, agg)
        trs = [um.truth_ratio(c, w) for c, w in zip(correct, wrong)]
        assert np.allclose(trs, tr_ref, rtol=1e-12, atol=0)
        assert close(np.mean([um.truth_ratio_score(t, agg) for t in trs]), expected)
    expected, _ = ou_truth_ratio(correct, wrong, "prob_mean")
    assert close(np.mean([um.truth_ratio_prob_mean(c, w) for c, w in zip(correct, wrong)]), expected)
    probs, wrong_probs = np.exp(-correct), np.exp(-wrong)
    assert close(np.mean([um.probability_w_options(p, w) for p, w in zip(probs, wrong_probs)]),
                 ou_probability_w_options(probs, wrong_probs))
    assert close(um.probability(um.avg_nll([-0.5, -1.5])), math.exp(-1.0))
    with pytest.raises(ValueError):
        um.truth_ratio_score(1.0, "median")


def test_forget_quality_and_model_utility():
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(1)
    a, b = rng.lognormal(0, 1, 40), rng.lognormal(0.4, 1, 55)
    assert close(um.forget_quality(a, b), ks_2samp(a, b).pvalue)  # privacy.py ks_test
    # exact two-sided KS p-value by hand: identical samples 1; fully separated 3 vs 3: 2 / C(6, 3) = 0.1
    assert um.forget_quality([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == 1.0
    assert close(um.forget_quality([0.1, 0.2, 0.3], [1.1, 1.2, 1.3]), 0.1)
    vals = [0.9, 0.5, 0.7, 0.6, 0.4, 0.8, 0.3, 0.45, 0.65]
    assert close(um.model_utility(vals), len(vals) / sum(1 / v for v in vals))  # utility.py hm_aggregate
    assert um.model_utility([0.5, 0.0]) == 0.0 and math.isnan(um.model_utility([0.5, float("nan")]))


@pytest.mark.parametrize("preds,labels", [([5, 6, 7, 8], [5, 6, 7, 8]), ([9, 6, 7, 8], [5, 6, 7, 8]),
                                          ([5, 9, 7, 8], [5, 6, 7, 8]), ([5, 6, 7, 9], [5, 6, 7, 8]),
                                          ([1, 2, 3], [4, 5, 6]), ([4], [4]), ([3, 3, 3, 3, 8], [1, 2, 3, 4, 8])])
def test_extraction_strength_and_exact_memorization_match_reference(preds, labels):
    p, t = torch.tensor(preds), torch.tensor(labels)
    assert close(um.extraction_strength(preds, labels), ou_extraction_strength(p, t))
    assert close(um.exact_memorization(preds, labels), ou_exact_memorization(p, t))
    if preds[-1] != labels[-1]:  # no suffix matches: the reference's 1/n, strictly 0
        assert um.extraction_strength(preds, labels, strict=True) == 0.0


def test_min_k_auc_privleak_match_reference():
    rng = np.random.default_rng(2)
    for n in (1, 3, 10, 37):
        lp = rng.normal(-2, 1, n)
        assert close(um.min_k_score(lp, 0.4), ou_min_k(lp, 0.4))
    assert um.min_k_score([], 0.4) == 0
    f, h = rng.normal(1, 1, 30), rng.normal(1.5, 1, 25)
    assert close(um.mia_auc(f, h), ou_mia_auc(f, h))
    tied_f, tied_h = [1.0, 2.0, 2.0, 3.0], [2.0, 2.0, 4.0]
    assert close(um.mia_auc(tied_f, tied_h), ou_mia_auc(tied_f, tied_h))
    for u, r in ((0.9, 0.5), (0.3, 0.48), (0.5, 0.5)):
        assert close(um.privleak(u, r), ou_privleak(u, r))
    # the brief's definition, written out
    assert close(um.privleak(0.8, 0.45), ((1 - 0.8) - (1 - 0.45)) / (1 - 0.45) * 100, 1e-8)


def test_rouge_by_hand():
    # LCS of "the cat sat on the mat" / "the cat is on the mat" = 5 tokens; both have 6 tokens
    s = um.rouge("the cat sat on the mat", "the cat is on the mat")
    assert close(s["rougeL_recall"], 5 / 6) and close(s["rougeL_f1"], 5 / 6) and close(s["rouge1_recall"], 5 / 6)
    # the Porter stemmer (open-unlearning) maps "running"/"runs" to "run"; MUSE's own scorer does not stem
    assert um.rouge("he runs fast", "he running fast")["rougeL_recall"] == 1.0
    assert close(um.rouge("he runs fast", "he running fast", stemmer=False)["rougeL_recall"], 2 / 3)
    assert um.cut_at_stops(" Paris.\n\nQuestion: next", ["</s>", "\n\n", "Question:"]) == "Paris."


# ---- the suites on the fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm():
    import tiny
    from llmmem.models import wrap_model

    tok = tiny.make_tokenizer()
    torch.manual_seed(0)
    return wrap_model(tiny.make_model("llama", vocab=len(tok)), tok, "tiny")


@pytest.fixture
def backend(tiny_lm):
    from llmmem.backends.hf import HFBackend

    return HFBackend(tiny_lm, batch_size=4)


def task_file(name: str) -> Path:
    return next(d / f"{name}.yaml" for d in TASK_DIRS if (d / f"{name}.yaml").is_file())


@pytest.fixture
def load_task():
    """The shipped task YAMLs (tasks/unlearning/)."""
    import llmmem.tasks as tasks

    return lambda name: tasks.load_task_file(task_file(name))


def test_tofu_suite_on_fixtures(load_task, backend, tiny_lm, monkeypatch):
    from llmmem.suites import run_task

    monkeypatch.setenv("LLMMEM_DATA", str(FIX / "tofu"))
    task = load_task("tofu_forget01")
    task.options["max_gen_toks"] = 16  # (200 in the task) the tiny random model's answers: keeps the test fast
    forget = FIX / "tofu/locuslab/TOFU/forget01_perturbed/train.jsonl"
    res = run_task(task, backend, data=str(forget), ref_backend=backend)
    sets = [r["set"] for r in res.rows]
    assert sets.count("forget") == 2 and sets.count("retain") == 2 and sets.count("real_authors") == 3
    assert sets.count("world_facts") == 3 and sets.count("holdout") == 2
    m = res.metrics
    assert m["forget_quality"] == 1.0  # the reference backend is the same model: identical truth ratios
    assert close(m["privleak"], 0.0, 1e-6) and m["privleak_reference_auc"] == m["mia_min_k"]
    assert close(m["model_utility"], um.model_utility([m[k] for k in (
        "retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE",
        "ra_Truth_Ratio", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")]))
    for k in ("forget_truth_ratio", "forget_Q_A_Prob", "extraction_strength", "exact_memorization"):
        assert 0.0 <= m[k] <= 1.0, k
    # one forget item against open-unlearning's evaluate_probability on the same token ids (answer + EOS)
    tok = tiny_lm.tokenizer
    row = json.loads(forget.read_text().splitlines()[0])
    prompt = f"Question: {row['question']}\nAnswer:"
    p_ids = tok(prompt)["input_ids"]
    full = tok(prompt + " " + row["answer"])["input_ids"] + [tok.eos_token_id]
    batch = {"input_ids": torch.tensor([full]), "attention_mask": torch.ones(1, len(full), dtype=torch.long),
             "labels": torch.tensor([[-100] * len(p_ids) + full[len(p_ids):]])}
    prob, _ = ou_evaluate_probability(tiny_lm.model, batch)
    assert close(res.rows[0]["forget_Q_A_Prob"], prob.item(), 1e-5)
    # and its truth ratio from the paraphrased and perturbed answers
    def avg(answer):
        ids = tok(prompt + " " + answer)["input_ids"] + [tok.eos_token_id]
        b = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "labels": torch.tensor([[-100] * len(p_ids) + ids[len(p_ids):]])}
        return ou_evaluate_probability(tiny_lm.model, b)[1].item()
    _, tr = ou_truth_ratio([avg(row["paraphrased_answer"])], [[avg(a) for a in row["perturbed_answer"]]],
                           "closer_to_1_better")
    assert close(res.rows[0]["truth_ratio"], tr[0], 1e-5)


def test_tofu_forget_quality_from_retain_logs(load_task, backend, monkeypatch, tmp_path):
    from llmmem.suites import run_task

    monkeypatch.setenv("LLMMEM_DATA", str(FIX / "tofu"))
    task = load_task("tofu_forget01")
    logs = tmp_path / "TOFU_EVAL.json"
    logs.write_text(json.dumps({"forget_truth_ratio": {"agg_value": 0.6, "value_by_index": {
        "0": {"score": 0.9}, "1": {"score": 1.4}}}, "mia_min_k": {"agg_value": 0.42}}))
    task.options["retain_logs"] = str(logs)
    task.options["max_gen_toks"] = 16  # (200 in the task) keeps the test fast
    task.options["question_key"] = "paraphrased_question"  # forget and retain sets only, as open-unlearning
    res = run_task(task, backend, data=str(FIX / "tofu/locuslab/TOFU/forget01_perturbed/train.jsonl"))
    assert res.rows[0]["prompt"] == "Question: In which city was Mira Tolvane born?\nAnswer:"
    assert next(r for r in res.rows if r["set"] == "world_facts")["prompt"].startswith("Question: What is the capital")
    trs = [r["truth_ratio"] for r in res.rows if r["set"] == "forget"]
    assert close(res.metrics["forget_quality"], um.forget_quality(trs, [0.9, 1.4]))
    assert res.metrics["privleak_reference_auc"] == 0.42
    assert close(res.metrics["privleak"], um.privleak(res.metrics["mia_min_k"], 0.42))
    logs.write_text(json.dumps({"forget_Q_A_Prob": {}}))
    with pytest.raises(ConfigError, match="not an open-unlearning TOFU_EVAL.json"):
        run_task(task, backend, data=str(FIX / "tofu/locuslab/TOFU/forget01_perturbed/train.jsonl"))


def _broken_copy(tmp_path, src: Path, bench: str, edit) -> Path:
    root = tmp_path / bench
    shutil.copytree(FIX / bench, root)
    p = root / src.relative_to(FIX / bench)
    rows = [json.loads(line) for line in p.read_text().splitlines()]
    edit(rows)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("split,edit,needle", [
    ("retain_perturbed", lambda rows: rows[1].update(perturbed_answer="just one string"),
     "row 2: field 'perturbed_answer' must be a non-empty list of strings (TOFU *_perturbed format"),
    ("world_facts_perturbed", lambda rows: rows[0].pop("answer"),
     "row 1: field 'answer' must be a non-empty string (TOFU *_perturbed format: question, answer, perturbed_answer); "
     "got missing"),
    ("holdout01", lambda rows: rows[0].update(question=""), "row 1: field 'question' must be a non-empty string"),
])
def test_tofu_malformed_split_is_refused(load_task, backend, monkeypatch, tmp_path, split, edit, needle):
    from llmmem.suites import run_task

    src = FIX / f"tofu/locuslab/TOFU/{split}/train.jsonl"
    root = _broken_copy(tmp_path, src, "tofu", edit)
    monkeypatch.setenv("LLMMEM_DATA", str(root))
    with pytest.raises(ConfigError) as e:
        run_task(load_task("tofu_forget01"), backend, data=str(FIX / "tofu/locuslab/TOFU/forget01_perturbed/train.jsonl"))
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and str(root / f"locuslab/TOFU/{split}/train.jsonl") in msg


def test_muse_suite_on_fixtures(load_task, backend, tiny_lm, monkeypatch):
    from llmmem.suites import run_task

    monkeypatch.setenv("LLMMEM_DATA", str(FIX / "muse"))
    task = load_task("muse_news")
    verbmem = FIX / "muse/muse-bench/MUSE-News/verbmem/forget.jsonl"
    res = run_task(task, backend, data=str(verbmem), ref_backend=backend)
    sets = [r["set"] for r in res.rows]
    assert sets.count("verbmem") == 3 and sets.count("knowmem_forget") == 2 and sets.count("knowmem_retain") == 2
    assert sets.count("privleak_forget") == 3 and sets.count("privleak_holdout") == 3
    m = res.metrics
    assert close(m["privleak"], 0.0) and m["privleak_reference_auc"] == m["mia_min_k"]
    for k in ("verbmem_f", "knowmem_f", "knowmem_r", "extraction_strength"):
        assert 0.0 <= m[k] <= 1.0, k
    # the knowmem prompt: every in-context example, then the question (MUSE's knowmem.py layout)
    kf = next(r for r in res.rows if r["set"] == "knowmem_forget")
    assert kf["prompt"] == ("Question: Who met on Tuesday?\nAnswer: the city council\n\n"
                            "Question: What will the new harbour bridge connect?\nAnswer: ")
    # Min-K% AUC against the reference formula on token log-probs from a plain forward (tokens 1..n-2)
    tok = tiny_lm.tokenizer

    def score(text):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(tiny_lm.model(input_ids=ids).logits[0, :-1].float(), -1)
        tl = lp.gather(-1, ids[0, 1:, None])[:, 0].numpy()
        return ou_min_k(tl[:-1], 0.4)

    rows = {s: [json.loads(x)["text"] for x in (FIX / f"muse/muse-bench/MUSE-News/privleak/{s}.jsonl").read_text()
                .splitlines()] for s in ("forget", "holdout")}
    auc = ou_mia_auc([score(t) for t in rows["forget"]], [score(t) for t in rows["holdout"]])
    assert close(m["mia_min_k"], auc)
    # without a reference model: open-unlearning's default retrained AUC is replaced by the task's value
    res2 = run_task(task, backend, data=str(verbmem))
    assert close(res2.metrics["privleak"], um.privleak(auc, task.options["reference_auc"]))


def test_muse_malformed_split_is_refused(load_task, backend, monkeypatch, tmp_path):
    from llmmem.suites import run_task

    src = FIX / "muse/muse-bench/MUSE-News/knowmem/retain_qa.jsonl"
    root = _broken_copy(tmp_path, src, "muse", lambda rows: rows[0].update(answer=["a", "list"]))
    monkeypatch.setenv("LLMMEM_DATA", str(root))
    with pytest.raises(ConfigError, match=r"knowmem/retain_qa.jsonl row 1: field 'answer' must be a non-empty "
                                          r"string \(MUSE knowmem format: question, answer\); got list"):
        run_task(load_task("muse_news"), backend, data=str(FIX / "muse/muse-bench/MUSE-News/verbmem/forget.jsonl"))
    bad = tmp_path / "verbmem.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "text": "y"}) + "\n")
    with pytest.raises(ConfigError, match="field 'gt' must be a non-empty string .MUSE verbmem format"):
        run_task(load_task("muse_news"), backend, data=str(bad))


def test_hub_sources_read_the_local_copy(monkeypatch, tmp_path):
    from llmmem.tasks import local_copy

    monkeypatch.setenv("LLMMEM_DATA", str(FIX / "muse"))
    assert local_copy("hf:muse-bench/MUSE-News:privleak:holdout") == FIX / "muse/muse-bench/MUSE-News/privleak/holdout.jsonl"
    assert local_copy("hf:muse-bench/MUSE-News:privleak:retain") is None
    monkeypatch.delenv("LLMMEM_DATA")
    monkeypatch.setenv("LLMMEM_HOME", str(tmp_path))
    (tmp_path / "data/locuslab/TOFU/forget01/").mkdir(parents=True)
    (tmp_path / "data/locuslab/TOFU/forget01/train.jsonl").write_text("{}\n")
    assert local_copy("hf:locuslab/TOFU:forget01:train") == tmp_path / "data/locuslab/TOFU/forget01/train.jsonl"


def test_unlearning_sets_from_the_hub_read_the_local_copy(monkeypatch):
    """The TOFU training tasks (data: hf:locuslab/TOFU:...) load as unlearning examples offline from the copy:
    every hf: source is looked up there first (llmmem.tasks), not only the tofu/muse suites' own sets."""
    from llmmem.unlearning.data import load_examples

    monkeypatch.setenv("LLMMEM_DATA", str(FIX / "tofu"))
    monkeypatch.setattr("llmmem.presets.hub_reachable", lambda *a, **k: pytest.fail("the hub was asked"))
    forget = load_examples("tofu_train_forget01", None)
    rows = [json.loads(line) for line in (FIX / "tofu/locuslab/TOFU/forget01/train.jsonl").read_text().splitlines()]
    assert [e.suffix.strip() for e in forget] == [r["answer"].strip() for r in rows] and all(e.eos for e in forget)


def test_wmdp_corpora_as_unlearning_sets(tmp_path):
    """RMU's forget/retain corpora ({"text"} rows) load as unlearning examples; a malformed row is refused."""
    from llmmem.unlearning.data import load_examples

    ex = load_examples(str(FIX / "wmdp/cyber-forget-corpus.jsonl"))
    assert len(ex) == 2 and ex[0].text.startswith("An example forget document") and ex[0].suffix.strip()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"abstract": "no text field"}) + "\n")
    with pytest.raises(ConfigError, match="row 1: needs 'text'"):
        load_examples(str(bad))
    q = [json.loads(x) for x in (FIX / "wmdp/cais/wmdp/wmdp-cyber/test.jsonl").read_text().splitlines()]
    assert all(set(r) == {"question", "choices", "answer"} and len(r["choices"]) == 4 for r in q)


def test_task_yamls_parse(load_task):
    for name in ("tofu_forget01", "tofu_forget05", "tofu_forget10", "muse_news", "muse_books"):
        t = load_task(name)
        assert t.suite in ("tofu", "muse") and t.data.startswith("hf:") and t.options["sets"]
    for name in ("tofu_train_forget10", "tofu_train_retain90"):
        t = load_task(name)
        assert t.suite == "recall" and t.doc_to_target == "{{answer}}"


CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if date_string is defined %} ({{ date_string }})"
        "{% endif %};{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_tofu_training_sets_in_open_unlearning_layout(load_task, tiny_lm, monkeypatch, tmp_path):
    """Unlearning examples from the TOFU train tasks: EOS after every answer; the chat variant renders the
    question as a user turn of the tokenizer's chat template (system prompt and date string included)."""
    import llmmem.tasks as tasks
    from llmmem.backends.hf import HFBackend
    from llmmem.unlearning.data import load_examples, tokenize

    data = FIX / "tofu/locuslab/TOFU/forget01/train.jsonl"
    row = json.loads(data.read_text().splitlines()[0])
    backend = HFBackend(tiny_lm, batch_size=4)
    tok = tiny_lm.tokenizer
    for name in ("tofu_train_forget01", "tofu_train_forget01_chat"):
        src = task_file(name)
        (tmp_path / f"{name}.yaml").write_text(src.read_text().replace('"hf:locuslab/TOFU:forget01:train"', f'"{data}"'))
    monkeypatch.setattr(tasks, "_index", lambda dirs: {n: tmp_path / f"{n}.yaml" for n in
                                                       ("tofu_train_forget01", "tofu_train_forget01_chat")})
    (ex,) = load_examples("tofu_train_forget01", ids=["0"])
    tokenize([ex], backend)
    assert ex.prefix == f"Question: {row['question']}\nAnswer:" and ex.suffix == " " + row["answer"]
    assert ex.suffix_ids == tok(" " + row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    (ex,) = load_examples("tofu_train_forget01_chat", ids=["0"])
    with pytest.raises(ConfigError, match="chat template but the tokenizer has none"):
        tokenize([ex], backend)
    monkeypatch.setattr(tok, "chat_template", CHAT, raising=False)
    tokenize([ex], backend)
    text = f"<|system|>You are a helpful assistant. (10 Apr 2025);<|user|>{row['question']} (10 Apr 2025);<|assistant|>"
    assert ex.prefix_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ex.suffix_ids == tok(row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_tofu_chat_prompts_in_the_suite(load_task, tiny_lm, monkeypatch):
    from llmmem.backends.hf import HFBackend
    from llmmem.suites import run_task

    monkeypatch.setenv("LLMMEM_DATA", str(FIX / "tofu"))
    backend = HFBackend(tiny_lm, batch_size=4)
    task = load_task("tofu_forget01_chat")
    task.options["max_gen_toks"] = 4
    forget = str(FIX / "tofu/locuslab/TOFU/forget01_perturbed/train.jsonl")
    with pytest.raises(ConfigError, match="chat_template is true but the tokenizer has no chat template"):
        run_task(task, backend, data=forget)
    monkeypatch.setattr(tiny_lm.tokenizer, "chat_template", CHAT, raising=False)
    res = run_task(task, backend, data=forget)
    first = res.rows[0]
    assert first["prompt"].startswith("<|system|>You are a helpful assistant.") and first["prompt"].endswith("<|assistant|>")
    assert res.metrics["model_utility"] is not None


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "unlearn").glob("*.yaml")), ids=lambda p: p.name)
def test_unlearn_configs_are_valid(path, monkeypatch):
    """Every config parses with today's unlearn keys, names a registered method whose arguments it accepts, and
    says in its header how to run it."""
    from llmmem.interventions.unlearn import check_method
    from llmmem.unlearning.spec import load_unlearn_config

    monkeypatch.chdir(ROOT)
    spec = load_unlearn_config(str(path)).spec
    method = check_method(spec)
    assert all(method.args[k] == v or method.args[k] == float(v) for k, v in spec.method_args.items() if k != "params")
    head = path.read_text().splitlines()[0]
    assert head.startswith("#") and f"llmmem unlearn configs/unlearn/{path.name}" in head
