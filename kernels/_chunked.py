"""The one chunked driver behind every fused op, and its one custom-op wrapper.

For N token rows, hidden H, vocab V and C rows at a time:
    Z = X_c @ W^T (+ b)                       GEMM, Z is a reused [C, V] buffer
    stats(Z) -> lse, logp, entropy            row-wise kernel (cpp / triton), Z unchanged
    per-row loss math in torch on [C] vectors -> a = dL/dlogp, e = dL/dentropy
    grad_(Z) -> Z holds dL/d(raw logits)      row-wise kernel, in place
    dX_c = Z @ W ; dW += Z^T @ X_c ; db += sum_rows Z
Every op (linear_logprobs, policy_loss, preference_loss) calls `run`, which calls one custom op,
`rlfuse::chunked_loss`; a loss family supplies only its loss math (a `LossMath`). A loss whose
rows fall into independent groups that fit a chunk (single tokens, whole sequences, whole
chosen/rejected pairs) has each chunk's gradient written during the forward: 3 GEMMs per chunk,
6·N·H·V FLOPs. A loss coupled across the batch runs two phases inside the forward: the stats
pass, the loss math on the [N] vectors, then a recomputing gradient pass (`backward`): 8·N·H·V.
Either way autograd's backward only scales the saved gradients. linear_logprobs (no loss) saves
lse and recomputes Z chunk by chunk in autograd's backward (`rlfuse::chunked_logprobs_backward`).
Extra memory: one [C, V] buffer plus O(N) row statistics, and an fp32 dW accumulator.

The vocabulary-slab order (`pass_order` decides: for bf16 / fp16 heads whose fp32 dW
accumulator or fp32 weight copy would be large, and on CPU for taller GEMMs) runs the same
steps with the loops swapped, as the vocab-parallel ops' shards (`_vocab_parallel`), combined
locally:
    stats pass, per slab W_s [Vs, H] (upcast per slab), per chunk: Z = X_c @ W_s^T -> row
        partials (max, sum-exp, shifted sum p*z, target logit), merged online into [4, N]
        -> lse, logp, entropy; the loss math on the [N] vectors (two phases)
    gradient pass, per slab, per chunk: Z recomputed -> the slice-aware grad_ -> dZ,
        dX += dZ @ W_s (fp32 [N, H], rounded once), dW_s += dZ^T @ X_c (fp32 [Vs, H], rounded
        once into dW), db likewise
So 8·N·H·V FLOPs for every fused loss (linear_logprobs: unchanged), and extra memory of one
slab's buffers (its weight copy when upcasting, its fp32 dW, a [C, Vs] logits buffer) plus the
fp32 dX and O(N) row statistics: no weight-sized buffer beyond the gradients themselves.

bf16 / fp16 inputs: where `lowp_gemm_native` says the hardware multiplies them natively, the
GEMMs take them as they are (no fp32 weight copy) and accumulate in fp32: Z lands in the
epilogue's buffer (fp32 on CPU, written by MKL's bf16 -> fp32 GEMM, so the logits are not even
rounded; the operand dtype on CUDA, as PyTorch's own bf16 logits), dL/dZ is rounded to the
operand dtype once for the two gradient GEMMs, and dW += dZ^T @ X_c accumulates in fp32 across
chunks and is rounded once at the end. Elsewhere the GEMMs run in fp32 on chunk-wise upcasts.
"""
from __future__ import annotations

import ast
import contextlib
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import _vocab_parallel
from ._backend import (LOWP, cpp_ext, epilogues, lowp_gemm_native, partials_epilogue,
                       vocab_slab_mode)
from ._checks import check_number

# The [C, V] logits buffer when chunk_size is not given. CPU: 256 rows, as fast as one big GEMM
# (MKL loses ~2x below ~128 rows at H=896; 256 rows ran as fast as 576 at H=256, V=32k), and
# fewer for vocabularies so large that 256 rows would pass 160 MB. CUDA: 2048 rows within 1 GiB
# (2048 x 131072 bf16 is 512 MiB), so each GEMM fills an H100/H200 (unmeasured: no GPU yet).
CHUNK_ROWS = {"cpu": 256, "cuda": 2048}
CHUNK_BYTES = {"cpu": 160 * 2**20, "cuda": 2**30}
# The pass order (`pass_order`): the row order may hold weight-sized buffers (an fp32 copy of a
# bf16 / fp16 weight when upcasting, dW's fp32 accumulator for a bf16 / fp16 weight) up to
# WEIGHT_BYTES; past it `auto` runs vocabulary slabs, whose buffers (the slab's weight copy and dW
# accumulator, its [C, Vs] logits) fit SLAB_BYTES. On CPU `auto` also runs slabs where both
# orders do the same FLOPs, for their taller GEMMs: a slab's chunk is SLAB_CHUNK_ROWS rows, as its
# [C, Vs] tile is bounded by SLAB_BYTES, not by V. MKL ran the qwen-0.5b head's GEMM (H 896,
# V 151936, fp32, 2 threads, a Zen 3 EPYC) at 140 GFLOP/s on 256 rows and 169 on 2048, and 2048
# x 8192 tiles at 168. At that head, bf16 upcast with dW: 545 MB + 545 MB in the row order, 35
# slabs of 4352 rows (16 MB + 16 MB + a 34 MB tile) in the other.
WEIGHT_BYTES = 128 * 2**20
SLAB_BYTES = 64 * 2**20
SLAB_MULTIPLE = 256  # slab rows: the GEMMs' N dimension, kept large
SLAB_CHUNK_ROWS = 2048  # CPU (CUDA: its default chunk, already this tall)


