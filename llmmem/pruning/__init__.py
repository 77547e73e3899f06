"""Pruning: ``prune(model, spec, calibration) -> PruningReport``, in place (``core.py``).

This package's face is torch-free: the method registry and the spec (``spec.py``) import nothing heavy,
so the command line validates a pruning spec before torch loads. Methods (registry ``METHODS``):
magnitude, wanda, sparsegpt; structures unstructured and N:M; profiles uniform and OWL. Embeddings and
``lm_head`` are never pruned: only the linears inside the decoder blocks found by
:func:`llmmem.models.decoder_blocks`.

A method is a class with ``name``, ``needs_calibration``, ``new_stats(linear) -> stats`` (an object with
``add(x)`` fed the linear's inputs block by block) and ``prune_linear(linear, stats, sparsity, n, m, spec,
notes)``.
"""

from llmmem.registry import Registry

METHODS: Registry = Registry("pruning method")
METHODS.register("magnitude", "llmmem.pruning.magnitude:Magnitude", "|W|, per matrix (or global) threshold")
METHODS.register("wanda", "llmmem.pruning.wanda:Wanda", "|W| x input-activation norm, per output row")
METHODS.register("sparsegpt", "llmmem.pruning.sparsegpt:SparseGPT", "OBS reconstruction from the layer Hessian")


def __getattr__(name):  # lazy: `from llmmem.pruning import prune` imports torch only when asked
    if name in ("prune", "PruningReport", "owl_block_sparsities"):
        from llmmem.pruning import core

        return getattr(core, name)
    raise AttributeError(name)
