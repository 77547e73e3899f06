"""TOFU (Maini et al. 2024) scored as open-unlearning does: one task = one forget split evaluated with its
retain, real-authors and world-facts sets.

A task's ``data`` is the forget split in TOFU's ``*_perturbed`` format; ``options.sets`` names the other
sets (``retain``, ``real_authors``, ``world_facts``: ``*_perturbed`` format; ``holdout``: ``question`` +
``answer``, for the Min-K% PrivLeak). Per item: the answer's probability exp(-mean NLL), the truth ratio
(paraphrased vs perturbed answers on forget/retain, answer vs perturbed on real authors/world facts),
ROUGE of the greedy answer, and on the forget set extraction strength, exact memorization and Min-K%.
Set-level: forget quality (KS test between the truth ratios of this model and of the retain model, taken
from the reference backend, or ``options.retain_logs``: open-unlearning's ``TOFU_EVAL.json`` of the retain
model or an llmmem ``samples_<task>.jsonl`` of it), model utility (harmonic mean of the nine retain /
real-authors / world-facts numbers), the Min-K% AUC (forget 0 vs holdout 1) and PrivLeak.

Options: ``sets``, ``question_key`` (``question``; ``paraphrased_question`` as open-unlearning allows),
``eos`` (true: the EOS token is part of every scored answer, as open-unlearning appends it; ES/EM and
Min-K% leave it out, as its ``tokenwise_*logprobs`` do), ``max_gen_toks`` (200), ``until`` ([]),
``chat_template`` (false: ``doc_to_text`` + ``target_delimiter``; true: the tokenizer's chat template with
``system_prompt`` / ``date_string``), ``min_k`` (0.4), ``reference_auc`` (0.5, open-unlearning's default
retain-model AUC when none is measured), ``rouge_stemmer`` (true), ``es_strict`` (false).

Data sources (``data`` and each set): a jsonl path (relative to the YAML) or ``hf:PATH:CONFIG:SPLIT``; an
``hf:`` source is read from ``$LLMMEM_DATA/PATH/CONFIG/SPLIT.jsonl`` when that file exists (default
``$LLMMEM_HOME/data``), so the benchmarks run offline from a copy made by ``tasks/unlearning/fetch_data.py``.
"""

from __future__ import annotations

import json
import math

import numpy as np

from llmmem import unlearn_metrics as um
from llmmem.backends.base import GenerateRequest, LoglikelihoodRequest
from llmmem.config import ConfigError
from llmmem.suites import Requests, Suite
from llmmem.tasks import local_copy

UTILITY = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE",
           "ra_Truth_Ratio", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")
PREFIX = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}
PERTURBED_FIELDS = {"forget": ("question", "answer", "paraphrased_answer", "perturbed_answer"),
                    "retain": ("question", "answer", "paraphrased_answer", "perturbed_answer"),
                    "real_authors": ("question", "answer", "perturbed_answer"),
                    "world_facts": ("question", "answer", "perturbed_answer"),
                    "holdout": ("question", "answer")}


# ----------------------------------------------------------------------------- data (shared with muse.py)
def load_source(task, src, name: str) -> tuple[list[dict], str]:
    """Rows of one data source and where they came from (for messages)."""
    if not isinstance(src, str) or not src.strip():
        raise ConfigError(f"task {task.name}: options.sets.{name} must be a jsonl path or hf:PATH:CONFIG:SPLIT, "
                          f"got {src!r}")
    if src.startswith("hf:"):  # read from the local copy when there is one (llmmem.tasks.local_copy)
        local = local_copy(src)
        return task.load_rows(data=src), str(local) if local is not None else src
    return task.load_rows(data=src), str(task._resolve(src))


def check_schema(rows: list[dict], fields: dict, where: str, fmt: str) -> None:
    """Every row has every field with the expected type (``str`` or ``list`` of str); one line otherwise."""
    if not rows:
        raise ConfigError(f"{where}: no rows ({fmt})")
    for r in rows:
        for f, kind in fields.items():
            v = r.get(f)
            ok = isinstance(v, str) and v.strip() if kind == "str" else (
                isinstance(v, list) and v and all(isinstance(x, str) and x.strip() for x in v))
            if not ok:
                what = "a non-empty string" if kind == "str" else "a non-empty list of strings"
                got = "missing" if f not in r else f"{type(v).__name__} {str(v)[:40]!r}"
                raise ConfigError(f"{where} row {r.get('_row', 0) + 1}: field {f!r} must be {what} ({fmt}); got {got}")


