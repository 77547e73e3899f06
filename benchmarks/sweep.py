"""Where a sweep's time goes: per cell load / restore / prune / evaluate / overhead, and the whole sweep's wall
time (with --plot, as the README runs it) against the 15-minute target: the last line is wall / target.

    python benchmarks/sweep.py                              # runs configs/quickstart.yaml into results/bench-quickstart
    python benchmarks/sweep.py --run_dir results/quickstart # only reads an existing run

Targets: the whole quickstart <= 15 minutes on a 2-core CPU; restore < 2% of a cell.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--run_dir", default=None, help="read this finished run instead of running the config")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    wall = None
    if args.run_dir is None:
        run_dir = Path("results/bench-quickstart")
        cmd = [sys.executable, "-m", "llmmem.cli", "sweep", args.config, "--output_path", str(run_dir), "--quiet",
               "--overwrite", "--plot"] + (["--threads", str(args.threads)] if args.threads else [])
        t0 = time.time()
        subprocess.run(cmd, check=True)
        wall = time.time() - t0
    else:
        run_dir = Path(args.run_dir)
    cells = []
    for p in sorted(run_dir.rglob("results.json")):
        d = json.loads(p.read_text())
        t = d["timings"]
        cells.append((d.get("sweep", {}).get("label", p.parent.name), t))
    if not cells:
        sys.exit(f"no finished cells in {run_dir}")
    load = max(t.get("load_seconds", 0.0) for _, t in cells)
    print(f"run {run_dir}: {len(cells)} cells" + (f", wall {wall / 60:.1f} min" if wall else ""))
    print(f"| {'cell':<30} | {'cell s':>7} | {'restore s':>9} | {'prune s':>7} | {'eval s':>7} | {'other s':>7} | {'restore %':>9} |")
    print(f"|{'-' * 32}|{'-' * 9}|{'-' * 11}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 11}|")
    tot = {"cell": 0.0, "restore": 0.0, "prune": 0.0, "eval": 0.0}
    for label, t in cells:
        cell, restore = t.get("cell_seconds", t.get("total_seconds", 0.0)), t.get("restore_seconds", 0.0)
        prune, ev = t.get("intervention_seconds", t.get("prune_seconds", 0.0)), t.get("eval_seconds", 0.0)
        other = cell - restore - prune - ev
        for k, v in (("cell", cell), ("restore", restore), ("prune", prune), ("eval", ev)):
            tot[k] += v
        print(f"| {label:<30} | {cell:7.1f} | {restore:9.3f} | {prune:7.1f} | {ev:7.1f} | {other:7.1f} | "
              f"{100 * restore / cell if cell else 0:8.2f}% |")
    print(f"| {'total':<30} | {tot['cell']:7.1f} | {tot['restore']:9.3f} | {tot['prune']:7.1f} | {tot['eval']:7.1f} | "
          f"{tot['cell'] - tot['restore'] - tot['prune'] - tot['eval']:7.1f} | "
          f"{100 * tot['restore'] / tot['cell']:8.2f}% |")
    per_restore = tot["restore"] / len(cells)
    print(f"\nmodel load (once per worker): {load:.1f}s; restore per cell {per_restore:.3f}s (a worker's first "
          f"Wanda cell also samples the self calibration there)")
    if wall:
        print(f"ratio: wall {wall / 60:.1f} min / 15-minute target = {wall / 900:.2f}")


if __name__ == "__main__":
    main()
