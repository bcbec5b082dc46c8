"""Vocab-parallel fused ops: the LM head's rows sharded over the ranks of a torch.distributed
process group, every rank getting the full-vocabulary results.

Layout. Rank r of a group of w holds a contiguous shard of the weight's (and bias's) rows, in
rank order. `vocab_shard_range(V, r, w)` is the split rlfuse documents and the engine uses:
rows [r*V//w, (r+1)*V//w), so when w does not divide V the shards hold floor(V/w) or ceil(V/w)
rows, the larger ones towards the higher ranks (V=123, w=2: [0, 61) and [61, 123)). The ops
accept any contiguous split in rank order with at least one row per rank, DTensor's
Shard(0) (torch.chunk: the larger shards first) included: they all-gather the shard sizes once
per call. A DTensor weight / bias placed Shard(0) on a 1-D mesh is taken as its local shard
(differentiably: its gradient comes back as a DTensor), and its mesh's group is the default
vocab group. Everything else (hidden, targets as global token ids, masks, advantages, ...) is
replicated: identical on every rank, which is not checked.

Algorithm, per chunk of C rows (Z_r = X_c @ W_r^T, the [C, V_r] logits of this shard):
    part = partials(Z_r)         row-wise kernel: max m, s1 = sum exp(z - m) - 1,
                                 t = sum exp(z - m)(z - m), z[target] or 0 where absent
    M = all_reduce_max(m)                                    [C] fp32
    R, N, T, Zt = all_reduce_sum(stack(a s1 + (a if m < M), [m == M], a (t + (m - M)(1 + s1)),
                                 z[target]))  [4, C] fp32, a = exp(m - M) re-shifts this
                                 shard's sums to the global max; the global sum-exp is
                                 S = N + R, its maxima's 1s counted apart (`_shifted`)
    lse = M + log1p(S - 1), entropy = log1p(S - 1) - T / S, logp = (Zt - M) - log1p(S - 1)
    per-row loss math on [C] vectors, identical on every rank -> a = dL/dlogp, e = dL/dentropy
    grad_(Z_r) with the global lse / entropy: dL/dZ_r, no further communication; a row whose
        target is on another shard keeps its softmax / entropy terms and has no one-hot term
        ("absent", distinct from ignore_index, whose rows get zeros everywhere)
    dX_c = dZ_r @ W_r, all_reduce_sum(dX_c) asynchronously: it overlaps the next chunk's GEMMs
        and its handle is waited once at the end; dW_r, db_r stay local (this shard's).
So two blocking collectives of per-row vectors per chunk (4 C + 16 C bytes), one async
[C, H] reduction of the hidden gradient (fp32, rounded once at the end for bf16 / fp16
hidden), and one [w] int64 all_gather of the shard sizes per call; never [C x V]. FLOPs per
rank are the single-process ones with V / w for V. The recomputing backward of
`linear_logprobs` reuses the saved global lse / entropy: only the dX reductions. The reference
(`logprobs_reference`) materializes this shard's logits and reduces the same per-row sums
through autograd-aware collectives (a sum whose backward is the identity, since every rank
computes the same outputs from it; a copy of hidden whose backward sums dX over the ranks).

NCCL (CUDA). The same code: a NCCL group with every tensor on the rank's own device
(`torch.cuda.set_device(local_rank)` before `init_process_group("nccl")`), impl "triton" (the
default for CUDA tensors). The blocking MAX / SUM are stream-ordered (the compute stream waits
on the collective, no host synchronization); the dX all-reduces run on NCCL's stream while the
next chunk's GEMMs run, and the final `wait()` orders the compute stream after them. The
per-call size all_gather synchronizes the host once (`.tolist()`). Only the gloo CPU path was
run here (tests/test_vocab_parallel.py).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ._backend import epilogues, partials_epilogue

# Process groups by name, so that the custom ops (whose schemas take no ProcessGroup) carry a
# shard as a string.
_GROUPS: dict = {}


def vocab_shard_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end): the vocabulary rows rank `rank` of `world_size` holds, r*V//w to
    (r+1)*V//w (module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size = {world_size}), got {rank}")
    if vocab_size < world_size:
        raise ValueError(f"vocab_size = {vocab_size} must be >= world_size = {world_size}: "
                         "every rank holds at least one vocabulary row")
    return rank * vocab_size // world_size, (rank + 1) * vocab_size // world_size


def _dtensor_local(t: Optional[Tensor], name: str):
    """(local shard, its mesh's group) of a DTensor placed Shard(0) on a 1-D mesh; (t, None)
    for anything else."""
    # A DTensor exists only once its module is imported: no import (seconds) for plain tensors.
    dtensor = sys.modules.get("torch.distributed.tensor")
    if t is None or dtensor is None or not isinstance(t, dtensor.DTensor):
        return t, None
    Shard = dtensor.Shard
    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise ValueError(f"{name}: a DTensor {name} must be placed (Shard(0),) on a 1-D device "
                         f"mesh (its vocabulary rows split over the ranks), got placements "
                         f"{tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh")
    return t.to_local(), t.device_mesh.get_group()


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice [start, start + rows) of a vocabulary of `vocab_size` ids."""

    group: object  # torch.distributed ProcessGroup
    start: int
    vocab_size: int

    @property
    def spec(self) -> str:
        """The shard as a custom op's string argument; `from_spec` reads it back."""
        name = self.group.group_name
        _GROUPS[name] = self.group
        return f"{self.start}:{self.vocab_size}:{name}"

    @staticmethod
    def from_spec(spec: str) -> Optional["VocabShard"]:
        if not spec:
            return None
        start, size, name = spec.split(":", 2)
        return VocabShard(_GROUPS[name], int(start), int(size))

    def epilogues(self, impl: str):
        """The driver's (stats, grad_) pair for this shard: same signatures as the
        single-process kernels, with the row statistics combined over the ranks."""
        partials = partials_epilogue(impl)
        _, grad_ = epilogues(impl)

        def stats(z, targets, scale, softcap, inv_temp, ignore_index):
            part = partials(z, targets, scale, softcap, inv_temp, self.start)  # [4, c] fp32
            return combine(part, targets, ignore_index, self.group)

        def grad_shard_(z, targets, lse, entropy, a, e, scale, softcap, inv_temp, ignore_index):
            grad_(z, targets, lse, entropy, a, e, scale, softcap, inv_temp, ignore_index,
                  self.start, self.vocab_size)

        return stats, grad_shard_

    def dx_reducer(self) -> "DxReducer":
        return DxReducer(self.group)


class DxReducer:
    """Sums each chunk's hidden gradient over the ranks asynchronously; `wait` ends them."""

    def __init__(self, group):
        self.group = group
        self.handles = []

    @staticmethod
    def dtype(hidden_dtype: torch.dtype) -> torch.dtype:
        """The partial dX's dtype: at least fp32, so bf16 / fp16 dX is rounded once, after
        the sum over the ranks."""
        return torch.promote_types(hidden_dtype, torch.float32)

    def add(self, dx_chunk: Tensor) -> None:
        self.handles.append(dist.all_reduce(dx_chunk, group=self.group, async_op=True))

    def wait(self) -> None:
        for h in self.handles:
            h.wait()
        self.handles.clear()


def shard(weight: Tensor, bias: Optional[Tensor], vocab_group
          ) -> tuple[Tensor, Optional[Tensor], Optional[VocabShard]]:
    """(local weight, local bias, this rank's VocabShard) from an op's arguments; the inputs
    and None when there is neither a vocab_group nor a DTensor weight."""
    weight, mesh_group = _dtensor_local(weight, "weight")
    bias, _ = _dtensor_local(bias, "bias")
    group = vocab_group if vocab_group is not None else mesh_group
    if group is None:
        return weight, bias, None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab_group was given but torch.distributed is not initialized; "
                         "call torch.distributed.init_process_group first")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"vocab_group must be a torch.distributed ProcessGroup, got "
                        f"{type(group).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return weight, bias, None  # the op's own input check names the problem
    rows = torch.tensor([weight.shape[0]], dtype=torch.int64, device=weight.device)
    sizes = torch.empty(dist.get_world_size(group), dtype=torch.int64, device=weight.device)
    dist.all_gather_single(sizes, rows, group=group)
    sizes = sizes.tolist()
    if min(sizes) < 1:
        raise ValueError(f"weight: every rank of vocab_group must hold at least one vocabulary "
                         f"row; the shards hold {sizes} rows")
    rank = dist.get_rank(group)
    return weight, bias, VocabShard(group, sum(sizes[:rank]), sum(sizes))


