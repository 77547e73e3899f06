"""Calibration windows, and the block-by-block runner every calibrated pruner uses.

Sources (``--calibration``):

* a token file: ``.safetensors`` / ``.pt`` holding a 2-D integer ``input_ids`` [nsamples, seqlen], or
  ``.npy`` (the model needs no tokenizer);
* a text file: ``.txt``, or ``.jsonl`` with a ``text`` field, cut into random windows with the seed;
* ``hf:PATH[:CONFIG[:SPLIT]]``: a Hugging Face dataset's ``text`` field; ``c4`` is the C4 shard the
  papers use;
* ``self``: sequences sampled from the model itself (seeded) — no data at all;
* ``auto`` (default): ``c4`` when the hub is reachable, else ``self``.

Runner semantics (as the reference code): blocks in order; statistics of block i come from the
still-dense block i fed by the already-pruned blocks before it; block i is pruned, then run again to
produce the inputs of block i+1.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmmem.config import ConfigError
from llmmem.models import (
    Block,
    base_model,
    capture_block_calls,
    capture_first_block_inputs,
    decoder_blocks,
    model_max_length,
    run_block,
    to_device,
)
from llmmem.progress import progress

log = logging.getLogger(__name__)

DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 2048
TOKEN_SUFFIXES = (".safetensors", ".pt", ".npy")
TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass
class Calibration:
    input_ids: torch.Tensor  # [nsamples, seqlen] int64
    source: str
    seed: int

    @property
    def nsamples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.input_ids.shape[1]

    def describe(self) -> dict:
        return {"source": self.source, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed}


def read_token_file(path: Path) -> torch.Tensor:
    suffix = path.suffix
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
            if "input_ids" not in data:
                raise ConfigError(f"calibration file {path} has no 'input_ids' tensor (has: {', '.join(data)})")
            ids = data["input_ids"]
        elif suffix == ".pt":
            data = torch.load(str(path), map_location="cpu", weights_only=True)
            ids = data.get("input_ids") if isinstance(data, dict) else data
            if not isinstance(ids, torch.Tensor):
                raise ConfigError(f"calibration file {path} holds no 'input_ids' tensor")
        else:
            import numpy as np

            arr = np.load(str(path), allow_pickle=False)
            ids = torch.from_numpy(arr.astype("int64") if arr.dtype.kind in "iu" else arr)
    except ConfigError:
        raise
    except Exception as e:  # unreadable file of the right suffix
        raise ConfigError(f"cannot read calibration file {path}: {str(e).splitlines()[0]}") from None
    if ids.dim() != 2:
        raise ConfigError(f"calibration input_ids in {path} must be 2-D [nsamples, seqlen]; got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
        raise ConfigError(f"calibration input_ids in {path} must be integers; got {ids.dtype}")
    return ids.to(torch.int64)


def _text_documents(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    from llmmem.tasks import read_jsonl

    docs = []
    for i, row in enumerate(read_jsonl(path), 1):
        if "text" not in row:
            raise ConfigError(f"{path}: row {i} has no 'text' field")
        docs.append(str(row["text"]))
    return docs


def _hf_documents(source: str, nsamples: int, seed: int) -> list[str]:
    from llmmem.presets import hub_reachable

    try:
        import datasets
    except ImportError:  # pragma: no cover
        raise ConfigError("calibration from a Hugging Face dataset needs the 'datasets' package") from None
    if source == "c4":
        if not hub_reachable():
            raise ConfigError("calibration c4 needs the Hugging Face hub, which is unreachable; use "
                              "--calibration self or a local text/token file")
        ds = datasets.load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                                   split="train")
    else:
        parts = source[3:].split(":")
        path, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
        split = parts[2] if len(parts) > 2 and parts[2] else "train"
        try:
            ds = datasets.load_dataset(path, config, split=split)
        except Exception as e:
            raise ConfigError(f"cannot load calibration dataset {source!r}: {str(e).splitlines()[0]}") from None
    if "text" not in ds.column_names:
        raise ConfigError(f"calibration dataset {source!r} has no 'text' column (has: {', '.join(ds.column_names)})")
    rng = random.Random(seed)
    picks = [rng.randrange(len(ds)) for _ in range(min(len(ds), max(nsamples * 8, 256)))]
    return [ds[i]["text"] for i in picks]


def windows_from_documents(docs: list[str], tokenizer, nsamples: int, seqlen: int, seed: int,
                           source: str) -> torch.Tensor:
    """Random windows of ``seqlen`` tokens from the documents joined by EOS (seeded)."""
    if tokenizer is None:
        raise ConfigError(f"calibration {source!r} is text, but the model has no tokenizer; use a token file")
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for d in docs:
        if stream:
            stream += sep
        stream += tokenizer(d, add_special_tokens=False)["input_ids"]
    if len(stream) <= seqlen:
        raise ConfigError(f"calibration source {source!r} has {len(stream)} tokens, fewer than one window "
                          f"of --seqlen {seqlen} (+1)")
    rng = random.Random(seed)
    rows = []
    for _ in range(nsamples):
        i = rng.randint(0, len(stream) - seqlen - 1)
        rows.append(stream[i:i + seqlen])
    return torch.tensor(rows, dtype=torch.int64)


@torch.no_grad()
def self_generated(model, tokenizer, nsamples: int, seqlen: int, seed: int, batch_size: int,
                   quiet: bool = True) -> torch.Tensor:
    """Sequences sampled from the model itself (temperature 1, no top-k/top-p), seeded.

    Each starts with the BOS token (EOS, or token 0, when there is none); EOS is suppressed so
    every sequence has exactly ``seqlen`` tokens.
    """
    from transformers import GenerationConfig

    cfg = model.config
    start = next((t for t in (getattr(tokenizer, "bos_token_id", None), getattr(cfg, "bos_token_id", None),
                              getattr(tokenizer, "eos_token_id", None), getattr(cfg, "eos_token_id", None))
                  if isinstance(t, int)), 0)
    eos = getattr(cfg, "eos_token_id", None)
    eos_list = [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)]
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    rows = []
    bar = progress(total=nsamples, desc="self calibration", quiet=quiet)
    state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        for i in range(0, nsamples, batch_size):
            b = min(batch_size, nsamples - i)
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            ids = torch.full((b, 1), start, dtype=torch.long, device=device)
            if seqlen > 1:
                gc = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                      max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1,
                                      suppress_tokens=eos_list or None, eos_token_id=None,
                                      pad_token_id=start, num_beams=1)
                ids = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
            rows.append(ids[:, :seqlen].cpu())
            bar.update(b)
    finally:
        torch.random.set_rng_state(state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        bar.close()
    return torch.cat(rows)


def is_token_file(source: str) -> bool:
    return Path(source).suffix in TOKEN_SUFFIXES


def check_source(source: str) -> None:
    """Cheap checks that need no model (run before anything is loaded)."""
    from llmmem.pruning.spec import check_calibration_source

    check_calibration_source(source)


def load_calibration(source: str, model, tokenizer, nsamples: int | None, seqlen: int | None, seed: int,
                     batch_size: int = 8, quiet: bool = True) -> Calibration:
    """Resolve a calibration source into token windows, validated against the model."""
    check_source(source)
    vocab = model.get_input_embeddings().weight.shape[0]
    max_pos = model_max_length(model)
    if source == "auto":
        from llmmem.presets import hub_reachable

        source = "c4" if hub_reachable() else "self"
        log.info("calibration: %s", source)
    if is_token_file(source):
        ids = read_token_file(Path(source).expanduser())
        n = nsamples or ids.shape[0]
        t = seqlen or ids.shape[1]
        if n > ids.shape[0]:
            raise ConfigError(f"--nsamples {n} but {source} holds only {ids.shape[0]} sequences")
        if t > ids.shape[1]:
            raise ConfigError(f"--seqlen {t} but {source} holds sequences of {ids.shape[1]} tokens")
        ids = ids[:n, :t]
    else:
        n = nsamples or DEFAULT_NSAMPLES
        t = seqlen or min(DEFAULT_SEQLEN, max_pos)
    if t > max_pos:
        raise ConfigError(f"--seqlen {t} is larger than the model's {max_pos} positions")
    if not is_token_file(source):
        if source == "self":
            ids = self_generated(model, tokenizer, n, t, seed, batch_size, quiet)
        elif source == "c4" or source.startswith("hf:"):
            ids = windows_from_documents(_hf_documents(source, n, seed), tokenizer, n, t, seed, source)
        else:
            ids = windows_from_documents(_text_documents(Path(source).expanduser()), tokenizer, n, t, seed, source)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ConfigError(f"calibration token ids must be in [0, {vocab}) for this model; found {lo}..{hi}")
    return Calibration(ids, source, seed)


# ----------------------------------------------------------------------------- the runner
Collect = Callable[[Block], Callable[[], None]]  # registers hooks on a block; returns a remover


@torch.no_grad()
def run_blockwise(model, calib: Calibration, *, device: torch.device, batch_size: int, offload: bool,
                  collect: Callable[[Block], Callable[[], None]] | None,
                  process: Callable[[Block], None], quiet: bool = True, propagate_pruned: bool = True) -> None:
    """Feed calibration windows through the model block by block.

    For each block: ``collect(block)`` installs statistics hooks (and returns their remover); the
    dense block runs on its inputs; ``process(block)`` prunes it; the block runs again on the same
    inputs to produce the next block's inputs (``propagate_pruned``; when False the dense outputs of
    the statistics pass are propagated, which is what a profile's dense statistics pass wants).
    With ``offload`` the model stays on the CPU and each block visits ``device`` in turn.
    """
    blocks = decoder_blocks(model)
    ids = calib.input_ids
    batches = [ids[i:i + batch_size] for i in range(0, ids.shape[0], batch_size)]
    body_device = torch.device("cpu") if offload else device
    calls = capture_block_calls(model, blocks, ids[:1].to(body_device))
    calls = [type(c)(to_device(c.args, device), to_device(c.kwargs, device)) for c in calls]
    inps = capture_first_block_inputs(model, blocks, [b.to(body_device) for b in batches], store_device=device)
    bar = progress(total=len(blocks), desc="blocks", quiet=quiet)
    for blk in blocks:
        if offload:
            blk.module.to(device)
        remove = collect(blk) if collect is not None else None
        if propagate_pruned and collect is not None:
            for x in inps:  # statistics pass on the dense block; its outputs are not needed
                run_block(blk, x, calls[blk.index])
        else:
            outs = [run_block(blk, x, calls[blk.index]) for x in inps]
        if remove is not None:
            remove()
        process(blk)
        if propagate_pruned:
            outs = [run_block(blk, x, calls[blk.index]) for x in inps]
        inps = outs
        if offload:
            blk.module.to("cpu")
        bar.update(1)
    bar.close()


def body_device(model) -> torch.device:
    return next(base_model(model).parameters()).device
