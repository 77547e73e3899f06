"""Weight-only quantization: ``quantize(model, spec, calibration) -> QuantizationReport``, in place.

Methods: ``rtn`` (round-to-nearest) and ``gptq``, int 2/3/4/8 bits, symmetric or asymmetric, per group of
input columns or per output channel, with compressed-tensors' quantization conventions (see ``rtn.py``)
so that the dequantized ("fake-quant") weights evaluated in memory are the weights a compressed-tensors
checkpoint of the same model decodes to. Only the linears inside the decoder blocks found by
:func:`llmmem.models.decoder_blocks` are quantized; embeddings and ``lm_head`` never. GPTQ runs block by
block on the pruning runner (:func:`llmmem.pruning.calibration.run_blockwise`): the Hessians of block i
come from block i fed by the already-quantized blocks before it, as llm-compressor's sequential pipeline.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from llmmem import __version__
from llmmem.config import ConfigError
from llmmem.quantization.spec import QuantizeSpec

# torch and the model code are imported inside the functions: ``llmmem.quantization.spec`` (and this
# package's __init__, which Python runs first) must stay importable without torch.

__all__ = ["QuantizeSpec", "QuantizationReport", "quantize", "SCALE_BITS"]

SCALE_BITS = 16  # scales counted as fp16/bf16, the dtype a served compressed-tensors checkpoint stores


@dataclass
class QuantizationReport:
    method: str
    label: str
    bits: int
    group_size: int | None  # None: per output channel
    symmetric: bool
    act_order: bool
    keep_sparsity: bool
    effective_bits: float  # bits per quantized weight, scales and zero-points amortised (see effective_bits_note)
    effective_bits_note: str
    params: int  # quantized weights
    relative_error: float  # sqrt(sum ||W - Wq||_F^2 / sum ||W||_F^2) over the quantized linears
    max_distinct_per_group: int  # over every group of the model; <= 2**bits
    zeros_before: int
    zeros_after: int
    zeros_preserved: int  # positions zero before and after
    # name -> rel_error (||W - Wq||_F / ||W||_F), hessian_error (gptq: ||(W - Wq) X^T|| / ||W X^T|| on the
    # calibration inputs X of that layer), max_distinct, zeros_before, zeros_after
    per_linear: dict
    calibration: dict | None
    seconds: float
    notes: list = field(default_factory=list)
    llmmem_version: str = __version__
    # name -> (scale, int8 zero-point), each [out, n_groups] on the CPU: what save_quantized(format=
    # "compressed-tensors") writes beside the codes. Kept out of to_dict().
    qparams: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("qparams")
        return out


def check_shapes(blocks: list, spec: QuantizeSpec) -> None:
    """Every quantized linear's input size must be a multiple of the group size (as compressed-tensors)."""
    if spec.group_size is None:
        return
    for b in blocks:
        for name, ref in b.linears.items():
            n = ref.in_features
            if n % spec.group_size:
                divisors = [d for d in (256, 128, 64, 32, 16, 8) if n % d == 0 and d != spec.group_size][:2]
                hint = f"a divisor of {n} (e.g. {', '.join(map(str, divisors))})" if divisors else f"a divisor of {n}"
                raise ConfigError(f"group_size={spec.group_size} does not divide the {n} input features of "
                                  f"{b.name}.{name}; use {hint} or group_size=-1 (per channel)")


def max_distinct(Wq, group_size: int | None) -> int:
    """Most distinct values in one group (a group: ``group_size`` consecutive inputs of one output row)."""
    from llmmem.quantization.rtn import groups

    s = groups(Wq, group_size).sort(-1).values
    return int(((s[..., 1:] != s[..., :-1]).sum(-1) + 1).max())


