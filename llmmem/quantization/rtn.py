"""Round-to-nearest weight quantization with compressed-tensors' conventions (its ``calculate_qparams`` and
``fake_quantize``, used by llm-compressor's ``QuantizationModifier`` with the default weight observer
``memoryless_minmax``):

* integer range ``[-2^(b-1), 2^(b-1) - 1]`` for symmetric *and* asymmetric (the zero-point shifts it);
* per group (``group_size`` consecutive input columns of one output row) or per output channel, min and
  max are widened to include 0 (0 is always exactly representable);
* symmetric: ``scale = max(|min|, |max|) / ((qmax - qmin) / 2)`` (int4: absmax / 7.5, so +absmax rounds to
  8 and is clamped to 7), zero-point 0;
* asymmetric: ``scale = (max - min) / (qmax - qmin)``, ``zp = round(clamp(qmin - min / scale, qmin, qmax))``
  stored as int8;
* a zero scale becomes the dtype's eps; scales are kept in the weight's dtype (``scale_dtype`` unset);
* fake quantization: ``q = round(clamp(w / scale + zp, qmin, qmax))`` (round half to even, clamp
  *before* round), ``w_hat = (q - zp) * scale`` computed in the scale's dtype.

One deliberate difference: for an all-zero group compressed-tensors computes the asymmetric zero-point
as ``qmin - 0 / 0`` (NaN cast to int8, platform dependent); here the zero scale is replaced by eps first,
so the zero-point is ``qmin``. Either way the group dequantizes to exact zeros.
"""

from __future__ import annotations

import torch


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def groups(W: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``[rows, cols]`` -> ``[rows, n_groups, group_size]`` (one group per row when ``group_size`` is None)."""
    gs = group_size or W.shape[-1]
    if W.shape[-1] % gs:
        raise ValueError(f"group_size {gs} does not divide {W.shape[-1]} input features")
    return W.unflatten(-1, (W.shape[-1] // gs, gs))


def qparams(W: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (``W.dtype``) and int8 zero-point, both ``[rows, n_groups]``, from each group's min and max."""
    g = groups(W, group_size)
    lo = torch.clamp(g.amin(-1), max=0)
    hi = torch.clamp(g.amax(-1), min=0)
    qmin, qmax = qrange(bits)
    eps = torch.finfo(W.dtype).eps
    if symmetric:
        scale = torch.max(lo.abs(), hi) / ((qmax - qmin) / 2)
        scale = torch.where(scale == 0, torch.full_like(scale, eps), scale)
        zp = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        scale = torch.where(scale == 0, torch.full_like(scale, eps), scale)
        zp = torch.clamp(qmin - lo / scale, qmin, qmax)
    return scale, torch.round(torch.clamp(zp, -128, 127)).to(torch.int8)


def qdq(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize and dequantize ``x`` elementwise (``scale``/``zp`` broadcast): returns (codes, ``w_hat``).

    ``w_hat`` is in ``scale.dtype``, as compressed-tensors' ``_quantize_dequantize``.
    """
    qmin, qmax = qrange(bits)
    q = torch.round(torch.clamp(x / scale + zp.to(x.dtype), qmin, qmax))
    return q, (q.to(scale.dtype) - zp.to(scale.dtype)) * scale


def fake_quantize(W: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int,
                  group_size: int | None) -> torch.Tensor:
    """Dequantized ``W`` ([rows, cols], in ``scale.dtype``) for per-group/per-channel parameters."""
    _, w_hat = qdq(groups(W, group_size), scale.unsqueeze(-1), zp.unsqueeze(-1), bits)
    return w_hat.flatten(-2)


def codes(W: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """The int8 codes of ``W`` (for an already dequantized ``W`` these are the codes it came from)."""
    q, _ = qdq(groups(W.float(), group_size), scale.float().unsqueeze(-1), zp.unsqueeze(-1), bits)
    return q.flatten(-2).to(torch.int8)


def grid_codes(Wq: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int,
               group_size: int | None) -> torch.Tensor | None:
    """The int8 codes whose dequantization is exactly ``Wq``, or None if ``Wq`` is off the grid.

    In bf16, ``(q - zp) * scale`` is rounded to 8 significant bits, so ``round(Wq / scale + zp)`` can miss
    the code by one for 8-bit codes; the neighbours are tried where it does.
    """
    qmin, qmax = qrange(bits)
    q = codes(Wq, scale, zp, bits, group_size).int()
    g = groups(Wq, group_size)
    s, z = scale.unsqueeze(-1), zp.to(scale.dtype).unsqueeze(-1)

    def off(q):  # grouped: [rows, n_groups, group_size]
        return (q.unflatten(-1, g.shape[-2:]).to(scale.dtype) - z) * s != g

    for step in (1, -1):
        cand = (q + step).clamp(qmin, qmax)
        q = torch.where((off(q) & ~off(cand)).flatten(-2), cand, q)
    return None if off(q).any() else q.to(torch.int8)


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int | None,
                 symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (dequantized ``W`` in its dtype, scale, zero-point)."""
    scale, zp = qparams(W, bits, group_size, symmetric)
    return fake_quantize(W, scale, zp, bits, group_size).to(W.dtype), scale, zp
