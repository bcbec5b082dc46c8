"""The engine under torchrun: the process group, DDP / FSDP2 wrapping, and the few collectives the
trainers need. In one process (no torchrun) every function here is the identity or a no-op, so a
trainer has one code path.

    torchrun --standalone --nproc-per-node N -m rlfuse.engine.cli train grpo ... \
        distributed.strategy=fsdp

- Device and backend, decided once (`setup`): CUDA -> cuda:LOCAL_RANK and NCCL; CPU -> gloo.
- Batches: the config's batch sizes are global. Every rank draws step k's rows alike (the samplers
  share the seed) and trains on its contiguous share (`share`), so SFT and DPO train the same
  weights at any world size. GRPO and PPO share out prompts, so a prompt's group stays on one rank;
  each rank samples its own completions (its RNG is seeded with seed + rank). Quantities over the
  whole batch (group advantages, GAE whitening, the KL controller's KL) are computed on the
  gathered per-row vectors (`gather_rows`), never on [rows x vocab].
- Gradients: DDP and FSDP2 average them over the ranks. A loss averaged over this rank's rows is
  then the global average (the shares are equal); a loss normalized by a token count is rescaled
  to the global count (`token_share`).
- Forward: the backbone and the fused loss run inside the wrapper's forward (`Wrapped.forward`:
  the wrapped module's forward runs the trainer's call, the way TRL redirects a wrapped model's
  forward), so DDP's reducer and FSDP2's unshard / reshard hooks fire and the fused ops see the full LM-head weight. FSDP2 shards each
  decoder layer (the model's `_no_split_modules`) and, as the root, the rest (embeddings, final
  norm, LM head, PPO's value head); the no-grad passes keep the layers gathered for their
  duration (`Wrapped.inference`) instead of all-gathering them once per generated token.
- Checkpoints: rank 0 writes them; under FSDP it writes the gathered full state (`full_state`),
  so a checkpoint is the same save_pretrained folder a single process writes.
- Metrics: `reduce_metrics` (means, sums of throughputs and counts, min and max).
- distributed.vocab_parallel=true: the LM head's rows are sharded over the ranks and left out of
  the wrappers (`Wrapped(ignore=...)`); rlfuse.engine.vocab_parallel says how.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import ConfigError


# ----------------------------------------------------------------------------- process group
def setup(device: str) -> torch.device:
    """This process's device (`device` is auto | cpu | cuda). Under torchrun (WORLD_SIZE > 1) it
    is cuda:LOCAL_RANK on CUDA, and the process joins the group: NCCL on CUDA, gloo on CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but CUDA is not available")
    dev = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return dev


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collectives need their tensors: NCCL's on this rank's GPU, gloo's on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- sharing out rows
def check_share(key: str, n: int) -> None:
    """Config key `key` (a global count, `n`) must split evenly over the ranks."""
    if n % world():
        raise ConfigError(f"config key {key!r} is {n}, which {world()} processes cannot share "
                          f"evenly: under torchrun batch sizes are global; make it a multiple of "
                          f"{world()}")


