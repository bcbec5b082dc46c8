"""The one chunked driver behind every fused op.

For N token rows, hidden H, vocab V and C rows at a time:
    Z = X_c @ W^T (+ b)                       GEMM, Z is a reused [C, V] buffer
    stats(Z) -> lse, logp, entropy            row-wise kernel (cpp / triton), Z unchanged
    per-row loss math in torch on [C] vectors -> a = dL/dlogp, e = dL/dentropy
    grad_(Z) -> Z holds dL/d(raw logits)      row-wise kernel, in place
    dX_c = Z @ W ; dW += Z^T @ X_c ; db += sum_rows Z
`forward_stats` is one GEMM per chunk, `backward` three (recompute + two), `fused_rowloss`
three (the gradient is written during the forward). Extra memory: one [C, V] buffer plus O(N)
row statistics, and an fp32 dW accumulator.

bf16 / fp16 inputs: where `lowp_gemm_native` says the hardware multiplies them natively, the
GEMMs take them as they are (no fp32 weight copy) and accumulate in fp32: Z lands in the
epilogue's buffer (fp32 on CPU, written by MKL's bf16 -> fp32 GEMM, so the logits are not even
rounded; the operand dtype on CUDA, as PyTorch's own bf16 logits), dL/dZ is rounded to the
operand dtype once for the two gradient GEMMs, and dW += dZ^T @ X_c accumulates in fp32 across
chunks and is rounded once at the end. Elsewhere the GEMMs run in fp32 on chunk-wise upcasts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ._backend import LOWP, cpp_ext, epilogues, lowp_gemm_native
from ._checks import check_number

# The [C, V] logits buffer when chunk_size is not given. CPU: 256 rows, as fast as one big GEMM
# (MKL loses ~2x below ~128 rows at H=896; 256 rows ran as fast as 576 at H=256, V=32k), and
# fewer for vocabularies so large that 256 rows would pass 160 MB. CUDA: 2048 rows within 1 GiB
# (2048 x 131072 bf16 is 512 MiB), so each GEMM fills an H100/H200 (unmeasured: no GPU yet).
CHUNK_ROWS = {"cpu": 256, "cuda": 2048}
CHUNK_BYTES = {"cpu": 160 * 2**20, "cuda": 2**30}


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
    """The GEMM operand dtype for `dtype` inputs on `device`."""
    if dtype in LOWP:
        return dtype if lowp_gemm_native(device, dtype) else torch.float32
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


def default_chunk_size(n: int, v: int, device: torch.device, dtype: torch.dtype) -> int:
    """Rows per chunk for N rows at vocabulary V, from the device's row and byte budgets."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    elem_bytes = torch.finfo(logits_dtype(device, compute_dtype(device, dtype))).bits // 8
    rows = min(CHUNK_ROWS[kind], CHUNK_BYTES[kind] // (v * elem_bytes))
    rows = rows // 32 * 32 if rows >= 64 else max(16, rows)  # GEMM-friendly multiples of 32
    return max(1, min(n, rows))


class _Gemms:
    """The three GEMMs of a chunk, on one reused logits buffer."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], chunk: int):
        self.dtype = compute_dtype(hidden.device, hidden.dtype)
        self.hidden = hidden
        self.w = weight.to(self.dtype)  # [V, H], a copy only when upcasting
        n, v = hidden.shape[0], weight.shape[0]
        self.chunk = chunk
        self.buf = torch.empty(min(chunk, n), v, device=hidden.device,
                               dtype=logits_dtype(hidden.device, self.dtype))  # [C, V]
        self.b = None if bias is None else bias.to(self.buf.dtype)
        self.dz_buf: Optional[Tensor] = None  # [C, V] GEMM dtype, when the buffer is wider

    def ranges(self):
        n = self.hidden.shape[0]
        for s in range(0, n, self.chunk):
            yield s, min(n, s + self.chunk)

    def logits(self, s: int, e: int) -> tuple[Tensor, Tensor]:
        x = self.hidden[s:e].to(self.dtype)  # [c, H]
        z = self.buf[: e - s]  # [c, V]
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
        return self.dz_buf[: dz.shape[0]].copy_(dz)


def _epilogues(impl: str, vocab):
    # Vocab-parallel hook (_vocab_parallel.py): a VocabShard's kernels combine the row
    # statistics over the ranks and take the global lse / entropy in the gradient.
    return epilogues(impl) if vocab is None else vocab.epilogues(impl)


def forward_stats(hidden, weight, bias, targets, tf: LogitTransform, ignore_index: int,
                  chunk: int, impl: str, vocab=None) -> tuple[Tensor, Tensor, Tensor]:
    """lse [N] fp64 (the gradient kernels recover z - lse from it to fp32 accuracy), logp and
    entropy [N] fp32, from one GEMM pass. `vocab`: this rank's VocabShard (weight and bias are
    its rows), or None."""
    stats, _ = _epilogues(impl, vocab)
    n = hidden.shape[0]
    out = [torch.empty(n, dtype=dt, device=hidden.device)
           for dt in (torch.float64, torch.float32, torch.float32)]
    if n == 0:
        return tuple(out)
    g = _Gemms(hidden, weight, bias, chunk)
    for s, e in g.ranges():
        _, z = g.logits(s, e)
        for o, r in zip(out, stats(z, targets[s:e], *tf.kernel_args(), ignore_index)):
            o[s:e] = r
    return tuple(out)


Needs = tuple[bool, bool, bool]  # which of dX, dW, db to compute
ALL: Needs = (True, True, True)


def needs_of(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Needs:
    """The gradients autograd will ask for: a frozen LM head (LoRA) skips dW, a third of the
    GEMMs, and its weight-sized fp32 buffer."""
    return hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad


class _GradAccumulator:
    def __init__(self, g: _Gemms, bias: Optional[Tensor], hidden_dtype: torch.dtype,
                 needs: Needs, vocab=None):
        n, h = g.hidden.shape
        v = g.w.shape[0]
        dev = g.hidden.device
        acc = torch.promote_types(g.dtype, torch.float32)  # never rounded per chunk
        self.g = g
        self.hidden_dtype = hidden_dtype
        # Vocab-parallel hook: each chunk's partial dX is summed over the ranks (async).
        self.reducer = vocab.dx_reducer() if vocab is not None and needs[0] else None
        dx_dtype = hidden_dtype if self.reducer is None else self.reducer.dtype(hidden_dtype)
        self.dx = torch.empty(n, h, dtype=dx_dtype, device=dev) if needs[0] else None
        self.dw = torch.zeros(v, h, dtype=acc, device=dev) if needs[1] else None
        self.db = torch.zeros(v, dtype=acc, device=dev) \
            if bias is not None and needs[2] else None

    def add(self, s: int, e: int, x: Tensor, dz: Tensor):
        dz_op = self.g.gemm_operand(dz) if self.dx is not None or self.dw is not None else None
        if self.dx is not None:
            _mm_into(dz_op, self.g.w, self.dx[s:e])  # [c, H]
            if self.reducer is not None:
                self.reducer.add(self.dx[s:e])
        if self.dw is not None:
            _mm_into(dz_op.t(), x, self.dw, accumulate=True)  # [V, H] fp32
        if self.db is not None:
            self.db += dz.sum(0, dtype=self.db.dtype)

    def result(self, weight: Tensor, bias: Optional[Tensor]):
        if self.reducer is not None:
            self.reducer.wait()
            self.dx = self.dx.to(self.hidden_dtype)
        dw = None if self.dw is None else self.dw.to(weight.dtype)
        db = None if self.db is None else self.db.to(bias.dtype)
        return self.dx, dw, db


def backward(grad_logp: Tensor, grad_entropy: Tensor, hidden, weight, bias, targets,
             lse: Tensor, entropy: Tensor, tf: LogitTransform, ignore_index: int,
             chunk: int, impl: str, needs: Needs = ALL, vocab=None):
    """dX, dW, db from per-row gradients a = dL/dlogp and e = dL/dentropy (recomputes Z);
    None for those `needs` leaves out. With `vocab`, lse and entropy are the global ones."""
    _, grad_ = _epilogues(impl, vocab)
    g = _Gemms(hidden, weight, bias, chunk)
    acc = _GradAccumulator(g, bias, hidden.dtype, needs, vocab)
    a = grad_logp.float().contiguous()
    e = grad_entropy.float().contiguous()
    for s, t in g.ranges():
        x, z = g.logits(s, t)
        grad_(z, targets[s:t], lse[s:t], entropy[s:t], a[s:t], e[s:t], *tf.kernel_args(),
              ignore_index)
        acc.add(s, t, x, z)
    return acc.result(weight, bias)


RowLoss = Callable[[int, int, Tensor, Tensor], Tensor]


def fused_rowloss(hidden, weight, bias, targets, tf: LogitTransform, ignore_index: int,
                  chunk: int, impl: str, row_loss: RowLoss, needs: Optional[Needs] = None,
                  vocab=None):
    """Token-separable loss with its gradient written during the forward (3 GEMMs / chunk).

    `row_loss(s, e, logp_c, entropy_c)` returns the (already normalized) contribution of rows
    [s, e) to the scalar loss, differentiably in logp_c and entropy_c ([e - s] fp32).
    Returns loss (fp32 scalar), logp, entropy ([N] fp32) and (dX, dW, db), each None where
    `needs` (default: the inputs' requires_grad) leaves it out. `vocab` as in forward_stats.
    """
    stats, grad_ = _epilogues(impl, vocab)
    g = _Gemms(hidden, weight, bias, chunk)
    acc = _GradAccumulator(g, bias, hidden.dtype, needs or needs_of(hidden, weight, bias), vocab)
    n = hidden.shape[0]
    logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    ent = torch.zeros_like(logp)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    args = tf.kernel_args()
    for s, e in g.ranges():
        x, z = g.logits(s, e)
        lse_c, lp_c, en_c = stats(z, targets[s:e], *args, ignore_index)
        lp_c.requires_grad_(True)
        en_c.requires_grad_(True)
        with torch.enable_grad():
            part = row_loss(s, e, lp_c, en_c)
            a, b = torch.autograd.grad(part, (lp_c, en_c), allow_unused=True,
                                       materialize_grads=True)
        grad_(z, targets[s:e], lse_c, en_c.detach(), a.contiguous(), b.contiguous(), *args,
              ignore_index)
        acc.add(s, e, x, z)
        loss += part.detach()
        logp[s:e] = lp_c.detach()
        ent[s:e] = en_c.detach()
    return loss, logp, ent, acc.result(weight, bias)


def scale_saved_grads(ctx, grad_output: Tensor):
    """Backward of a loss whose gradients were written during the forward: the saved gradients
    times the scalar grad_output. They are handed over as they are (no second weight-sized
    buffer), so autograd may accumulate into them: a second backward through the same graph
    is refused rather than answered with a modified tensor."""
    if getattr(ctx, "grads_handed_over", False):
        raise RuntimeError("rlfuse fused losses compute their gradients in the forward and "
                           "support one backward per forward (retain_graph reuse is not "
                           "supported); call the loss again")
    ctx.grads_handed_over = True
    grads = ctx.saved_tensors
    if bool(grad_output == 1):
        return tuple(grads)
    g = grad_output.float()  # 0-d: a bf16 gradient times g stays bf16, computed in fp32
    return tuple(None if t is None else t * g for t in grads)
