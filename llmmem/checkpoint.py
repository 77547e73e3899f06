"""Saving a changed model as a normal Hugging Face checkpoint, with what was done to it beside the weights."""

from __future__ import annotations

from pathlib import Path

from llmmem.results import atomic_directory, atomic_write_json, environment

DROP_CONFIG_KEYS = ("sparsity_config", "quantization_config", "compression_config")


def save_model(lm, output: str | Path, sidecars: dict[str, dict]) -> Path:
    """Write safetensors (pruned zeros kept dense), the tokenizer and each sidecar JSON; ``output`` is
    replaced atomically (``config.json`` is moved in last)."""
    out = Path(output)
    with atomic_directory(out) as tmp:
        for key in DROP_CONFIG_KEYS:
            lm.model.config.__dict__.pop(key, None)
        lm.model.save_pretrained(tmp, safe_serialization=True)
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(tmp)
        for name, doc in sidecars.items():
            atomic_write_json(tmp / name, {**doc, "versions": environment()})
    return out
