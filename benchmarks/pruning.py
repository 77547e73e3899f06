"""Pruning speed: seconds per method against the floor of two forward passes of the calibration data.

Wanda and SparseGPT must run every block twice over the calibration windows (statistics on the dense
block, then the pruned block's outputs for the next block), so two full forward passes are the floor.
Goal: Wanda within 1.5x of that floor.

    python benchmarks/pruning.py                      # smollm2-135m, nsamples 32, seqlen 256
    python benchmarks/pruning.py --model ./ckpt --nsamples 128 --seqlen 2048 --threads 8
"""

from __future__ import annotations

import argparse
import time

import torch

from llmmem.cli import default_threads
from llmmem.config import ModelSpec
from llmmem.models import base_model, load_model
from llmmem.pruning import prune
from llmmem.pruning.calibration import Calibration
from llmmem.pruning.spec import PruneSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for every timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(ModelSpec(args.model, device=args.device), need_tokenizer=False)
    model = lm.model
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    calib = Calibration(torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=g), "random", 0)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    device = lm.device

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def forward_pass():
        body = base_model(model)
        for i in range(0, args.nsamples, args.batch_size):
            body(input_ids=calib.input_ids[i:i + args.batch_size].to(device), use_cache=False)

    def best(fn):
        times = []
        for _ in range(args.repeats):
            model.load_state_dict(dense)
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return min(times)

    floor = 2 * best(forward_pass)
    rows = [("2 x forward (floor)", floor, 1.0)]
    for method in args.methods.split(","):
        spec = PruneSpec(method, 0.5)
        secs = best(lambda spec=spec: prune(model, spec, calib, device=device, batch_size=args.batch_size))
        rows.append((method, secs, secs / floor))
    print(f"model {lm.name}, device {device}, threads {args.threads}, nsamples {args.nsamples}, "
          f"seqlen {args.seqlen}, batch {args.batch_size}, best of {args.repeats}")
    print(f"| {'what':<22} | {'seconds':>8} | {'x floor':>7} |")
    print(f"|{'-' * 24}|{'-' * 10}|{'-' * 9}|")
    for name, secs, ratio in rows:
        print(f"| {name:<22} | {secs:8.2f} | {ratio:7.2f} |")


if __name__ == "__main__":
    main()
