"""linear_logprobs: per-token log-prob of the target (and entropy) under
softmax(transform(hidden @ weight^T + bias)), without holding the [N, V] logits.

Algorithm: the chunked driver (`_chunked.run`, family "logprobs") runs one GEMM per chunk of C
rows and a row-wise epilogue kernel (max / sum-exp / target logit / sum p*z) in the forward; the
backward recomputes each chunk's logits, overwrites them in place with dL/dlogits and runs two
GEMMs (one when the LM head is frozen: no dW).
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
        c = self.chunk_size
        if c is not None and (not isinstance(c, int) or isinstance(c, bool) or c < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {c!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")

    def transform(self) -> LogitTransform:
        return LogitTransform(self.logit_scale, self.final_logit_softcapping, self.temperature)


@dataclass(frozen=True)
class LogprobOptions(HeadOptions):
    """linear_logprobs' options: the head's, and whether to gather the logit summary."""

    summary: bool = False


# ----------------------------------------------------------------------------- reference
def linear_logprobs_reference(hidden: Tensor, weight: Tensor, targets: Tensor,
                              bias: Optional[Tensor] = None,
                              transform: LogitTransform = LogitTransform(),
                              ignore_index: int = -100,
                              vocab_group=None, summary: bool = False) -> tuple[Tensor, ...]:
    """The spec: materialized logits, log_softmax, gather. Computes in fp32 (fp64 for fp64).
    -> logp, entropy, and with `summary` the mean transformed logit and whether the target is
    its first argmax (bool). vocab_group (or a DTensor weight): weight and bias are this rank's
    vocabulary shard (`_vocab_parallel.logprobs_reference`; no summary)."""
    weight, bias, vocab = _vocab_parallel.shard(weight, bias, vocab_group)
    if vocab is not None:
        if summary:
            raise ValueError("return_logit_summary with vocab_group runs on the chunked impls "
                             "(impl='cpp' or 'triton'), not on the reference path")
        return _vocab_parallel.logprobs_reference(hidden, weight, targets, bias, transform,
                                                  ignore_index, vocab)
    dt = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(dt) @ weight.to(dt).T  # [..., V]
    if bias is not None:
        logits = logits + bias.to(dt)
    logits = transform.apply(logits)
    logz = torch.log_softmax(logits, dim=-1)  # [..., V]
    valid = targets != ignore_index
    logp = logz.gather(-1, torch.where(valid, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logz.exp() * logz).sum(-1)
    # A non-finite logit makes the entropy NaN (0 * -inf at worst); its log-prob is NaN too,
    # in every impl.
    logp = torch.where(torch.isnan(entropy), entropy, logp)
    zero = torch.zeros((), dtype=dt, device=logp.device)
    out = torch.where(valid, logp, zero), torch.where(valid, entropy, zero)
    if not summary:
        return out
    top1 = (logits.argmax(-1) == targets) & valid & ~torch.isnan(entropy)
    return *out, logits.detach().mean(-1).float(), top1


# ----------------------------------------------------------------------------- public API
def linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                    bias: Optional[Tensor] = None, temperature: float = 1.0,
                    ignore_index: int = -100, return_entropy: bool = False,
                    chunk_size: Optional[int] = None, impl: str = "auto",
                    logit_scale: float = 1.0,
                    final_logit_softcapping: Optional[float] = None,
                    vocab_group=None, return_logit_summary: bool = False):
    """Per-token log-prob of `targets` (and optionally entropy) under the LM head, in fp32
    (fp64 for fp64 inputs on the reference path).

    hidden [..., H], weight [V, H], targets [...] int -> logp [...] fp32 (and entropy [...]).
    return_logit_summary: also the mean transformed logit over the vocabulary [...] fp32 and
    whether the target is its first argmax [...] bool (TRL's `mean_logits` and `is_top1`;
    False for ignored positions and rows with a NaN logit), not differentiable, from the same
    GEMM pass: the outputs are logp, entropy (if return_entropy), mean_logit, is_top1.
    Positions whose target is `ignore_index` give 0 and receive no gradient. Differentiable in
    hidden, weight and bias through both outputs (any number of backward passes: the backward
    recomputes the logits; no dW for a frozen weight); the [N, V] logits are never held.
    Compile-safe (torch.compile(fullgraph=True)); the float options are static configuration:
    literals, or values that stay the same across calls of a compiled function.
    vocab_group (a torch.distributed ProcessGroup; or a DTensor weight placed Shard(0)): weight
    and bias are this rank's contiguous shard of the vocabulary rows, targets global ids;
    every rank gets the full-vocabulary results and the full hidden gradient
    (`rlfuse.vocab_shard_range` gives the split, `_vocab_parallel` the algorithm).
    """
    weight, bias, vocab = _vocab_parallel.shard(weight, bias, vocab_group)
    check_linear_inputs(hidden, weight, targets, bias, ignore_index, vocab)
    opts = LogprobOptions(temperature, logit_scale, final_logit_softcapping, ignore_index,
                          chunk_size, impl, bool(return_logit_summary))
    impl = resolve(impl, hidden.device)
    if impl == "reference":
        logp, ent, *summary = linear_logprobs_reference(
            hidden, weight, targets, bias, opts.transform(), ignore_index, vocab and vocab.group,
            summary=opts.summary)
    else:
        lead, h = targets.shape, weight.shape[1]
        inputs = _chunked.Inputs(hidden.reshape(-1, h), weight, bias, targets.reshape(-1).long())
        _, logp, ent, summary = _chunked.run("logprobs", opts, impl, inputs, vocab=vocab)
        logp, ent = logp.view(lead), ent.view(lead)
        summary = [summary[0].view(lead), summary[1].view(lead).bool()] if opts.summary else []
    out = [logp, *([ent] if return_entropy else []), *summary]
    return out[0] if len(out) == 1 else tuple(out)


_chunked.register_family("logprobs", LogprobOptions)
