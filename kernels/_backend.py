"""Which implementation runs: decided here, once, for every op.

`impl="auto"` picks `cpp` for CPU tensors when the extension `rlfuse._C` loaded, else
`reference`; CUDA tensors go to `triton`. `auto` never raises for a missing backend; an
explicit impl that is unavailable raises a clear error.

`lowp_gemm_native(device, dtype)` is the one place that decides whether bf16/fp16 inputs run
their GEMMs in their own dtype (fp32 accumulation) or in fp32 on chunk-wise upcasts. `auto`:
native on CUDA and on CPUs whose matmul units take that dtype (AMX / AVX512-BF16 for bf16,
AMX-FP16 for fp16; their flags as torch's cpuinfo reports them), upcast on other CPUs (AVX2,
where torch's bf16 GEMM runs several times slower than fp32). The user overrides it with the
environment variable RLFUSE_LOWP_GEMM=auto|native|upcast or `rlfuse.set_lowp_gemm(mode)`.

`vocab_slab_mode()` is the user's say over the driver's pass order (`_chunked.pass_order` decides
from it): RLFUSE_VOCAB_SLAB=auto|off|on|ROWS or `rlfuse.set_vocab_slab(mode)`. "auto" runs the
vocabulary-slab order where the row order would hold weight-sized fp32 buffers past a budget, and
on CPU where both orders do the same FLOPs (taller GEMMs); "off" always runs the row order, "on"
always the slab order, a positive integer the slab order with that many vocabulary rows per slab.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from functools import cache

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


def partials_epilogue(impl: str):
    """The row-partials kernel of a vocabulary slice (the vocab-parallel ops)."""
    if impl == "cpp":
        return _CPP.logits_partials
    if impl == "triton":
        from . import _triton

        return _triton.logits_partials
    raise ValueError(f"impl {impl!r} has no chunked epilogue kernels")


LOWP_GEMM_MODES = ("auto", "native", "upcast")
LOWP = (torch.bfloat16, torch.float16)


def _check_lowp_mode(mode, where: str) -> str:
    if mode not in LOWP_GEMM_MODES:
        raise ValueError(f"{where} must be one of {LOWP_GEMM_MODES}, got {mode!r}")
    return mode


_lowp_mode = _check_lowp_mode(os.environ.get("RLFUSE_LOWP_GEMM", "auto"),
                              "the environment variable RLFUSE_LOWP_GEMM")


def set_lowp_gemm(mode: str) -> None:
    """How bf16/fp16 inputs run their GEMMs: "native" (in their dtype, fp32 accumulation),
    "upcast" (fp32 on chunk-wise upcasts) or "auto" (native where the hardware has it).
    Overrides RLFUSE_LOWP_GEMM for this process."""
    global _lowp_mode
    _lowp_mode = _check_lowp_mode(mode, "set_lowp_gemm(mode)")


def lowp_gemm_mode() -> str:
    return _lowp_mode


@cache
def cpu_native_lowp(dtype: torch.dtype) -> bool:
    """Whether this CPU's matmul units take `dtype` (cpuinfo's flags, as torch reports them)."""
    if dtype == torch.bfloat16:
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return torch.cpu._is_amx_fp16_supported()


def lowp_gemm_native(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `dtype` inputs on `device` run their GEMMs in their own dtype: the one place
    that decides it (False for fp32 / fp64, which keep their own GEMMs)."""
    if dtype not in LOWP or _lowp_mode == "upcast":
        return False
    if device.type != "cpu":
        return True
    has_gemm = _CPP is not None and _CPP.has_lowp_gemm(dtype)
    if _lowp_mode == "auto":
        return has_gemm and cpu_native_lowp(dtype)
    if not has_gemm:
        raise RuntimeError(f"RLFUSE_LOWP_GEMM / set_lowp_gemm ask for native {dtype} GEMMs, "
                           "but rlfuse._C has no bf16/fp16 -> fp32 GEMM here (it calls the MKL "
                           "that x86-64 torch builds link); use 'auto' or 'upcast'")
    return True


VOCAB_SLAB_MODES = ("auto", "off", "on")


def _check_slab_mode(mode, where: str):
    """mode as a VOCAB_SLAB_MODES string or a positive int (rows per slab)."""
    if isinstance(mode, str) and mode.strip().isdigit():
        mode = int(mode)
    if isinstance(mode, bool) or not (mode in VOCAB_SLAB_MODES
                                      or isinstance(mode, int) and mode > 0):
        raise ValueError(f"{where} must be one of {VOCAB_SLAB_MODES} or a positive number of "
                         f"vocabulary rows per slab, got {mode!r}")
    return mode


_slab_mode = _check_slab_mode(os.environ.get("RLFUSE_VOCAB_SLAB", "auto"),
                              "the environment variable RLFUSE_VOCAB_SLAB")


def set_vocab_slab(mode) -> None:
    """The driver's pass order: "auto" (the vocabulary-slab order where the row order would hold
    weight-sized fp32 buffers, and on CPU for taller GEMMs where both orders do the same FLOPs;
    `rlfuse._chunked.pass_order`), "off" (the row order), "on" (the slab order) or a positive
    int (the slab order, that many vocabulary rows per slab).
    Overrides RLFUSE_VOCAB_SLAB for this process."""
    global _slab_mode
    _slab_mode = _check_slab_mode(mode, "set_vocab_slab(mode)")


def vocab_slab_mode():
    return _slab_mode
