"""Skinny linear layers for decoding: a few rows of activations against a whole weight.

A decode step multiplies each weight by the batch's few rows once. BLAS GEMMs are tuned for
many rows; at 8 rows, MKL's fp32 GEMM at Qwen2.5-0.5B's LM head (151936 x 896) reads its weight
at a fraction of the memory bandwidth, torch's bf16 GEMM on a CPU without native bf16 is slower
still, and torch's int8 weight-only kernel is compute-bound (`python -m rlfuse.benches.decode`).
`decode_linear` (csrc/cpu/decode.cpp) reads each weight row once for all rows, converts fp32,
bf16 or int8 (one fp32 scale per output row) to fp32 in registers and accumulates in fp32.

`decode_rows(rows, weight, x)` is the one place that decides when it runs: CPU tensors, the
extension built, no autograd graph to record, and at most FLOAT_MAX_ROWS rows (fp32 / bf16
weights) or INT8_MAX_ROWS rows (int8), the crossovers measured by the bench above. The
environment variable RLFUSE_DECODE=off turns it off (torch runs every call).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ._backend import cpp_ext

FLOAT_MAX_ROWS = 16
INT8_MAX_ROWS = 64
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.int8)
_MODES = ("auto", "off")
ENABLED = os.environ.get("RLFUSE_DECODE", "auto")
if ENABLED not in _MODES:
    raise ValueError(f"the environment variable RLFUSE_DECODE must be one of {_MODES}, "
                     f"got {ENABLED!r}")
ENABLED = ENABLED == "auto"


def decode_rows(rows: int, weight: Tensor, x: Optional[Tensor] = None) -> bool:
    """Whether `decode_linear` of `rows` activation rows (`x`, when known) runs the decode kernel
    on `weight` (else it runs torch)."""
    limit = INT8_MAX_ROWS if weight.dtype == torch.int8 else FLOAT_MAX_ROWS
    grad = torch.is_grad_enabled() and (weight.requires_grad or (x is not None and x.requires_grad))
    return (ENABLED and cpp_ext() is not None and weight.device.type == "cpu" and weight.dtype in WEIGHT_DTYPES
            and 0 < rows <= limit and not grad and (x is None or x.device.type == "cpu"))


def decode_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  scale: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None
                  ) -> Tensor:
    """x [..., K] @ weight[N, K]^T (* scale [N] for an int8 weight) (+ bias [N]), accumulated in
    fp32 and returned in `out_dtype` (default x's dtype). No gradient. Runs the decode kernel
    where `decode_rows` says so, else torch on the weight converted to x's dtype."""
    out_dtype = out_dtype or x.dtype
    if not decode_rows(x.numel() // max(x.shape[-1], 1), weight, x):
        w = weight.to(x.dtype) if scale is None else weight.to(x.dtype) * scale[:, None].to(x.dtype)
        return torch.nn.functional.linear(x, w, bias if bias is None else bias.to(x.dtype)
                                          ).to(out_dtype)
    rows = x.reshape(-1, x.shape[-1]).float().contiguous()
    y = cpp_ext().decode_linear(rows, weight.contiguous(),
                                None if scale is None else scale.reshape(-1).float().contiguous(),
                                None if bias is None else bias.float().contiguous())
    return y.reshape(*x.shape[:-1], -1).to(out_dtype)
