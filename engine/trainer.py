"""What every trainer shares: device, optimizer and schedule, the step loop, checkpoints.

A trainer subclass sets up its data in `__init__`, ending it with `prepare()` (which wraps the
trainable modules for the distributed strategy and builds the optimizer over them), and
implements `train_step()` (one optimizer step, or one rollout step for GRPO) returning its
metrics; the backbone and the fused losses run through `forward(fn, ...)`, inside the wrapper's
forward (see rlfuse.engine.distributed). `fit()` runs
`train_step` `total_steps` times with logging, alerts, periodic (every `save_every` steps and
`save_every_minutes`) and final checkpoints, `resume`, and a save on SIGINT/SIGTERM
(`interrupted` then names the signal).

No work is lost silently: an out_dir that holds a previous run is refused unless resume=true
(continue it) or overwrite=true (replace it); resume takes the newest readable checkpoint and
refuses settings it cannot honour; a NaN/inf gradient never reaches the weights (the update
is skipped, and the run stops by the `nonfinite` policy). Under torchrun, rank 0 alone prints,
logs metrics (reduced over the ranks) and writes checkpoints; the ranks agree each step on
stopping (a signal on any rank) and on saving.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from typing import Optional

import torch

from . import checkpoint, distributed, vocab_parallel
from .config import ConfigError, TrainConfig, to_dict
from .model import load_policy, quiet_transformers
from .monitor import Monitor
from .optim import make_optimizer
from .overopt import GUARD_LOG, Guard


def return_freed_memory(threshold: int = 1 << 20) -> None:
    """glibc: serve allocations >= `threshold` bytes with mmap, so a freed logits chunk or
    activation goes back to the OS at once. By default glibc raises this threshold as big
    blocks are freed, and later ones then fragment the heap (peak RSS +85 MB over 3 steps of
    the reference GRPO benchmark). No-op elsewhere."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - frac
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0
    return f


# What a run writes into out_dir (overwrite=true removes exactly these).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "alerts.jsonl", "plots", "tb", GUARD_LOG)
# Settings a resumed run cannot change: the checkpoint's state would be wrong for them (data
# order, group shapes, the model), or would silently override them (the optimizer's
# hyper-parameters live in its state). To change them, start a new run from the checkpoint
# (model.path=<checkpoint folder>).
RESUME_FIXED = ("algo", "model.path", "model.hidden_size", "model.num_layers",
                "model.num_heads", "model.num_kv_heads", "model.intermediate_size",
                "model.dtype", "model.lora_r", "model.lora_alpha", "sft.data", "sft.batch_size",
                "grpo.data", "grpo.rollout.samples_per_prompt", "grpo.rollout.prompts_per_step",
                "dpo.data", "dpo.batch_size", "dpo.loss.loss_type", "ppo.data",
                "ppo.rollout.prompts_per_step", "ppo.rollout.samples_per_prompt", "ppo.critic",
                "optim.lr", "optim.weight_decay", "optim.beta1", "optim.beta2",
                "optim.states", "model.reference", "distributed.strategy",
                "distributed.vocab_parallel")


class NonFiniteError(RuntimeError):
    """The run stopped on NaN/inf losses or gradients (by the `nonfinite` policy)."""


