"""Request cache: time an unchanged re-run's evaluation without the cache and with a warm cache.

    python benchmarks/cache.py                                  # smollm2-135m, quickstart tasks, 16 docs each
    python benchmarks/cache.py --model ./ckpt --limit 40 --model_args device=cuda,dtype=bfloat16

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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
