import json

import numpy as np
import pytest
import torch

import tiny
from conftest import cli_error, run_cli
from llmmem.config import ConfigError
from llmmem.models import decoder_blocks
from llmmem.pruning import prune
from llmmem.pruning.calibration import Calibration, load_calibration, self_generated
from llmmem.pruning.masks import nm_mask, row_mask, threshold_mask
from llmmem.pruning.profiles import owl_from_ratios
from llmmem.pruning.sparsegpt import sparsegpt_reconstruct
from llmmem.pruning.spec import PruneSpec

ARCHS = tiny.available_archs()


def calib(n=8, t=16, vocab=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randint(3, vocab, (n, t), generator=g), "random", seed)


def test_row_mask_exact_per_row_and_stable():
    scores = torch.tensor([[3.0, 1.0, 2.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    m = row_mask(scores, 0.5)
    assert m.sum(1).tolist() == [2, 2]
    assert m[0].tolist() == [False, True, False, True]
    assert m[1].tolist() == [True, True, False, False]  # stable: ties pruned left to right
    assert row_mask(scores, 0.7).sum(1).tolist() == [2, 2]  # int(4 * 0.7) = 2


def test_threshold_mask_prunes_ties_like_reference():
    distinct = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert threshold_mask(distinct, 0.25).sum() == 2  # sorted[int(4 * .25)] = 2.0 and <=: one more than numel*s
    ties = torch.tensor([[1.0, 2.0], [2.0, 3.0]])
    assert threshold_mask(ties, 0.25).sum() == 3  # threshold 2.0: both 2.0s pruned
    assert threshold_mask(ties, 0.0).sum() == 0


def test_nm_mask_pattern():
    scores = torch.rand(16, 32)
    m = nm_mask(scores, 2, 4)
    assert (m.reshape(16, 8, 4).sum(-1) == 2).all()
    lowest = scores.reshape(16, 8, 4).argsort(-1)[..., :2]
    assert m.reshape(16, 8, 4).gather(-1, lowest).all()
    with pytest.raises(ConfigError, match="divisible"):
        nm_mask(torch.rand(4, 30), 2, 4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_architecture_and_method(arch, method):
    model = tiny.make_model(arch)
    emb = model.get_input_embeddings().weight.clone()
    head = model.get_output_embeddings().weight.clone()
    rep = prune(model, PruneSpec(method, 0.5), calib() if method != "magnitude" else None)
    assert abs(rep.measured_sparsity - 0.5) < 0.01
    for b in decoder_blocks(model):
        for name, ref in b.linears.items():
            if method == "wanda":  # exact per-row count
                assert ((ref.weight == 0).sum(1) >= int(ref.in_features * 0.5)).all(), name
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert torch.equal(model.get_output_embeddings().weight, head)
    out = model(torch.randint(3, 300, (2, 8))).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_nm_structure_holds_in_every_group(method):
    model = tiny.make_model("llama")
    prune(model, PruneSpec(method, structure="2:4"), calib() if method != "magnitude" else None)
    for b in decoder_blocks(model):
        for ref in b.linears.values():
            w = ref.weight
            assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()


def test_wanda_row_sparsity_exact_on_gpt2_conv1d():
    model = tiny.make_model("gpt2")
    prune(model, PruneSpec("wanda", 0.3), calib())
    for b in decoder_blocks(model):
        for ref in b.linears.values():
            assert ((ref.weight == 0).sum(1) == int(ref.in_features * 0.3)).all()


def test_owl_targets_and_global_sparsity():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                      num_attention_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make blocks differ in outlier structure
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight[:, : 8 * (i + 1)] *= 20
    spec = PruneSpec("wanda", 0.5, profile="owl")
    rep = prune(model, spec, calib(4, 16))
    targets = np.array(rep.block_targets)
    assert targets.max() - targets.min() == pytest.approx(2 * 0.08, abs=1e-9)
    assert abs(targets.mean() - 0.5) < 1e-9
    assert abs(rep.measured_sparsity - 0.5) <= 0.001
    m2 = LlamaForCausalLM(cfg).eval()
    rep2 = prune(m2, PruneSpec("magnitude", 0.6, profile="owl"), calib(4, 16))
    assert abs(rep2.measured_sparsity - 0.6) <= 0.001


def test_owl_from_ratios_recentres_weighted():
    t = owl_from_ratios([0.01, 0.02, 0.05], 0.5, 0.08, sizes=[1, 1, 2], mean="weighted")
    dens = 1 - np.array(t)
    assert np.average(dens, weights=[1, 1, 2]) == pytest.approx(0.5)
    assert t[2] < t[0]  # more outliers, less pruning
    assert owl_from_ratios([0.1, 0.1], 0.4, 0.08) == [0.4, 0.4]


def test_magnitude_global_scope():
    model = tiny.make_model("llama")
    rep = prune(model, PruneSpec("magnitude", 0.4, scope="global"))
    assert abs(rep.measured_sparsity - 0.4) < 0.001
    assert len({round(v, 3) for v in rep.per_linear.values()}) > 1  # thresholds are not per matrix


def test_sparsegpt_cholesky_retry_is_reported():
    torch.manual_seed(0)
    a = torch.randn(32, 40)
    H = a @ a.t() / 40 - 0.05 * torch.eye(32)  # slightly indefinite
    W = torch.randn(8, 32)
    notes = []
    out = sparsegpt_reconstruct(W, H, 0.5, 0, 0, percdamp=1e-3, where="test", notes=notes)
    assert notes and "retrying" in notes[0]
    assert abs(float((out == 0).float().mean()) - 0.5) < 0.05


def test_offload_gives_same_weights():
    m1, m2 = tiny.make_model("llama"), tiny.make_model("llama")
    c = calib()
    prune(m1, PruneSpec("sparsegpt", 0.5), c)
    prune(m2, PruneSpec("sparsegpt", 0.5), c, device=torch.device("cpu"), offload=True)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_calibration_text_sources_are_seeded(tmp_path):
    tok = tiny.make_tokenizer()
    model = tiny.make_model("llama", vocab=len(tok))
    txt = tmp_path / "c.txt"
    txt.write_text(" ".join(tiny.CORPUS) * 5)
    a = load_calibration(str(txt), model, tok, 4, 16, seed=1)
    b = load_calibration(str(txt), model, tok, 4, 16, seed=1)
    c = load_calibration(str(txt), model, tok, 4, 16, seed=2)
    assert a.input_ids.shape == (4, 16) and torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny.CORPUS * 3))
    assert load_calibration(str(jl), model, tok, 3, 8, seed=0).input_ids.shape == (3, 8)


def test_self_calibration_seeded_and_shaped():
    tok = tiny.make_tokenizer()
    model = tiny.make_model("llama", vocab=len(tok))
    a = self_generated(model, tok, 5, 12, seed=3, batch_size=2)
    b = self_generated(model, tok, 5, 12, seed=3, batch_size=2)
    assert a.shape == (5, 12) and torch.equal(a, b)
    assert (a[:, 0] == tok.bos_token_id).all()
    assert not (a[:, 1:] == tok.eos_token_id).any()


def test_token_file_formats(tmp_path):
    model = tiny.make_model("llama")
    ids = torch.randint(0, 320, (6, 10))
    torch.save({"input_ids": ids}, tmp_path / "c.pt")
    np.save(tmp_path / "c.npy", ids.numpy().astype(np.uint16))
    for name in ("c.pt", "c.npy"):
        c = load_calibration(str(tmp_path / name), model, None, None, None, 0)
        assert torch.equal(c.input_ids, ids)
    c = load_calibration(str(tmp_path / "c.pt"), model, None, 4, 8, 0)
    assert c.input_ids.shape == (4, 8)


def test_prune_cli_writes_loadable_checkpoint(tmp_path, llama_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "pruned"
    rc = run_cli(["prune", "--model", llama_dir, "--method", "wanda", "--sparsity", "0.5", "--calibration", "self",
                  "--nsamples", "4", "--seqlen", "16", "--output", out, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert "sparsity_config" not in cfg and "quantization_config" not in cfg
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    rep = json.loads((out / "pruning.json").read_text())
    for key in ("method", "structure", "profile", "target_sparsity", "measured_sparsity", "per_linear", "calibration",
                "seconds", "llmmem_version", "peak_memory"):
        assert key in rep
    assert rep["calibration"]["source"] == "self" and rep["calibration"]["nsamples"] == 4
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if "layers" in n and "proj" in n)
    assert zeros > 0
    # --overwrite replaces it
    rc = run_cli(["prune", "--model", llama_dir, "--method", "magnitude", "--sparsity", "0.2", "--output", out,
                  "--overwrite", "--quiet"])
    assert rc == 0
    assert json.loads((out / "pruning.json").read_text())["method"] == "magnitude"


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written
def _bad(capsys, tmp_path, args, *needles):
    out = tmp_path / "out"
    line = cli_error(capsys, ["prune", *args] + ([] if "--output" in args else ["--output", out]), *needles)
    assert not out.exists() or not any(out.iterdir())
    return line


@pytest.fixture
def gold():
    from pathlib import Path

    return Path(__file__).parent / "fixtures" / "pruning-golden-llama"


@pytest.mark.parametrize("flags,needles", [
    (["--method", "wanda", "--sparsity", "1.0"], ["outside [0, 1)"]),
    (["--method", "wanda", "--sparsity", "-0.1"], ["outside [0, 1)"]),
    (["--method", "wanda", "--structure", "4:4"], ["0 < N < M"]),
    (["--method", "wanda", "--structure", "2:4", "--sparsity", "0.6"], ["does not match", "2:4"]),
    (["--method", "pruney", "--sparsity", "0.5"], ["unknown pruning method", "wanda"]),
    (["--method", "wanda", "--sparsity", "0.5", "--profile", "sharp"], ["profile='sharp'", "owl"]),
    (["--method", "wanda", "--sparsity", "0.5", "--structure", "blocky"], ["structure", "N:M"]),
    (["--method", "wanda", "--sparsity", "0.5", "--nsamples", "0"], ["nsamples=0", ">= 1"]),
])
def test_bad_spec(capsys, tmp_path, gold, flags, needles):
    _bad(capsys, tmp_path, ["--model", gold / "model", *flags], *needles)


def test_bad_calibration_files(capsys, tmp_path, gold):
    from safetensors.torch import save_file

    m = ["--model", gold / "model", "--method", "wanda", "--sparsity", "0.5"]
    _bad(capsys, tmp_path, [*m, "--calibration", tmp_path / "missing.safetensors"], "does not exist")
    save_file({"input_ids": torch.zeros(16, dtype=torch.int64)}, tmp_path / "flat.safetensors")
    _bad(capsys, tmp_path, [*m, "--calibration", tmp_path / "flat.safetensors"], "2-D")
    save_file({"input_ids": torch.zeros(2, 8, dtype=torch.float32)}, tmp_path / "float.safetensors")
    _bad(capsys, tmp_path, [*m, "--calibration", tmp_path / "float.safetensors"], "integers")
    save_file({"input_ids": torch.full((2, 8), 500, dtype=torch.int64)}, tmp_path / "big.safetensors")
    _bad(capsys, tmp_path, [*m, "--calibration", tmp_path / "big.safetensors"], "[0, 128)", "500")
    save_file({"input_ids": torch.zeros(2, 200, dtype=torch.int64)}, tmp_path / "long.safetensors")
    _bad(capsys, tmp_path, [*m, "--calibration", tmp_path / "long.safetensors"], "--seqlen 200", "128 positions")


def test_seqlen_beyond_positions_and_short_text(capsys, tmp_path, llama_dir):
    m = ["--model", llama_dir, "--method", "wanda", "--sparsity", "0.5"]
    _bad(capsys, tmp_path, [*m, "--calibration", "self", "--seqlen", "4096"], "128 positions")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    _bad(capsys, tmp_path, [*m, "--calibration", short, "--seqlen", "64"], "fewer than one window")


def test_nonempty_output_needs_overwrite(capsys, tmp_path, gold):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _bad(capsys, tmp_path, ["--model", gold / "model", "--method", "magnitude", "--sparsity", "0.5",
                            "--output", out], "not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
