"""Which implementation runs: decided here, once, for every op.

`impl="auto"` picks `cpp` for CPU tensors when the extension `rlfuse._C` loaded, else
`reference`; CUDA tensors go to `triton`. `auto` never raises for a missing backend; an
explicit impl that is unavailable raises a clear error.
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings

import torch

IMPLS = ("auto", "reference", "cpp", "triton")


def _load_cpp():
    try:
        return importlib.import_module("rlfuse._C")
    except ImportError as err:
        warnings.warn(
            f"rlfuse: C++ extension not available ({err}); CPU ops run on the reference "
            "path. Reinstall with `pip install --no-build-isolation -e .` to build it.",
            stacklevel=2,
        )
        return None


# Decided once at import (not per call: keeps the dispatch traceable by torch.compile).
_CPP = _load_cpp()
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def cpp_ext():
    """The compiled extension module, or None when it was not built."""
    return _CPP


def resolve(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda" and _HAS_TRITON:
            return "triton"
        if device.type == "cpu" and _CPP is not None:
            return "cpp"
        return "reference"
    if impl == "cpp":
        if device.type != "cpu":
            raise ValueError(f"impl='cpp' runs on CPU tensors, got tensors on {device}")
        if _CPP is None:
            raise RuntimeError("impl='cpp' requested but the C++ extension rlfuse._C is not built")
    if impl == "triton" and not _HAS_TRITON:
        raise RuntimeError("impl='triton' requested but triton is not installed")
    return impl


def epilogues(impl: str):
    """The (stats, grad_) pair of row-wise kernels for a chunked impl."""
    if impl == "cpp":
        return _CPP.logits_stats, _CPP.logits_grad_
    if impl == "triton":
        from . import _triton

        return _triton.logits_stats, _triton.logits_grad_
    raise ValueError(f"impl {impl!r} has no chunked epilogue kernels")
