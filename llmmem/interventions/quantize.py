"""The quantization intervention: ``llmmem.quantization`` (RTN, GPTQ; weight-only, 2-8 bits) behind the
intervention interface. In memory the weights are dequantized ("fake-quant"): what a compressed-tensors
checkpoint of the same model decodes to; ``llmmem quantize --format compressed-tensors`` writes that
checkpoint."""

from __future__ import annotations

from llmmem.interventions import Context, Intervention, PrepareEnv
from llmmem.pruning.spec import check_calibration_source, resolve_calibration
from llmmem.quantization.spec import QuantizeSpec


class Quantize(Intervention):
    kind = "quantize"
    spec_class = QuantizeSpec
    section = "quantization"
    grid_keys = ("method", "bits", "group_size", "symmetric", "act_order", "keep_sparsity", "calibration", "nsamples",
                 "seqlen")
    axis = "bits"
    axis_base = 16.0  # the unquantized model, plotted at 16 bits

    def canonical(self, spec: QuantizeSpec) -> dict:
        out = {"method": spec.method, "bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric,
               "keep_sparsity": spec.keep_sparsity}
        if spec.needs_calibration:
            out.update(act_order=spec.act_order, dampening_frac=spec.dampening_frac, block_size=spec.block_size,
                       calibration=spec.calibration, nsamples=spec.nsamples, seqlen=spec.seqlen)
        return out

    def series(self, spec: QuantizeSpec) -> str:
        out = f"{spec.method} " + (f"g{spec.group_size}" if spec.group_size else "per-channel")
        if not spec.symmetric:
            out += " asym"
        if spec.act_order:
            out += " act-order"
        return out

    def prepare(self, spec: QuantizeSpec, env: PrepareEnv) -> None:
        if spec.needs_calibration:
            check_calibration_source(spec.calibration)
            spec.calibration = resolve_calibration(spec.calibration)

    def calibration_needs(self, spec: QuantizeSpec) -> list[tuple]:
        return [(spec.calibration, spec.nsamples, spec.seqlen)] if spec.needs_calibration else []

    def apply(self, model, spec: QuantizeSpec, ctx: Context) -> dict:
        from llmmem.quantization import quantize

        calib = ctx.calibration(spec.calibration, spec.nsamples, spec.seqlen) if spec.needs_calibration else None
        report = quantize(model, spec, calib, device=ctx.device, batch_size=ctx.batch_size, offload=ctx.offload,
                          quiet=ctx.quiet)
        ctx.artifacts["quantization_report"] = report  # the scales and zero-points a compressed checkpoint needs
        return report.to_dict()
