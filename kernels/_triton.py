"""Triton epilogues of the chunked driver: row statistics and the in-place logits gradient.

Same contract and math as csrc/cpu/epilogue.cpp (logits_partials and the vocab slice of
logits_grad_ serve the vocab-parallel ops, kernels/_vocab_parallel.py). One program per row of a chunk of raw logits
Z [C, V] (fp32, bf16, fp16 or fp64; upcast to fp32 in registers), looping over V in BLOCK-wide
tiles, with z = softcap * tanh(scale * raw / softcap) * inv_temp (softcap 0: z = k * raw,
k = scale * inv_temp):
  logits_stats: one sweep with an online max m, s = sum exp(z - m) and t = sum exp(z - m)(z - m),
      both rescaled when m grows (s carried as s1 = s - 1, `_row_sweep`) -> lse = m + log1p(s1)
      (stored in fp64), logp = (z[target] - m) - log1p(s1), entropy = log1p(s1) - t / s
      (shifted by m, so no cancellation against large logits).
  logits_grad_: one sweep writing, in Z's dtype,
      dL/draw_j = dz_j/draw_j * (a (onehot_j - p_j) - e p_j (log p_j + entropy)),
      log p_j = (z_j - c) - r with c + r = lse split into two fp32 values (fp32-accurate
      whatever lse's magnitude), log p_j + entropy = z_j - sum_k p_k z_k.
Each kernel reads Z once (the gradient also writes it once): memory-bound, ~4 flops/element
(plus a tanh with softcap). Memory: O(BLOCK) registers per program; no buffers beyond the [C]
row statistics. Rows whose target is ignore_index get logp = entropy = 0 and a zero gradient
row; a row with a non-finite logit gets NaN log-prob and entropy; a target outside [0, V) gives
NaN (no out-of-bounds read; the public ops reject such targets up front). Runs under
TRITON_INTERPRET=1 on CPU tensors (read when this module is imported), which is how the CPU-only
test suite checks it.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_BLOCK = 4096  # tile width cap (elements); a module attribute so tests can force tiling
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _tanh(x):
    # tl has no tanh. tanh|x| = (1 - q) / (1 + q) with q = exp(-2|x|) in (0, 1]: never
    # overflows. Below 0.3, where 1 - q cancels, the odd Taylor series to x^11 (truncation
    # < 1e-9 relative) keeps the relative error a few ulps everywhere.
    ax = tl.abs(x)
    q = tl.exp(-2.0 * ax)
    xs = tl.minimum(ax, 0.3)  # the series' branch only; clamped so it cannot overflow
    x2 = xs * xs
    series = xs * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (
        62.0 / 2835.0 + x2 * (-1382.0 / 155925.0))))))
    t = tl.where(ax < 0.3, series, (1.0 - q) / (1.0 + q))
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _log1p(x):
    # tl has no log1p (libdevice's does not run under TRITON_INTERPRET). log(u) * x / (u - 1) with u = 1 + x (rounded) cancels u's rounding error
    # (Goldberg's trick): a few ulps for x > -1; x itself where u rounds to 1.
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _transformed(raw, k, cap_in, cap_out, HAS_CAP: tl.constexpr):
    if HAS_CAP:
        return cap_out * _tanh(cap_in * raw)
    else:
        return k * raw


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _row_sweep(z_row, V, k, cap_in, cap_out, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
    """(m, s1, t) of one row: its max m, s1 = sum exp(z - m) - 1, t = sum exp(z - m) * (z - m).
    The sum-exp is carried as n + r: n counts the elements at the running max (each exactly
    1), r sums the rest, so a peaked row's small terms are not lost against the 1."""
    cols = tl.arange(0, BLOCK)
    # Start the running max at the row's first logit: every rescale factor is then finite.
    m = _transformed(tl.load(z_row).to(tl.float32), k, cap_in, cap_out, HAS_CAP)
    n = 0.0  # elements equal to m
    r = 0.0  # sum exp(z - m) over the others
    t = 0.0  # sum exp(z - m) * (z - m)
    for start in range(0, V, BLOCK):
        idx = start + cols
        mask = idx < V
        raw = tl.load(z_row + idx, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
        z = tl.where(mask, _transformed(raw, k, cap_in, cap_out, HAS_CAP), -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        # re-shift the old sums to m_new: sum p (z - m_new) = sum p (z - m) + (m - m_new) sum p;
        # where the max grew, the old maxima join the rest
        t = alpha * (t + (m - m_new) * (n + r))
        grew = m < m_new
        r = alpha * r + tl.where(grew, alpha * n, 0.0)
        n = tl.where(grew, 0.0, n)
        at_top = mask & (z == m_new)
        x = tl.where(mask, z - m_new, 0.0)
        p = tl.exp(z - m_new)  # [BLOCK], 0 on masked lanes
        # exp(x) = 1 + x at the max: x is 0, or the rounding of the transform where the
        # compiler fuses it into the subtraction (as it may in the gradient: kept, to match)
        n = n + tl.sum(at_top.to(tl.float32), axis=0)
        r = r + tl.sum(tl.where(at_top, x, p), axis=0)
        t = t + tl.sum(p * x, axis=0)
        m = m_new
    return m, (n - 1.0) + r, t


@triton.jit
def _stats_kernel(z_ptr, tgt_ptr, lse_ptr, logp_ptr, ent_ptr, V, k, cap_in, cap_out,
                  ignore_index, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * V
    m, s1, t = _row_sweep(z_row, V, k, cap_in, cap_out, HAS_CAP, BLOCK)
    log_s = _log1p(s1)
    tl.store(lse_ptr + row, m.to(tl.float64) + log_s.to(tl.float64))

    tgt = tl.load(tgt_ptr + row)
    in_range = (tgt >= 0) & (tgt < V)
    raw_t = tl.load(z_row + tl.where(in_range, tgt, 0)).to(tl.float32)
    logp = (_transformed(raw_t, k, cap_in, cap_out, HAS_CAP) - m) - log_s
    ent = log_s - t / (1.0 + s1)
    # t is finite exactly when every logit is (NaN or inf makes some term NaN): else NaN, as on
    # the reference path.
    ok = in_range & (tl.abs(t) < float("inf"))
    logp = tl.where(ok, logp, float("nan"))
    ent = tl.where(ok, ent, float("nan"))
    keep = tgt != ignore_index
    tl.store(logp_ptr + row, tl.where(keep, logp, 0.0))
    tl.store(ent_ptr + row, tl.where(keep, ent, 0.0))


@triton.jit
def _partials_kernel(z_ptr, tgt_ptr, part_ptr, C, V, vocab_start, k, cap_in, cap_out,
                     HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * V
    m, s1, t = _row_sweep(z_row, V, k, cap_in, cap_out, HAS_CAP, BLOCK)
    j = tl.load(tgt_ptr + row) - vocab_start  # the target's column; outside [0, V): absent
    present = (j >= 0) & (j < V)
    raw_t = tl.load(z_row + tl.where(present, j, 0)).to(tl.float32)
    tl.store(part_ptr + row, m)
    tl.store(part_ptr + C + row, s1)
    tl.store(part_ptr + 2 * C + row, t)
    tl.store(part_ptr + 3 * C + row,
             tl.where(present, _transformed(raw_t, k, cap_in, cap_out, HAS_CAP), 0.0))


@triton.jit
def _grad_kernel(z_ptr, tgt_ptr, lse_ptr, ent_ptr, a_ptr, e_ptr, V, vocab_start, vocab_size, k,
                 cap_in, cap_out, ignore_index, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * V
    cols = tl.arange(0, BLOCK)
    tgt = tl.load(tgt_ptr + row)
    keep = tgt != ignore_index
    bad = keep & ((tgt < 0) | (tgt >= vocab_size))
    jt = tgt - vocab_start  # the target's column; outside [0, V) when absent: no one-hot term
    lse = tl.load(lse_ptr + row)  # fp64
    c = lse.to(tl.float32)
    r = (lse - c.to(tl.float64)).to(tl.float32)
    h = tl.load(ent_ptr + row)
    a = tl.load(a_ptr + row)
    e = tl.load(e_ptr + row)
    for start in range(0, V, BLOCK):
        idx = start + cols
        mask = idx < V
        raw = tl.load(z_row + idx, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
        if HAS_CAP:
            th = _tanh(cap_in * raw)
            z = cap_out * th
            dz = k * (1.0 - th * th)  # dz/draw
        else:
            z = k * raw
            dz = k
        logp = (z - c) - r
        g = dz * (tl.where(idx == jt, a, 0.0) - tl.exp(logp) * (a + e * (logp + h)))
        g = tl.where(bad, float("nan"), tl.where(keep, g, 0.0))
        tl.store(z_row + idx, g.to(z_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- host side
def _check_chunk(z: Tensor, targets: Tensor, op: str) -> None:
    if not isinstance(z, Tensor) or z.dim() != 2:
        got = f"{z.dim()}-D" if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"{op}: logits must be a 2-D [C, V] tensor, got {got}")
    if z.dtype not in DTYPES:
        raise TypeError(f"{op}: logits must be float32, bfloat16, float16 or float64, "
                        f"got {z.dtype}")
    if not z.is_contiguous():
        raise ValueError(f"{op}: logits must be contiguous")
    if z.shape[1] == 0:
        raise ValueError(f"{op}: logits must have V >= 1 columns")
    if z.device.type == "cpu" and not INTERPRET:
        raise ValueError(f"{op}: logits must be a GPU tensor for the Triton kernels, got a CPU "
                         "tensor (set TRITON_INTERPRET=1 before importing rlfuse to run them on "
                         "CPU, or use impl='cpp' / 'reference')")
    c = z.shape[0]
    if (not isinstance(targets, Tensor) or targets.dtype != torch.int64
            or tuple(targets.shape) != (c,) or targets.device != z.device):
        got = (f"{targets.dtype} {tuple(targets.shape)} on {targets.device}"
               if isinstance(targets, Tensor) else type(targets).__name__)
        raise ValueError(f"{op}: targets must be an int64 tensor of shape [{c}] on {z.device}, "
                         f"got {got}")


def _check_row(x: Tensor, c: int, device: torch.device, name: str, op: str,
               dtype: torch.dtype = torch.float32) -> None:
    if (not isinstance(x, Tensor) or x.dtype != dtype or tuple(x.shape) != (c,)
            or x.device != device or not x.is_contiguous()):
        got = (f"{x.dtype} {tuple(x.shape)} on {x.device}" if isinstance(x, Tensor)
               else type(x).__name__)
        raise ValueError(f"{op}: {name} must be a contiguous {str(dtype)[6:]} tensor of shape "
                         f"[{c}] on {device}, got {got}")


def _on_device(z: Tensor):
    # Triton launches on the current CUDA device, which need not be z's.
    return torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext()


def _launch_args(v: int, scale: float, softcap: float, inv_temp: float) -> dict:
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(v)))
    cap = float(softcap) > 0.0
    return dict(
        k=float(scale) * float(inv_temp),
        cap_in=float(scale) / float(softcap) if cap else 0.0,
        cap_out=float(softcap) * float(inv_temp),
        HAS_CAP=cap, BLOCK=block, num_warps=4 if block <= 1024 else 8,
        enable_fp_fusion=True,  # fma, as the C++ kernels; explicit: the default is changing
    )


def logits_stats(z: Tensor, targets: Tensor, scale: float, softcap: float, inv_temp: float,
                 ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """lse [C] fp64, logp and entropy [C] fp32 of the transformed rows of raw logits z [C, V]."""
    _check_chunk(z, targets, "logits_stats")
    c, v = z.shape
    lse, logp, ent = (torch.empty(c, dtype=dt, device=z.device)
                      for dt in (torch.float64, torch.float32, torch.float32))
    if c:
        with _on_device(z):
            _stats_kernel[(c,)](z, targets.contiguous(), lse, logp, ent, v,
                                ignore_index=int(ignore_index),
                                **_launch_args(v, scale, softcap, inv_temp))
    return lse, logp, ent


def logits_partials(z: Tensor, targets: Tensor, scale: float, softcap: float, inv_temp: float,
                    vocab_start: int) -> Tensor:
    """part [4, C] fp32 of raw logits z [C, V], the columns of global ids [vocab_start,
    vocab_start + V): per row the max m, sum exp(z - m), sum exp(z - m)(z - m) and the target's
    logit where the target lies in the slice, else 0 (csrc/cpu/epilogue.h)."""
    _check_chunk(z, targets, "logits_partials")
    c, v = z.shape
    part = torch.empty(4, c, dtype=torch.float32, device=z.device)
    if c:
        with _on_device(z):
            _partials_kernel[(c,)](z, targets.contiguous(), part, c, v, int(vocab_start),
                                   **_launch_args(v, scale, softcap, inv_temp))
    return part


def logits_grad_(z: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor, a: Tensor,
                 e: Tensor, scale: float, softcap: float, inv_temp: float,
                 ignore_index: int, vocab_start: int = 0, vocab_size: int = -1) -> None:
    """Overwrite raw logits z [C, V] with dL/d(raw logits), given a = dL/dlogp and
    e = dL/dentropy per row ([C] fp32) and the forward's lse ([C] fp64) / entropy. z may be the
    columns [vocab_start, vocab_start + V) of a vocabulary of vocab_size ids (-1: V), with the
    full vocabulary's lse and entropy: a target outside the slice gets no one-hot term."""
    op = "logits_grad_"
    _check_chunk(z, targets, op)
    c, v = z.shape
    vocab_size = v if vocab_size < 0 else vocab_size
    if not 0 <= vocab_start <= vocab_size - v:
        raise ValueError(f"{op}: the logits' columns [vocab_start, vocab_start + V) = "
                         f"[{vocab_start}, {vocab_start + v}) must lie in [0, vocab_size = "
                         f"{vocab_size})")
    _check_row(lse, c, z.device, "lse", op, torch.float64)
    for name, x in (("entropy", entropy), ("grad_logp", a), ("grad_entropy", e)):
        _check_row(x, c, z.device, name, op)
    if c:
        with _on_device(z):
            _grad_kernel[(c,)](z, targets.contiguous(), lse, entropy, a, e, v,
                               int(vocab_start), int(vocab_size),
                               ignore_index=int(ignore_index),
                               **_launch_args(v, scale, softcap, inv_temp))