@dataclass(frozen=True)
class LogitTransform:
    """z = softcap(logit_scale * (x @ W^T + b)) / temperature, softcap(u) = c * tanh(u / c) with
    c = final_logit_softcapping (None: no cap). The names are transformers' config keys.
    Validated on construction."""

    logit_scale: float = 1.0
    final_logit_softcapping: Optional[float] = None
    temperature: float = 1.0

    def __post_init__(self):
        check_number("temperature", self.temperature, positive=True)
        check_number("logit_scale", self.logit_scale, positive=True)
        if self.final_logit_softcapping is not None:
            check_number("final_logit_softcapping (None or a number)",
                         self.final_logit_softcapping, positive=True)

    def apply(self, logits: Tensor) -> Tensor:
        u = logits * self.logit_scale if self.logit_scale != 1.0 else logits
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            u = cap * torch.tanh(u / cap)
        return u / self.temperature if self.temperature != 1.0 else u

    def kernel_args(self) -> tuple[float, float, float]:
        """The kernels' (scale, softcap, inv_temp) scalars; softcap 0 means none."""
        return (float(self.logit_scale), float(self.final_logit_softcapping or 0.0),
                1.0 / float(self.temperature))


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The GEMM operand dtype for `dtype` inputs on `device`. fp32 inputs opt in to bf16 GEMMs
    with torch's own switch, `torch.set_float32_matmul_precision("medium")`, where bf16 is
    native: their hidden chunks and a bf16 copy of the weight (2 bytes a weight) are rounded once
    to bf16, the GEMMs accumulate in fp32, and the rest stays fp32."""
    if dtype in LOWP:
        return dtype if lowp_gemm_native(device, dtype) else torch.float32
    if (dtype == torch.float32 and torch.get_float32_matmul_precision() == "medium"
            and lowp_gemm_native(device, torch.bfloat16)):
        return torch.bfloat16
    return torch.float32 if device.type == "cpu" else dtype  # the C++ epilogue reads fp32


def logits_dtype(device: torch.device, gemm_dtype: torch.dtype) -> torch.dtype:
    """The chunk's logits buffer: fp32 for the C++ epilogue (MKL writes bf16 GEMMs' fp32 output
    straight into it, no extra pass); the GEMM dtype on CUDA, where Triton reads bf16 at half the
    bytes and the rounded logits are those of PyTorch's own bf16 computation."""
    return torch.float32 if device.type == "cpu" else gemm_dtype


def _mm_into(a: Tensor, b: Tensor, out: Tensor, accumulate: bool = False) -> None:
    """out = a @ b (+ out if accumulate: out fp32 or in a's dtype), the products summed in fp32
    at least and rounded once, to out's dtype.

    bf16 / fp16 operands on CPU go through MKL's GEMM with an fp32 output (`rlfuse._C`): torch has
    no CPU mm with out_dtype, and its own CPU bf16 GEMM on a CPU without bf16 units ran ~150x
    slower than fp32 at the dX shape [C, V] @ [V, H]. On CUDA, cuBLAS writes fp32 via out_dtype.
    """
    if a.dtype in LOWP and a.device.type == "cpu":
        f32 = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32)
        cpp_ext().gemm_f32_(a, b, f32, accumulate)
        if f32 is not out:
            out.copy_(f32)  # dX: [c, H], rounded once
    elif out.dtype != a.dtype and a.dtype in LOWP:  # CUDA
        torch.addmm(out, a, b, out_dtype=out.dtype, beta=int(accumulate), out=out)
    elif out.dtype != a.dtype:
        out.copy_(a @ b)  # an fp32 GEMM's dX into bf16 / fp16 / fp64
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def _bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def default_chunk_size(n: int, v: int, device: torch.device, dtype: torch.dtype) -> int:
    """Rows per chunk for N rows at vocabulary V, from the device's row and byte budgets."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    elem_bytes = _bytes(logits_dtype(device, compute_dtype(device, dtype)))
    rows = min(CHUNK_ROWS[kind], CHUNK_BYTES[kind] // (v * elem_bytes))
    rows = rows // 32 * 32 if rows >= 64 else max(16, rows)  # GEMM-friendly multiples of 32
    return max(1, min(n, rows))


def pass_order(n: int, h: int, v: int, device: torch.device, dtype: torch.dtype,
               chunk_size: Optional[int], needs: "Needs", same_flops: bool) -> tuple[int, int]:
    """(rows per chunk, vocabulary rows per slab; 0 for the row order): the one place that
    decides the pass order (the user's say: `_backend.vocab_slab_mode`) and the chunk where
    `chunk_size` is None. `auto` runs slabs where the row order's weight-sized buffers (an fp32
    weight copy when upcasting, dW's fp32 accumulator when dW is not fp32 itself) would pass
    WEIGHT_BYTES, and on CPU where the op does the same FLOPs in both orders (`same_flops`:
    log-probs, a loss without gradients or in two phases), for taller GEMMs; slabs are sized
    so that their own buffers fit SLAB_BYTES."""
    mode = vocab_slab_mode()
    gemm = compute_dtype(device, dtype)
    copy = h * _bytes(gemm) if gemm != dtype else 0  # per vocabulary row
    acc = h * _bytes(torch.promote_types(gemm, torch.float32)) if needs[1] else 0
    heavy = v * (copy + (acc if acc > h * _bytes(dtype) else 0)) > WEIGHT_BYTES
    cpu = device.type == "cpu"
    if v == 0 or mode == "off" or mode == "auto" and not (heavy or same_flops and cpu):
        return chunk_size or default_chunk_size(n, v, device, dtype), 0
    chunk = chunk_size or (max(1, min(n, SLAB_CHUNK_ROWS)) if cpu
                           else default_chunk_size(n, v, device, dtype))
    if isinstance(mode, int):
        return chunk, min(mode, v)
    z = logits_dtype(device, gemm)
    rows = max(1, min(chunk, n))  # the tile's rows (N = 0: no tile, a nonzero divisor)
    per_row = copy + acc + rows * (_bytes(z) + (_bytes(gemm) if z != gemm else 0))
    return chunk, min(v, max(SLAB_MULTIPLE,
                             SLAB_BYTES // per_row // SLAB_MULTIPLE * SLAB_MULTIPLE))


@dataclass(frozen=True)
class ChunkPlan:
    """How the driver runs an op, resolved: the logit transform, the ignored target id, rows per
    chunk, the impl ("cpp" or "triton"), for the vocab-parallel ops this rank's shard of the
    vocabulary (weight and bias are its rows; `_vocab_parallel.VocabShard`), and the vocabulary
    rows per slab of the slab order (`pass_order`; 0: the row order)."""

    transform: LogitTransform
    ignore_index: int
    chunk: int
    impl: str
    vocab: Optional[_vocab_parallel.VocabShard] = None
    slab: int = 0

    @property
    def first_id(self) -> int:
        """The vocabulary id of the weight's first row (vocab-parallel: the shard's start)."""
        return 0 if self.vocab is None else self.vocab.start


class Inputs(NamedTuple):
    """The LM head's inputs, flattened to rows."""

    hidden: Tensor            # [N, H]
    weight: Tensor            # [V, H]
    bias: Optional[Tensor]    # [V]
    targets: Tensor           # [N] int64