class Prompter:
    """Prompt and answer token ids the way the reference builds them: the answer's ids are those of the
    prompt + answer string after the prompt's ids (or the answer encoded alone after a chat template)."""

    def __init__(self, task, backend, opts: dict):
        self.task, self.backend = task, backend
        self.chat = bool(opts.get("chat_template", False))
        self.eos = bool(opts.get("eos", True))
        self.system_prompt = opts.get("system_prompt")
        self.date_string = opts.get("date_string")
        tok = getattr(backend, "tok", None)
        self.eos_id = getattr(tok, "eos_token_id", None)
        if self.eos and self.eos_id is None:
            raise ConfigError(f"task {task.name}: options.eos needs a tokenizer with an EOS token; set eos: false")
        if self.chat and not getattr(tok, "chat_template", None):
            raise ConfigError(f"task {task.name}: options.chat_template is true but the tokenizer has no chat template")
        self.tok = tok

    def prompt(self, question: str, row: dict) -> tuple[str, list[int]]:
        if self.chat:
            msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
            msgs.append({"role": "user", "content": question})
            kw = {"date_string": self.date_string} if self.date_string else {}
            text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
            return text, self.backend.encode(text, add_special_tokens=False)
        from llmmem.tasks import render

        text = render(self.task.doc_to_text, {**row, "question": question}, self.task.name) if self.task.doc_to_text \
            else question
        return text, self.backend.encode(text)

    def answer_ids(self, prompt_text: str, prompt_ids: list[int], answer: str) -> list[int]:
        if self.chat:
            ids = self.backend.encode(answer, add_special_tokens=False)
        else:
            whole = self.backend.encode(prompt_text + self.task.target_delimiter + answer)
            ids = whole[len(prompt_ids):] if whole[: len(prompt_ids)] == prompt_ids else \
                self.backend.encode(self.task.target_delimiter + answer, add_special_tokens=False)
        if not ids:
            raise ConfigError(f"task {self.task.name}: answer {answer[:40]!r} encodes to no tokens")
        return ids + [self.eos_id] if self.eos else ids


def avg_loss(res) -> float:
    return -res.logprob / res.n_tokens


def scored(res, eos: bool) -> tuple[list, list, list]:
    """Token log-probs, greedy ids and target ids of an answer without the appended EOS."""
    n = res.n_tokens - 1 if eos and res.n_tokens > 1 else res.n_tokens
    return res.token_logprobs[:n], res.greedy_ids[:n], res.continuation_ids[:n]