class _Silent:
    """The monitor of the ranks other than 0: they log and print nothing."""

    def __init__(self):
        self.history: list = []

    def log(self, step: int, metrics: dict) -> list:
        return []

    def alert(self, step: int, msg: str) -> None:
        pass

    def close(self, plot: bool = True) -> None:
        pass


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "alerts":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(dotted key, old, new) for every setting that differs (resume/overwrite excepted)."""
    a, b = _flat(old), _flat(json.loads(json.dumps(new)))  # tuples -> lists, as meta.json
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in ("resume", "overwrite") and a.get(k) != b.get(k)]


class Trainer:
    name = "train"

    def __init__(self, cfg: TrainConfig, model=None, tokenizer=None):
        quiet_transformers()
        return_freed_memory()
        self.cfg = cfg
        self.device = distributed.setup(cfg.device)
        _check_device(cfg, self.device)
        if distributed.world() > 1:
            _check_distributed(cfg)
        self.prepare_out_dir()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if model is None:
            model, tokenizer = load_policy(cfg.model, self.device)
        self.model, self.tok = model.to(self.device), tokenizer
        self.model.train()
        self.step = 0
        self.monitor = None
        self.last_checkpoint: Optional[str] = None  # the newest checkpoint of this run
        self.interrupted: Optional[int] = None      # the signal that stopped fit(), if any

    def prepare(self, extra: Optional[dict] = None, extra_lr_scale: float = 1.0) -> None:
        """Wrap the policy and `extra` ({name: module}, trained along, with lr x extra_lr_scale;
        their states go into the checkpoint's extra under those names) for the distributed
        strategy, then build the optimizer and schedule over their trainable parameters. Every
        subclass calls it at the end of its __init__, after any copy of the initial policy."""
        cfg = self.cfg
        self.extra = {k: m.to(self.device) for k, m in (extra or {}).items()}
        # distributed.vocab_parallel: this rank's LM-head rows, outside the wrapper, with their
        # own optimizer (rlfuse.engine.vocab_parallel)
        self.vocab = None
        if cfg.distributed.vocab_parallel and distributed.world() > 1:
            self.vocab = vocab_parallel.shard_head(self.model)
            reference = getattr(self, "reference", None)  # GRPO / PPO: a frozen copy
            if reference is not None and reference.copy is not None:
                vocab_parallel.shard_head(reference.copy, announce=False)
        head = list(vocab_parallel.head_params(self.model).values()) if self.vocab else []
        self.wrapped = distributed.Wrapped({"policy": self.model, **self.extra},
                                           cfg.distributed.strategy, self.device, ignore=head)
        if distributed.world() > 1:  # each rank samples its own rollouts
            torch.manual_seed(cfg.seed + distributed.rank())
            random.seed(cfg.seed + distributed.rank())
        skip = {id(p) for p in head}
        self.params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in skip]
        groups = [{"params": self.params}]
        extra_params = [p for m in self.extra.values() for p in m.parameters() if p.requires_grad]
        if extra_params:
            groups.append({"params": extra_params, "lr": cfg.optim.lr * extra_lr_scale})
            self.params = self.params + extra_params
        o = cfg.optim
        self.opt = make_optimizer(groups, o.lr, (o.beta1, o.beta2), o.weight_decay, cfg.seed,
                                  o.states)
        self.head_params = [p for p in head if p.requires_grad]
        self.head_opt = make_optimizer(self.head_params, o.lr, (o.beta1, o.beta2),
                                       o.weight_decay, cfg.seed + 1 + distributed.rank()
                                       ) if self.head_params else None
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(o.schedule, o.warmup_steps, max(1, self.total_steps)))
        self.grad_sq: Optional[torch.Tensor] = None  # step_in_backward: sum of squared grads
        if o.step_in_backward:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._step_in_backward)

    def _step_in_backward(self, p: torch.Tensor) -> None:
        """optim.step_in_backward: update p the moment backward has finished its gradient, and
        free the gradient. One backward per optimizer step sets every other .grad to None
        (optimizer_step), so `opt.step()` updates p alone; a non-finite gradient skips p."""
        sq = torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()  # no grad copy
        self.grad_sq = sq if self.grad_sq is None else self.grad_sq + sq
        if bool(torch.isfinite(sq)):
            self.opt.step()
        p.grad = None

    def forward(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) inside the wrapper's forward: every backbone pass and fused loss
        goes through here (in one process, a plain call)."""
        return self.wrapped.forward(fn, *args, **kwargs)

    # -- per-trainer hooks
    @property
    def total_steps(self) -> int:
        return self.cfg.steps

    def train_step(self) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:  # extra state a checkpoint keeps (tensors / containers)
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- shared
    def optimizer_step(self) -> float:
        """Clip (if max_grad_norm > 0), step, schedule; returns the pre-clip grad norm. A NaN/inf
        gradient skips the update: it would poison the weights and Adam's moments. With
        optim.step_in_backward the hooks have already updated each parameter (skipping those with
        a NaN/inf gradient): only the norm and the schedule are left."""
        if self.cfg.optim.step_in_backward:
            norm, self.grad_sq = (self.grad_sq if self.grad_sq is not None
                                  else torch.zeros(())).sqrt(), None
            if bool(torch.isfinite(norm)):
                self.sched.step()
            return float(norm)
        max_norm = self.cfg.optim.max_grad_norm
        if self.head_opt is not None:
            return self._vocab_parallel_step(max_norm)
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else math.inf)
        norm = distributed.full(norm)  # FSDP2: the norm over every rank's shards
        if bool(torch.isfinite(norm)):
            self.opt.step()
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

    def _vocab_parallel_step(self, max_norm: float) -> float:
        """optimizer_step with the LM head sharded: the norm is over the data-parallel
        parameters and every rank's head rows, the head's optimizer steps at the schedule's lr."""
        grads = [p.grad for p in self.params if p.grad is not None]
        head = [p.grad for p in self.head_params if p.grad is not None]
        norm = distributed.full(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        head_sq = sum(float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2 for g in head)
        norm = math.sqrt(float(norm) ** 2 + float(distributed.all_sum(head_sq)))
        if math.isfinite(norm):
            coef = max_norm / (norm + 1e-6)
            if max_norm > 0 and coef < 1.0:  # as clip_grad_norm_
                for g in grads + head:
                    g.mul_(coef)
            for group in self.head_opt.param_groups:
                group["lr"] = self.opt.param_groups[0]["lr"]
            self.opt.step()
            self.head_opt.step()
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.head_opt.zero_grad(set_to_none=True)
        return norm

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.cfg.out_dir, "checkpoints")

    def prepare_out_dir(self) -> None:
        """Refuse to mix this run with a previous one in out_dir (see the module docstring)."""
        cfg = self.cfg
        ckpts = checkpoint.checkpoints(self.ckpt_dir)
        if cfg.resume:
            if not ckpts:
                raise checkpoint.CheckpointError(
                    f"resume=true but {self.ckpt_dir} holds no checkpoint; run without "
                    "resume=true to start (with overwrite=true to replace the old run's logs)")
            return
        metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
        logged = os.path.exists(metrics) and os.path.getsize(metrics) > 0
        if not (ckpts or logged):
            return
        if not cfg.overwrite:
            raise ConfigError(
                f"config key 'out_dir': {cfg.out_dir} holds a previous run ({len(ckpts)} "
                f"checkpoint(s){', metrics.jsonl' if logged else ''}); set resume=true to "
                "continue it, overwrite=true to replace it, or choose another out_dir")
        distributed.barrier()  # every rank has looked before rank 0 removes anything
        if not distributed.is_main():
            return
        for name in RUN_OUTPUTS:
            path = os.path.join(cfg.out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        print(f"rlfuse: overwrite=true: removed the previous run's checkpoints and logs in "
              f"{cfg.out_dir}", file=sys.stderr, flush=True)

    def save(self, ckpt_dir: Optional[str] = None, keep: Optional[int] = None) -> str:
        """Write a checkpoint (rank 0; every rank calls this) into ckpt_dir (default: the run's,
        which then names it the last checkpoint), keeping the newest `keep` (default: the
        config's keep_checkpoints); returns its folder."""
        weights, optim = self.wrapped.full_state(self.opt)
        modules = weights or {k: m.state_dict() for k, m in self.extra.items()}
        state = {"optimizer": optim or self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "rng": distributed.gather_objects(checkpoint.rng_state()),
                 "extra": {**self.state_dict(), **{k: modules[k] for k in self.extra}}}
        policy = weights and weights["policy"]
        if self.vocab is not None:  # the full head, gathered, and its optimizer's full rows
            policy = {**(policy if policy is not None else self.model.state_dict()),
                      **vocab_parallel.full_head(self.model)}
            state["vocab_head"] = vocab_parallel.optimizer_state(self.head_opt, self.vocab)
        path = error = None
        if distributed.is_main():
            try:
                path = checkpoint.save(ckpt_dir or self.ckpt_dir, self.step, self.model,
                                       self.tok, state, to_dict(self.cfg),
                                       keep or self.cfg.keep_checkpoints,
                                       merge_lora=self.cfg.model.lora_merge_on_save,
                                       weights=policy)
            except checkpoint.CheckpointError as err:
                error = str(err)
        path, error = distributed.from_main((path, error))
        if error:
            raise checkpoint.CheckpointError(error)
        if ckpt_dir is None:
            self.last_checkpoint = path
        return path

    def resume(self) -> str:
        """Restore the newest readable checkpoint; returns its folder."""
        if not distributed.is_main():  # rank 0 first sets unreadable ones aside
            distributed.barrier()
        path, ckpt = checkpoint.read_newest(self.ckpt_dir)
        if distributed.is_main():
            distributed.barrier()
        self.check_resume_config(ckpt["config"] or {}, path)
        extra = ckpt["trainer"]["extra"]
        modules = {k: extra.pop(k) for k in self.extra}
        if self.vocab is not None:  # this rank's rows of the full head and its optimizer state
            vocab_parallel.slice_weights(ckpt["weights"], self.model, self.vocab)
            vocab_parallel.load_optimizer_state(self.head_opt, ckpt["trainer"]["vocab_head"],
                                                self.vocab)
        load = None
        if self.wrapped.strategy == "fsdp":
            def load(weights, optim):
                missing = self.wrapped.load_full_state({"policy": weights, **modules}, self.opt,
                                                       optim)
                return [k.partition(".")[2] for k in missing]
        self.step, extra = checkpoint.apply(ckpt, self.model, self.opt, self.sched, load)
        if load is None:
            for k, m in self.extra.items():
                m.load_state_dict(modules[k])
        self.load_state_dict(extra)
        self.last_checkpoint = path
        if distributed.is_main():
            print(f"rlfuse: resumed {self.name} at step {self.step} from {path}", file=sys.stderr,
                  flush=True)
        return path

    def check_resume_config(self, old: dict, path: str) -> None:
        """Warn on every setting that differs from the checkpoint's; refuse RESUME_FIXED ones."""
        changes = config_changes(old, to_dict(self.cfg))
        for key, a, b in changes if distributed.is_main() else ():
            print(f"rlfuse: warning: resuming with {key} changed: {a!r} -> {b!r}",
                  file=sys.stderr, flush=True)
        fixed = [k for k, _, _ in changes if k in RESUME_FIXED]
        if fixed:
            raise ConfigError(
                f"config key(s) {', '.join(repr(k) for k in fixed)} differ from the checkpoint "
                f"{path}; a resumed run cannot change them: restore the old value(s), or start "
                f"a new run from the checkpoint with model.path={path}")

    def finished(self) -> bool:
        """Checked before every step: True ends the run early, as if at its last step (for a
        subclass's own stopping rule; the demo's SFT stops at a target accuracy). Under torchrun
        it must answer the same on every rank."""
        return False

    def fit(self, plot: bool = True) -> list[dict]:
        """Run to total_steps; returns the logged metrics rows."""
        cfg = self.cfg
        if cfg.resume:
            self.resume()
        mon = self.monitor = Monitor(cfg.out_dir, self.total_steps, self.step, cfg.alerts,
                                     cfg.progress, desc=self.name, print_every=cfg.print_every
                                     ) if distributed.is_main() else _Silent()
        saved, saved_at, bad_run = self.step if cfg.resume else -1, time.monotonic(), 0
        guard = None
        try:
            guard = Guard(self)  # the over-optimization detector (config section guard)
            with checkpoint.GracefulExit() as stop:
                while (self.step < self.total_steps and not stop.requested and not guard.stopped
                       and not self.finished()):
                    metrics = distributed.reduce_metrics(self.train_step())
                    self.step += 1
                    bad = [k for k in ("loss", "grad_norm", "grad_norm_max")
                           if k in metrics and not math.isfinite(metrics[k])]
                    bad_run = bad_run + 1 if bad else 0
                    if bad:
                        skipped = ("the non-finite parameters' updates skipped (optim."
                                   "step_in_backward)" if cfg.optim.step_in_backward
                                   else "update skipped")
                        mon.alert(self.step, f"non-finite {', '.join(bad)}: {skipped} "
                                             f"({bad_run} step(s) in a row)")
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps or bad:
                        mon.log(self.step, {**metrics, "lr": self.sched.get_last_lr()[0]})
                    guard.after_step()
                    if bad and (cfg.nonfinite == "stop" or bad_run >= cfg.max_nonfinite_skips):
                        raise NonFiniteError(
                            f"stopped at step {self.step}: non-finite {', '.join(bad)} in "
                            f"{bad_run} step(s) in a row (nonfinite={cfg.nonfinite}, "
                            f"max_nonfinite_skips={cfg.max_nonfinite_skips}); those updates "
                            f"were skipped; last checkpoint: {self.last_checkpoint or '(none)'}."
                            " Lower optim.lr or check the data and rewards, then resume")
                    minutes = (time.monotonic() - saved_at) / 60
                    # one decision for all ranks: a signal on any rank stops every rank
                    late, stopping = distributed.any_rank(
                        bool(cfg.save_every_minutes) and minutes >= cfg.save_every_minutes,
                        stop.requested)
                    if stopping and not stop.requested:  # another rank got the signal
                        stop.signal = signal.SIGTERM
                    if not bad and ((cfg.save_every and self.step % cfg.save_every == 0) or late):
                        self.save()
                        saved, saved_at = self.step, time.monotonic()
                if saved != self.step and (stop.requested or cfg.keep_checkpoints > 0):
                    self.save()
                self.interrupted = stop.signal
        finally:
            if guard is not None and plot:
                guard.close()
            mon.close(plot=plot)
        return mon.history


def _rollout(cfg: TrainConfig):
    """The RL trainer's RolloutConfig and its config section, or (None, None)."""
    return {"grpo": (cfg.grpo.rollout, "grpo.rollout"),
            "ppo": (cfg.ppo.rollout, "ppo.rollout")}.get(cfg.algo, (None, None))


def _check_device(cfg: TrainConfig, device: torch.device) -> None:
    """What the engine cannot do on this device (yet), as ConfigErrors naming the key."""
    rollout, section = _rollout(cfg)
    if rollout is not None and rollout.weights == "int8" and device.type != "cpu":
        raise ConfigError(f"config key '{section}.weights': int8 runs on CPU only for now "
                          f"(torch's int8 weight-only kernel), not on {device.type}; set it to "
                          f"policy")


def _check_distributed(cfg: TrainConfig) -> None:
    """What the engine cannot do under torchrun (yet), as ConfigErrors naming the key."""
    if cfg.optim.step_in_backward:  # DDP / FSDP2 reduce the gradients after their hooks
        raise ConfigError("config key 'optim.step_in_backward': not under torchrun (the "
                          "gradients are reduced over the ranks after backward); set it false")
    if cfg.optim.states != "param":  # sharded / gathered 8-bit states are untested
        raise ConfigError(f"config key 'optim.states': {cfg.optim.states} states are not "
                          f"supported under torchrun yet; set optim.states=param")
    if cfg.distributed.strategy == "fsdp" and cfg.model.lora_r > 0:
        raise ConfigError("config key 'distributed.strategy': fsdp does not train LoRA "
                          "policies (model.lora_r > 0) yet; use distributed.strategy=ddp")
    if cfg.algo == "ppo" and cfg.ppo.reward in ("model", "both") and cfg.ppo.reward_model.pairs:
        raise ConfigError("config key 'ppo.reward_model.pairs': under torchrun, train the reward "
                          "model in one process first and set ppo.reward_model.path to its "
                          "folder (<out_dir>/reward_model)")
    if cfg.distributed.vocab_parallel and cfg.model.lora_r > 0:
        raise ConfigError("config keys 'distributed.vocab_parallel' and 'model.lora_r': a "
                          "vocab-parallel LM head does not train LoRA policies; set "
                          "distributed.vocab_parallel=false or model.lora_r=0")
    rollout, section = _rollout(cfg)
    if rollout is not None and rollout.weights == "int8":
        raise ConfigError(f"config key '{section}.weights': int8 runs in one process for now, "
                          f"not under torchrun; set it to policy")
    if cfg.distributed.vocab_parallel and rollout is not None and rollout.decoder == "hf":
        raise ConfigError(f"config keys 'distributed.vocab_parallel' and "
                          f"'{section}.decoder': model.generate cannot sample from a "
                          f"vocab-parallel LM head (each rank holds some vocabulary rows); use "
                          f"{section}.decoder=rlfuse")
    if cfg.guard.every:  # it samples from the unwrapped model, which FSDP2 holds sharded
        raise ConfigError("config key 'guard.every': the over-optimization guard does not run "
                          "under torchrun yet; set guard.every=0 or run in one process")
