"""Pruning speed: llmmem against the reference Wanda / SparseGPT code, and against the two-forward floor.

Wanda and SparseGPT must run every block twice over the calibration windows (statistics on the dense
block, then the pruned block's outputs for the next block), so two full forward passes are the floor.

The reference is the published code (the Wanda authors' ``lib/prune.py`` with the SparseGPT authors'
``sparsegpt.py``; see ../shared/reference/README.md) re-implemented here with its own loop structure:
``prepare_calibration_input`` (a Catcher on block 0, one model call per calibration sequence), per-block
forward hooks feeding ``add_batch`` (``WrappedGPT`` / ``SparseGPT``), one block call per sequence, and
SparseGPT's ``fasterprune`` column loop; magnitude sorts each matrix. Only what transformers 5 needs was
changed: the Catcher keeps every keyword argument (rotary ``position_embeddings``) and a block's output
may be a tensor. Both run on the same model, calibration and threads, A and B interleaved; each side's
pruned weights are compared (mask agreement, relative Frobenius error).

Goals: llmmem <= 1.0x the reference for each method; SparseGPT <= 1.8x the floor.

    python benchmarks/pruning.py                      # smollm2-135m, nsamples 32, seqlen 256
    python benchmarks/pruning.py --model ./ckpt --nsamples 128 --seqlen 2048 --threads 8
    python benchmarks/pruning.py --methods sparsegpt --structure 2:4   # N:M (SparseGPT only)

The last line holds the ratios.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from llmmem.cli import default_threads
from llmmem.config import ModelSpec
from llmmem.models import base_model, find_block_list, load_model
from llmmem.pruning import prune
from llmmem.pruning.calibration import Calibration
from llmmem.pruning.spec import PruneSpec, parse_structure


# ----------------------------------------------------------------------------- the reference, re-implemented
def find_layers(module, layers=(nn.Linear,), name=""):
    if type(module) in layers:
        return {name: module}
    res = {}
    for name1, child in module.named_children():
        res.update(find_layers(child, layers=layers, name=name + "." + name1 if name != "" else name1))
    return res


class WrappedGPT:
    def __init__(self, layer):
        self.layer = layer
        self.dev = self.layer.weight.device
        self.columns = layer.weight.data.shape[1]
        self.scaler_row = torch.zeros((self.columns), device=self.dev)
        self.nsamples = 0

    def add_batch(self, inp, out):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if isinstance(self.layer, nn.Linear):
            if len(inp.shape) == 3:
                inp = inp.reshape((-1, inp.shape[-1]))
            inp = inp.t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


class RefSparseGPT:
    def __init__(self, layer):
        self.layer = layer
        self.dev = self.layer.weight.device
        W = layer.weight.data.clone()
        self.rows = W.shape[0]
        self.columns = W.shape[1]
        self.H = torch.zeros((self.columns, self.columns), device=self.dev)
        self.nsamples = 0

    def add_batch(self, inp, out):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if isinstance(self.layer, nn.Linear):
            if len(inp.shape) == 3:
                inp = inp.reshape((-1, inp.shape[-1]))
            inp = inp.t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity, prune_n=0, prune_m=0, blocksize=128, percdamp=.01):
        W = self.layer.weight.data.clone()
        W = W.float()
        H = self.H
        del self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        Losses = torch.zeros(self.rows, device=self.dev)
        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns, device=self.dev)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        H = torch.linalg.cholesky(H, upper=True)
        Hinv = H
        mask = None
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prune_n == 0:
                if mask is not None:
                    mask1 = mask[:, i1:i2]
                else:
                    tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                    thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                    mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1) == 1
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prune_n != 0 and i % prune_m == 0:
                    tmp = W1[:, i:(i + prune_m)] ** 2 / (torch.diag(Hinv1)[i:(i + prune_m)].reshape((1, -1))) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                Losses1[:, i] = (w - q) ** 2 / d ** 2
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            Losses += torch.sum(Losses1, 1) / 2
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        self.layer.weight.data = W.reshape(self.layer.weight.shape).to(self.layer.weight.data.dtype)


def prepare_calibration_input(model, layers, ids):
    nsamples, seqlen = ids.shape
    dtype = next(iter(model.parameters())).dtype
    inps = torch.zeros((nsamples, seqlen, model.config.hidden_size), dtype=dtype, device=ids.device)
    cache = {"i": 0, "kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps[cache["i"]] = inp
            cache["i"] += 1
            cache["kwargs"] = kwargs
            raise ValueError

    layers[0] = Catcher(layers[0])
    for j in range(nsamples):
        try:
            model(ids[j:j + 1])
        except ValueError:
            pass
    layers[0] = layers[0].module
    return inps, torch.zeros_like(inps), cache["kwargs"]


def _layer_out(out):
    return (out[0] if isinstance(out, (tuple, list)) else out)[0]


@torch.no_grad()
def reference_prune(model, ids, method: str, sparsity: float, prune_n: int = 0, prune_m: int = 0) -> None:
    _, layers = find_block_list(model)
    if method == "magnitude":
        for layer in layers:
            subset = find_layers(layer)
            for name in subset:
                W = subset[name].weight.data
                W_metric = torch.abs(W)
                thresh = torch.sort(W_metric.flatten())[0][int(W.numel() * sparsity)]
                W[W_metric <= thresh] = 0
        return
    use_cache = model.config.use_cache
    model.config.use_cache = False
    inps, outs, kwargs = prepare_calibration_input(model, layers, ids)
    for i in range(len(layers)):
        layer = layers[i]
        subset = find_layers(layer)
        wrapped = {name: (WrappedGPT if method == "wanda" else RefSparseGPT)(subset[name]) for name in subset}

        def add_batch(name, wrapped=wrapped):
            def tmp(_, inp, out):
                wrapped[name].add_batch(inp[0].data, out.data)
            return tmp

        handles = [subset[name].register_forward_hook(add_batch(name)) for name in wrapped]
        for j in range(ids.shape[0]):
            outs[j] = _layer_out(layer(inps[j].unsqueeze(0), **kwargs))
        for h in handles:
            h.remove()
        for name in subset:
            if method == "sparsegpt":
                wrapped[name].fasterprune(sparsity, prune_n=prune_n, prune_m=prune_m, percdamp=0.01, blocksize=128)
                continue
            W_metric = torch.abs(subset[name].weight.data) * torch.sqrt(wrapped[name].scaler_row.reshape((1, -1)))
            W_mask = (torch.zeros_like(W_metric) == 1)
            sort_res = torch.sort(W_metric, dim=-1, stable=True)
            indices = sort_res[1][:, :int(W_metric.shape[1] * sparsity)]
            W_mask.scatter_(1, indices, True)
            subset[name].weight.data[W_mask] = 0
        for j in range(ids.shape[0]):
            outs[j] = _layer_out(layer(inps[j].unsqueeze(0), **kwargs))
        inps, outs = outs, inps
    model.config.use_cache = use_cache


# ----------------------------------------------------------------------------- the benchmark
def block_weights(model) -> dict:
    _, layers = find_block_list(model)
    return {f"{i}.{n}": m.weight.detach().clone() for i, layer in enumerate(layers)
            for n, m in find_layers(layer).items()}


def agreement(a: dict, b: dict) -> tuple[float, float]:
    """(share of identical mask entries, largest relative Frobenius error of a matrix)."""
    same = total = 0
    worst = 0.0
    for k, wa in a.items():
        wb = b[k]
        same += int(((wa == 0) == (wb == 0)).sum())
        total += wa.numel()
        worst = max(worst, float((wa - wb).norm() / wb.norm()))
    return same / total, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--structure", default="unstructured",
                    help="unstructured or N:M (e.g. 2:4; sparsegpt only: the re-implemented reference has N:M there)")
    ap.add_argument("--repeats", type=int, default=2, help="A/B pairs per method; best of N for every timing")
    ap.add_argument("--no_reference", action="store_true", help="time llmmem and the floor only")
    args = ap.parse_args()
    prune_n, prune_m = parse_structure(args.structure)
    if prune_m and args.methods != "sparsegpt":
        ap.error("--structure N:M needs --methods sparsegpt")
    torch.set_num_threads(args.threads)
    lm = load_model(ModelSpec(args.model, device=args.device), need_tokenizer=False)
    model = lm.model
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    calib = Calibration(torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=g), "random", 0)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    device = lm.device
    ids = calib.input_ids.to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def forward_pass():
        body = base_model(model)
        for i in range(0, args.nsamples, args.batch_size):
            body(input_ids=ids[i:i + args.batch_size], use_cache=False)

    def timed(fn) -> float:
        model.load_state_dict(dense)
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    floor = 2 * min(timed(forward_pass) for _ in range(args.repeats))
    rows = [("2 x forward (floor)", floor, None, None)]
    ratios = []
    for method in args.methods.split(","):
        spec = PruneSpec(method, args.sparsity, structure=args.structure)
        ours, ref = [], []
        for _ in range(args.repeats):  # A and B interleaved
            ours.append(timed(lambda spec=spec: prune(model, spec, calib, device=device, batch_size=args.batch_size)))
            w_ours = block_weights(model)
            if not args.no_reference:
                ref.append(timed(lambda method=method: reference_prune(model, ids, method, args.sparsity, prune_n,
                                                                       prune_m)))
                w_ref = block_weights(model)
        secs = min(ours)
        rows.append((method, secs, None, None))
        if ref:
            same, rel = agreement(w_ours, w_ref)
            rows.append((f"{method} (reference)", min(ref), same, rel))
            ratios.append(f"{method} {secs / min(ref):.2f}x reference")
        if method == "sparsegpt":
            ratios.append(f"sparsegpt {secs / floor:.2f}x floor")
    model.load_state_dict(dense)
    print(f"model {lm.name}, device {device}, threads {args.threads}, nsamples {args.nsamples}, "
          f"seqlen {args.seqlen}, batch {args.batch_size}, sparsity {args.sparsity}, {args.structure}, "
          f"best of {args.repeats}")
    print(f"| {'what':<24} | {'seconds':>8} | {'x floor':>7} | {'mask agreement':>14} | {'max rel. Frobenius':>18} |")
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 9}|{'-' * 16}|{'-' * 20}|")
    for name, secs, same, rel in rows:
        agree = f"{same:14.6f}" if same is not None else " " * 14
        err = f"{rel:18.2e}" if rel is not None else " " * 18
        print(f"| {name:<24} | {secs:8.2f} | {secs / floor:7.2f} | {agree} | {err} |")
    print("ratios: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
