"""SparseGPT (Frantar & Alistarh 2023): OBS weight reconstruction from the layer Hessian.

``H = (2/N) sum_x x x^T`` over calibration tokens, dampened by ``percdamp * mean(diag H)``; columns are
processed in blocks of ``blocksize``; within a block the mask is chosen on ``w^2 / [H^-1]_cc^2`` (per block
for unstructured, per M-column group for N:M) and each pruned weight's error is propagated to the
not-yet-processed columns through the upper Cholesky factor of ``H^-1``.

Speed without changing a bit: linears fed the same input tensor (q/k/v, gate/up) share one Hessian and one
Cholesky factor (the reference computes equal ones separately); on the CPU each sequence's ``X^T X`` is computed
on its upper staircase only and mirrored, where a check finds the full product's bits (:class:`HessianStats`);
the column loop computes every value with the reference's operations in the reference's order, on the block
transposed and with fewer kernel launches per column (:func:`_obs_columns`; a sub-blocked variant summed in
another order and drifted from the reference's masks on a real model, so reorderings are out).

TF32 is off for the whole SparseGPT run (the block forward passes, the Hessian accumulation and the OBS
update), as in the reference's ``sparsegpt.py``, which turns it off globally at import; the caller's
settings are restored afterwards, also on error (:func:`full_fp32_matmul`). ``HessianStats.add`` and
:func:`sparsegpt_reconstruct` turn it off themselves for other callers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading

import torch

from llmmem.models import LinearRef
from llmmem.pruning.masks import kth_smallest

log = logging.getLogger(__name__)



@contextlib.contextmanager
def full_fp32_matmul():
    """Turn TF32 (and reduced-precision float32 matmuls) off inside; restore the caller's settings after.

    The reference sets ``torch.backends.cuda.matmul.allow_tf32 = False`` and
    ``torch.backends.cudnn.allow_tf32 = False``. Torch >= 2.9 spells these ``fp32_precision = "ieee"``
    per backend and refuses to read the old flags once the new ones were used, so the new API is used
    where it exists (the settings are saved and restored exactly), the old flags otherwise.
    """
    b = torch.backends
    new_api = [o for o in (getattr(b.cuda, "matmul", None), getattr(getattr(b, "cudnn", None), "conv", None),
                           getattr(getattr(b, "cudnn", None), "rnn", None),
                           getattr(getattr(b, "mkldnn", None), "matmul", None))
               if o is not None and hasattr(o, "fp32_precision")]
    if new_api:
        saved = [o.fp32_precision for o in new_api]
        try:
            for o in new_api:
                o.fp32_precision = "ieee"
            yield
        finally:
            for o, v in zip(new_api, saved):
                o.fp32_precision = v
    else:  # pragma: no cover - torch < 2.9
        matmul, cudnn = b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32
        try:
            b.cuda.matmul.allow_tf32 = False
            b.cudnn.allow_tf32 = False
            yield
        finally:
            b.cuda.matmul.allow_tf32 = matmul
            b.cudnn.allow_tf32 = cudnn


_workspaces = threading.local()  # per thread: a few recently used buffers, by shape (SparseGPT runs drop them)


def _cached(cls, *args):
    """This thread's ``cls(*args)`` (a set of buffers), made on first use; the 8 most recent are kept."""
    cache = getattr(_workspaces, "cache", None)
    if cache is None:
        cache = _workspaces.cache = {}
    key = (cls, *args)
    ws = cache.pop(key, None)
    if ws is None:
        ws = cls(*args)
    cache[key] = ws  # most recently used last
    while len(cache) > 8:
        del cache[next(iter(cache))]
    return ws


_TILE = 64  # rows of a tile of the Hessian's upper staircase (a multiple of 16: 64-byte aligned slices)
_staircase_exact: dict = {}  # (device, tokens, d_in) -> whether the staircase gives the full product's bits


