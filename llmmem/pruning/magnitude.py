"""Magnitude pruning: score |W|, no calibration (reference: Wanda's ``prune_magnitude``)."""

from __future__ import annotations

import torch

from llmmem.models import LinearRef
from llmmem.pruning.masks import apply_mask, kth_smallest, nm_mask, threshold_mask


class Magnitude:
    name = "magnitude"
    needs_calibration = False

    def new_stats(self, ref: LinearRef):
        return None

    def scores(self, ref: LinearRef, stats) -> torch.Tensor:
        return ref.weight.abs()

    def prune_linear(self, ref: LinearRef, stats, sparsity: float, n: int, m: int, spec, notes: list) -> None:
        w = ref.weight
        score = w.abs()
        mask = nm_mask(score, n, m) if m else threshold_mask(score, sparsity)
        apply_mask(w, mask)


def global_magnitude_threshold(refs: list[LinearRef], sparsity: float) -> float:
    """``sorted(|W| over every block linear)[int(numel * s)]`` (one threshold for the whole model)."""
    flat = torch.cat([r.weight.detach().abs().flatten().float().cpu() for r in refs])
    k = min(int(flat.numel() * sparsity), flat.numel() - 1)
    return float(kth_smallest(flat, k + 1))
