"""The LM head sharded over the ranks of a torchrun job (`distributed.vocab_parallel=true`).

Layout. Rank r keeps rows `rlfuse.vocab_shard_range(V, r, w)` of the LM head's weight (and bias)
as its parameter, and AdamW state for those rows only (its own optimizer, `Trainer.head_opt`).
The rest of the model stays data-parallel under DDP or FSDP2, which ignore the head's parameters.
Every fused-op call passes `vocab_group=` (`LMHead.vocab_group`).

Inputs. The ops want their hidden states, targets and per-row tensors identical on every rank,
but the backbone is data-parallel: each rank holds other rows. So each rank all-gathers the
head's inputs (`whole_batch`) and runs the head on the whole global batch with its shard. The
alternative, a head call per rank's rows, would run w calls with their own collectives where one
does; gathering costs one [N, H] all-gather of hidden rows forward. The op's loss is then the
global batch's loss (its normalizers are global already), its shard's weight gradient is the
full-batch gradient of that shard, and its hidden gradient (all-reduced by the op) is the full
dL/dX of every row, of which a rank keeps its own rows. A rank's backbone thus gets the global
loss's gradient through its own rows; DDP / FSDP2 average over the ranks where the sum is the
full gradient, so the kept rows are scaled by w (`_RowsToAll.backward`). The head's gradient
never enters the wrappers' averaging.

Cost per training op call, on top of the ops' own per-row collectives: the all-gather of the
hidden rows ([N, H]) and of the targets and per-row tensors ([N] or [N, T] each), and the op's
[N, H] all-reduce of the hidden gradient, where N is the global batch's rows x positions. Each
rank runs the head GEMMs on all N rows but V / w vocabulary rows: the same FLOPs per rank as a
data-parallel head.

Sampling. A decode step needs every vocabulary logit of each rank's own rows at the last position
only: the ranks all-gather those hidden rows [B, H], each computes its shard's logits for all of
them [B_total, V_r], and one all-to-all hands every rank its rows of every shard [B_r, V]
(`own_logits`); never [rows x V] for a whole sequence. The ranks then step in lockstep until
every rank's rows have stopped; a rank whose rows are done draws nothing, so its random stream
is the one it has without vocab_parallel.

Tied embeddings (input embedding = LM head) are untied with a message: the embedding lookup is
data-parallel (each rank looks up its own ids), so a vocab-parallel embedding would need every
rank's ids gathered, an [N, H] all-reduce forward and an [N, H] all-gather backward per step;
untying keeps the embedding a plain data-parallel parameter at the cost of its own V x H matrix
(sharded 1/w under FSDP2), and the saved model says tie_word_embeddings=false.

Checkpoints: rank 0 writes the full head, gathered (`full_head`), so the folder loads into one
process; trainer.pt keeps the head's optimizer state gathered to full rows (`optimizer_state`),
and a resumed rank takes its rows of both again (`slice_weights`, `load_optimizer_state`).
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import Tensor, nn

import rlfuse
from rlfuse._vocab_parallel import VocabShard  # the ops' own record of a shard

from . import distributed
from .data import IGNORE


def rows(shard: VocabShard) -> slice:
    """This rank's rows of the full vocabulary (`rlfuse.vocab_shard_range`)."""
    return slice(*rlfuse.vocab_shard_range(shard.vocab_size, distributed.rank(),
                                           distributed.world()))


def shard_head(model, announce: bool = True) -> VocabShard:
    """Replace the LM head's weight (and bias) by this rank's rows of rank 0's, untying a tied
    input embedding first (module docstring, and a message unless not `announce`); returns the
    shard, which `model.head` reads. The trainer shards the policy and the frozen reference."""
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if emb is not None and out.weight is emb.weight:
        out.weight = nn.Parameter(out.weight.detach().clone(),
                                  requires_grad=out.weight.requires_grad)
        for c in {id(model.config): model.config,
                  id(model.config.get_text_config()): model.config.get_text_config()}.values():
            c.tie_word_embeddings = False
        if announce and distributed.is_main():
            print("rlfuse: distributed.vocab_parallel=true unties the input embedding from the "
                  "LM head (they were one matrix): each is trained on its own, and checkpoints "
                  "hold both (tie_word_embeddings=false)", file=sys.stderr, flush=True)
    vocab = out.weight.shape[0]
    start, end = rlfuse.vocab_shard_range(vocab, distributed.rank(), distributed.world())
    for name in ("weight", "bias"):
        p = getattr(out, name, None)
        if p is None:
            continue
        full = p.detach().to(distributed._comm_device())
        dist.broadcast(full, 0)  # every rank slices rank 0's head, as DDP broadcasts the rest
        setattr(out, name, nn.Parameter(full[start:end].to(p.device).clone(),
                                        requires_grad=p.requires_grad))
    out.rlfuse_vocab = VocabShard(dist.group.WORLD, start, vocab)
    return out.rlfuse_vocab


def head_params(model) -> dict[str, nn.Parameter]:
    """{state-dict key: parameter} of the sharded LM head."""
    out = model.get_output_embeddings()
    mine = {id(p) for p in out.parameters()}
    return {k: p for k, p in model.named_parameters() if id(p) in mine}


