"""Layer-wise sparsity profiles: uniform, and OWL (Yin et al. 2023, outlier-weighted layer-wise sparsity).

OWL, as the reference (luuyin/OWL ``lib/prune_all.py``, ``prune_wanda_outlier``): a block's outlier ratio
is the share of its Wanda scores above ``M x mean`` (``check_outlier_mean``, M = 5), measured on the
dense model. Ratios are scaled linearly into ``[0, 2 lambda]``, re-centred so that their plain mean
(``np.mean``) equals the target density ``1 - target``, and a block's sparsity is ``1 - density``; a
sparsity ``<= 0`` becomes 0.01 (the reference's ``if layer_sparsity_ratio<=0: layer_sparsity_ratio=0.01``),
so at low targets (0.1) the profile's mean sparsity is slightly above the target, as in the reference.
Blocks with more outliers are pruned less.

Where llmmem differs: a sparsity above 0.99 is capped at 0.99 (only reachable when
``target + 2 lambda > 1``: the reference then prunes a whole Wanda layer, and its SparseGPT path indexes
past the end of the sorted scores). ``mean="weighted"`` re-centres the parameter-weighted mean instead
(equal to the reference when all blocks have the same size, as in every standard decoder).
"""

from __future__ import annotations

import numpy as np
import torch

OWL_FLOOR = 0.01  # the reference's replacement for a block sparsity <= 0
OWL_CAP = 0.99


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    flat = torch.cat([s.flatten().float().cpu() for s in scores])
    return float((flat > flat.mean() * m).sum()) / flat.numel()


def owl_from_ratios(ratios: list[float], target: float, lam: float, sizes: list[int] | None = None, *,
                    mean: str = "plain") -> list[float]:
    """Block sparsities from outlier ratios (see the module docstring); ``mean`` is ``plain`` (reference)
    or ``weighted`` (by ``sizes``)."""
    if mean not in ("plain", "weighted"):
        raise ValueError(f"owl_from_ratios: mean {mean!r} is not 'plain' or 'weighted'")
    r = np.asarray(ratios, dtype=np.float64)
    span = r.max() - r.min()
    if span <= 0:  # the reference divides by zero here; equal ratios mean a uniform profile
        return [float(target)] * len(r)
    scaled = (r - r.min()) * (1 / span * lam * 2)
    if mean == "weighted":
        w = np.asarray(sizes if sizes is not None else [1] * len(r), dtype=np.float64)
        centre = float((scaled * w).sum() / w.sum())
    else:
        centre = float(np.mean(scaled))
    density = scaled - centre + (1 - target)
    sparsity = 1 - density
    sparsity = np.where(sparsity <= 0, OWL_FLOOR, sparsity)
    return [float(x) for x in np.minimum(sparsity, OWL_CAP)]
