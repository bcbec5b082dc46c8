"""linear_logprobs: per-token log-prob of the target (and entropy) under
softmax(transform(hidden @ weight^T + bias)), without holding the [N, V] logits.

Algorithm: the chunked driver (`_chunked`) runs one GEMM per chunk of C rows and a row-wise
epilogue kernel (max / sum-exp / target logit / sum p*z) in the forward; the backward
recomputes each chunk's logits, overwrites them in place with dL/dlogits and runs two GEMMs.
FLOPs: 2NHV (forward), 6NHV (backward). Extra memory: one [C, V] fp32 buffer + O(N) row stats
(+ an fp32 copy of the weight and an fp32 dW accumulator for bf16/fp16 weights on CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _chunked, _vocab_parallel
from ._backend import IMPLS, resolve
from ._checks import check_tensor
from ._chunked import LogitTransform


# ----------------------------------------------------------------------------- validation
def check_linear_inputs(hidden: Tensor, weight: Tensor, targets: Tensor,
                        bias: Optional[Tensor] = None, ignore_index: int = -100,
                        vocab=None) -> None:
    """Clear errors, naming the argument, for everything the fused ops rely on. `vocab`: the
    VocabShard weight and bias are this rank's rows of (targets are global ids), or None."""
    check_tensor("hidden", hidden)
    check_tensor("weight", weight, dim=2)
    v, h = weight.shape
    if v == 0:
        raise ValueError("weight has V = 0 rows: the vocabulary must not be empty")
    if hidden.dim() < 1 or hidden.shape[-1] != h:
        raise ValueError(f"hidden must have shape [..., H] with H = weight.shape[1] = {h}, "
                         f"got {tuple(hidden.shape)}")
    check_tensor("targets", targets, "index", shape={"hidden.shape[:-1]": hidden.shape[:-1]})
    if bias is not None:
        check_tensor("bias", bias, shape={"[V]": (v,)})
    devices = {t.device for t in (hidden, weight, targets, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"hidden, weight, targets (and bias) must be on one device, got "
                         f"{sorted(str(d) for d in devices)}")
    if vocab is not None:
        v = vocab.vocab_size
    # Data-dependent, so skipped while tracing; the kernels check the range again.
    if targets.numel() and not torch.compiler.is_compiling():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
        if bool(bad.any()):
            ex = targets[bad][0].item()
            raise ValueError(f"targets must be in [0, {v}) or ignore_index={ignore_index}; "
                             f"found {ex}")


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


@dataclass(frozen=True)
class HeadOptions:
    """The LM-head options every fused loss config shares, validated on construction."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    final_logit_softcapping: Optional[float] = None
    ignore_index: int = -100
    chunk_size: Optional[int] = None
    impl: str = "auto"

    def __post_init__(self):
        self.transform()
        check_chunk_size(self.chunk_size)
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")

    def transform(self) -> LogitTransform:
        return LogitTransform(self.logit_scale, self.final_logit_softcapping, self.temperature)


# ----------------------------------------------------------------------------- reference
def linear_logprobs_reference(hidden: Tensor, weight: Tensor, targets: Tensor,
                              bias: Optional[Tensor] = None,
                              transform: LogitTransform = LogitTransform(),
                              ignore_index: int = -100,
                              vocab_group=None) -> tuple[Tensor, Tensor]:
    """The spec: materialized logits, log_softmax, gather. Computes in fp32 (fp64 for fp64).
    vocab_group (or a DTensor weight): weight and bias are this rank's vocabulary shard
    (`_vocab_parallel.logprobs_reference`)."""
    weight, bias, vocab = _vocab_parallel.shard(weight, bias, vocab_group)
    if vocab is not None:
        return _vocab_parallel.logprobs_reference(hidden, weight, targets, bias, transform,
                                                  ignore_index, vocab)
    dt = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(dt) @ weight.to(dt).T  # [..., V]
    if bias is not None:
        logits = logits + bias.to(dt)
    logz = torch.log_softmax(transform.apply(logits), dim=-1)  # [..., V]
    valid = targets != ignore_index
    logp = logz.gather(-1, torch.where(valid, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logz.exp() * logz).sum(-1)
    # A non-finite logit makes the entropy NaN (0 * -inf at worst); its log-prob is NaN too,
    # in every impl.
    logp = torch.where(torch.isnan(entropy), entropy, logp)
    zero = torch.zeros((), dtype=dt, device=logp.device)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("rlfuse::linear_logprobs", mutates_args=())
def _linear_logprobs_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                        logit_scale: float, final_logit_softcapping: Optional[float],
                        temperature: float, ignore_index: int, chunk_size: int, impl: str,
                        vocab_shard: str = "") -> tuple[Tensor, Tensor, Tensor]:
    # vocab_shard: VocabShard.spec of this rank's vocabulary shard, "" for the whole vocabulary
    tf = LogitTransform(logit_scale, final_logit_softcapping, temperature)
    lse, logp, ent = _chunked.forward_stats(hidden, weight, bias, targets, tf, ignore_index,
                                            chunk_size, impl,
                                            _vocab_parallel.VocabShard.from_spec(vocab_shard))
    return logp, ent, lse


@_linear_logprobs_op.register_fake
def _(hidden, weight, bias, targets, logit_scale, final_logit_softcapping, temperature,
      ignore_index, chunk_size, impl, vocab_shard=""):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=dt)
                 for dt in (torch.float32, torch.float32, torch.float64))


@torch.library.custom_op("rlfuse::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward_op(grad_logp: Tensor, grad_entropy: Tensor, hidden: Tensor,
                                 weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                                 lse: Tensor, entropy: Tensor, logit_scale: float,
                                 final_logit_softcapping: Optional[float], temperature: float,
                                 ignore_index: int, chunk_size: int, impl: str,
                                 vocab_shard: str) -> tuple[Tensor, Tensor, Tensor]:
    tf = LogitTransform(logit_scale, final_logit_softcapping, temperature)
    dx, dw, db = _chunked.backward(grad_logp, grad_entropy, hidden, weight, bias, targets, lse,
                                   entropy, tf, ignore_index, chunk_size, impl,
                                   vocab=_vocab_parallel.VocabShard.from_spec(vocab_shard))
    return dx, dw, (db if db is not None else weight.new_empty(0))


@_linear_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, targets, lse, entropy, *args):
    db = bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), db


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, *scalars = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
    ctx.scalars = scalars


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if grad_entropy is None:
        grad_entropy = torch.zeros_like(lse)
    dx, dw, db = _linear_logprobs_backward_op(grad_logp, grad_entropy, hidden, weight, bias,
                                              targets, lse, ent, *ctx.scalars)
    return (dx, dw, (db if bias is not None else None)) + (None,) * 8


_linear_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                    bias: Optional[Tensor] = None, temperature: float = 1.0,
                    ignore_index: int = -100, return_entropy: bool = False,
                    chunk_size: Optional[int] = None, impl: str = "auto",
                    logit_scale: float = 1.0,
                    final_logit_softcapping: Optional[float] = None,
                    vocab_group=None):
    """Per-token log-prob of `targets` (and optionally entropy) under the LM head, in fp32
    (fp64 for fp64 inputs on the reference path).

    hidden [..., H], weight [V, H], targets [...] int -> logp [...] fp32 (and entropy [...]).
    Positions whose target is `ignore_index` give 0 and receive no gradient. Differentiable in
    hidden, weight and bias through both outputs; the [N, V] logits are never held.
    vocab_group (a torch.distributed ProcessGroup; or a DTensor weight placed Shard(0)): weight
    and bias are this rank's contiguous shard of the vocabulary rows, targets global ids;
    every rank gets the full-vocabulary results and the full hidden gradient
    (`rlfuse.vocab_shard_range` gives the split, `_vocab_parallel` the algorithm).
    """
    weight, bias, vocab = _vocab_parallel.shard(weight, bias, vocab_group)
    check_linear_inputs(hidden, weight, targets, bias, ignore_index, vocab)
    tf = LogitTransform(logit_scale, final_logit_softcapping, temperature)
    check_chunk_size(chunk_size)
    impl = resolve(impl, hidden.device)
    if impl == "reference":
        logp, ent = linear_logprobs_reference(hidden, weight, targets, bias, tf, ignore_index,
                                              None if vocab is None else vocab.group)
    else:
        lead, (v, h) = targets.shape, weight.shape
        x = hidden.reshape(-1, h)
        t = targets.reshape(-1).long()
        chunk = chunk_size or _chunked.default_chunk_size(x.shape[0], v, x.device, x.dtype)
        logp, ent, _ = _linear_logprobs_op(x, weight, bias, t, tf.logit_scale,
                                           tf.final_logit_softcapping, tf.temperature,
                                           ignore_index, chunk, impl,
                                           "" if vocab is None else vocab.spec)
        logp, ent = logp.view(lead), ent.view(lead)
    return (logp, ent) if return_entropy else logp
