"""Saving a quantized model: ``fake`` (a normal HF checkpoint of the dequantized weights) or
``compressed-tensors`` (``pack-quantized`` int codes + scales + ``quantization_config``: what vLLM serves).

Both write ``quantization.json`` (spec, report, versions) and replace ``output`` atomically. The
compressed-tensors format is written with the ``compressed-tensors`` library (optional extra
``llmmem[quantize]``): its ``PackedQuantizationCompressor`` packs each block linear's codes, and its
``ModelCompressor.update_config`` writes ``quantization_config`` into config.json, as llm-compressor does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmmem.config import ConfigError
from llmmem.models import LoadedModel, decoder_blocks
from llmmem.quantization.spec import QuantizeSpec
from llmmem.results import atomic_directory, atomic_write_json, environment

FORMATS = ("fake", "compressed-tensors")
DROP_CONFIG_KEYS = ("sparsity_config", "quantization_config", "compression_config")


def _ct_config(model, spec: QuantizeSpec):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    args = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric,
                            strategy="group" if spec.group_size else "channel", group_size=spec.group_size,
                            actorder="static" if spec.act_order else None)
    quantized = {f"{b.name}.{n}" for b in decoder_blocks(model) for n in b.linears}
    ignore = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore, format="pack-quantized",
                                quantization_status="compressed")
    return scheme, config


def compressed_state_dict(model, spec: QuantizeSpec, report) -> tuple[dict, dict]:
    """The model's state dict with each block linear's ``weight`` replaced by compressed-tensors'
    ``weight_packed``/``weight_scale``/``weight_shape`` (+ ``weight_zero_point`` when asymmetric), and a
    round-trip check (the library's decompression against the in-memory dequantized weights)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    from llmmem.quantization.rtn import grid_codes

    scheme, _ = _ct_config(model, spec)
    dtype = next(model.parameters()).dtype
    state = dict(model.state_dict())
    worst, same, total = 0.0, 0, 0
    for b in decoder_blocks(model):
        for name, ref in b.linears.items():
            key = f"{b.name}.{name}"
            if key not in report.qparams:
                raise ValueError(f"the report has no quantization parameters for {key}; quantize this model first")
            scale, zp = report.qparams[key]
            w = ref.weight.detach().cpu()
            q = grid_codes(w, scale, zp, spec.bits, spec.group_size)
            if q is None:
                raise ValueError(f"the weights of {key} are not on the quantization grid of the report; were they "
                                 "changed after quantize()?")
            # the library recomputes the codes as round(w / scale + zp): give it (q - zp) * scale in float32,
            # which is exact, so it finds q again even where a 16-bit dequantized weight is ambiguous
            gs = spec.group_size or w.shape[1]
            exact = ((q.float().unflatten(-1, (-1, gs)) - zp.float()[..., None]) * scale.float()[..., None]).flatten(-2)
            local = {"weight": exact, "weight_scale": scale.to(dtype), "weight_zero_point": zp}
            packed = PackedQuantizationCompressor.compress(local, scheme)
            back = PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
            worst = max(worst, float((back.to(w.dtype).float() - w.float()).abs().max()))
            same += int((back.to(w.dtype) == w).sum())
            total += w.numel()
            del state[f"{key}.weight"]
            state.update({f"{key}.{k}": v.contiguous() for k, v in packed.items()})
    return state, {"roundtrip_max_abs_diff": worst, "roundtrip_identical": same / total if total else 1.0}


def save_quantized(lm: LoadedModel, spec: QuantizeSpec, report, output: str | Path, format: str = "fake",
                   sidecars: dict | None = None) -> Path:
    """Write the quantized model to ``output`` (atomically replaced) in ``format``; returns ``output``.
    ``sidecars``: more JSON files to write beside it ({file name: document}, e.g. the cell's chain)."""
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not valid; choose from: {', '.join(FORMATS)}")
    model = lm.model
    roundtrip = None
    if format == "compressed-tensors":
        try:
            import compressed_tensors  # noqa: F401
        except ImportError:
            raise ConfigError("format=compressed-tensors needs the compressed-tensors package: "
                              "pip install 'llmmem[quantize]'") from None
        conv = [f"{b.name}.{n}" for b in decoder_blocks(model) for n, r in b.linears.items() if r.transposed]
        if conv:
            raise ConfigError(f"format=compressed-tensors needs nn.Linear layers; {conv[0]} is a GPT-2 Conv1D "
                              "(use format=fake)")
        _, ct_config = _ct_config(model, spec)
        state, roundtrip = compressed_state_dict(model, spec, report)
    out = Path(output)
    with atomic_directory(out) as tmp:
        for key in DROP_CONFIG_KEYS:
            model.config.__dict__.pop(key, None)
        if format == "fake":
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            from compressed_tensors.compressors import ModelCompressor

            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            ModelCompressor(quantization_config=ct_config).update_config(str(tmp))
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(tmp)
        doc = {"model": {"name": lm.name, "source": lm.source.path, "fingerprint": lm.fingerprint},
               "format": format, "spec": spec.to_dict(), **report.to_dict(), "versions": _versions()}
        if roundtrip is not None:
            doc["roundtrip"] = roundtrip
        for name, extra in (sidecars or {}).items():
            if name != "quantization.json":
                atomic_write_json(tmp / name, {**extra, "versions": _versions()})
        atomic_write_json(tmp / "quantization.json", doc)
    return out


def _versions() -> dict:
    out = environment()
    try:
        import compressed_tensors

        out["compressed_tensors"] = compressed_tensors.__version__
    except ImportError:
        pass
    return out


def read_compressed(path: str | Path) -> dict:
    """The state dict of a pack-quantized compressed-tensors checkpoint with every packed linear decoded
    (``(codes - zp) * scale`` by the library's decompressor), for checking what a checkpoint holds.
    transformers cannot load an asymmetric pack-quantized checkpoint with compressed-tensors <= 0.20.1
    (its meta-device pass leaves ``weight_zero_point`` unpacked: llm-compressor issue #1618); this can."""
    import json

    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    path = Path(path)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    qc = {k: v for k, v in qc.items() if k in QuantizationConfig.model_fields}
    (scheme,) = QuantizationConfig.model_validate(qc).config_groups.values()
    state: dict = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    for key in [k for k in state if k.endswith(".weight_packed")]:
        prefix = key[: -len("weight_packed")]
        local = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix + "weight_")}
        state[prefix + "weight"] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    return state
