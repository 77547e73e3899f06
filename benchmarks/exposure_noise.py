"""Noise of the sampled exposure estimate (llmmem.exposure) against the number of alternatives.

    python benchmarks/exposure_noise.py            # 300 repetitions per cell (~2 minutes on one core)
    python benchmarks/exposure_noise.py --reps 100

The alternatives' scores are drawn from a standard normal and the secret is placed at the 2^-E quantile,
so its true exposure in a space of 10^10 secrets is E bits (to within 1e-9). Per (n alternatives, E): the
mean and standard deviation of the estimate over repetitions, its RMSE, the coverage of the 95%
Clopper-Pearson interval, and the share of repetitions where no alternative scored <= the secret (the
point value is then the skew-normal extrapolation; with normal scores that model is right, so real
score distributions can do worse there).
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import norm

from llmmem.exposure import exposure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    size = 10 ** 10
    print("| n alternatives | true E (bits) | mean estimate | sd | RMSE | 95% coverage | skew-normal share |")
    print("|---|---|---|---|---|---|---|")
    for n in (100, 200, 500, 1000, 2000):
        for e in (1, 3, 5, 7, 9, 12):
            t = norm.ppf(2.0 ** -e)
            est, cover, ext = [], 0, 0
            for _ in range(args.reps):
                ex = exposure(t, rng.normal(size=n), size)
                est.append(ex["exposure"])
                cover += ex["exposure_low"] <= e <= ex["exposure_high"]
                ext += ex["method"] == "sampled+skewnorm"
            a = np.asarray(est)
            print(f"| {n} | {e} | {a.mean():.2f} | {a.std():.2f} | {np.sqrt(((a - e) ** 2).mean()):.2f} | "
                  f"{cover / args.reps:.2f} | {ext / args.reps:.2f} |")


if __name__ == "__main__":
    main()