# ----------------------------------------------------------------------------- training inputs
class _RowsToAll(torch.autograd.Function):
    """Every rank's rows of x [b_r, T_r, H] (padded to the longest T); backward: this rank's rows
    of the gradient, times the world size (module docstring: the op's hidden gradient is already
    the sum over the shards, and the wrappers average the backbone's gradients)."""

    @staticmethod
    def forward(ctx, x):
        out, ctx.mine = distributed.gather_rows(x)
        ctx.shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        own = grad[(ctx.mine, *(slice(0, n) for n in ctx.shape[1:]))]
        return own * distributed.world()


def whole_batch(h, hidden: Tensor, targets: Tensor, *rows):
    """(hidden, targets, *rows, this rank's rows slice) of the whole global batch when the head
    `h` (a model.LMHead) is a vocab shard: every rank's rows, padded on the right (targets with
    IGNORE, the rest with 0) and concatenated in rank order; the inputs as they are (and
    slice(None)) otherwise. `rows` may hold None."""
    if h.vocab is None:
        return hidden, targets, *rows, slice(None)
    hidden = _RowsToAll.apply(hidden)
    targets, mine = distributed.gather_rows(targets, fill=IGNORE)
    rows = [None if x is None else distributed.gather_rows(x)[0] for x in rows]
    return hidden, targets, *rows, mine


def chosen_first(n: int) -> Tensor:
    """The order that turns gathered DPO rows, w blocks of [chosen; rejected] of n / (2w) each,
    into [every chosen row; every rejected row]."""
    w = distributed.world()
    return torch.arange(n).view(w, 2, n // (2 * w)).transpose(0, 1).reshape(-1)


def local_tokens(metrics: dict, mask: Tensor) -> dict:
    """The op's metrics with `tokens` counting this rank's tokens (reduce_metrics sums it)."""
    return {**metrics, "tokens": float(mask.sum())}


# ----------------------------------------------------------------------------- sampling
def row_counts(n: int) -> list[int]:
    """Every rank's row count b_r (a decode loop's rows: gathered once, not per step)."""
    return [int(k) for k in distributed.gather_rows(torch.tensor([n]))[0]]


def own_logits(logits: Tensor, counts: list[int], shard: VocabShard) -> Tensor:
    """This rank's rows of the full-vocabulary logits [b_r, V] from every rank's shard logits
    [sum(counts), V_s] (rank order, `distributed.gather_rows`): one all-to-all."""
    w, r = distributed.world(), distributed.rank()
    widths = [e - s for s, e in (rlfuse.vocab_shard_range(shard.vocab_size, k, w)
                                 for k in range(w))]
    dev = distributed._comm_device()
    send = logits.to(dev).contiguous().view(-1)
    recv = torch.empty(counts[r] * shard.vocab_size, dtype=logits.dtype, device=dev)
    dist.all_to_all_single(recv, send, output_split_sizes=[counts[r] * v for v in widths],
                           input_split_sizes=[n * widths[r] for n in counts], group=shard.group)
    parts = recv.split([counts[r] * v for v in widths])
    return torch.cat([p.view(counts[r], v) for p, v in zip(parts, widths)], 1).to(logits.device)


# ----------------------------------------------------------------------------- checkpoints
def full_head(model) -> dict[str, Tensor]:
    """{state-dict key: the full tensor} of the sharded head, on every rank (all must call): a
    transient V x H per rank while a checkpoint is written, what a data-parallel replica holds."""
    return {k: distributed.gather_rows(p.detach())[0] for k, p in head_params(model).items()}


def slice_weights(weights: dict, model, shard: VocabShard) -> None:
    """A full checkpoint's head tensors in `weights` cut to this rank's rows, in place."""
    for k in head_params(model):
        if k in weights:
            weights[k] = weights[k][rows(shard)]


def optimizer_state(opt, shard: VocabShard) -> dict:
    """The head optimizer's state_dict with every per-row tensor gathered to the full vocabulary
    (and the bf16 optimizer's rounding RNG, one per rank); every rank must call it."""
    state = opt.state_dict()
    n = rows(shard).stop - shard.start
    state["state"] = {i: {k: distributed.gather_rows(v)[0]
                          if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v
                          for k, v in s.items()} for i, s in state["state"].items()}
    if "rounding_rng" in state:
        state["rounding_rng"] = distributed.gather_objects(state["rounding_rng"])
    return state


def load_optimizer_state(opt, state: dict, shard: VocabShard) -> None:
    """optimizer_state's output, cut back to this rank's rows, into the head optimizer."""
    state = dict(state)
    state["state"] = {i: {k: v[rows(shard)]
                          if torch.is_tensor(v) and v.dim() and v.shape[0] == shard.vocab_size
                          else v for k, v in s.items()} for i, s in state["state"].items()}
    if "rounding_rng" in state:
        state["rounding_rng"] = state["rounding_rng"][distributed.rank()]
    opt.load_state_dict(state)
