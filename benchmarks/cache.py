"""Request cache: time an unchanged re-run's evaluation without the cache and with a warm cache.

    python benchmarks/cache.py                                  # smollm2-135m, quickstart tasks, 16 docs each
    python benchmarks/cache.py --model ./ckpt --limit 40 --model_args device=cuda,dtype=bfloat16
    python benchmarks/cache.py --sweep                          # a sweep re-run: cells deleted, cache kept

``--sweep``: the same sweep (dense + magnitude at two sparsities, the quickstart tasks) run three times into
one run directory: without a cache, with an empty cache (filling it), and again with the cells deleted so
they recompute while the cache is kept (a re-run after a crash, or a sweep whose cells were cleaned). Every
run must give the same metrics per cell. The table shows each cell's evaluation seconds (``timings.
eval_seconds``: requests and scoring, not model load or pruning) and its cache hits/misses; the last line
is the speed-up of the re-run's evaluation (no cache / warm cache). Target: >= 10.

Three evaluations of the same model on the same tasks: without a cache, with an empty cache (filling it)
and with the filled cache, opened anew as a re-run would. All three must give the same per-sample rows.
The table shows seconds, model forward calls and cache hits/misses; the last line is the speed-up of a
re-run (seconds without the cache / seconds with the warm cache). Target: >= 10.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


class _Forwards:
    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.n += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--model_args", default="device=cpu,dtype=float32")
    ap.add_argument("--tasks", default="capitals,capitals_override,openbook_invented,associative_recall,"
                                       "linear_classification,famous_passages")
    ap.add_argument("--include_path", default=None)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache_dir", default=None, help="default: a fresh temporary directory")
    ap.add_argument("--sweep", action="store_true", help="time a sweep re-run (cells deleted, cache kept)")
    ap.add_argument("--sparsities", default="0.3,0.6", help="--sweep: magnitude sparsities (default 0.3,0.6)")
    args = ap.parse_args()
    if args.sweep:
        return sweep_case(args)
    import torch

    from llmmem.backends.cache import CachingBackend, cache_model_key
    from llmmem.backends.hf import HFBackend
    from llmmem.cli import default_threads
    from llmmem.config import model_spec_from_args
    from llmmem.evaluation import evaluate, resolve_tasks
    from llmmem.models import load_model
    from llmmem.tasks import with_model_tasks

    torch.set_num_threads(args.threads or default_threads())
    tasks = resolve_tasks([t for t in args.tasks.split(",") if t], with_model_tasks(args.include_path, [args.model]))
    lm = load_model(model_spec_from_args(args.model, args.model_args))
    key = cache_model_key(lm.fingerprint)
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="llmmem-cache-bench-"))
    inner = HFBackend(lm, batch_size=args.batch_size, quiet=True)
    evaluate(inner, tasks[:1], limit=5, seed=0)  # warm-up (first-call overheads are not the cache's business)

    def timed(backend):
        fw = _Forwards(lm.model)
        t = time.perf_counter()
        res = evaluate(backend, tasks, limit=args.limit, seed=0)
        secs = time.perf_counter() - t
        fw.handle.remove()
        print(f"  {secs:.2f}s, {fw.n} forward calls", file=sys.stderr, flush=True)
        return res, secs, fw.n

    rows = []
    plain, t_plain, n_plain = timed(inner)
    rows.append(("no cache", t_plain, n_plain, "-", "-"))
    for label in ("empty cache (fills it)", "warm cache (re-run)"):
        cb = CachingBackend(inner, cache_dir, key)
        res, secs, n = timed(cb)
        cb.close()
        if [r.rows for r in res] != [r.rows for r in plain]:
            raise SystemExit(f"{label}: per-sample rows differ from the uncached run")
        rows.append((label, secs, n, cb.stats["hits"], cb.stats["misses"]))
    t_warm = rows[-1][1]
    n_req = rows[1][4]
    dev = "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"model {lm.name}, device {dev}, threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"{len(tasks)} tasks x {args.limit} docs, {n_req} distinct requests, cache {cache_dir}")
    print()
    print(f"| {'evaluation':<24} | {'seconds':>8} | {'forward calls':>13} | {'hits':>6} | {'misses':>6} |")
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 15}|{'-' * 8}|{'-' * 8}|")
    for label, secs, n, hits, misses in rows:
        print(f"| {label:<24} | {secs:>8.2f} | {n:>13} | {hits!s:>6} | {misses!s:>6} |")
    print()
    print("re-run speed-up (no cache / warm cache), target >= 10:")
    print(f"{t_plain / t_warm:.1f}")


def sweep_case(args) -> None:
    import json
    import shutil

    from llmmem.config import parse_kv_list

    work = Path(tempfile.mkdtemp(prefix="llmmem-cache-sweep-"))
    cache_dir = Path(args.cache_dir or work / "cache")
    tasks = [t for t in args.tasks.split(",") if t]
    doc = {"models": [{"name": args.model, "model_args": args.model_args}], "methods": ["magnitude"],
           "sparsities": [float(x) for x in args.sparsities.split(",")], "tasks": tasks, "limit": args.limit,
           "batch_size": args.batch_size, "include_path": args.include_path}
    parse_kv_list(args.model_args)

    def run(label, out, cache):
        import subprocess

        cfg = work / f"{label.split()[0]}.yaml"
        cfg.write_text(json.dumps(dict(doc, output_path=str(out), **({"use_cache": str(cache)} if cache else {}))))
        cmd = [sys.executable, "-m", "llmmem.cli", "sweep", str(cfg), "--quiet"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        cells = {d["cell"]["label"]: d for d in (json.loads(p.read_text()) for p in sorted(out.rglob("results.json")))}
        print(f"  {label}: {wall:.1f}s wall", file=sys.stderr, flush=True)
        return cells, wall

    plain, w0 = run("no cache", work / "plain", None)
    filled, w1 = run("empty cache (fills it)", work / "cached", cache_dir)
    for d in filled.values():
        shutil.rmtree(work / "cached" / d["cell"]["name"])
    rerun, w2 = run("re-run, cells deleted, cache kept", work / "cached", cache_dir)
    for label in plain:
        for other in (filled, rerun):
            if other[label]["metrics"] != plain[label]["metrics"]:
                raise SystemExit(f"{label}: metrics differ between the cached and the uncached sweep")
    rows = []
    totals = [0.0, 0.0, 0.0]
    for label in plain:
        secs = [c[label]["timings"]["eval_seconds"] for c in (plain, filled, rerun)]
        totals = [a + b for a, b in zip(totals, secs)]
        st1, st2 = filled[label]["timings"]["request_cache"], rerun[label]["timings"]["request_cache"]
        rows.append((label, *secs, f"{st1['hits']}/{st1['misses']}", f"{st2['hits']}/{st2['misses']}"))
    print(f"sweep: model {args.model} ({args.model_args}), {len(plain)} cells, {len(tasks)} tasks x {args.limit} docs, "
          f"batch {args.batch_size}, cache {cache_dir}")
    print(f"wall seconds (whole sweep, model load and pruning included): no cache {w0:.1f}, filling {w1:.1f}, "
          f"re-run {w2:.1f}")
    print()
    print(f"| {'cell':<30} | {'eval s, no cache':>16} | {'eval s, filling':>15} | {'eval s, re-run':>14} | "
          f"{'hits/misses filling':>19} | {'hits/misses re-run':>18} |")
    print(f"|{'-' * 32}|{'-' * 18}|{'-' * 17}|{'-' * 16}|{'-' * 21}|{'-' * 20}|")
    for label, a, b, c, h1, h2 in rows + [("total", *totals, "", "")]:
        print(f"| {label:<30} | {a:>16.2f} | {b:>15.2f} | {c:>14.2f} | {h1:>19} | {h2:>18} |")
    print()
    print("sweep re-run speed-up on the evaluation part (no cache / warm cache), target >= 10:")
    print(f"{totals[0] / totals[2]:.1f}")


if __name__ == "__main__":
    main()
