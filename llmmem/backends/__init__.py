"""Backends: the contract (base.py) and its implementations (hf.py, vllm.py)."""

from llmmem.backends.base import BACKENDS

__all__ = ["BACKENDS", "make_backend"]


def make_backend(name: str, lm, **kwargs):
    """Instantiate the backend registered as ``name`` for a loaded model."""
    return BACKENDS.get(name)(lm, **kwargs)


def check_backend(name: str) -> str:
    """Fail early (before any model loads) for an unknown or uninstalled backend."""
    BACKENDS.get(name).check_available()
    return name
