"""Mask selection (unstructured per row, per matrix, global; N:M) and the sparsity report.

Masks are boolean tensors, True = pruned, with the semantics of the published reference code
(Wanda's ``lib/prune.py``): a row-wise comparison group prunes ``int(d_in * s)`` weights with a
stable ascending sort; a per-matrix threshold prunes every weight ``<= sorted(|W|)[int(numel * s)]``;
N:M prunes the N lowest scores of each M consecutive input columns of every row.
"""

from __future__ import annotations

import torch
from torch import nn

from llmmem.config import ConfigError


def kth_smallest(x: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """The k-th smallest value (1-based) of ``x`` flattened, or along ``dim`` (kept as a size-1 dim).

    The value ``sort(x)[k - 1]`` is, found by selection: numpy's introselect on the CPU (30-60x faster
    than ``torch.kthvalue`` there), ``torch.kthvalue`` elsewhere.
    """
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        import numpy as np

        a = (x.float() if x.dtype == torch.bfloat16 else x).detach().numpy()
        if dim is None:
            return torch.tensor(np.partition(a.ravel(), k - 1)[k - 1], dtype=x.dtype)
        part = np.partition(a, k - 1, axis=dim)
        return torch.from_numpy(np.take(part, [k - 1], axis=dim)).to(x.dtype)
    if dim is None:
        return torch.kthvalue(x.flatten(), k).values
    return torch.kthvalue(x, k, dim=dim, keepdim=True).values


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(d_in * sparsity)`` lowest scores of every row, as the first k of a stable sort.

    Found by selection instead of a sort (half the time): every score below the row's k-th smallest,
    then the leftmost of the scores equal to it until k are pruned (the stable sort's tie order).
    """
    k = int(scores.shape[1] * sparsity)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = kth_smallest(scores, k, dim=1)
    less = scores < kth
    tie = scores == kth
    return less | (tie & (tie.cumsum(1) <= k - less.sum(1, keepdim=True)))


def threshold_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune every score ``<=`` the ``int(numel * sparsity)``-th smallest (reference magnitude)."""
    if sparsity <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    k = min(int(scores.numel() * sparsity), scores.numel() - 1)  # sorted(scores)[k], by selection
    thresh = kth_smallest(scores, k + 1)
    return scores <= thresh


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every row, prune the N lowest scores of each group of M consecutive input columns."""
    rows, cols = scores.shape
    if cols % m:
        raise ConfigError(f"N:M structure {n}:{m} needs input widths divisible by {m}; a layer has {cols}")
    groups = scores.float().reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1, largest=False)[1]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the masked entries in place (``weight`` may be a transposed view)."""
    weight.masked_fill_(mask, 0)


def linear_sparsity(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


def sparsity_report(model: nn.Module) -> dict:
    """Measured sparsity of the block linears: global, per linear and per block."""
    from llmmem.models import decoder_blocks

    per_linear, per_block = {}, {}
    zeros = total = 0
    for b in decoder_blocks(model):
        bz = bt = 0
        for name, ref in b.linears.items():
            w = ref.weight
            z = int((w == 0).sum())
            per_linear[f"{b.name}.{name}"] = round(z / w.numel(), 6)
            bz += z
            bt += w.numel()
        per_block[b.index] = round(bz / bt, 6) if bt else 0.0
        zeros += bz
        total += bt
    return {"global": zeros / total if total else 0.0, "per_block": per_block, "per_linear": per_linear,
            "params": total, "zeros": zeros}
