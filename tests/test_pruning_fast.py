"""The pruning speed-ups give the reference's results: selection-based masks = the reference's sorts, the
vectorised SparseGPT column loop = the reference's ``fasterprune`` loop, shared Hessians = separate ones,
and the TF32 switch restores the caller's settings."""

import math

import pytest
import torch

import tiny
from llmmem.pruning import prune, sparsegpt
from llmmem.pruning.calibration import Calibration
from llmmem.pruning.masks import row_mask, threshold_mask
from llmmem.pruning.sparsegpt import HessianStats, full_fp32_matmul, sparsegpt_reconstruct
from llmmem.pruning.spec import PruneSpec


def _sort_row_mask(scores, sparsity):  # the reference (Wanda lib/prune.py)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    idx = torch.sort(scores, dim=-1, stable=True)[1][:, :int(scores.shape[1] * sparsity)]
    return mask.scatter_(1, idx, True)


def _scores(kind, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "continuous":
        return torch.rand(shape, generator=g)
    if kind == "ties":  # few distinct values: ties straddle the k-th score in most rows
        return torch.randint(0, 4, shape, generator=g).float()
    s = torch.rand(shape, generator=g)  # rows with zeros (already pruned weights)
    s[torch.rand(shape, generator=g) < 0.6] = 0
    return s


@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7, 0.99])
def test_row_mask_is_the_stable_sort_mask(kind, sparsity):
    for seed, shape in enumerate([(7, 13), (64, 96), (3, 1)]):
        s = _scores(kind, shape, seed)
        assert torch.equal(row_mask(s, sparsity), _sort_row_mask(s, sparsity)), (kind, shape)


@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros"])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_threshold_mask_is_the_sort_threshold(kind, sparsity):
    s = _scores(kind, (48, 40), 1)
    thresh = torch.sort(s.flatten())[0][int(s.numel() * sparsity)]
    assert torch.equal(threshold_mask(s, sparsity), s <= thresh)