def _shifted(part: Tensor, mx: Tensor) -> Tensor:
    """[4, c] terms of partials [4, c] re-shifted from their own max m to mx (>= it), to be
    summed over slices and finished by `_summed`. With a = exp(m - mx), a slice's sum-exp
    a (1 + s1) is split into a * s1 plus a where m < mx, or a count of 1 where m is the max: the
    maxima's exact 1s are added back as an integer count, not lost against small terms. t
    moves by (m - mx) times the sum-exp."""
    m, s1, t, zt = part
    shift = m - mx  # <= 0
    alpha = torch.exp(shift)
    top = shift == 0
    return torch.stack([alpha * s1 + torch.where(top, 0.0, alpha), top.to(s1.dtype),
                        alpha * (t + shift * (1 + s1)), zt])


def _summed(mx: Tensor, terms: Tensor) -> Tensor:
    """The partials [4, c] of a union of slices from their `_shifted` terms summed [4, c]."""
    rest, tops, t, zt = terms
    return torch.stack([mx, (tops - 1) + rest, t, zt])


def merge(a: Tensor, b: Tensor) -> Tensor:
    """The partials [4, c] of two disjoint vocabulary slices' partials [4, c] (online, as flash
    attention merges its softmax blocks)."""
    mx = torch.maximum(a[0], b[0])
    return _summed(mx, _shifted(a, mx) + _shifted(b, mx))