# ----------------------------------------------------------------------------- the suite
class TofuSuite(Suite):
    name = "tofu"
    default_metrics = ("forget_quality", "model_utility", "forget_truth_ratio", "forget_Q_A_Prob",
                       "forget_Q_A_ROUGE", "extraction_strength", "privleak")
    ref_backend = None

    def _sets(self, task, docs) -> dict:
        sets = {"forget": (docs, task._where())}
        extra = task.options.get("sets") or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"task {task.name}: options.sets must map a set name to a data source")
        unknown = set(extra) - {"retain", "real_authors", "world_facts", "holdout"}
        if unknown:
            raise ConfigError(f"task {task.name}: unknown set(s) {', '.join(sorted(unknown))} in options.sets; "
                              f"allowed: retain, real_authors, world_facts, holdout")
        for name, src in extra.items():
            rows, where = load_source(task, src, name)
            sets[name] = (rows, where)
        for name, (rows, where) in sets.items():
            fmt = "TOFU holdout format: question, answer" if name == "holdout" else \
                f"TOFU *_perturbed format: {', '.join(PERTURBED_FIELDS[name])}"
            check_schema(rows, {f: "list" if f == "perturbed_answer" else "str" for f in PERTURBED_FIELDS[name]},
                         where, fmt)
        return {k: v[0] for k, v in sets.items()}

    def build(self, task, docs, backend, num_fewshot, seed) -> Requests:
        opts = task.options
        self.prompter = Prompter(task, backend, opts)
        qkey = opts.get("question_key", "question")
        max_gen = int(opts.get("max_gen_toks", 200))
        until = list(opts.get("until") or [])
        req = Requests()
        self.sets = self._sets(task, docs)
        for set_name, rows in self.sets.items():
            qfield = qkey if set_name in ("forget", "retain") else "question"  # as open-unlearning's metric configs
            for r in rows:
                if not isinstance(r.get(qfield), str):
                    raise ConfigError(f"task {task.name}: question_key {qfield!r} is not a text field of the {set_name} set")
                text, ids = self.prompter.prompt(r[qfield], r)
                item = {"set": set_name, "row": r, "prompt": text, "ll": {}}
                answers = [("answer", r["answer"])]
                if set_name != "holdout":
                    if set_name in ("forget", "retain"):
                        answers.append(("correct", r["paraphrased_answer"]))
                    answers += [("wrong", p) for p in r["perturbed_answer"]]
                for key, answer in answers:
                    item["ll"].setdefault(key, []).append(len(req.loglikelihood))
                    req.loglikelihood.append(LoglikelihoodRequest(
                        context_ids=ids, continuation_ids=self.prompter.answer_ids(text, ids, answer),
                        token_logprobs=True))
                if set_name != "holdout":
                    item["gen"] = len(req.generate)
                    req.generate.append(GenerateRequest(context_ids=ids, max_gen_toks=max_gen, until=until))
                req.meta.append(item)
        return req

    def _truth_ratios(self, items, lls) -> dict:
        """Raw truth ratio per forget item id from a list of loglikelihood results."""
        return {self.task_ref.doc_id(it["row"]): um.truth_ratio(avg_loss(lls[it["ll"]["correct"][0]]),
                                                              [avg_loss(lls[j]) for j in it["ll"]["wrong"]])
                for it in items if it["set"] == "forget"}

    def score(self, task, docs, req, resp, backend) -> list[dict]:
        opts = task.options
        self.task_ref = task
        eos = self.prompter.eos
        k = float(opts.get("min_k", 0.4))
        stem = bool(opts.get("rouge_stemmer", True))
        strict = bool(opts.get("es_strict", False))
        eos_text = backend.decode([self.prompter.eos_id]) if self.prompter.eos_id is not None else ""
        stops = [s for s in [eos_text, *(opts.get("until") or [])] if s]
        L = resp.loglikelihood
        rows = []
        for it in req.meta:
            s, r = it["set"], it["row"]
            ans = L[it["ll"]["answer"][0]]
            lp, greedy, target = scored(ans, eos)
            row = {"id": task.doc_id(r), "set": s, "prompt": it["prompt"], "target": r["answer"]}
            if s == "holdout":
                row["min_k"] = um.min_k_score(lp, k)
                rows.append(row)
                continue
            prob = um.probability(avg_loss(ans))
            wrong = [avg_loss(L[j]) for j in it["ll"]["wrong"]]
            correct = avg_loss(L[it["ll"]["correct"][0]]) if "correct" in it["ll"] else avg_loss(ans)
            tr = um.truth_ratio(correct, wrong)
            gen = um.cut_at_stops(resp.generate[it["gen"]].text, stops)
            rg = um.rouge(r["answer"].strip(), gen, stemmer=stem)
            p = PREFIX[s]
            row.update({"response": gen, "truth_ratio": tr, f"{p}_Q_A_Prob": prob, f"{p}_Q_A_ROUGE": rg["rougeL_recall"],
                        "rougeL_recall": rg["rougeL_recall"], "rouge1_recall": rg["rouge1_recall"],
                        "rougeL_f1": rg["rougeL_f1"]})
            pert_probs = [math.exp(-w) for w in wrong]
            if s == "forget":
                row.update({"forget_truth_ratio": um.truth_ratio_score(tr, "closer_to_1_better"),
                            "forget_Q_A_PARA_Prob": math.exp(-correct),
                            "forget_Q_A_PERT_Prob": float(np.mean(pert_probs)),
                            "extraction_strength": um.extraction_strength(greedy, target, strict),
                            "exact_memorization": um.exact_memorization(greedy, target),
                            "min_k": um.min_k_score(lp, k)})
            elif s == "retain":
                row["retain_Truth_Ratio"] = um.truth_ratio_score(tr, "true_better")
            else:
                row[f"{p}_Q_A_Prob_normalised"] = um.probability_w_options(prob, pert_probs)
                row[f"{p}_Truth_Ratio"] = um.truth_ratio_score(tr, "true_better")
            rows.append(row)
        self.reference = self._reference(task, req, backend) if self.ref_backend is not None else None
        return rows

    def _reference(self, task, req, backend) -> dict:
        """The retain model's forget truth ratios and Min-K% AUC, measured with the reference backend."""
        wanted = sorted({j for it in req.meta if it["set"] in ("forget", "holdout") for js in it["ll"].values()
                         for j in js})
        got = self.ref_backend.loglikelihood([req.loglikelihood[j] for j in wanted])
        lls = dict(zip(wanted, got))
        out = {"truth_ratios": self._truth_ratios(req.meta, lls)}
        k = float(task.options.get("min_k", 0.4))
        mk = {"forget": [], "holdout": []}
        for it in req.meta:
            if it["set"] in mk:
                mk[it["set"]].append(um.min_k_score(scored(lls[it["ll"]["answer"][0]], self.prompter.eos)[0], k))
        out["mia_auc"] = um.mia_auc(mk["forget"], mk["holdout"]) if mk["holdout"] else None
        return out

    def summarize(self, task, rows, seed) -> dict:
        out = {}
        ref = self.reference or read_retain_logs(task)
        forget = [r for r in rows if r["set"] == "forget"]
        if ref and ref.get("truth_ratios"):
            rt = ref["truth_ratios"]
            out["forget_quality"] = um.forget_quality([r["truth_ratio"] for r in forget], list(rt.values()))
        else:
            out["forget_quality"] = None
        means = {m: [r[m] for r in rows if r.get(m) is not None] for m in UTILITY}
        out["model_utility"] = um.model_utility([np.mean(v) for v in means.values()]) if all(means.values()) else None
        hold = [r["min_k"] for r in rows if r["set"] == "holdout"]
        if hold:
            auc = um.mia_auc([r["min_k"] for r in forget], hold)
            ref_auc = ref.get("mia_auc") if ref and ref.get("mia_auc") is not None else \
                float(task.options.get("reference_auc", 0.5))
            out.update({"mia_min_k": auc, "privleak": um.privleak(auc, ref_auc), "privleak_reference_auc": ref_auc})
        else:
            out.update({"mia_min_k": None, "privleak": None})
        return out


