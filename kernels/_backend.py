"""Which implementation runs: decided here, once, for every op.

`impl="auto"` picks `cpp` for CPU tensors when the extension `rlfuse._C` loaded, else
`reference`; CUDA tensors go to `triton`. `auto` never raises for a missing backend; an
explicit impl that is unavailable raises a clear error.
"""
from __future__ import annotations

import functools
import importlib
import warnings

import torch

IMPLS = ("auto", "reference", "cpp", "triton")


@functools.cache
def cpp_ext():
    """The compiled extension, or None (warned once) when it was not built."""
    try:
        return importlib.import_module("rlfuse._C")
    except ImportError as err:
        warnings.warn(
            f"rlfuse: C++ extension not available ({err}); CPU ops run on the reference "
            "path. Reinstall with `pip install --no-build-isolation -e .` to build it.",
            stacklevel=3,
        )
        return None


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu" and cpp_ext() is not None:
            return "cpp"
        return "reference"
    if impl == "cpp":
        if device.type != "cpu":
            raise ValueError(f"impl='cpp' runs on CPU tensors, got tensors on {device}")
        if cpp_ext() is None:
            raise RuntimeError("impl='cpp' requested but the C++ extension rlfuse._C is not built")
    if impl == "triton" and not triton_available():
        raise RuntimeError("impl='triton' requested but triton is not installed")
    return impl


def epilogues(impl: str):
    """The (stats, grad_) pair of row-wise kernels for a chunked impl."""
    if impl == "cpp":
        ext = cpp_ext()
        return ext.logits_stats, ext.logits_grad_
    if impl == "triton":
        from . import _triton

        return _triton.logits_stats, _triton.logits_grad_
    raise ValueError(f"impl {impl!r} has no chunked epilogue kernels")
