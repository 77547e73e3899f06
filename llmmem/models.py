"""Model resolution, loading, fingerprints, and architecture-generic decoder structure.

``--model`` may be a local HF checkpoint directory, a ``.gguf`` file, a preset name (see
``llmmem ls models``) or a hub id. Decoder blocks and their prunable linears are discovered
from the module tree, never from model-name strings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmmem.config import ConfigError, ModelSpec, llmmem_home, model_display_name
from llmmem.presets import forget_gguf_quantization

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# Resolution and loading
# --------------------------------------------------------------------------------------


from llmmem.sources import _HUB_ID, Source, resolve  # noqa: E402,F401 (torch-free: checked before any load)


def _display(p: Path) -> str:
    return model_display_name(str(p))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device} but CUDA is not available on this machine; use device=cpu")
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise ConfigError(
                f"device={device} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("device=mps but MPS is not available on this machine")
    return torch.device(device)


def _torch_dtype(dtype: str):
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def check_decoder_only(config) -> None:
    """Raise ConfigError for encoder-only and encoder-decoder models."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"model type {mt!r} is an encoder-decoder model; llmmem needs a decoder-only causal LM")
    if mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise ConfigError(f"model type {mt!r} is an encoder-only model; llmmem needs a decoder-only causal LM")
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "auto_map", None):
        raise ConfigError(f"model type {mt!r} has no causal-LM head in transformers; llmmem needs a decoder-only causal LM")


@dataclass
class LoadedModel:
    """A model with everything downstream code needs to know about it."""

    model: nn.Module
    tokenizer: object | None
    spec: ModelSpec
    source: Source
    device: torch.device
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.source.display_name or self.spec.name

    @property
    def fingerprint(self) -> str:
        """Hash of config + weights (or the hub revision), computed once."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.source, self.model)
        return self._fingerprint


def load_model(spec: ModelSpec, need_tokenizer: bool = True) -> LoadedModel:
    """Resolve and load ``spec``: a causal LM in eval mode on the requested device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = resolve_device(spec.device)
    src = resolve(spec)
    common = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        common["revision"] = spec.revision
    if src.gguf_file:
        common["gguf_file"] = src.gguf_file
    try:
        config = AutoConfig.from_pretrained(src.path, **common)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the config of {spec.name!r}: {_first_line(e)}") from None
    check_decoder_only(config)
    kwargs = dict(common, dtype=_torch_dtype(spec.dtype))
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model {spec.name!r}: {_first_line(e)}") from None
    if src.gguf_file:
        forget_gguf_quantization(model)
    model.eval()
    if not spec.offload:
        model.to(device)
    tokenizer = load_tokenizer(src, common, required=need_tokenizer)
    return LoadedModel(model, tokenizer, spec, src, device)


def load_tokenizer(src: Source, common: dict, required: bool = True):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.path, **common)
    except (OSError, ValueError, TypeError) as e:
        if required:
            raise ConfigError(f"model {src.path!r} has no usable tokenizer: {_first_line(e)}") from None
        return None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def wrap_model(model: nn.Module, tokenizer=None, name: str = "in-memory") -> LoadedModel:
    """Wrap an in-memory model (e.g. built in a test or pruned in a sweep) as a LoadedModel."""
    device = next(model.parameters()).device
    return LoadedModel(model, tokenizer, ModelSpec(name=name, device=str(device.type)),
                       Source("memory", name, None, name), device)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------


def _weight_files(path: Path) -> list[Path]:
    pats = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
    return sorted({f for pat in pats for f in path.glob(pat)})


def _fingerprint_cache() -> Path:
    return llmmem_home() / "fingerprints.json"


def fingerprint(src: Source, model: nn.Module | None = None) -> str:
    """A short stable hash of what was loaded: files for local sources, tensors otherwise."""
    if src.kind == "hub":
        rev = getattr(getattr(model, "config", None), "_commit_hash", None)
        if rev:
            return f"hub:{src.path}@{rev}"
    if src.kind in ("dir", "gguf"):
        base = Path(src.path)
        files = [base / "config.json"] if (base / "config.json").exists() else []
        files += [base / src.gguf_file] if src.gguf_file else _weight_files(base)
        key = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
        cache_path = _fingerprint_cache()
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
        if key in cache:
            return cache[key]
        h = hashlib.blake2b(digest_size=16)
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
        fp = h.hexdigest()
        cache[key] = fp
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_path)
        except OSError:
            pass
        return fp
    return state_fingerprint(model)


