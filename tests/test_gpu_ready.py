"""GPU-ready training and unlearning: the testbed's CPU path is unchanged (golden numbers from before the
device option), device/dtype input errors, unlearning precision (bf16 autocast) and the `accelerate launch`
path on one process; `gpu` tests compare CUDA bf16 with CPU float32."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import cli_error, run_cli

ROOT = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# The tiny preset for 0.5 epochs (25 steps), seed 0, 1 thread, trained by the code before `device`/`dtype`
# existed (commit f71649b): the EMA loss at every logged step, and a hash of every weight (bitwise, for the
# torch build it was recorded with).
GOLDEN_LOSS = [5.9947, 5.9832, 5.9622, 5.9322, 5.8984, 5.858, 5.8142, 5.7667, 5.7156, 5.6602, 5.6041, 5.5448, 5.4856,
               5.4271, 5.3671, 5.3125, 5.2551, 5.1953, 5.1384, 5.0793, 5.0216, 4.9686, 4.9168, 4.8655, 4.8173]
GOLDEN_SHA = ("2.13.0+cpu", "1b92e2057106cfbe")


def _weights_sha(model) -> str:
    sd = model.state_dict()
    return hashlib.sha256(b"".join(sd[k].detach().float().numpy().tobytes() for k in sorted(sd))).hexdigest()[:16]


def _train(**train_over):
    from llmmem.testbed.train import preset_config, train
    from llmmem.testbed.world import build_world

    cfg = preset_config("tiny", {"train": {"epochs": 0.5, **train_over}})
    model, _, info = train(build_world(0, cfg.world), cfg, 0, quiet=True, threads=1)
    return model, info


def test_testbed_cpu_path_unchanged():
    model, info = _train()
    assert [p["loss"] for p in info["loss_curve"]] == pytest.approx(GOLDEN_LOSS, abs=2e-4)
    assert info["device"] == "cpu" and info["precision"] == "float32"
    assert next(model.parameters()).dtype == torch.float32
    if torch.__version__ == GOLDEN_SHA[0]:
        assert _weights_sha(model) == GOLDEN_SHA[1]  # bit for bit


def test_testbed_device_and_dtype_bad_input(tmp_path, capsys):
    out = tmp_path / "tb"
    cli_error(capsys, ["testbed", "build", "--preset", "tiny", "--dtype", "fp8", "--output", out],
              "dtype='fp8' is not valid; choose from: auto, float32, bfloat16")
    cli_error(capsys, ["testbed", "build", "--preset", "tiny", "--dtype", "bfloat16", "--output", out],
              "dtype=bfloat16 (autocast) needs a CUDA device")
    cli_error(capsys, ["testbed", "build", "--preset", "tiny", "--device", "gpu0", "--output", out],
              "device='gpu0' is not valid")
    if not torch.cuda.is_available():
        cli_error(capsys, ["testbed", "build", "--preset", "tiny", "--device", "cuda", "--output", out],
                  "device=cuda but CUDA is not available here")
    assert not out.exists()


@pytest.mark.gpu
@needs_cuda
def test_testbed_cuda_bf16_close_to_cpu_float32(tmp_path):
    """The tiny preset trained on CUDA with bf16 autocast vs on the CPU in float32, same seed and data order.

    Tolerance: bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per matmul input; accumulation stays
    float32, and the AdamW state and master weights are float32), so the two runs follow slightly different
    trajectories from the first step; over the 300 steps of the tiny preset the training loss agrees to well
    within 3% relative, and the first-token probe accuracies (64 prompts each: one prompt = 0.016; binomial
    noise sd ~0.06) within 0.15."""
    from llmmem.testbed.train import preset_config, train
    from llmmem.testbed.world import build_world

    runs = {}
    for device in ("cpu", "cuda"):
        cfg = preset_config("tiny", {"train": {"device": device}})
        model, _, info = train(build_world(0, cfg.world), cfg, 0, quiet=True, threads=1)
        assert next(model.parameters()).device.type == "cpu" and next(model.parameters()).dtype == torch.float32
        runs[device] = info
    cpu, gpu = runs["cpu"], runs["cuda"]
    assert gpu["precision"] == "bfloat16 autocast" and gpu["device"].startswith("cuda")
    lc, lg = cpu["loss_curve"][-1]["loss"], gpu["loss_curve"][-1]["loss"]
    assert abs(lg - lc) / lc < 0.03, (lc, lg)
    pc = next(p["probe"] for p in reversed(cpu["loss_curve"]) if "probe" in p)
    pg = next(p["probe"] for p in reversed(gpu["loss_curve"]) if "probe" in p)
    for k in pc:
        assert abs(pc[k] - pg[k]) <= 0.15, (k, pc, pg)
    print(json.dumps({"cpu_final_loss": lc, "cuda_bf16_final_loss": lg, "cpu_s": cpu["seconds"],
                      "cuda_s": gpu["seconds"]}))


# ----------------------------------------------------------------------------- unlearning
def _ul_cfg(tmp_path, model, name="ul", **over):
    cfg = {"model": str(model), "forget": "testbed_canaries", "forget_filter": {"group": ["dup004", "dup008", "dup016"]},
           "retain": "testbed_recall", "nonmember": "testbed_canaries", "nonmember_filter": {"group": ["heldout"]},
           "method": "npo", "steps": 4, "lr": 3e-3, "batch_size": 8, "eval_every": 4, "utility_tasks": [],
           "exposure_alternatives": 30, "output_path": str(tmp_path / name)}
    cfg.update(over)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _result(run: Path) -> dict:
    (res,) = list(run.rglob("results.json"))
    return json.loads(res.read_text())


def test_precision_key_keeps_old_cells_and_validates():
    from llmmem.config import ConfigError
    from llmmem.unlearning.spec import UnlearnSpec

    base = UnlearnSpec(forget="f", retain="r")
    assert "precision" not in base.canonical()  # float32: the hash of cells from before the key is unchanged
    assert UnlearnSpec(forget="f", retain="r", precision="bfloat16").canonical()["precision"] == "bf16"
    with pytest.raises(ConfigError, match="precision='fp16' is not valid; choose from: float32, bf16"):
        UnlearnSpec(forget="f", retain="r", precision="fp16")


def test_unlearn_bf16_autocast_and_accelerate_launch(tmp_path, tiny_testbed, capsys):
    """bf16 (CPU autocast here) is a different cell with close numbers; `accelerate launch` on one process gives
    exactly the plain run's numbers through the Accelerator path (prepare, backward, clipping)."""
    assert run_cli(["unlearn", _ul_cfg(tmp_path, tiny_testbed, "f32"), "--quiet", "--threads", "1"]) == 0
    assert run_cli(["unlearn", _ul_cfg(tmp_path, tiny_testbed, "bf16", precision="bf16"), "--quiet",
                    "--threads", "1"]) == 0
    capsys.readouterr()
    f32, bf16 = _result(tmp_path / "f32"), _result(tmp_path / "bf16")
    assert f32["cell"]["name"] != bf16["cell"]["name"]
    assert f32["unlearning"]["precision"] == "float32" and bf16["unlearning"]["precision"] == "bf16"
    a, b = f32["unlearning"]["loss_curve"], bf16["unlearning"]["loss_curve"]
    assert a != b and b == pytest.approx(a, rel=0.1)
    # one process under accelerate launch (the documented multi-GPU entry point)
    env = dict(os.environ, LLMMEM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cfg = _ul_cfg(tmp_path, tiny_testbed, "acc")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
                           "--num_cpu_threads_per_process", "1", "-m", "llmmem.cli", "unlearn", str(cfg), "--quiet",
                           "--threads", "1"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    acc = _result(tmp_path / "acc")
    assert acc["unlearning"]["accelerate"] == {"processes": 1, "distributed_type": "DistributedType.NO",
                                               "mixed_precision": "no"}
    assert acc["cell"]["name"] == f32["cell"]["name"]
    assert acc["unlearning"]["loss_curve"] == a and acc["metrics"] == f32["metrics"]


@pytest.mark.gpu
@needs_cuda
def test_unlearn_cuda_bf16_checkpointing_close_to_cpu(tmp_path, tiny_testbed, capsys):
    """Unlearning on CUDA with bf16 autocast and gradient checkpointing vs the CPU float32 run: the same
    trajectory within bf16's precision (loss curve within 10% per step over 4 steps), forgetting rates within 0.25."""
    assert run_cli(["unlearn", _ul_cfg(tmp_path, tiny_testbed, "cpu", model_args="device=cpu"), "--quiet"]) == 0
    assert run_cli(["unlearn", _ul_cfg(tmp_path, tiny_testbed, "gpu", model_args="device=cuda", precision="bf16",
                                       gradient_checkpointing=True), "--quiet"]) == 0
    cpu, gpu = _result(tmp_path / "cpu"), _result(tmp_path / "gpu")
    assert gpu["unlearning"]["precision"] == "bf16" and gpu["unlearning"]["gradient_checkpointing"]
    assert gpu["unlearning"]["loss_curve"] == pytest.approx(cpu["unlearning"]["loss_curve"], rel=0.1)
    assert abs(gpu["metrics"]["unlearn_forget"]["forgotten_rate"]
               - cpu["metrics"]["unlearn_forget"]["forgotten_rate"]) <= 0.25
