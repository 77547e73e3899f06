"""Evaluation throughput: llmmem's HF backend against lm-evaluation-harness's ``HFLM``, same model, same requests.

Requests come from the quickstart tasks, built by llmmem's suites (``build()``) and handed as the very same
strings to both:

* ``generate_until``: every doc's few-shot prompt with the task's ``max_gen_toks`` and ``until`` (greedy);
  famous_passages: the 32-token prefix (decoded) continued for 32 tokens;
* ``loglikelihood``: recall / ICL docs scored as lm-eval scores a multiple-choice task — the prompt
  followed by each of ``--choices`` answers (the doc's target and the targets of the next docs; the
  real capital among them for overriding QA); famous_passages: the prefix with its true 32-token suffix.

Outputs must be equal (generated text identical, log-likelihoods within 1e-4, the same is-greedy flags);
any difference is printed and makes the exit status 1. Each (task, kind) is timed as one call over all
its requests, lm-eval and llmmem interleaved ``--repeats`` times, the median kept. The last line is the
throughput ratio over everything (total lm-eval seconds / total llmmem seconds; > 1 = llmmem faster).

    python benchmarks/eval.py                                   # smollm2-135m, float32, CPU, 16 docs per task
    python benchmarks/eval.py --limit 40 --repeats 3
    python benchmarks/eval.py --levers                          # also each lever of the fast path on its own
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

QUICKSTART = "capitals,demonyms,element_symbols,capitals_override,openbook_invented,famous_passages"


def build_requests(task, docs, backend, n_choices: int):
    """(generate requests, loglikelihood requests) of one task, as plain llmmem request objects with strings."""
    from llmmem.backends.base import GenerateRequest, LoglikelihoodRequest
    from llmmem.suites import SUITES
    from llmmem.tasks import render

    req = SUITES.get(task.suite)().build(task, docs, backend, task.num_fewshot, 0)
    if task.suite == "extraction":
        gen, ll = [], []
        for g, meta in zip(req.generate, req.meta):
            prefix = backend.decode(meta["prefix"])
            gen.append(GenerateRequest(context=prefix, max_gen_toks=g.max_gen_toks))
            ll.append(LoglikelihoodRequest(context=prefix, continuation=backend.decode(meta["suffix"])))
        return gen, ll
    gen = [GenerateRequest(context=g.context, max_gen_toks=g.max_gen_toks, until=list(g.until)) for g in req.generate]
    targets = [task.target(d) for d in docs]
    parametric = task.options.get("parametric_target")
    ll = []
    for k, (prompt, doc) in enumerate(zip(req.meta, docs)):
        choices = [targets[k]]
        if parametric:
            choices.append(render(parametric, doc, task.name).strip())
        j = k
        while len(choices) < n_choices and j < k + len(targets):
            j += 1
            t = targets[j % len(targets)]
            if t not in choices:
                choices.append(t)
        ll += [LoglikelihoodRequest(context=prompt, continuation=task.target_delimiter + c) for c in choices]
    return gen, ll


def lm_eval_instances(kind: str, reqs):
    from lm_eval.api.instance import Instance

    if kind == "generate":
        return [Instance("generate_until", {}, (r.context, {"until": list(r.until), "max_gen_toks": r.max_gen_toks,
                                                             "do_sample": False}), i) for i, r in enumerate(reqs)]
    return [Instance("loglikelihood", {}, (r.context, r.continuation), i) for i, r in enumerate(reqs)]


def compare(kind: str, ours, theirs) -> list[str]:
    bad = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if kind == "generate":
            if a.text != b:
                bad.append(f"#{i}: llmmem {a.text!r} != lm-eval {b!r}")
        elif abs(a.logprob - b[0]) > 1e-4 or a.is_greedy != b[1]:
            bad.append(f"#{i}: llmmem ({a.logprob:.6f}, {a.is_greedy}) != lm-eval ({b[0]:.6f}, {b[1]})")
    return bad


def same_tokens(backend, hflm, kind: str, reqs) -> bool:
    """Both sides see the same token ids (prompts; context/continuation splits)."""
    for r in reqs:
        if kind == "generate":
            if backend.prompt_ids(r) != hflm.tok_encode(r.context)[-(hflm.max_length - r.max_gen_toks):]:
                return False
        elif backend._split_pair(r) != tuple(hflm._encode_pair(r.context, r.continuation)):
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--model_args", default="device=cpu,dtype=float32")
    ap.add_argument("--tasks", default=QUICKSTART)
    ap.add_argument("--limit", type=int, default=16, help="docs per task")
    ap.add_argument("--choices", type=int, default=4, help="answers scored per doc (loglikelihood)")
    ap.add_argument("--kinds", default="generate,loglikelihood")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="A/B pairs per (task, kind); the median is kept")
    ap.add_argument("--levers", action="store_true",
                    help="also time llmmem's plain path and each fast-path lever alone (slower)")
    args = ap.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from llmmem.backends.hf import HFBackend
    from llmmem.cli import default_threads
    from llmmem.config import model_spec_from_args
    from llmmem.evaluation import resolve_tasks
    from llmmem.models import load_model

    torch.set_num_threads(args.threads or default_threads())
    lm = load_model(model_spec_from_args(args.model, args.model_args))
    ours = HFBackend(lm, batch_size=args.batch_size)
    plain = HFBackend(lm, batch_size=args.batch_size, fast=False)
    hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=args.batch_size, max_length=ours.max_length,
                device=str(ours.device))
    kinds = args.kinds.split(",")
    variants = {"llmmem": ours}
    if args.levers:
        variants["llmmem plain"] = plain
    rows, failures = [], []
    for task in resolve_tasks([t for t in args.tasks.split(",") if t]):
        docs = task.docs(limit=args.limit)
        gen, ll = build_requests(task, docs, ours, args.choices)
        for kind, reqs in (("generate", gen), ("loglikelihood", ll)):
            if kind not in kinds or not reqs:
                continue
            if not same_tokens(ours, hflm, kind, reqs):
                failures.append(f"{task.name} {kind}: llmmem and lm-eval tokenize the requests differently")
            insts = lm_eval_instances(kind, reqs)
            call_ref = (lambda insts=insts: hflm.generate_until(insts, disable_tqdm=True)) if kind == "generate" \
                else (lambda insts=insts: hflm.loglikelihood(insts, disable_tqdm=True))
            times: dict[str, list[float]] = {"lm-eval": [], **{v: [] for v in variants}}
            outs = {}
            for _ in range(args.repeats):
                for name, fn in [("lm-eval", call_ref)] + [
                        (v, (lambda b=b, reqs=reqs, kind=kind: b.generate(reqs) if kind == "generate" else b.loglikelihood(reqs)))
                        for v, b in variants.items()]:
                    t = time.perf_counter()
                    outs[name] = fn()
                    times[name].append(time.perf_counter() - t)
            n_bad = 0
            for v in variants:
                bad = compare(kind, outs[v], outs["lm-eval"])
                n_bad += len(bad)
                if bad:
                    failures.append(f"{task.name} {kind} ({v}): {len(bad)} of {len(reqs)} differ; " + "; ".join(bad[:3]))
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append((task.name, kind, len(reqs), med))
            # progress on stderr as it goes (equality included), so a run cut short still tells something
            print(f"  {task.name} {kind}: n={len(reqs)} " + ", ".join(f"{k} {s:.2f}s" for k, s in med.items())
                  + f", {'equal' if not n_bad else f'{n_bad} DIFFER'}", file=sys.stderr, flush=True)

    dev = f"cuda:{torch.cuda.get_device_name(0)}" if ours.device.type == "cuda" else "cpu"
    print(f"model {lm.name} ({args.model_args}), device {dev}, threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"{args.limit} docs per task, {args.choices} choices per doc, median of {args.repeats} interleaved runs")
    names = list(variants)
    head = f"| {'task':<20} | {'kind':<13} | {'n':>4} | {'lm-eval s':>9} | " + " | ".join(f"{n + ' s':>14}" for n in names) \
        + " | " + " | ".join(f"{n + ' x':>14}" for n in names) + " |"
    print(head)
    print("|" + "|".join("-" * (len(c) + 2) for c in head.strip("|").split("|")[:-1]) + "|")
    tot = {k: 0.0 for k in ["lm-eval"] + names}
    by_kind: dict[str, dict[str, float]] = {}
    for task, kind, n, med in rows:
        for k in tot:
            tot[k] += med[k]
            by_kind.setdefault(kind, {k2: 0.0 for k2 in tot})[k] += med[k]
        print(f"| {task:<20} | {kind:<13} | {n:>4} | {med['lm-eval']:9.2f} | "
              + " | ".join(f"{med[v]:14.2f}" for v in names) + " | "
              + " | ".join(f"{med['lm-eval'] / med[v]:14.2f}" for v in names) + " |")
    for kind, t in by_kind.items():
        print(f"| {'all (' + kind + ')':<20} | {'':<13} | {'':>4} | {t['lm-eval']:9.2f} | "
              + " | ".join(f"{t[v]:14.2f}" for v in names) + " | "
              + " | ".join(f"{t['lm-eval'] / t[v]:14.2f}" for v in names) + " |")
    for f in failures:
        print("NOT EQUAL: " + f)
    print(f"outputs equal: {'yes' if not failures else 'NO'}")
    print(f"throughput ratio llmmem / lm-eval: {tot['lm-eval'] / tot['llmmem']:.2f}x")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
