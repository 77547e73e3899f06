"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) as llm-compressor's ``GPTQModifier`` runs it
(``llmcompressor/modifiers/gptq/gptq_quantize.py`` and ``helpers.py``, v0.14):

1. quantization parameters (scale, zero-point per group) come from min/max of the *original* weights,
   fixed before the column loop (llm-compressor's weight observer, ``memoryless_minmax``; the original
   GPTQ code recomputes them from the updated weights when a group starts — llm-compressor does not);
2. activation ordering ``weight``/``static`` (GPTQModifier's default): columns are processed in order of
   decreasing ``diag(H)``; a column keeps the group of its original position (``g_idx[perm]``), so the
   groups stay contiguous in the checkpoint and no ``g_idx`` is stored;
3. dead inputs (``H_jj == 0``) get ``H_jj = 1`` and their weights are zeroed; ``H`` is dampened by
   ``dampening_frac * mean(diag H)`` and replaced by the upper Cholesky factor ``U`` of its inverse;
4. columns in blocks of ``block_size``: ``q = qdq(w)``, ``err = (w - q) / U_ii``, the rest of the block gets
   ``-= err * U_i,i:``, and after the block the later columns get ``-= Err @ U_block,later`` (OBS).

``keep_sparsity``: weights that are exactly zero on entry are quantized to exactly zero, and the error
of doing so is propagated like any other quantization error (the SparseGPT joint sparse + quantized
update). Zero is always on the quantization grid, so no extra value appears in a group.

A Hessian that is not positive definite is retried with 10x the dampening (SparseGPT's
``_inverse_cholesky``); if that never works the layer falls back to round-to-nearest, as llm-compressor
does at once. Both are recorded in ``notes``.
"""

from __future__ import annotations

import torch

from llmmem.pruning.sparsegpt import _inverse_cholesky
from llmmem.quantization.rtn import qdq, qparams


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, *,
                  act_order: bool = True, block_size: int = 128, dampening_frac: float = 0.01,
                  keep_sparsity: bool = True, where: str = "",
                  notes: list | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (dequantized ``W`` in its dtype, scale, zero-point) for ``W`` [out, in] and ``H`` [in, in]."""
    notes = notes if notes is not None else []
    scale, zp = qparams(W, bits, group_size, symmetric)
    rows, cols = W.shape
    W, H = W.float().clone(), H.float().clone()
    g_idx = torch.arange(cols, device=W.device) // (group_size or cols)
    keep_zero = (W == 0) if keep_sparsity else None
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H, g_idx = W[:, perm], H[perm][:, perm], g_idx[perm]
        keep_zero = keep_zero[:, perm] if keep_zero is not None else None
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    try:
        U = _inverse_cholesky(H, dampening_frac, where, notes)
    except RuntimeError as e:
        notes.append(f"{e}; round-to-nearest for this layer")
        U = torch.eye(cols, device=W.device)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        S1, Z1 = scale[:, g_idx[i1:i2]], zp[:, g_idx[i1:i2]]  # each column's group parameters
        for i in range(i2 - i1):
            w = W1[:, i]
            q = qdq(w, S1[:, i], Z1[:, i], bits)[1].float()
            if keep_zero is not None:
                q[keep_zero[:, i1 + i]] = 0
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Q1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if perm is not None:
        W = W[:, torch.argsort(perm)]
    return W.to(scale.dtype), scale, zp


def hessian_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error on the calibration inputs X, ``||(W - Wq) X^T||_F / ||W X^T||_F``, from the
    undampened ``H ~ X^T X``: ``sqrt(tr(dW H dW^T) / tr(W H W^T))``."""
    W, D = W.float(), (W.float() - Wq.float())
    den = ((W @ H) * W).sum()
    return float((((D @ H) * D).sum() / den).clamp(min=0).sqrt()) if den > 0 else 0.0
