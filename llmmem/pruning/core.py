"""``prune(model, spec, calibration) -> PruningReport``: the block-by-block driver shared by every method."""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from llmmem import __version__
from llmmem.models import Block, decoder_blocks
from llmmem.pruning import METHODS
from llmmem.pruning.calibration import Calibration, run_blockwise
from llmmem.pruning.masks import sparsity_report
from llmmem.pruning.spec import PruneSpec

log = logging.getLogger(__name__)


@dataclass
class PruningReport:
    method: str
    structure: str
    profile: str
    target_sparsity: float
    measured_sparsity: float
    per_linear: dict
    per_block: dict
    block_targets: list
    calibration: dict | None
    seconds: float
    peak_memory: dict
    notes: list = field(default_factory=list)
    scope: str = "layer"
    llmmem_version: str = __version__

    def to_dict(self) -> dict:
        return asdict(self)


def _peak_memory(device: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"cpu_max_rss_mb": round(rss / (1024 if sys.platform != "darwin" else 1024 * 1024), 1)}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def _stat_hooks(blk: Block, method, store: dict):
    stats = {name: method.new_stats(ref) for name, ref in blk.linears.items()}
    store[blk.index] = stats
    handles = [ref.module.register_forward_hook(lambda _m, args, _o, s=stats[name]: s.add(args[0].detach()))
               for name, ref in blk.linears.items()]
    return lambda: [h.remove() for h in handles]


def owl_block_sparsities(model, spec: PruneSpec, calib: Calibration, device, batch_size: int, offload: bool,
                         quiet: bool) -> list[float]:
    """Per-block sparsities from Wanda outlier ratios on the dense model."""
    from llmmem.pruning.profiles import outlier_ratio, owl_from_ratios
    from llmmem.pruning.wanda import Wanda, wanda_scores

    wanda, store, ratios, sizes = Wanda(), {}, [], []

    def process(blk: Block):
        stats = store.pop(blk.index)
        ratios.append(outlier_ratio([wanda_scores(ref, stats[name]) for name, ref in blk.linears.items()],
                                    spec.owl_m))
        sizes.append(sum(ref.weight.numel() for ref in blk.linears.values()))

    run_blockwise(model, calib, device=device, batch_size=batch_size, offload=offload,
                  collect=lambda b: _stat_hooks(b, wanda, store), process=process, quiet=quiet,
                  propagate_pruned=False)
    targets = owl_from_ratios(ratios, spec.sparsity, spec.owl_lambda, sizes)
    log.info("OWL outlier ratios %s -> block sparsities %s", [round(r, 4) for r in ratios],
             [round(t, 4) for t in targets])
    return targets


@torch.no_grad()
def prune(model, spec: PruneSpec, calibration: Calibration | None = None, *, device: torch.device | None = None,
          batch_size: int = 8, offload: bool = False, quiet: bool = True) -> PruningReport:
    """Prune ``model`` in place and report what was done."""
    t0 = time.time()
    blocks = decoder_blocks(model)
    device = device or next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if spec.needs_calibration and calibration is None:
        raise ValueError(f"{spec.method} with profile {spec.profile} needs calibration data")
    n, m = spec.nm
    method = METHODS.get(spec.method)()
    notes: list[str] = []
    if spec.profile == "owl":
        targets = owl_block_sparsities(model, spec, calibration, device, batch_size, offload, quiet)
    else:
        targets = [spec.sparsity] * len(blocks)

    if not method.needs_calibration:
        if spec.scope == "global":
            from llmmem.pruning.magnitude import global_magnitude_threshold

            refs = [r for b in blocks for r in b.linears.values()]
            thresh = global_magnitude_threshold(refs, spec.sparsity)
            for r in refs:
                r.weight[r.weight.abs() <= thresh] = 0
            notes.append(f"global magnitude threshold {thresh:.6g}")
        else:
            for b in blocks:
                for ref in b.linears.values():
                    method.prune_linear(ref, None, targets[b.index], n, m, spec, notes)
    else:
        store: dict = {}

        def process(blk: Block):
            stats = store.pop(blk.index)
            for name, ref in blk.linears.items():
                method.prune_linear(ref, stats[name], targets[blk.index], n, m, spec, notes)

        with method.precision() if hasattr(method, "precision") else contextlib.nullcontext():
            run_blockwise(model, calibration, device=device, batch_size=batch_size, offload=offload,
                          collect=lambda b: _stat_hooks(b, method, store), process=process, quiet=quiet)
    measured = sparsity_report(model)
    return PruningReport(
        method=spec.method, structure=spec.structure, profile=spec.profile, target_sparsity=spec.sparsity,
        measured_sparsity=measured["global"], per_linear=measured["per_linear"], per_block=measured["per_block"],
        block_targets=targets, calibration=calibration.describe() if calibration is not None else None,
        seconds=round(time.time() - t0, 3), peak_memory=_peak_memory(device), notes=notes, scope=spec.scope,
    )