def _reference_fasterprune(W, H, sparsity, prune_n, prune_m, blocksize=128, percdamp=0.01):
    """SparseGPT's ``fasterprune`` (the reference's column loop), on a weight and a Hessian."""
    W = W.clone().float()
    H = H.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prune_n == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                tmp = W1[:, i:(i + prune_m)] ** 2 / (torch.diag(Hinv1)[i:(i + prune_m)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def _problem(rows, cols, seed, dead=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(4 * cols, cols, generator=g) * torch.exp(torch.randn(cols, generator=g))
    X[:, :dead] = 0
    return W, 2 / X.shape[0] * X.t() @ X


@pytest.mark.parametrize("structure", [(0.5, 0, 0), (0.6, 0, 0), (0.5, 2, 4), (0.5, 4, 8)])
@pytest.mark.parametrize("shape", [(24, 200), (70, 64), (9, 136), (300, 260), (192, 576)])
def test_sparsegpt_column_loop_is_the_reference_loop(structure, shape):
    sparsity, n, m = structure
    W, H = _problem(*shape, seed=shape[1], dead=3)
    ref = _reference_fasterprune(W, H, sparsity, n, m)
    for blocksize in (128, 32):
        got = sparsegpt_reconstruct(W, H, sparsity, n, m, blocksize=blocksize)
        exp = ref if blocksize == 128 else _reference_fasterprune(W, H, sparsity, n, m, blocksize=blocksize)
        assert torch.equal(got, exp), (shape, structure, blocksize)  # bit for bit, no tolerance


def _reference_hessian(batches):
    """SparseGPT's ``add_batch``, one sequence per call, as the Wanda code calls it."""
    H, nsamples = None, 0
    for x in batches:
        for seq in x:
            inp = seq.t()  # [d_in, tokens], a transposed view
            H = torch.zeros(inp.shape[0], inp.shape[0]) if H is None else H
            H *= nsamples / (nsamples + 1)
            nsamples += 1
            inp = math.sqrt(2 / nsamples) * inp.float()
            H += inp.matmul(inp.t())
    return H


@pytest.mark.parametrize("shape", [(37, 192), (256, 576), (64, 208), (37, 200), (64, 130), (19, 16)])
def test_hessian_is_the_reference_hessian_bit_for_bit(shape):
    """Also through the upper-staircase product (d_in > 64 on the CPU) and its mirrored lower half, where
    that gives the full product's bits (with MKL: d_in a multiple of 16; other d_in fall back to the full
    product, e.g. 200: MKL's edge tiles there sum in another order)."""
    tokens, d = shape
    g = torch.Generator().manual_seed(d)
    scale = torch.exp(torch.randn(d, generator=g))
    batches = [torch.randn(b, tokens, d, generator=g) * scale for b in (3, 1, 2)]
    stats = HessianStats(d, "cpu")
    for i, x in enumerate(batches):
        stats.add(x)
        if i == 1:  # read in between: mirrored, then stale again after the next add
            assert torch.equal(stats.H, _reference_hessian(batches[:2]))
    assert torch.equal(stats.H, _reference_hessian(batches))
    assert torch.equal(stats.H, stats.H.t())
    if d > 64 and d % 16 == 0 and torch.backends.mkl.is_available():  # the staircase was exact, and used
        assert sparsegpt._staircase_exact[(torch.device("cpu"), tokens, d)]


def test_linears_fed_one_input_share_one_hessian_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    shared: dict = {}
    a, b = HessianStats(16, "cpu", shared=shared), HessianStats(16, "cpu", shared=shared)
    alone = HessianStats(16, "cpu")
    other = HessianStats(16, "cpu", shared=shared)
    for _ in range(3):
        x = torch.randn(2, 5, 16, generator=g)
        a.add(x.detach())
        b.add(x.detach())  # the same input (as forward hooks pass it): adopts a's Hessian
        alone.add(x)
        other.add(x.clone())  # equal values in other memory: computed on its own
    assert b.H is a.H and b.nsamples == a.nsamples == 6
    assert other.H is not a.H
    assert torch.equal(a.H, alone.H) and torch.equal(other.H, alone.H)
    x = torch.randn(2, 5, 16, generator=g)
    c, d = HessianStats(16, "cpu", shared=shared), HessianStats(16, "cpu", shared=shared)
    c.add(x)
    x.mul_(2)  # changed in place between the two hooks: not the same input any more
    d.add(x)
    assert d.H is not c.H and torch.equal(d.H, 4 * c.H)
    shared.clear()  # and with Hessians accumulated on their upper staircase (d_in > 64)
    a, b, alone = HessianStats(128, "cpu", shared=shared), HessianStats(128, "cpu", shared=shared), HessianStats(128, "cpu")
    for i in range(3):
        x = torch.randn(2, 5, 128, generator=g)
        a.add(x)
        b.add(x)
        alone.add(x)
        if i == 1:
            assert torch.equal(b.H, alone.H)  # b mirrors the shared H; a sees it mirrored
    assert b.H is a.H and torch.equal(a.H, alone.H) and torch.equal(a.H, a.H.t())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi"])
def test_shared_hessians_give_the_unshared_pruning(arch, monkeypatch):
    g = torch.Generator().manual_seed(0)
    calib = Calibration(torch.randint(3, 300, (6, 12), generator=g), "random", 0)
    shared_model, plain_model = tiny.make_model(arch), tiny.make_model(arch)
    prune(shared_model, PruneSpec("sparsegpt", 0.5), calib)
    init = HessianStats.__init__
    monkeypatch.setattr("llmmem.pruning.sparsegpt.HessianStats.__init__",
                        lambda self, d, dev, shared=None: init(self, d, dev))
    prune(plain_model, PruneSpec("sparsegpt", 0.5), calib)
    assert not hasattr(sparsegpt._workspaces, "cache")  # the column loop's buffers are let go after a run
    for (k, a), b in zip(shared_model.state_dict().items(), plain_model.state_dict().values()):
        assert torch.equal(a, b), k


def _precision_state():
    b = torch.backends
    return [getattr(o, "fp32_precision", None) for o in (b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn, b.mkldnn.matmul)]


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
@pytest.mark.parametrize("user", ["default", "tf32", "ieee_matmul_only"])
def test_full_fp32_matmul_restores_the_callers_settings_even_on_error(user):
    b = torch.backends
    before = _precision_state()
    try:
        if user == "tf32":
            b.cuda.matmul.fp32_precision = "tf32"
            b.mkldnn.matmul.fp32_precision = "bf16"
        elif user == "ieee_matmul_only":
            b.cuda.matmul.fp32_precision = "ieee"
        mine = _precision_state()
        with pytest.raises(RuntimeError, match="boom"):
            with full_fp32_matmul():
                assert _precision_state() == ["ieee"] * 4
                raise RuntimeError("boom")
        assert _precision_state() == mine
        with full_fp32_matmul():
            assert not math.isnan(float(torch.ones(2) @ torch.ones(2)))
        assert _precision_state() == mine
    finally:
        for o, v in zip((b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn, b.mkldnn.matmul), before):
            o.fp32_precision = v


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
def test_sparsegpt_runs_without_tf32_and_restores_the_setting():
    from llmmem.models import decoder_blocks

    b = torch.backends
    before = b.cuda.matmul.fp32_precision
    model = tiny.make_model("llama")
    seen = []
    decoder_blocks(model)[0].module.register_forward_hook(lambda *_: seen.append(_precision_state()))
    calib = Calibration(torch.randint(3, 300, (4, 8), generator=torch.Generator().manual_seed(0)), "random", 0)
    try:
        b.cuda.matmul.fp32_precision = "tf32"
        prune(model, PruneSpec("sparsegpt", 0.5), calib)
        assert seen and all(s == ["ieee"] * 4 for s in seen)  # the block forward passes too
        assert b.cuda.matmul.fp32_precision == "tf32"
    finally:
        b.cuda.matmul.fp32_precision = before