Needs = tuple[bool, bool, bool]  # which of dX, dW, db to compute
NONE: Needs = (False, False, False)


def needs_of(inputs: Inputs) -> Needs:
    """The gradients autograd will ask for: a frozen LM head (LoRA) skips dW, a third of the
    GEMMs, and its weight-sized fp32 buffer."""
    hidden, weight, bias, _ = inputs
    return hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad


class _Gemms:
    """The three GEMMs of a chunk, on one reused logits buffer, against the whole weight or (the
    slab order) one vocabulary slab of it at a time (`slabs`)."""

    def __init__(self, inputs: Inputs, chunk: int, slab: int = 0):
        hidden, weight, _, _ = inputs
        self.inputs = inputs
        self.dtype = compute_dtype(hidden.device, hidden.dtype)
        n, v = hidden.shape[0], weight.shape[0]
        self.chunk, self.slab = chunk, slab or v
        self.buf = torch.empty(min(chunk, n) * self.slab, device=hidden.device,
                               dtype=logits_dtype(hidden.device, self.dtype))  # [C, Vs] flat
        self.dz_buf: Optional[Tensor] = None  # [C, Vs] GEMM dtype, when the buffer is wider
        self.w = self.b = None
        self._select(0, self.slab)

    def _select(self, v0: int, v1: int) -> None:
        """Multiply by vocabulary rows [v0, v1) from now on."""
        _, weight, bias, _ = self.inputs
        self.w = self.b = None  # the previous slab's copies go first
        self.w = weight[v0:v1].to(self.dtype)  # [Vs, H], a copy only when upcasting
        self.b = None if bias is None else bias[v0:v1].to(self.buf.dtype)

    def slabs(self):
        """Each vocabulary slab's first row, selected in turn."""
        v = self.inputs.weight.shape[0]
        for v0 in range(0, v, self.slab):
            if v0:
                self._select(v0, min(v, v0 + self.slab))
            yield v0

    def ranges(self):
        n = self.inputs.hidden.shape[0]
        for s in range(0, n, self.chunk):
            yield s, min(n, s + self.chunk)

    def logits(self, s: int, e: int) -> tuple[Tensor, Tensor]:
        x = self.inputs.hidden[s:e].to(self.dtype)  # [c, H]
        z = self.buf[: (e - s) * self.w.shape[0]].view(e - s, -1)  # [c, Vs]
        if self.b is not None and z.dtype == x.dtype:
            torch.addmm(self.b, x, self.w.t(), out=z)  # one pass over Z
        else:
            if self.b is not None:  # bf16 operands, fp32 Z (CPU): MKL adds onto the bias
                z.copy_(self.b.expand_as(z))
            _mm_into(x, self.w.t(), z, accumulate=self.b is not None)
        return x, z

    def gemm_operand(self, dz: Tensor) -> Tensor:
        """dL/dZ in the GEMM dtype (rounded once when the buffer is wider: bf16 inputs on CPU)."""
        if dz.dtype == self.dtype:
            return dz
        if self.dz_buf is None:
            self.dz_buf = torch.empty_like(self.buf, dtype=self.dtype)
        return self.dz_buf[: dz.numel()].view_as(dz).copy_(dz)