def state_fingerprint(model: nn.Module) -> str:
    """Hash of config + every parameter and buffer (for in-memory models)."""
    h = hashlib.blake2b(digest_size=16)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(cfg.to_json_string(use_diff=False).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Architecture-generic structure
# --------------------------------------------------------------------------------------


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # pragma: no cover
        return None


@dataclass
class LinearRef:
    """A prunable linear inside a block; ``weight`` is always [out_features, in_features]."""

    name: str  # qualified name inside the block, e.g. "self_attn.q_proj"
    module: nn.Module
    transposed: bool  # True for GPT-2's Conv1D, whose stored weight is [in, out]

    @property
    def weight(self) -> torch.Tensor:
        """A view of the stored weight in [out, in] orientation (in-place edits write through)."""
        w = self.module.weight.data
        return w.t() if self.transposed else w

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def input_of(self, args: tuple) -> torch.Tensor:
        """The activation fed to this linear in a forward hook's ``args``."""
        return args[0]


@dataclass
class Block:
    index: int
    name: str  # qualified name in the model, e.g. "model.layers.3"
    module: nn.Module
    linears: dict[str, LinearRef]


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder blocks, found structurally."""
    check_decoder_only(model.config)
    n = getattr(_text_config(model.config), "num_hidden_layers", None)
    linear_types = tuple(t for t in (nn.Linear, _conv1d_type()) if t is not None)
    candidates = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if n is not None and len(mod) != n:
            continue
        if len({type(c) for c in mod}) != 1:
            continue
        if not any(isinstance(m, linear_types) for m in mod[0].modules()):
            continue
        size = sum(p.numel() for p in mod.parameters())
        candidates.append((size, name, mod))
    if not candidates:
        raise ConfigError(
            f"cannot find the decoder blocks of {type(model).__name__}: no list of {n} identical "
            "blocks with linear layers"
        )
    _, name, mod = max(candidates, key=lambda c: c[0])
    return name, mod


def decoder_blocks(model: nn.Module) -> list[Block]:
    """Ordered decoder blocks with their prunable linears (nn.Linear and GPT-2 Conv1D)."""
    list_name, blocks = find_block_list(model)
    conv1d = _conv1d_type()
    out = []
    for i, blk in enumerate(blocks):
        linears = {}
        for qn, m in blk.named_modules():
            if isinstance(m, nn.Linear):
                linears[qn] = LinearRef(qn, m, transposed=False)
            elif conv1d is not None and isinstance(m, conv1d):
                linears[qn] = LinearRef(qn, m, transposed=True)
        out.append(Block(i, f"{list_name}.{i}", blk, linears))
    return out


def prunable_parameter_names(model: nn.Module) -> set[str]:
    """Qualified parameter names of every block linear's weight (what pruning may touch)."""
    return {f"{b.name}.{ln}.weight" for b in decoder_blocks(model) for ln in b.linears}


@dataclass
class BlockCall:
    """What a block's forward needs besides the hidden states, as the model passes it."""

    args: tuple  # positional arguments after hidden_states
    kwargs: dict  # attention mask, position ids, rotary position_embeddings, cache_position, ...


class _Stop(Exception):
    pass


def to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def base_model(model: nn.Module) -> nn.Module:
    """The transformer body (no LM head), e.g. LlamaModel inside LlamaForCausalLM."""
    body = getattr(model, "base_model", None)
    return body if isinstance(body, nn.Module) else model


@torch.no_grad()
def capture_block_calls(model: nn.Module, blocks: list[Block], input_ids: torch.Tensor) -> list[BlockCall]:
    """Record, for every block, the extra arguments the model passes to it.

    One forward of a single sequence (its length sets the masks and rotary tables) through the
    body with ``use_cache=False``. Tensors with a batch dimension of 1 broadcast over larger
    batches of the same length. Per-block differences (sliding-window masks, local/global rotary
    tables) are kept.
    """
    calls: list[BlockCall | None] = [None] * len(blocks)
    handles = []

    def make_hook(i):
        def hook(_mod, args, kwargs):
            kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}
            kw["use_cache"] = False
            calls[i] = BlockCall(tuple(args[1:]), kw)
            if i == len(blocks) - 1:
                raise _Stop
        return hook

    for b in blocks:
        handles.append(b.module.register_forward_pre_hook(make_hook(b.index), with_kwargs=True))
    try:
        base_model(model)(input_ids=input_ids[:1], use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise RuntimeError(f"blocks {missing} were not called in the model's forward")
    return calls  # type: ignore[return-value]


@torch.no_grad()
def capture_first_block_inputs(model: nn.Module, blocks: list[Block], batches: Iterable[torch.Tensor],
                               store_device=None) -> list[torch.Tensor]:
    """Hidden states entering block 0 for each batch of input ids (the model stops there)."""
    out = []

    def hook(_mod, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        out.append(hs.detach().to(store_device) if store_device is not None else hs.detach())
        raise _Stop

    h = blocks[0].module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        body = base_model(model)
        for ids in batches:
            try:
                body(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return out


def run_block(block: Block, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """Run one decoder block on captured inputs; returns the output hidden states."""
    out = block.module(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def model_max_length(model: nn.Module, tokenizer=None, override: int | None = None) -> int:
    """Longest sequence the model accepts (positions), or ``override``."""
    if override:
        return override
    cfg = _text_config(model.config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 10**7:
        return v
    return 2048