def finish(part: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """lse [c] fp64, logp and entropy [c] fp32 from the whole vocabulary's partials [4, c]."""
    mx, s1, t, zt = part
    log_s = torch.log1p(s1)
    lse = mx.double() + log_s.double()
    logp = (zt - mx) - log_s
    ent = log_s - t / (1 + s1)
    # A non-finite logit in any slice leaves t non-finite: NaN row, as in the single-process
    # kernels; ignored rows are 0.
    ok = torch.isfinite(t)
    keep = targets != ignore_index
    lse = torch.where(ok, lse, float("nan"))
    logp = torch.where(keep, torch.where(ok, logp, float("nan")), 0.0)
    ent = torch.where(keep, torch.where(ok, ent, float("nan")), 0.0)
    return lse, logp, ent


def combine(part: Tensor, targets: Tensor, ignore_index: int, group
            ) -> tuple[Tensor, Tensor, Tensor]:
    """Full-vocabulary lse [c] fp64, logp and entropy [c] fp32 from this shard's partials
    [4, c] fp32 (max, sum-exp - 1, shifted sum p*z, target logit or 0): two collectives."""
    mx = part[0].clone()
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)  # [c]
    terms = _shifted(part, mx)  # [4, c]
    dist.all_reduce(terms, group=group)
    return finish(_summed(mx, terms), targets, ignore_index)


def combine_summary(mx: Tensor, arg: Tensor, total: Tensor, group
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The full vocabulary's row max, its first id and the logits' sum ([c] each) from this
    shard's: three collectives (the lowest id among the ranks holding the max is the first)."""
    local, mx = mx, mx.clone()
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    arg = torch.where(local == mx, arg, torch.iinfo(torch.int64).max)
    dist.all_reduce(arg, op=dist.ReduceOp.MIN, group=group)
    total = total.clone()
    dist.all_reduce(total, group=group)
    return mx, arg, total


# ----------------------------------------------------------------------------- reference
class _SumOverRanks(torch.autograd.Function):
    """all_reduce SUM forward; identity backward: every rank computes the same (replicated)
    outputs from the sum alone, so each rank's part receives the sum's gradient as it is."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToRanks(torch.autograd.Function):
    """Identity forward; all_reduce SUM backward: the replicated hidden's gradient is the sum
    of every shard's part."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def logprobs_reference(hidden: Tensor, weight: Tensor, targets: Tensor,
                       bias: Optional[Tensor], transform, ignore_index: int,
                       vocab: VocabShard) -> tuple[Tensor, Tensor]:
    """The vocab-parallel spec, differentiable (fp32; fp64 for fp64 inputs): this shard's
    materialized logits [..., V_r], the per-row sums over the ranks, and log-prob / entropy
    from those sums alone (as `combine`)."""
    dt = torch.promote_types(hidden.dtype, torch.float32)
    x = _CopyToRanks.apply(hidden.to(dt), vocab.group)  # dX summed over the ranks in fp32
    logits = x @ weight.to(dt).T  # [..., V_r]
    if bias is not None:
        logits = logits + bias.to(dt)
    z = transform.apply(logits)
    m = z.detach().amax(-1)  # the shift only: the results do not depend on it
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=vocab.group)
    zm = z - m[..., None]
    p = torch.exp(zm)  # [..., V_r] unnormalized
    valid = targets != ignore_index
    col = targets - vocab.start
    present = valid & (col >= 0) & (col < z.shape[-1])
    own = zm.gather(-1, torch.where(present, col, 0).long().unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=dt, device=z.device)
    parts = torch.stack([p.sum(-1), (p * zm).sum(-1), torch.where(present, own, zero)])
    s, t, zt = _SumOverRanks.apply(parts, vocab.group)  # [3, ...] the full vocabulary's
    log_s = torch.log(s)
    logp, entropy = zt - log_s, log_s - t / s
    logp = torch.where(torch.isnan(entropy), entropy, logp)  # as linear_logprobs_reference
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)
