"""SparseGPT on CUDA against the reference fixture (issue 14.10): TF32 off inside SparseGPT, so every pruned
matrix is within 1e-5 relative Frobenius error of the reference's (float32), whatever the user's TF32 setting,
and the setting is the user's again afterwards.

Fixture: tests/fixtures/pruning-golden-llama (see SOURCE.md). Runs only where CUDA is available (`-m gpu`).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmmem.models import decoder_blocks
from llmmem.pruning import prune
from llmmem.pruning.calibration import Calibration
from llmmem.pruning.spec import PruneSpec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GOLD = Path(__file__).parent / "fixtures" / "pruning-golden-llama"
CASES = [c for c in json.loads((GOLD / "manifest.json").read_text())["cases"] if c["method"] == "sparsegpt"]


def _set_tf32(on: bool) -> None:
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"
    else:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = on


def _tf32() -> object:
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return torch.backends.cuda.matmul.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("user_tf32", [False, True], ids=["tf32-off", "tf32-on"])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_sparsegpt_cuda_matches_reference(case, user_tf32):
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda")
    before = _tf32()
    try:
        _set_tf32(user_tf32)
        mine = _tf32()
        model = AutoModelForCausalLM.from_pretrained(str(GOLD / "model"), dtype=torch.float32).to(device).eval()
        ids = load_file(str(GOLD / "calibration.safetensors"))["input_ids"]
        structure = "unstructured" if case["prune_n"] == 0 else f"{case['prune_n']}:{case['prune_m']}"
        prune(model, PruneSpec("sparsegpt", case["sparsity"], structure=structure), Calibration(ids, "golden", 0),
              device=device)
        assert _tf32() == mine  # the user's setting is back
        expected = load_file(str(GOLD / f"expected_{case['name']}.safetensors"))
        got = {f"layers.{b.index}.{name}": ref.weight.detach().float().cpu()
               for b in decoder_blocks(model) for name, ref in b.linears.items()}
        assert set(got) == set(expected)
        for key, exp in expected.items():
            w = got[key]
            assert ((w == 0) == (exp == 0)).float().mean().item() >= 0.999, key
            rel = ((w - exp).norm() / exp.norm()).item()
            assert rel <= 1e-5, (key, rel)
    finally:
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            torch.backends.cuda.matmul.fp32_precision = before
        else:
            torch.backends.cuda.matmul.allow_tf32 = before