class _GradAccumulator:
    """dX, dW, db of the GEMMs' current weight rows. `dx`: the slab order's fp32 [N, H]
    accumulator, which every slab adds to (else dX rows are written once per chunk)."""

    def __init__(self, g: _Gemms, needs: Needs, vocab=None, dx: Optional[Tensor] = None):
        hidden, _, bias, _ = g.inputs
        n, h = hidden.shape
        dev = hidden.device
        acc = torch.promote_types(g.dtype, torch.float32)  # never rounded per chunk
        v = g.w.shape[0]
        self.g = g
        # Vocab-parallel hook: each chunk's partial dX is summed over the ranks (async).
        self.reducer = vocab.dx_reducer() if vocab is not None and needs[0] else None
        dx_dtype = hidden.dtype if self.reducer is None else self.reducer.dtype(hidden.dtype)
        self.dx_adds = dx is not None
        self.dx = dx if self.dx_adds or not needs[0] else torch.empty(n, h, dtype=dx_dtype,
                                                                      device=dev)
        self.dw = torch.zeros(v, h, dtype=acc, device=dev) if needs[1] else None
        self.db = torch.zeros(v, dtype=acc, device=dev) if bias is not None and needs[2] else None

    def add(self, s: int, e: int, x: Tensor, dz: Tensor):
        dz_op = self.g.gemm_operand(dz) if self.dx is not None or self.dw is not None else None
        if self.dx is not None:
            _mm_into(dz_op, self.g.w, self.dx[s:e], accumulate=self.dx_adds)  # [c, H]
            if self.reducer is not None:
                self.reducer.add(self.dx[s:e])
        if self.dw is not None:
            _mm_into(dz_op.t(), x, self.dw, accumulate=True)  # [Vs, H] fp32
        if self.db is not None:
            self.db += dz.sum(0, dtype=self.db.dtype)

    def result(self) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        hidden, weight, bias, _ = self.g.inputs
        if self.reducer is not None:
            self.reducer.wait()
            self.dx = self.dx.to(hidden.dtype)
        dw = None if self.dw is None else self.dw.to(weight.dtype)
        db = None if self.db is None else self.db.to(bias.dtype)
        return self.dx, dw, db