class HessianStats:
    """``H`` accumulated one calibration sequence at a time with the reference's running-mean update.

    ``shared``: a dict owned by the caller (one per pruning run). Linears whose forward hooks receive
    the same input (the same memory, view and version: q/k/v projections, gate/up, even through
    ``detach()``) then hold one Hessian tensor: the first computes it, the others adopt it. The dict
    holds those inputs alive (so their memory cannot be reused meanwhile); the caller clears it once a
    block's statistics pass is over.

    Each sequence's product ``X^T X`` is symmetric; on the CPU only its upper staircase (tiles of ``_TILE`` rows,
    from the diagonal on) is computed, about half the work, and the rest of ``H`` is mirrored from it when
    ``H`` is read. Each entry is the same dot product as in the full product, so the bits are the same:
    this is checked on the first sequence of each shape (against the full product, which must itself be
    bitwise symmetric), and the full product is used where it is not so.
    """

    def __init__(self, d_in: int, device, shared: dict | None = None):
        # [H, whether H's lower staircase is stale (to be mirrored from the upper one before H is read)]
        self._acc = [torch.zeros((d_in, d_in), dtype=torch.float32, device=device), False]
        self.nsamples = 0
        self.shared = shared

    @property
    def H(self) -> torch.Tensor:
        acc = self._acc
        if acc[1]:
            _mirror_upper(acc[0])
            acc[1] = False
        return acc[0]

    def add(self, x: torch.Tensor) -> None:
        if self.shared is not None:
            key = _input_key(x)
            hit = self.shared.get(key)
            # the same input, added to a Hessian that was in our state before
            if hit is not None and hit[1] == self.nsamples and hit[3][0].shape == self._acc[0].shape:
                self._acc, self.nsamples = hit[3], hit[2]
                return
            before = self.nsamples
        src = x
        if x.dim() == 2:
            x = x.unsqueeze(0)
        H = self._acc[0]
        ws = None  # buffers for the upper staircase products of this call's sequences
        with full_fp32_matmul():
            for seq in x.reshape(x.shape[0], -1, x.shape[-1]):  # one sequence at a time, as the reference
                H *= self.nsamples / (self.nsamples + 1)
                self.nsamples += 1
                scale = math.sqrt(2 / self.nsamples)
                seq = seq.float()
                G = None
                if _staircase_may_be_exact(seq):
                    if ws is None or ws.inp.shape != seq.shape:
                        ws = _ProductWorkspace(*seq.shape, seq.device)
                    G = ws.product(seq, scale)
                if G is None:
                    inp = scale * seq
                    H += inp.t() @ inp
                else:
                    H += G  # its lower staircase is zero: H's goes stale
                    self._acc[1] = True
        if self.shared is not None:
            self.shared[key] = (src, before, self.nsamples, self._acc)


def _tiles(d: int) -> list[tuple[int, int]]:
    edges = list(range(0, d, _TILE)) + [d]
    return list(zip(edges, edges[1:]))


def _mirror_upper(H: torch.Tensor) -> None:
    """Copy the upper staircase's off-diagonal tiles onto the lower ones (in place)."""
    for a0, a1 in _tiles(H.shape[0]):
        H[a1:, a0:a1].copy_(H[a0:a1, a1:].t())


def _staircase_may_be_exact(seq: torch.Tensor) -> bool:
    tokens, d = seq.shape
    return (seq.device.type == "cpu" and d > _TILE and seq.is_contiguous()
            and _staircase_exact.get((seq.device, tokens, d), True))


class _ProductWorkspace:
    """Buffers for ``inp^T inp`` on its upper staircase, ``inp = scale * seq`` ([tokens, d])."""

    def __init__(self, tokens: int, d: int, device):
        self.inp = torch.empty((tokens, d), dtype=torch.float32, device=device)
        self.G = torch.zeros((d, d), dtype=torch.float32, device=device)  # lower staircase: stays zero
        self.tiles = [(self.inp[:, a0:a1].t(), self.inp[:, a0:], self.G[a0:a1, a0:]) for a0, a1 in _tiles(d)]

    def product(self, seq: torch.Tensor, scale: float) -> torch.Tensor | None:
        """``G`` (upper staircase: the full product's entries; zero below), or None where the staircase does not
        give the full product's bits (checked on the first sequence of each shape)."""
        torch.mul(seq, scale, out=self.inp)  # = scale * seq, as the reference
        for a, b, out in self.tiles:
            torch.matmul(a, b, out=out)
        key = (seq.device, *seq.shape)
        if key not in _staircase_exact:
            full = self.inp.t() @ self.inp
            mirrored = self.G.clone()
            _mirror_upper(mirrored)
            _staircase_exact[key] = torch.equal(mirrored, full)
            if not _staircase_exact[key]:
                log.info("Hessian of %d x %d inputs on %s: the full product (the staircase's bits differ)", *key[1:],
                         key[0])
        return self.G if _staircase_exact[key] else None


