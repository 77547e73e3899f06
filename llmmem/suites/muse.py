"""MUSE (Shi et al. 2024) scored as open-unlearning does: one task = one corpus (News or Books).

A task's ``data`` is the ``verbmem`` forget split (``prompt``, ``gt``); ``options.sets`` names the others:
``knowmem_forget`` / ``knowmem_retain`` (``question``, ``answer``) with their in-context examples
``knowmem_forget_icl`` / ``knowmem_retain_icl`` (all of them precede every question, ``Question: q\\nAnswer:
a\\n\\n``), and ``privleak_forget`` / ``privleak_holdout`` (``text``). The criteria:

* ``verbmem_f``: ROUGE-L F1 between the greedy continuation of the prompt (``verbmem_max_gen_toks``, 128)
  and ``gt`` (C1, no verbatim memorization);
* ``knowmem_f`` / ``knowmem_r``: ROUGE-L F1 of the greedy answer (``knowmem_max_gen_toks`` 32, cut at
  ``knowmem_until``) on the forget / retain QA (C2 no knowledge memorization; C4 utility preservation);
* ``privleak``: Min-K% (k = ``min_k``, 0.4) AUC of forget (label 0) vs holdout (label 1) texts, relative to
  the retrained model's AUC (``reference_auc``, or measured with the reference backend):
  ((1 - AUC) - (1 - AUC_retrain)) / (1 - AUC_retrain) * 100 (C3);
* ``extraction_strength`` / ``exact_memorization`` on the verbmem continuations (open-unlearning's muse.yaml).

Scales are open-unlearning's (fractions; MUSE's own tables multiply ROUGE by 100). Conventions that MUSE's
own code (swj0419/muse_bench) does differently are options: ``rouge_stemmer`` (true, open-unlearning;
MUSE: false), ``privleak_tokens`` (``open-unlearning``: the text's tokens after the first, without the last,
as ``tokenwise_logprobs`` drops an "EOS" a completion text does not have; ``muse``: every token after the
first), ``verbmem_gt_tokens`` (null; MUSE: 128, the reference truncated to its first 128 tokens, BOS
included) and ``max_tokens`` (2048: the privleak texts are cut to this many tokens after the first, as
open-unlearning's ``max_length``). Scalability and sustainability (C5, C6) are run designs (forget splits
``scal``/``sust`` of News), not metrics: see configs/unlearn/muse-*.yaml.
"""

from __future__ import annotations

from llmmem import unlearn_metrics as um
from llmmem.backends.base import GenerateRequest, LoglikelihoodRequest
from llmmem.config import ConfigError
from llmmem.suites import Requests, Suite
from llmmem.suites.tofu import check_schema, load_source

SETS = {"knowmem_forget": {"question": "str", "answer": "str"}, "knowmem_retain": {"question": "str", "answer": "str"},
        "knowmem_forget_icl": {"question": "str", "answer": "str"},
        "knowmem_retain_icl": {"question": "str", "answer": "str"},
        "privleak_forget": {"text": "str"}, "privleak_holdout": {"text": "str"}}
KNOWMEM_UNTIL = ["\n\n", "\nQuestion", "Question:"]


