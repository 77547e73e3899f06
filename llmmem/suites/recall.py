"""Closed-book recall: few-shot cloze / QA, scored by normalised exact match and token F1 on the first line.

Prompts come from :meth:`Task.prompts` (lm-eval's few-shot sampler, independent of ``--limit``).
A task written in lm-eval's vocabulary is scored as lm-eval scores it: its ``filter_list`` turns the
response into the prediction (instead of the first line), and an ``exact_match`` given in lm-eval's form
(``{metric: exact_match, ignore_case: ..., regexes_to_ignore: ...}``) is lm-eval's exact match against
any of the targets (``lm_eval/api/metrics.py`` ``exact_match_hf_evaluate``; ``ConfigurableTask.
process_results``, multiple targets: 1 when any target matches).
"""

from __future__ import annotations

import re
import string

from llmmem.backends.base import GenerateRequest
from llmmem.metrics import contains_answer, exact_match, first_line, token_f1
from llmmem.suites import Requests, Suite


def apply_filters(task, response: str) -> str:
    """The prediction: lm-eval's filter pipeline (``filter_list``) on one response, else its first line."""
    if not task.filter_list:
        return first_line(response)
    out = response
    for fn, kw in task.filter_list:
        if fn == "remove_whitespace":  # lm_eval/filters/extraction.py WhitespaceFilter
            out = out.strip()
        elif fn == "lowercase":
            out = out.lower()
        elif fn == "uppercase":
            out = out.upper()
        elif fn == "regex":  # lm_eval/filters/extraction.py RegexFilter
            fallback = kw.get("fallback", "[invalid]")
            match = re.findall(kw.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"), out)
            if match:
                match = match[int(kw.get("group_select", 0))]
                if isinstance(match, tuple):
                    match = next((m for m in match if m), fallback)
                out = match.strip()
            else:
                out = fallback
        # take_first: one response per request already
    return out


def lm_eval_exact_match(prediction: str, references: list[str], ignore_case=False, ignore_punctuation=False,
                        ignore_numbers=False, regexes_to_ignore=None) -> float:
    """lm-eval's exact_match (``exact_match_hf_evaluate``) against any of ``references``."""
    preds, refs = [prediction] * len(references), list(references)
    for rx in regexes_to_ignore or []:
        preds = [re.sub(rx, "", x) for x in preds]
        refs = [re.sub(rx, "", x) for x in refs]
    if ignore_case:
        preds, refs = [x.lower() for x in preds], [x.lower() for x in refs]
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        preds, refs = [x.translate(table) for x in preds], [x.translate(table) for x in refs]
    if ignore_numbers:
        table = str.maketrans("", "", string.digits)
        preds, refs = [x.translate(table) for x in preds], [x.translate(table) for x in refs]
    return float(any(p == r for p, r in zip(preds, refs)))


def score_response(task, doc, response: str) -> dict:
    """Per-sample metrics of one response (shared with the tasks exported to lm-eval)."""
    pred = apply_filters(task, response)
    answers = task.answers(doc)
    out = {"prediction": pred, "exact_match": exact_match(pred, answers), "f1": token_f1(pred, answers),
           "contains": contains_answer(pred, answers)}
    if "exact_match" in task.metric_options:
        targets = task.targets(doc) if task.doc_to_target else answers
        out["exact_match"] = lm_eval_exact_match(pred, targets, **task.metric_options["exact_match"])
    return out


class RecallSuite(Suite):
    name = "recall"
    default_metrics = ("exact_match", "f1")

    def build(self, task, docs, backend, num_fewshot, seed) -> Requests:
        gen = task.generation_kwargs
        req = Requests()
        for prompt in task.prompts(docs, num_fewshot, seed):
            req.generate.append(GenerateRequest(context=prompt, max_gen_toks=int(gen.get("max_gen_toks", 16)),
                                                until=list(gen.get("until", ["\n"]))))
            req.meta.append(prompt)
        return req

    def conventions(self, task, seed) -> dict:
        from llmmem.tasks import fewshot_seed

        out = super().conventions(task, seed)
        out["fewshot"] = (f"lm-eval {task.fewshot_sampler} sampler (lm_eval/api/samplers.py), seed "
                          f"{fewshot_seed(seed)}, pool: {task.fewshot_data or 'same'} (whole data, not the --limit slice)")
        out["scoring"] = ("lm-eval: filter_list + exact_match options" if task.filter_list or task.metric_options
                          else "llmmem: first line, SQuAD-normalised exact match / token F1")
        return out

    def score_row(self, task, doc, prompt, response) -> dict:
        answers = task.answers(doc)
        row = {"id": task.doc_id(doc), "prompt": prompt, "target": answers[0] if answers else "",
               "aliases": answers[1:], "response": response, **score_response(task, doc, response)}
        if task.bucket_by:
            row[task.bucket_by] = task.bucket_value(doc)
        return row

    def score(self, task, docs, req, resp, backend) -> list[dict]:
        rows = []
        for d, p, r in zip(docs, req.meta, resp.generate):
            row = self.score_row(task, d, p, r.text)
            row["truncated"] = bool(getattr(r, "truncated", False))
            rows.append(row)
        return rows