# ----------------------------------------------------------------------------- per-chunk steps
class _Summary:
    """The per-row logit summary TRL's trainers report (`mean_logits`, `is_top1`): the mean
    transformed logit over the vocabulary and whether the target is its first argmax, reduced
    with torch from the logits each chunk's stats step already holds (two reads of the buffer,
    no extra GEMM), then merged over the vocabulary slabs in order (and the ranks)."""

    SOFTCAP_BYTES = 16 * 2**20  # the transformed rows' fp32 temporaries, with a softcap

    def __init__(self, plan: "ChunkPlan", n: int, device: torch.device):
        self.plan = plan
        self.max = torch.full((n,), -float("inf"), dtype=torch.float32, device=device)
        self.arg = torch.zeros(n, dtype=torch.int64, device=device)  # first argmax, global id
        self.sum = torch.zeros(n, dtype=torch.float32, device=device)

    def add(self, s: int, e: int, z: Tensor, v0: int = 0) -> None:
        """Rows [s, e) of raw logits z [c, Vs] whose first column is weight row v0."""
        tf = self.plan.transform
        if tf.final_logit_softcapping is None:  # z -> k z, k > 0: the same argmax
            k = tf.logit_scale / tf.temperature
            m, i = z.max(-1)
            m, total = m.float() * k, z.sum(-1, dtype=torch.float32) * k
        else:  # the transformed logits, in row blocks of SOFTCAP_BYTES
            m = torch.empty(e - s, dtype=torch.float32, device=z.device)
            total = torch.empty_like(m)
            i = torch.empty(e - s, dtype=torch.int64, device=z.device)
            rows = max(1, self.SOFTCAP_BYTES // (4 * z.shape[1]))
            for r in range(0, e - s, rows):
                u = tf.apply(z[r:r + rows].float())
                torch.max(u, -1, out=(m[r:r + rows], i[r:r + rows]))
                total[r:r + rows] = u.sum(-1)
        # an earlier slab keeps a tie (the first argmax)
        better = m > self.max[s:e]
        self.arg[s:e] = torch.where(better, i + (self.plan.first_id + v0), self.arg[s:e])
        self.max[s:e] = torch.maximum(self.max[s:e], m)
        self.sum[s:e] += total

    def result(self, targets: Tensor, v: int) -> Tensor:
        """[2, N] fp32: the mean logit, and 1 where the target is the row's first argmax (0 for
        ignored targets and rows with a NaN logit), over a weight of v rows (vocab-parallel:
        this rank's shard, the summaries combined over the ranks)."""
        plan = self.plan
        if plan.vocab is not None:
            v = plan.vocab.vocab_size
            self.max, self.arg, self.sum = _vocab_parallel.combine_summary(
                self.max, self.arg, self.sum, plan.vocab.group)
        top1 = (self.arg == targets) & (targets != plan.ignore_index) & ~self.max.isnan()
        return torch.stack([self.sum / v, top1.float()])


def _epilogues(plan: ChunkPlan):
    # Vocab-parallel hook (_vocab_parallel.py): a VocabShard's kernels combine the row
    # statistics over the ranks and take the global lse / entropy in the gradient.
    return epilogues(plan.impl) if plan.vocab is None else plan.vocab.epilogues(plan.impl)


def chunk_stats(g: _Gemms, plan: ChunkPlan, s: int, e: int):
    """The row-stats step of rows [s, e): GEMM -> epilogue -> row stats. Returns x [c, H] (the
    GEMM operand), z [c, V] (the raw logits, for `chunk_grad_`), lse [c] fp64 (the gradient
    kernels recover z - lse from it to fp32 accuracy), logp and entropy [c] fp32."""
    stats, _ = _epilogues(plan)
    x, z = g.logits(s, e)
    lse, logp, ent = stats(z, g.inputs.targets[s:e], *plan.transform.kernel_args(),
                           plan.ignore_index)
    return x, z, lse, logp, ent


def chunk_grad_(z: Tensor, plan: ChunkPlan, targets: Tensor, lse: Tensor, entropy: Tensor,
                grad_logp: Tensor, grad_entropy: Tensor) -> None:
    """The backward epilogue: overwrites raw logits z [c, V] with dL/dz, from the forward's
    lse / entropy and a = dL/dlogp, e = dL/dentropy per row ([c])."""
    _, grad_ = _epilogues(plan)
    grad_(z, targets, lse, entropy, grad_logp.float().contiguous(),
          grad_entropy.float().contiguous(), *plan.transform.kernel_args(), plan.ignore_index)


def forward_stats(inputs: Inputs, plan: ChunkPlan, summary: Optional[_Summary] = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """lse [N] fp64, logp and entropy [N] fp32, from one GEMM pass; `summary`, when given, is
    added the same logits."""
    n = inputs.hidden.shape[0]
    out = [torch.empty(n, dtype=dt, device=inputs.hidden.device)
           for dt in (torch.float64, torch.float32, torch.float32)]
    if n == 0:
        return tuple(out)
    if plan.slab:
        return _slab_stats(inputs, plan, summary)
    g = _Gemms(inputs, plan.chunk)
    for s, e in g.ranges():
        _, z, *stats = chunk_stats(g, plan, s, e)
        for o, r in zip(out, stats):
            o[s:e] = r
        if summary is not None:
            summary.add(s, e, z)
    return tuple(out)


def backward(inputs: Inputs, plan: ChunkPlan, lse: Tensor, entropy: Tensor, grad_logp: Tensor,
             grad_entropy: Tensor, needs: Needs):
    """dX, dW, db from per-row gradients a = dL/dlogp and e = dL/dentropy ([N]; recomputes Z);
    None for those `needs` leaves out."""
    if plan.slab:
        return _slab_backward(inputs, plan, lse, entropy, grad_logp, grad_entropy, needs)
    g = _Gemms(inputs, plan.chunk)
    acc = _GradAccumulator(g, needs, plan.vocab)
    for s, e in g.ranges():
        x, z = g.logits(s, e)
        chunk_grad_(z, plan, inputs.targets[s:e], lse[s:e], entropy[s:e], grad_logp[s:e],
                    grad_entropy[s:e])
        acc.add(s, e, x, z)
    return acc.result()


# ----------------------------------------------------------------------------- the slab order
def _slab_kernels(plan: ChunkPlan, v0: int, v: int):
    """(partials, grad_) for a slab whose first row is row v0 of a weight of v rows: its columns
    are global ids from v0 (+ the shard's start, vocab-parallel) in a vocabulary of v ids (the
    shard's vocab_size)."""
    start, size = plan.first_id, v if plan.vocab is None else plan.vocab.vocab_size
    partials, (_, grad_) = partials_epilogue(plan.impl), epilogues(plan.impl)
    args = plan.transform.kernel_args()

    def part(z, targets):
        return partials(z, targets, *args, start + v0)  # [4, c] fp32

    def grad(z, targets, lse, entropy, a, e):
        grad_(z, targets, lse, entropy, a.float().contiguous(), e.float().contiguous(), *args,
              plan.ignore_index, start + v0, size)

    return part, grad


def _slab_stats(inputs: Inputs, plan: ChunkPlan, summary: Optional[_Summary] = None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """forward_stats in the slab order: each slab's row partials (max, sum-exp, shifted sum p*z,
    target logit), merged online into [4, N] (`_vocab_parallel.merge`), then finished into lse,
    logp, entropy (over the ranks first, vocab-parallel)."""
    hidden, weight, _, targets = inputs
    g = _Gemms(inputs, plan.chunk, plan.slab)
    merged = None
    for v0 in g.slabs():
        partials, _ = _slab_kernels(plan, v0, weight.shape[0])
        part = torch.empty(4, hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s, e in g.ranges():
            z = g.logits(s, e)[1]
            part[:, s:e] = partials(z, targets[s:e])
            if summary is not None:
                summary.add(s, e, z, v0)
        merged = part if merged is None else _vocab_parallel.merge(merged, part)
    if plan.vocab is not None:
        return _vocab_parallel.combine(merged, targets, plan.ignore_index, plan.vocab.group)
    return _vocab_parallel.finish(merged, targets, plan.ignore_index)


def _slab_backward(inputs: Inputs, plan: ChunkPlan, lse: Tensor, entropy: Tensor,
                   grad_logp: Tensor, grad_entropy: Tensor, needs: Needs):
    """backward in the slab order: per slab, every row chunk's Z recomputed and turned into dZ,
    dX (an fp32 [N, H] accumulator, rounded once at the end) += dZ @ W_slab, dW_slab (fp32
    [Vs, H]) += dZ^T @ X_c, written once into dW (and db likewise)."""
    hidden, weight, bias, targets = inputs
    dev = hidden.device
    dx = torch.zeros(hidden.shape, dtype=torch.promote_types(hidden.dtype, torch.float32),
                     device=dev) if needs[0] else None
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=dev) if needs[1] else None
    db = torch.empty(bias.shape, dtype=bias.dtype, device=dev) \
        if bias is not None and needs[2] else None
    g = _Gemms(inputs, plan.chunk, plan.slab)
    for v0 in g.slabs():
        _, grad_ = _slab_kernels(plan, v0, weight.shape[0])
        acc = _GradAccumulator(g, needs, dx=dx)
        for s, e in g.ranges():
            x, z = g.logits(s, e)
            grad_(z, targets[s:e], lse[s:e], entropy[s:e], grad_logp[s:e], grad_entropy[s:e])
            acc.add(s, e, x, z)
        v1 = v0 + g.w.shape[0]
        if dw is not None:
            dw[v0:v1] = acc.dw  # rounded once
        if db is not None:
            db[v0:v1] = acc.db
        del acc  # this slab's fp32 buffers go before the next slab's
    if dx is not None:
        if plan.vocab is not None:  # one sum over the ranks, of the whole fp32 dX
            reducer = plan.vocab.dx_reducer()
            reducer.add(dx)
            reducer.wait()
        dx = dx.to(hidden.dtype)
    return dx, dw, db


# ----------------------------------------------------------------------------- fused losses
class LossMath:
    """What a loss family supplies: its loss on per-row log-probs and entropies.

    `group`: rows that must share a chunk for their share of the loss (and its gradient) to be
    final once the chunk is through: 1 for a token-separable loss, T for a sequence-level one;
    None when the loss couples the whole batch (two phases). `layout` reorders [N, ...] rows from
    batch order to the order `loss` reads them in (groups contiguous), `restore` inverts it.
    """

    group: Optional[int] = 1

    def layout(self, t: Tensor) -> Tensor:
        return t

    def restore(self, t: Tensor) -> Tensor:
        return t

    def loss(self, s: int, e: int, logp: Tensor, entropy: Tensor) -> Tensor:
        """The share of rows [s, e) (of the layout) in the scalar loss, differentiably in logp
        and entropy ([e - s] fp32); s, e are multiples of `group` (0, N without one)."""
        raise NotImplementedError


_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                  torch._C.DispatchKey.AutogradNestedTensor)


@contextlib.contextmanager
def _autograd_on():
    """Autograd inside a custom op's kernel: torch runs kernels with the autograd dispatch keys
    excluded, and the loss math is differentiated with torch.autograd on [c] vectors there."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        excluded = excluded.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded), \
            torch.enable_grad():
        yield


def _loss_and_grads(math: LossMath, s: int, e: int, logp: Tensor, entropy: Tensor):
    """The loss share of rows [s, e) (detached) and its gradients in logp and entropy."""
    with _autograd_on():
        lp = logp.detach().requires_grad_(True)
        en = entropy.detach().requires_grad_(True)
        part = math.loss(s, e, lp, en)
        a, b = torch.autograd.grad(part, (lp, en), allow_unused=True, materialize_grads=True)
    return part.detach(), a, b


def _whole_groups(inputs: Inputs, plan: ChunkPlan, math: LossMath, needs: Needs):
    """Chunks of whole groups: each chunk's loss share and gradient are final after its own
    forward, 3 GEMMs / chunk."""
    hidden, weight, bias, targets = inputs
    laid = Inputs(math.layout(hidden), weight, bias, math.layout(targets))  # a copy if reordered
    g = _Gemms(laid, plan.chunk // math.group * math.group)
    acc = _GradAccumulator(g, needs, plan.vocab)
    n = hidden.shape[0]
    logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    ent = torch.zeros_like(logp)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for s, e in g.ranges():
        x, z, lse_c, lp_c, en_c = chunk_stats(g, plan, s, e)
        part, a, b = _loss_and_grads(math, s, e, lp_c, en_c)
        chunk_grad_(z, plan, laid.targets[s:e], lse_c, en_c, a, b)
        acc.add(s, e, x, z)
        loss += part
        logp[s:e] = lp_c
        ent[s:e] = en_c
    dx, dw, db = acc.result()
    return loss, math.restore(logp), math.restore(ent), (
        None if dx is None else math.restore(dx), dw, db)


def fused_in_forward(math: LossMath, needs: Needs, chunk: int) -> bool:
    """Whether the row order writes a loss's gradients during its forward, whole groups per
    chunk of `chunk` rows (3 GEMMs a chunk); else it runs two phases (4), as the slab order
    always does."""
    return any(needs) and math.group is not None and math.group <= chunk


def run_loss(inputs: Inputs, plan: ChunkPlan, math: LossMath, needs: Needs):
    """loss (fp32 scalar), logp, entropy ([N] fp32) and (dX, dW, db), each None where `needs`
    leaves it out: whole groups per chunk when they fit, else (and in the slab order) two
    phases."""
    if plan.slab or not fused_in_forward(math, needs, plan.chunk):
        n = inputs.hidden.shape[0]
        lse, logp, ent = forward_stats(inputs, plan)
        lp, en = math.layout(logp), math.layout(ent)
        if not any(needs):
            return math.loss(0, n, lp, en), logp, ent, (None, None, None)
        loss, a, b = _loss_and_grads(math, 0, n, lp, en)
        grads = backward(inputs, plan, lse, ent, math.restore(a), math.restore(b), needs)
        return loss, logp, ent, grads
    return _whole_groups(inputs, plan, math, needs)


# ----------------------------------------------------------------------------- the custom op
class Family(NamedTuple):
    name: str
    options: type  # its frozen options dataclass (a HeadOptions: transform, chunk_size, impl...)
    math: Optional[Callable[[Any, list[Tensor]], LossMath]]  # (options, rows); None: log-probs


FAMILIES: dict[str, Family] = {}


def register_family(name: str, options: type, math=None) -> None:
    """Make a family callable through `run`: `math(options, rows)` builds its LossMath from
    the per-row tensors `run` was given (an absent one arrives as an empty tensor)."""
    FAMILIES[name] = Family(name, options, math)


class _Spec(NamedTuple):
    family: Family
    options: Any  # impl resolved
    needs: Needs
    vocab: str  # VocabShard.spec of this rank's vocabulary shard, "" for the whole vocabulary

    def plan(self, inputs: Inputs, math: Optional[LossMath] = None) -> ChunkPlan:
        """The plan for `inputs`; `math`: the loss family's, None for log-probs."""
        o, (hidden, weight, _, _) = self.options, inputs
        (n, h), v = hidden.shape, weight.shape[0]
        rows = o.chunk_size or default_chunk_size(n, v, hidden.device, hidden.dtype)
        same_flops = math is None or not fused_in_forward(math, self.needs, rows)
        chunk, slab = pass_order(n, h, v, hidden.device, hidden.dtype, o.chunk_size, self.needs,
                                 same_flops)
        return ChunkPlan(o.transform(), o.ignore_index, chunk, o.impl,
                         _vocab_parallel.VocabShard.from_spec(self.vocab), slab)


def _spec_string(family: str, options, impl: str, needs: Needs, vocab: str) -> str:
    """The op's static configuration as one canonical string: the family, its options (impl
    resolved; chunk_size as given, None resolved from the shapes in the op, so that the string
    does not change with N), the gradients to compute and the vocabulary shard (`VocabShard.spec`,
    "" for the whole vocabulary)."""
    values = {f.name: getattr(options, f.name) for f in fields(options)}  # no deep copy
    return repr((family, tuple({**values, "impl": impl}.items()), tuple(needs), vocab))


# Under torch.compile the string is a constant of the graph, computed from the options object
# (guarded by identity: a frozen options object is one compiled configuration; another object
# recompiles). Reading its fields while tracing would not do: dynamo turns a float or int that
# changed between calls into a graph input, which has no string form.
_compiled_spec_string = torch.compiler.assume_constant_result(_spec_string)


@lru_cache(maxsize=256)
def _parse(spec: str) -> _Spec:
    name, options, needs, vocab = ast.literal_eval(spec)
    family = FAMILIES[name]
    return _Spec(family, family.options(**dict(options)), tuple(needs), vocab)


def _grad_outputs(inputs: Inputs, grads) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dW, db) as op outputs: an empty tensor where a gradient is not computed."""
    hidden, weight, bias, _ = inputs
    like = (hidden, weight, weight if bias is None else bias)
    return tuple(g if g is not None else t.new_empty(0) for g, t in zip(grads, like))


@torch.library.custom_op("rlfuse::chunked_loss", mutates_args=())
def _chunked_loss_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                     rows: list[Tensor], spec: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """loss, logp, entropy, lse, summary, dX, dW, db of the op that `spec` names (see `run`).

    rows: the family's per-row tensors (constants; an empty tensor for an absent one). spec:
    the static configuration, `_spec_string`. A loss family computes its gradients in the
    forward and returns them (empty where spec's needs leave them out; lse empty); autograd's
    backward scales them by grad_output.

    One backward per forward: in eager mode the saved gradients are scaled in place and handed
    over to autograd as they are (no second weight-sized buffer), so a second backward through
    the same graph (retain_graph=True) raises: call the loss again. Under torch.compile they are
    scaled out of place and torch itself refuses a second backward through the compiled graph.
    For "logprobs" (no loss: loss is 0, the gradients empty) autograd's backward recomputes Z
    from the saved lse (`chunked_logprobs_backward`) and may run any number of times; with
    its option `summary`, summary is the logit summary [2, N] fp32 (`_Summary.result`), else
    empty.
    """
    s = _parse(spec)
    inputs = Inputs(hidden, weight, bias, targets)
    math = None if s.family.math is None else s.family.math(s.options, rows)
    plan = s.plan(inputs, math)
    summary = hidden.new_empty(0, dtype=torch.float32)
    if math is None:
        gather = _Summary(plan, hidden.shape[0], hidden.device) if s.options.summary else None
        lse, logp, ent = forward_stats(inputs, plan, gather)
        if gather is not None:
            summary = gather.result(targets, weight.shape[0])
        loss, grads = torch.zeros((), dtype=torch.float32, device=hidden.device), (None,) * 3
    else:
        loss, logp, ent, grads = run_loss(inputs, plan, math, s.needs)
        lse = hidden.new_empty(0, dtype=torch.float64)
    return (loss, logp, ent, lse, summary, *_grad_outputs(inputs, grads))


@_chunked_loss_op.register_fake
def _(hidden, weight, bias, targets, rows, spec):
    s = _parse(spec)
    n = hidden.shape[0]
    f32 = [hidden.new_empty(shape, dtype=torch.float32) for shape in ((), (n,), (n,))]
    fused = s.family.math is not None
    lse = hidden.new_empty(0 if fused else n, dtype=torch.float64)
    summary = hidden.new_empty((2, n) if not fused and s.options.summary else 0,
                               dtype=torch.float32)
    like = (hidden, weight, bias)
    grads = tuple(torch.empty_like(t) if fused and need and t is not None else None
                  for t, need in zip(like, s.needs))
    return (*f32, lse, summary, *_grad_outputs(Inputs(hidden, weight, bias, targets), grads))


@torch.library.custom_op("rlfuse::chunked_logprobs_backward", mutates_args=())
def _chunked_logprobs_backward_op(grad_logp: Tensor, grad_entropy: Tensor, hidden: Tensor,
                                  weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                                  stats: list[Tensor], spec: str
                                  ) -> tuple[Tensor, Tensor, Tensor]:
    """dX, dW, db of linear_logprobs from dL/dlogp, dL/dentropy and the forward's (lse,
    entropy), recomputing Z; empty where `spec` does not ask for a gradient."""
    s = _parse(spec)
    lse, ent = stats
    inputs = Inputs(hidden, weight, bias, targets)
    return _grad_outputs(inputs, backward(inputs, s.plan(inputs), lse, ent, grad_logp,
                                          grad_entropy, s.needs))


@_chunked_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, targets, stats, spec):
    s = _parse(spec)
    grads = tuple(torch.empty_like(t) if need and t is not None else None
                  for t, need in zip((hidden, weight, bias), s.needs))
    return _grad_outputs(Inputs(hidden, weight, bias, targets), grads)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, rows, spec = inputs
    _, _, ent, lse, _, *grads = output
    s = _parse(spec)
    ctx.spec, ctx.n_rows = spec, len(rows)
    # Outputs that get no gradient (lse, dX, dW, db) arrive in backward as None, not as zeros
    # autograd would otherwise allocate: a weight-sized buffer for dW.
    ctx.set_materialize_grads(False)
    if s.family.math is None:
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
    else:
        ctx.save_for_backward(*(g if need else None for g, need in zip(grads, s.needs)))


def _traced(t: Tensor) -> bool:
    """Whether torch.compile / export / opcheck is tracing (no data-dependent Python then)."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


def _scale_saved_grads(ctx, grad_output: Tensor):
    """The saved gradients times the scalar grad_output. In eager mode, in place (none when
    grad_output is 1) and handed over as they are: autograd may accumulate into them, so a
    second backward through the same graph is refused rather than answered wrongly."""
    grads = ctx.saved_tensors
    g = grad_output.float()  # 0-d: a bf16 gradient times g stays bf16, computed in fp32
    if _traced(grad_output):
        return tuple(None if t is None else t * g for t in grads)
    if getattr(ctx, "grads_handed_over", False):
        raise RuntimeError("rlfuse fused losses compute their gradients in the forward and "
                           "support one backward per forward (retain_graph reuse is not "
                           "supported); call the loss again")
    ctx.grads_handed_over = True
    if bool(grad_output == 1):
        return grads
    return tuple(None if t is None else t.mul_(g) for t in grads)


def _backward(ctx, grad_loss, grad_logp, grad_entropy, *_unused):
    s = _parse(ctx.spec)
    if s.family.math is not None:
        grads = (None,) * 3 if grad_loss is None else _scale_saved_grads(ctx, grad_loss)
    else:
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        needs = (*ctx.needs_input_grad[:2], bias is not None and ctx.needs_input_grad[2])
        zero = torch.zeros_like(ent)
        dx, dw, db = _chunked_logprobs_backward_op(
            zero if grad_logp is None else grad_logp, zero if grad_entropy is None else
            grad_entropy, hidden, weight, bias, targets, [lse, ent],
            _spec_string(s.family.name, s.options, s.options.impl, needs, s.vocab))
        grads = tuple(g if need else None for g, need in zip((dx, dw, db), needs))
    return (*grads, None, [None] * ctx.n_rows, None)


_chunked_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- the entry
def run(family: str, options, impl: str, inputs: Inputs, rows: Sequence[Optional[Tensor]] = (),
        vocab=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The one entry of every fused op: loss (fp32 scalar, differentiable in hidden, weight and
    bias; 0 for "logprobs"), logp and entropy ([N] fp32; differentiable for "logprobs" only),
    and the logit summary ([2, N] fp32, detached; empty unless the "logprobs" option
    `summary` asks for it).

    `family` names a registered family, `options` its frozen options (a HeadOptions), `impl` the
    resolved chunked impl; `rows` are the family's per-row tensors (None: absent), constants;
    `vocab` this rank's VocabShard when weight and bias are its rows (vocab-parallel), or None.
    """
    needs = needs_of(inputs) if FAMILIES[family].math is not None and torch.is_grad_enabled() \
        else NONE
    absent = inputs.hidden.new_empty(0)
    rows = [absent if r is None else r for r in rows]
    spec = _compiled_spec_string(family, options, impl, needs, "" if vocab is None else vocab.spec)
    loss, logp, ent, _, summary, *_ = _chunked_loss_op(*inputs, rows, spec)
    return loss, logp, ent, summary.detach()
