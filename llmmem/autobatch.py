"""``--batch_size auto`` / ``auto:N``: the largest batch that fits, found once per model and cached.

The batch must fit the longest request a backend sends: a forward pass over ``max_length`` tokens per row
with float32 log-probabilities over the vocabulary at every position (rolling log-likelihood windows score
whole windows). Found once per (model fingerprint, device, dtype, max_length, cap) and kept in
``$LLMMEM_HOME/batch_sizes.json``, so later runs on the same model and machine reuse it without probing.

* **CUDA**: lm-eval's probe (``HFLM._detect_batch_size`` with ``find_executable_batch_size``): start at the
  cap (``--max_batch_size``, default 64 as lm-eval), run the model on a ``(batch, max_length)`` batch and
  take the float32 log-softmax; on out-of-memory halve the batch and try again.
* **CPU** (and other devices): a forward on the CPU does not fail when memory runs short, it swaps, so
  llmmem does not probe: it estimates the memory of one row's forward pass (float32 logits and their
  log-softmax, ``2 * max_length * vocab``, plus hidden states and one layer's attention scores) and takes
  the largest power of two whose rows fit in half of the memory available now (``MemAvailable``, or the
  cgroup's limit when lower), capped at ``--max_batch_size``.

``auto:N`` is accepted as lm-eval spells it; lm-eval re-detects the batch size N times while requests get
shorter, llmmem detects it once (the longest request is the one that must fit).
"""

from __future__ import annotations

import json
import logging
import os
import time

from llmmem.config import ConfigError, llmmem_home

log = logging.getLogger(__name__)

CACHE_FILE = "batch_sizes.json"
DEFAULT_MAX_BATCH = 64  # lm-eval's default --max_batch_size
CPU_MEMORY_FRACTION = 0.5


def is_auto(batch_size) -> bool:
    return isinstance(batch_size, str) and batch_size.strip().lower().startswith("auto")


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def available_memory() -> int:
    """Bytes of memory available to this process now (``MemAvailable``, bounded by a cgroup v2/v1 limit)."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 8 * 2**30
    for limit_f, used_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, used = _read_int(limit_f), _read_int(used_f)
        if limit and used is not None and limit < 2**60:
            avail = min(avail, max(0, limit - used))
    return int(avail)


def row_bytes(config, max_length: int) -> int:
    """Estimated peak bytes of one row of a forward pass over ``max_length`` tokens (float32 activations)."""
    from llmmem.models import _text_config

    cfg = _text_config(config)
    vocab = int(getattr(cfg, "vocab_size", 50000) or 50000)
    hidden = int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 1024)) or 1024)
    heads = int(getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", 16)) or 16)
    inter = int(getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden)
    per_token = 2 * vocab + 8 * hidden + 2 * inter + 2 * heads * max_length
    return 4 * max_length * per_token


def cpu_batch_size(config, max_length: int, cap: int, memory: int | None = None) -> int:
    """The CPU rule: the largest power of two (<= cap) whose rows fit in half the available memory."""
    budget = CPU_MEMORY_FRACTION * (available_memory() if memory is None else memory)
    fits = int(budget // max(1, row_bytes(config, max_length)))
    b = 1
    while b * 2 <= min(fits, cap):
        b *= 2
    return max(1, min(b, cap))


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error of torch (CUDA, or the CPU allocator), as lm-eval's ``should_reduce_batch_size``."""
    import torch

    if isinstance(e, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and any(s in msg for s in (
        "CUDA out of memory", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "DefaultCPUAllocator: can't allocate"))


def probe_batch_size(forward, start: int) -> int:
    """lm-eval's ``find_executable_batch_size``: call ``forward(batch)`` from ``start``, halving on OOM."""
    import gc

    import torch

    b = start
    while b >= 1:
        try:
            forward(b)
            return b
        except Exception as e:  # noqa: BLE001 - only out-of-memory errors are retried
            if not is_oom(e):
                raise
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            b //= 2
    raise ConfigError("--batch_size auto: even a batch of 1 runs out of memory at the model's max_length; "
                      "lower max_length in --model_args or use a device with more memory")


def _forward_probe(model, max_length: int, device):
    import torch

    def run(b: int):
        ids = torch.ones((b, max_length), dtype=torch.long, device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            torch.log_softmax(logits.float(), dim=-1)
        del logits
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def _device_key(device) -> str:
    import torch

    if device.type == "cuda":
        i = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(i)
        return f"cuda:{props.name}:{props.total_memory // 2**20}MiB"
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**30
    except (ValueError, OSError, AttributeError):
        total = 0
    return f"{device.type}:{total}GiB"


def _cache_path():
    return llmmem_home() / CACHE_FILE


def _load_cache() -> dict:
    p = _cache_path()
    try:
        doc = json.loads(p.read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(key: str, entry: dict) -> None:
    from llmmem.results import atomic_write_json

    doc = _load_cache()
    doc[key] = entry
    try:
        _cache_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(_cache_path(), doc)
    except OSError as e:  # a read-only home: the size is still used, only not remembered
        log.warning("cannot write %s (%s); the batch size will be found again next time", _cache_path(), e)


def resolve_batch_size(requested, lm, *, max_length: int | None = None, max_batch_size: int | None = None,
                       device=None) -> tuple[int, dict]:
    """An integer batch size for ``requested`` (an int, ``auto`` or ``auto:N``) on the loaded model ``lm``;
    returns it and what to record (requested, rule, cached or found now)."""
    if not is_auto(requested):
        return int(requested), {}
    from llmmem.models import model_max_length

    cap = int(max_batch_size or DEFAULT_MAX_BATCH)
    if cap < 1:
        raise ConfigError(f"--max_batch_size {cap} must be >= 1")
    model = lm.model
    param = next(model.parameters())
    device = device if device is not None else param.device
    dtype = str(param.dtype).replace("torch.", "")
    length = model_max_length(model, lm.tokenizer, max_length or lm.spec.max_length)
    rule = "cuda-oom-probe" if device.type == "cuda" else "memory-estimate"
    key = "|".join([lm.fingerprint, _device_key(device), dtype, f"max_length={length}", f"cap={cap}"])
    info = {"requested": requested, "rule": rule, "max_length": length, "max_batch_size": cap}
    cached = _load_cache().get(key)
    if isinstance(cached, dict) and isinstance(cached.get("batch_size"), int) and cached["batch_size"] >= 1:
        log.info("batch size %d (auto, cached in %s)", cached["batch_size"], _cache_path())
        return cached["batch_size"], dict(info, source="cached", found_at=cached.get("found_at"))
    t0 = time.time()
    if rule == "cuda-oom-probe":
        b = probe_batch_size(_forward_probe(model, length, device), cap)
    else:
        b = cpu_batch_size(model.config, length, cap)
    entry = {"batch_size": b, "rule": rule, "found_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "seconds": round(time.time() - t0, 3)}
    _save_cache(key, entry)
    log.info("batch size %d (auto: %s at max_length %d, cap %d)", b, rule, length, cap)
    return b, dict(info, source="found", seconds=entry["seconds"])
