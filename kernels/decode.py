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
DEQUANT_ROWS = 4096  # torch's path dequantizes an int8 weight this many output rows at a time
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.int8)
_MODES = ("auto", "off")
ENABLED = os.environ.get("RLFUSE_DECODE", "auto")
if ENABLED not in _MODES:
    raise ValueError(f"the environment variable RLFUSE_DECODE must be one of {_MODES}, "
                     f"got {ENABLED!r}")
ENABLED = ENABLED == "auto"


def decode_rows(rows: int, weight: Tensor, x: Optional[Tensor] = None) -> bool:
    """Whether `decode_linear` of `rows` activation rows (`x`, when known) runs the decode kernel
    on `weight` (else it runs torch). Tensor subclasses (an FSDP2 shard's DTensor) go to torch."""
    limit = INT8_MAX_ROWS if weight.dtype == torch.int8 else FLOAT_MAX_ROWS
    grad = torch.is_grad_enabled() and (weight.requires_grad or (x is not None and x.requires_grad))
    return (ENABLED and cpp_ext() is not None and 0 < rows <= limit and not grad
            and type(weight) in (Tensor, torch.nn.Parameter) and weight.device.type == "cpu"
            and weight.dtype in WEIGHT_DTYPES and (x is None or x.device.type == "cpu"))


def decode_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  scale: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None
                  ) -> Tensor:
    """x [..., K] @ weight[N, K]^T (* scale [N] for an int8 weight) (+ bias [N]), returned in
    `out_dtype` (default x's dtype): the decode kernel (fp32 accumulation, no gradient) where
    `decode_rows` says so, else `torch_linear`."""
    out_dtype = out_dtype or x.dtype
    if not decode_rows(x.numel() // max(x.shape[-1], 1), weight, x):
        return torch_linear(x, weight, bias, scale).to(out_dtype)
    rows = x.reshape(-1, x.shape[-1]).float().contiguous()
    y = cpp_ext().decode_linear(rows, weight.contiguous(),
                                None if scale is None else scale.reshape(-1).float().contiguous(),
                                None if bias is None else bias.float().contiguous())
    return y.reshape(*x.shape[:-1], -1).to(out_dtype)


def torch_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                 scale: Optional[Tensor] = None) -> Tensor:
    """`decode_linear` in torch, in x's dtype (differentiable in x): an int8 weight is
    dequantized DEQUANT_ROWS output rows at a time, a slab's transient, not the weight's."""
    if scale is None:
        y = torch.nn.functional.linear(x, weight.to(x.dtype))
    else:
        parts = [torch.nn.functional.linear(x, (q * s).to(x.dtype)) for q, s in
                 zip(weight.split(DEQUANT_ROWS), scale.reshape(-1, 1).split(DEQUANT_ROWS))]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return y if bias is None else y + bias.to(x.dtype)