def _input_key(x: torch.Tensor) -> tuple:
    """Identifies a tensor's values while the tensor is alive: its memory, view and version counter."""
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype,
            x.device, x._version)


def _inverse_cholesky(H: torch.Tensor, percdamp: float, where: str, notes: list) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1; retries with 10x more dampening when H is not PD."""
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    for attempt in range(6):
        Hd = H.clone()
        Hd[idx, idx] += damp
        try:
            L = torch.linalg.cholesky(Hd)
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True)
        except torch.linalg.LinAlgError:
            frac = percdamp * 10 ** (attempt + 1)
            msg = f"{where}: Cholesky failed with dampening {percdamp * 10 ** attempt:g}; retrying with {frac:g}"
            log.warning(msg)
            notes.append(msg)
            damp = frac * torch.mean(torch.diag(H))
    raise RuntimeError(f"{where}: Hessian is not positive definite even with heavy dampening")


def _prepare(H: torch.Tensor, percdamp: float, where: str, notes: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(dead input columns, upper Cholesky factor of the dampened inverse), as the reference."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    return dead, _inverse_cholesky(H, percdamp, where, notes)


class _BlockWorkspace:
    """Buffers and per-column views for one ``[out, count]`` block of :func:`_obs_columns`, made once per shape.

    The block is held transposed (``WT[c]`` = column ``c`` of the reference's ``W1``, contiguous), so every
    per-column operation reads and writes contiguous memory; the views each column needs are built here once,
    so the column loop itself only runs four kernels.
    """

    def __init__(self, rows: int, count: int, dtype, device):
        self.WT = torch.empty((count, rows), dtype=dtype, device=device)  # the block, transposed
        self.ET = torch.empty_like(self.WT)  # the errors, transposed
        self.MT = torch.empty((count, rows), dtype=torch.bool, device=device)  # the mask, transposed
        self.U1 = torch.empty((count, count), dtype=dtype, device=device)
        self.Err1 = torch.empty((rows, count), dtype=dtype, device=device)  # the reference's Err1 (contiguous)
        prod = torch.empty((max(count - 1, 0), rows), dtype=dtype, device=device)
        self.zero = torch.zeros((), dtype=dtype, device=device)
        WT, ET, MT, U1 = self.WT, self.ET, self.MT, self.U1
        # column c: (w, err, mask, d, U1[c, c+1:] as a column, err as a row, product buffer, later columns)
        self.steps = [(WT[c], ET[c], MT[c], U1[c, c], U1[c, c + 1:].unsqueeze(1), ET[c].unsqueeze(0),
                       prod[:count - c - 1], WT[c + 1:]) for c in range(count)]


def _obs_columns(W: torch.Tensor, U: torch.Tensor, sparsity: float, n: int, m: int, blocksize: int) -> None:
    """Prune and reconstruct ``W`` ([out, in]) in place, bit for bit as the reference's ``fasterprune`` loop
    (column by column inside a block, then one product for the columns after it).

    Every value is computed by the same floating-point operations, in the same order, as the reference;
    only the layout and the bookkeeping differ (the tests check equality bit for bit, for unstructured and
    N:M masks, on the reference loop itself):

    * the block is processed transposed (columns contiguous), in buffers and views made once per shape;
    * the error of column ``c`` is ``where(mask, w, 0) / d``, which equals the reference's ``(w - q) / d``
      bit for bit (``w - 0 = w``; ``w - w = +0``);
    * its update of the later columns is the reference's rank-1 product, each entry ``err * u`` rounded once
      (a product ``k = 1`` is exactly that), then subtracted on its own (never a fused multiply-add); the
      reference also updates column ``c`` itself, which is never read again, so that is skipped;
    * the pruned block ``Q1`` is made once at the block's end (the mask's entries of the block zeroed), not
      column by column;
    * the update of the columns after the block is the reference's product, with ``Err1`` laid out as the
      reference's (contiguous ``[out, count]``), since a long product's summation order may depend on it.

    A faster variant that grouped the errors in sub-blocks summed in another order: on SmolLM2-135M its masks
    agreed with the reference's on only 98.4% of the entries (max relative error 0.18, carried block to
    block). Such reorderings are excluded: the reference's numbers come first.
    """
    rows, cols = W.shape
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        ws = _cached(_BlockWorkspace, rows, count, W.dtype, W.device)
        WT, MT = ws.WT, ws.MT
        WT.copy_(W[:, i1:i2].t())
        ws.U1.copy_(U[i1:i2, i1:i2])
        d1 = torch.diag(ws.U1)
        if m == 0:
            score = WT ** 2 / d1.reshape(-1, 1) ** 2  # the reference's sorted(score)[k], found by selection
            torch.le(score, kth_smallest(score, int(score.numel() * sparsity) + 1), out=MT)
        else:
            MT.zero_()
        for c, (w, err, mask, d, u, err_row, prod, later) in enumerate(ws.steps):
            if m and c % m == 0:  # N:M: the mask of the next m columns, from their current values
                score = (WT[c:c + m].t() ** 2 / d1[c:c + m].reshape(1, -1) ** 2).contiguous()
                MT.t().scatter_(1, c + torch.topk(score, n, dim=1, largest=False)[1], True)
            torch.where(mask, w, ws.zero, out=err)
            err.div_(d)
            torch.mul(u, err_row, out=prod)
            later.sub_(prod)
        torch.where(MT.t(), ws.zero, WT.t(), out=W[:, i1:i2])  # Q1
        ws.Err1.copy_(ws.ET.t())
        W[:, i2:] -= ws.Err1 @ U[i1:i2, i2:]


def sparsegpt_reconstruct(W: torch.Tensor, H: torch.Tensor, sparsity: float, n: int, m: int,
                          blocksize: int = 128, percdamp: float = 0.01, where: str = "",
                          notes: list | None = None, prepared: tuple | None = None) -> torch.Tensor:
    """Return the pruned and reconstructed ``W`` ([out, in], float32).

    ``prepared``: ``_prepare(H, percdamp, ...)`` computed once for linears that share ``H``.
    """
    notes = notes if notes is not None else []
    with full_fp32_matmul():
        dead, U = prepared if prepared is not None else _prepare(H, percdamp, where, notes)
        W = W.clone().float()
        W[:, dead] = 0
        _obs_columns(W, U, sparsity, n, m, blocksize)
        return W


class SparseGPT:
    name = "sparsegpt"
    needs_calibration = True

    def __init__(self):
        self._inputs: dict = {}  # block input tensors -> shared Hessians (see HessianStats)
        self._prepared: tuple | None = None  # (H, percdamp, prepared) of the last linear pruned

    @contextlib.contextmanager
    def precision(self):
        """The whole run (forward passes included) without TF32, as the reference, which sets it at import;
        the column loop's buffers are let go at the end."""
        try:
            with full_fp32_matmul():
                yield
        finally:
            _workspaces.__dict__.pop("cache", None)

    def new_stats(self, ref: LinearRef) -> HessianStats:
        return HessianStats(ref.in_features, ref.weight.device, shared=self._inputs)

    def scores(self, ref: LinearRef, stats) -> torch.Tensor:  # used by profiles only
        raise NotImplementedError

    def prune_linear(self, ref: LinearRef, stats: HessianStats, sparsity: float, n: int, m: int, spec,
                     notes: list) -> None:
        self._inputs.clear()  # the statistics pass of this block is over
        if sparsity <= 0 and not m:
            return
        last = self._prepared
        if last is not None and last[0] is stats.H and last[1] == spec.percdamp:
            prepared = last[2]
        else:
            with full_fp32_matmul():
                prepared = _prepare(stats.H, spec.percdamp, ref.name, notes)
            self._prepared = (stats.H, spec.percdamp, prepared)
        W = sparsegpt_reconstruct(ref.weight, stats.H, sparsity, n, m, spec.blocksize, spec.percdamp,
                                  where=ref.name, notes=notes, prepared=prepared)
        ref.weight.copy_(W.to(ref.weight.dtype))