class MuseSuite(Suite):
    name = "muse"
    default_metrics = ("verbmem_f", "knowmem_f", "knowmem_r", "privleak", "extraction_strength")
    ref_backend = None

    def build(self, task, docs, backend, num_fewshot, seed) -> Requests:
        o = task.options
        check_schema(docs, {"prompt": "str", "gt": "str"}, task._where(), "MUSE verbmem format: prompt, gt")
        extra = o.get("sets") or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"task {task.name}: options.sets must map a set name to a data source")
        unknown = set(extra) - set(SETS)
        if unknown:
            raise ConfigError(f"task {task.name}: unknown set(s) {', '.join(sorted(unknown))} in options.sets; "
                              f"allowed: {', '.join(SETS)}")
        sets = {}
        for name, src in extra.items():
            rows, where = load_source(task, src, name)
            check_schema(rows, SETS[name], where, f"MUSE {name.split('_')[0]} format: {', '.join(SETS[name])}")
            sets[name] = rows
        for a, b in (("knowmem_forget", "knowmem_forget_icl"), ("knowmem_retain", "knowmem_retain_icl"),
                     ("privleak_forget", "privleak_holdout"), ("privleak_holdout", "privleak_forget")):
            if a in sets and b not in sets:
                raise ConfigError(f"task {task.name}: options.sets has {a} but not {b}")
        self.sets = sets
        tokens_mode = str(o.get("privleak_tokens", "open-unlearning"))
        if tokens_mode not in ("open-unlearning", "muse"):
            raise ConfigError(f"task {task.name}: options.privleak_tokens={tokens_mode!r}; allowed: open-unlearning, muse")
        self.drop_last = tokens_mode == "open-unlearning"
        max_tokens = int(o.get("max_tokens", 2048))
        req = Requests()
        vgen = int(o.get("verbmem_max_gen_toks", 128))
        for r in docs:  # verbmem: the prompt with BOS, a space, then gt (open-unlearning insert_space)
            ids = backend.encode(r["prompt"])
            whole = backend.encode(r["prompt"] + " " + r["gt"])
            cont = whole[len(ids):] if whole[: len(ids)] == ids else backend.encode(" " + r["gt"], add_special_tokens=False)
            req.meta.append({"set": "verbmem", "row": r, "gen": len(req.generate), "ll": len(req.loglikelihood)})
            req.generate.append(GenerateRequest(context_ids=ids, max_gen_toks=vgen))
            req.loglikelihood.append(LoglikelihoodRequest(context_ids=ids, continuation_ids=cont, token_logprobs=True))
        kgen = int(o.get("knowmem_max_gen_toks", 32))
        until = list(o.get("knowmem_until", KNOWMEM_UNTIL))
        for name in ("knowmem_forget", "knowmem_retain"):
            if name not in sets:
                continue
            shots = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in sets[name + "_icl"])
            for r in sets[name]:
                prompt = shots + f"Question: {r['question']}\nAnswer: "
                req.meta.append({"set": name, "row": r, "gen": len(req.generate), "prompt": prompt})
                req.generate.append(GenerateRequest(context_ids=backend.encode(prompt), max_gen_toks=kgen, until=until))
        for name in ("privleak_forget", "privleak_holdout"):
            for r in sets.get(name, []):
                ids = backend.encode(r["text"])[: 1 + max_tokens]
                if len(ids) < 2:
                    raise ConfigError(f"task {task.name}: a {name} text encodes to fewer than 2 tokens")
                req.meta.append({"set": name, "row": r, "ll": len(req.loglikelihood)})
                req.loglikelihood.append(LoglikelihoodRequest(context_ids=ids[:1], continuation_ids=ids[1:],
                                                              token_logprobs=True))
        return req

    def _min_k(self, res, k: float) -> float:
        lp = res.token_logprobs[:-1] if self.drop_last and len(res.token_logprobs) > 1 else res.token_logprobs
        return um.min_k_score(lp, k)

    def score(self, task, docs, req, resp, backend) -> list[dict]:
        o = task.options
        stem = bool(o.get("rouge_stemmer", True))
        k = float(o.get("min_k", 0.4))
        strict = bool(o.get("es_strict", False))
        gt_tokens = o.get("verbmem_gt_tokens")
        tok = getattr(backend, "tok", None)
        eos_text = backend.decode([tok.eos_token_id]) if tok is not None and tok.eos_token_id is not None else ""
        rows = []
        for it in req.meta:
            s, r = it["set"], it["row"]
            row = {"id": f"{s}-{r.get('id', r['_row'])}", "set": s}
            if s == "verbmem":
                gt = r["gt"]
                if gt_tokens:
                    gt = backend.decode(backend.encode(gt)[: int(gt_tokens)])
                gen = um.cut_at_stops(resp.generate[it["gen"]].text, [eos_text])
                ll = resp.loglikelihood[it["ll"]]
                n = ll.n_tokens - 1 if ll.n_tokens > 1 else ll.n_tokens  # the reference drops the last label
                row.update({"prompt": r["prompt"], "target": gt.strip(), "response": gen,
                            "verbmem_f": um.rouge(gt.strip(), gen, stemmer=stem)["rougeL_f1"],
                            "extraction_strength": um.extraction_strength(ll.greedy_ids[:n], ll.continuation_ids[:n],
                                                                          strict),
                            "exact_memorization": um.exact_memorization(ll.greedy_ids[:n], ll.continuation_ids[:n])})
            elif s.startswith("knowmem"):
                gen = um.cut_at_stops(resp.generate[it["gen"]].text, [eos_text, *o.get("knowmem_until", KNOWMEM_UNTIL)])
                key = "knowmem_f" if s == "knowmem_forget" else "knowmem_r"
                row.update({"prompt": it["prompt"], "target": r["answer"].strip(), "response": gen,
                            key: um.rouge(r["answer"].strip(), gen, stemmer=stem)["rougeL_f1"]})
            else:
                row["min_k"] = self._min_k(resp.loglikelihood[it["ll"]], k)
            rows.append(row)
        self.ref_auc = None
        if self.ref_backend is not None and "privleak_forget" in self.sets:
            items = [it for it in req.meta if it["set"].startswith("privleak")]
            got = self.ref_backend.loglikelihood([req.loglikelihood[it["ll"]] for it in items])
            f = [self._min_k(g, k) for it, g in zip(items, got) if it["set"] == "privleak_forget"]
            h = [self._min_k(g, k) for it, g in zip(items, got) if it["set"] == "privleak_holdout"]
            self.ref_auc = um.mia_auc(f, h)
        return rows

    def summarize(self, task, rows, seed) -> dict:
        f = [r["min_k"] for r in rows if r["set"] == "privleak_forget"]
        h = [r["min_k"] for r in rows if r["set"] == "privleak_holdout"]
        if not (f and h):
            return {"privleak": None, "mia_min_k": None}
        auc = um.mia_auc(f, h)
        ref = self.ref_auc if self.ref_auc is not None else float(task.options.get("reference_auc", 0.5))
        return {"mia_min_k": auc, "privleak": um.privleak(auc, ref), "privleak_reference_auc": ref}