def _effective_bits(spec: QuantizeSpec, shapes: list[tuple[int, int]]) -> tuple[float, str]:
    zp_bits = 0 if spec.symmetric else spec.bits
    total = sum(r * c for r, c in shapes)
    extra = sum(r * (c // (spec.group_size or c)) * (SCALE_BITS + zp_bits) for r, c in shapes)
    note = (f"{spec.bits}-bit codes + one {SCALE_BITS}-bit (fp16/bf16) scale"
            + (f" and one {spec.bits}-bit zero-point" if zp_bits else "")
            + f" per {'group of ' + str(spec.group_size) if spec.group_size else 'output channel'}")
    return (spec.bits + extra / total if total else float(spec.bits)), note


def _hessian_hooks(blk, store: dict, device):
    from llmmem.pruning.sparsegpt import HessianStats

    stats = {name: HessianStats(ref.in_features, device) for name, ref in blk.linears.items()}
    store[blk.index] = stats
    handles = [ref.module.register_forward_hook(lambda _m, args, _o, s=stats[name]: s.add(args[0].detach()))
               for name, ref in blk.linears.items()]
    return lambda: [h.remove() for h in handles]


def quantize(model, spec: QuantizeSpec, calibration=None, *, device=None, batch_size: int = 8,
             offload: bool = False, quiet: bool = True) -> QuantizationReport:
    """Quantize the decoder blocks' linears of ``model`` in place (dequantized weights, the model's dtype).

    ``calibration`` (a :class:`llmmem.pruning.calibration.Calibration`) is needed by gptq only; ``device``
    is where the work runs (default: the model's); ``offload`` keeps the body on the CPU and brings one
    block at a time to ``device`` (gptq).
    """
    import torch

    with torch.no_grad():
        return _quantize(model, spec, calibration, device, batch_size, offload, quiet)


def _quantize(model, spec, calibration, device, batch_size, offload, quiet) -> QuantizationReport:
    import torch

    from llmmem.models import decoder_blocks
    from llmmem.quantization.gptq import gptq_quantize, hessian_error
    from llmmem.quantization.rtn import rtn_quantize

    t0 = time.time()
    blocks = decoder_blocks(model)
    check_shapes(blocks, spec)
    if spec.needs_calibration and calibration is None:
        raise ValueError(f"{spec.method} needs calibration data")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    notes: list[str] = []
    per_linear: dict = {}
    qparams: dict = {}
    shapes: list[tuple[int, int]] = []
    sums = {"err": 0.0, "norm": 0.0, "zb": 0, "za": 0, "zp": 0, "distinct": 0}

    def quantize_block(blk, stats: dict | None) -> None:
        for name, ref in blk.linears.items():
            key = f"{blk.name}.{name}"
            W = ref.weight.to(device)
            if stats is None:
                # RTN keeps exact zeros whatever keep_sparsity says: 0 is always on the grid
                Wq, scale, zp = rtn_quantize(W, spec.bits, spec.group_size, spec.symmetric)
            else:
                Wq, scale, zp = gptq_quantize(W, stats[name].H, spec.bits, spec.group_size, spec.symmetric,
                                              act_order=spec.act_order, block_size=spec.block_size,
                                              dampening_frac=spec.dampening_frac,
                                              keep_sparsity=spec.keep_sparsity, where=key, notes=notes)
            Wf = W.float()
            d, n = (Wf - Wq.float()).square().sum(), Wf.square().sum()
            zero0, zero1 = W == 0, Wq == 0
            row = {"rel_error": round(float((d / n).sqrt()) if n > 0 else 0.0, 6)}
            if stats is not None:
                row["hessian_error"] = round(hessian_error(W, Wq, stats[name].H), 6)
            row.update(max_distinct=max_distinct(Wq, spec.group_size), zeros_before=int(zero0.sum()),
                       zeros_after=int(zero1.sum()))
            per_linear[key] = row
            sums["err"] += float(d)
            sums["norm"] += float(n)
            sums["zb"] += row["zeros_before"]
            sums["za"] += row["zeros_after"]
            sums["zp"] += int((zero0 & zero1).sum())
            sums["distinct"] = max(sums["distinct"], row["max_distinct"])
            shapes.append(tuple(W.shape))
            qparams[key] = (scale.cpu(), zp.cpu())
            ref.weight.copy_(Wq.to(ref.weight.device, ref.weight.dtype))

    if spec.method == "rtn":
        for blk in blocks:
            quantize_block(blk, None)
    else:
        from llmmem.pruning.calibration import run_blockwise

        store: dict = {}
        run_blockwise(model, calibration, device=device, batch_size=batch_size, offload=offload,
                      collect=lambda b: _hessian_hooks(b, store, device),
                      process=lambda b: quantize_block(b, store.pop(b.index)), quiet=quiet)
    eff, note = _effective_bits(spec, shapes)
    return QuantizationReport(
        method=spec.method, label=spec.label(), bits=spec.bits, group_size=spec.group_size,
        symmetric=spec.symmetric, act_order=spec.act_order, keep_sparsity=spec.keep_sparsity,
        effective_bits=round(eff, 6), effective_bits_note=note, params=sum(r * c for r, c in shapes),
        relative_error=round((sums["err"] / sums["norm"]) ** 0.5 if sums["norm"] else 0.0, 6),
        max_distinct_per_group=sums["distinct"], zeros_before=sums["zb"], zeros_after=sums["za"],
        zeros_preserved=sums["zp"], per_linear=per_linear,
        calibration=calibration.describe() if (calibration is not None and spec.needs_calibration) else None,
        seconds=round(time.time() - t0, 3), notes=notes, qparams=qparams,
    )