def share(items) -> list:
    """This rank's contiguous share of `items` (all of them in one process): rank r takes
    [r * n // w, (r + 1) * n // w)."""
    items, r, w = list(items), rank(), world()
    return items[r * len(items) // w:(r + 1) * len(items) // w]


def all_sum(x) -> Tensor:
    """x (a number or tensor) summed over the ranks, as an fp64 tensor on x's device (or the CPU)."""
    t = torch.as_tensor(x, dtype=torch.float64)
    if world() == 1:
        return t
    out = t.to(_comm_device())
    dist.all_reduce(out)
    return out.to(t.device)


def token_share(n_local) -> float:
    """The factor that turns a loss averaged over this rank's `n_local` tokens into this rank's
    share of the loss averaged over every rank's tokens, under the wrappers' gradient averaging:
    n_local * world / n_global (1 in one process)."""
    if world() == 1:
        return 1.0
    return float(n_local) * world() / max(float(all_sum(float(n_local))), 1.0)


def gather_rows(x: Tensor, fill=0) -> tuple[Tensor, slice]:
    """(every rank's rows of x [b_r, ...] concatenated in rank order, its trailing dims padded with
    `fill` to the largest; the slice of this rank's rows). Per-row vectors (rewards, masks, KL),
    and the vocab-parallel head's inputs (rlfuse.engine.vocab_parallel)."""
    if world() == 1:
        return x, slice(0, x.shape[0])
    dev = _comm_device()
    shape = torch.tensor(x.shape, device=dev)
    shapes = [torch.empty_like(shape) for _ in range(world())]
    dist.all_gather(shapes, shape)
    shapes = [s.tolist() for s in shapes]
    full = [max(s[d] for s in shapes) for d in range(x.dim())]
    padded = x.new_full(full, fill, device=dev)
    padded[tuple(slice(0, n) for n in x.shape)] = x
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    out = torch.cat([p[:s[0]] for p, s in zip(parts, shapes)]).to(x.device)
    start = sum(s[0] for s in shapes[:rank()])
    return out, slice(start, start + x.shape[0])


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def from_main(obj):
    """Rank 0's `obj` on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(*flags: bool) -> list[bool]:
    """Each flag, true where it is true on any rank (one all-reduce for all of them)."""
    if world() == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def reduce_metrics(m: dict) -> dict:
    """One step's metrics over the ranks: `*_min` the min, `*_max` the max, throughputs (`*_per_s`)
    and `tokens` the sum, everything else the mean over the ranks whose value is not NaN (each rank
    trains an equal share of rows). Every rank gets the same dict."""
    if world() == 1:
        return m
    keys = sorted(m)
    v = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    nan = v.isnan()
    sums = torch.stack([torch.where(nan, 0.0, v), (~nan).double()])
    lo, hi = torch.where(nan, math.inf, v), torch.where(nan, -math.inf, v)
    dist.all_reduce(sums)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    out = {}
    for i, k in enumerate(keys):
        total, count = float(sums[0, i]), float(sums[1, i])
        if count == 0:
            out[k] = math.nan
        elif k.endswith("_min"):
            out[k] = float(lo[i])
        elif k.endswith("_max"):
            out[k] = float(hi[i])
        elif k.endswith("_per_s") or k == "tokens":
            out[k] = total
        else:
            out[k] = total / count
    return out


def full(x):
    """A DTensor (an FSDP2 grad norm) as a plain tensor; anything else as it is."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


# ----------------------------------------------------------------------------- wrapping
class _Modules(nn.ModuleDict):
    """The trainable modules as one, whose forward runs the call it is given: the wrapper's
    forward hooks run around whatever a trainer computes with them."""

    def forward(self, call):
        return call()


class Wrapped:
    """The trainable modules (the policy, and PPO's value head / critic) under one module, wrapped
    for `strategy` when there is more than one process; `forward(fn, ...)` runs fn inside it."""

    def __init__(self, modules: dict[str, nn.Module], strategy: str, device: torch.device,
                 ignore: tuple = ()):
        """`ignore`: parameters the wrapper leaves alone (neither synchronized, averaged nor
        sharded): the vocab-parallel LM head's shard, whose gradient is already its own."""
        self.inner = _Modules(modules)  # the modules themselves: parameters are shared
        self.strategy = strategy if world() > 1 else None
        self.outer: Optional[nn.Module] = None
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            skip = {id(p) for p in ignore}
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self.inner, [n for n, p in self.inner.named_parameters() if id(p) in skip])
            self.outer = DistributedDataParallel(
                self.inner, device_ids=[device] if device.type == "cuda" else None,
                forward_sync_buffers=False)  # no trained buffers; rank 0's weights are broadcast
        elif self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            blocks = {name for m in modules.values() for name in
                      (getattr(m, "_no_split_modules", None) or ())}
            for m in self.inner.modules():
                if type(m).__name__ in blocks:
                    fully_shard(m)
            self.outer = fully_shard(self.inner, ignored_params=set(ignore) or None)

    def forward(self, fn, *args, **kwargs):
        """fn(*args, **kwargs), run as the wrapped module's forward: the wrapper's hooks fire
        (DDP prepares its gradient reduction; FSDP2 gathers the root's weights, the LM head's
        among them, for the call and its backward). In one process, a plain call."""
        if self.strategy is None:
            return fn(*args, **kwargs)
        return self.outer(functools.partial(fn, *args, **kwargs))

    @contextlib.contextmanager
    def inference(self):
        """For the no-grad passes (rollouts, old and reference log-probs): no gradient (DDP
        prepares no reduction), and under FSDP2 every rank gathers the full weights once on entry
        and keeps them across the forwards inside (ranks may run different numbers of them, say a
        rollout that stops early), sharding them again at the end."""
        if self.strategy != "fsdp":
            with torch.no_grad():
                yield
            return
        from torch.distributed.fsdp import FSDPModule

        sharded = [m for m in self.inner.modules() if isinstance(m, FSDPModule)]  # root first
        for m in sharded:
            m.unshard()
        layers = sharded[1:]
        for m in layers:
            m.set_reshard_after_forward(False, recurse=False)
        try:
            with torch.no_grad():
                yield
        finally:
            for m in layers:
                m.set_reshard_after_forward(True, recurse=False)
            for m in sharded:
                m.reshard()

    # -- checkpoints under FSDP2: the full state, gathered on rank 0
    def full_state(self, optimizer) -> tuple[Optional[dict], Optional[dict]]:
        """FSDP2: (full model state {name: {key: tensor}} per module, full optimizer state), on
        rank 0 ({} and {} on the others); every rank must call it. (None, None) otherwise: the
        modules hold full weights and the optimizer full states."""
        if self.strategy != "fsdp":
            return None, None
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        flat = get_model_state_dict(self.inner, options=opts)
        per_module: dict = {name: {} for name in self.inner}
        for key, value in flat.items():
            name, _, rest = key.partition(".")
            per_module[name][rest] = value
        return per_module, get_optimizer_state_dict(self.inner, optimizer, options=opts)

    def load_full_state(self, weights: dict, optimizer=None, optimizer_state=None) -> list[str]:
        """FSDP2: load full states ({name: {key: tensor}}, as full_state returns) into the sharded
        modules, and the optimizer's; returns the module keys the weights lacked."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, strict=False)
        flat = {f"{name}.{k}": v for name, sd in weights.items() for k, v in sd.items()}
        missing, _ = set_model_state_dict(self.inner, flat, options=opts)
        if optimizer is not None:
            set_optimizer_state_dict(self.inner, optimizer, optimizer_state, options=opts)
        return list(missing)