def read_retain_logs(task) -> dict | None:
    """The retain model's forget truth ratios (and Min-K% AUC) from ``options.retain_logs``: open-unlearning's
    ``TOFU_EVAL.json`` (``forget_truth_ratio.value_by_index.*.score``, ``mia_min_k.agg_value``) or the
    ``samples_<task>.jsonl`` an llmmem evaluation of the retain model wrote."""
    path = task.options.get("retain_logs")
    if not path:
        return None
    p = task._resolve(str(path))
    if not p.is_file():
        raise ConfigError(f"task {task.name}: options.retain_logs {p} does not exist")
    if p.suffix == ".jsonl":
        from llmmem.tasks import read_jsonl

        rows = read_jsonl(p)
        tr = {r["id"]: r["truth_ratio"] for r in rows if r.get("set") == "forget" and "truth_ratio" in r}
        f = [r["min_k"] for r in rows if r.get("set") == "forget" and "min_k" in r]
        h = [r["min_k"] for r in rows if r.get("set") == "holdout" and "min_k" in r]
        if not tr:
            raise ConfigError(f"task {task.name}: {p} has no forget rows with a truth_ratio (an llmmem TOFU samples file)")
        return {"truth_ratios": tr, "mia_auc": um.mia_auc(f, h) if f and h else None}
    try:
        doc = json.loads(p.read_text())
        scores = doc["forget_truth_ratio"]["value_by_index"]
        tr = {str(k): float(v["score"]) for k, v in scores.items()}
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"task {task.name}: {p} is not an open-unlearning TOFU_EVAL.json (needs "
                          f"forget_truth_ratio.value_by_index.<index>.score)") from None
    auc = (doc.get("mia_min_k") or {}).get("agg_value")
    return {"truth_ratios": tr, "mia_auc": float(auc) if auc is not None else None}
