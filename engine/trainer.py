"""What every trainer shares: device, optimizer and schedule, the step loop, checkpoints.

A trainer subclass sets up its data in `__init__` and implements `train_step()` (one
optimizer step, or one rollout step for GRPO) returning its metrics; `fit()` runs
`train_step` `total_steps` times with logging, alerts, periodic (every `save_every` steps and
`save_every_minutes`) and final checkpoints, `resume`, and a save on SIGINT/SIGTERM
(`interrupted` then names the signal).

No work is lost silently: an out_dir that holds a previous run is refused unless resume=true
(continue it) or overwrite=true (replace it); resume takes the newest readable checkpoint and
refuses settings it cannot honour; a NaN/inf gradient never reaches the weights (the update
is skipped, and the run stops by the `nonfinite` policy).
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import random
import shutil
import sys
import time
from typing import Optional

import torch

from . import checkpoint
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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but CUDA is not available")
    return torch.device(name)


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
                "optim.lr", "optim.weight_decay",
                "optim.beta1", "optim.beta2")


class NonFiniteError(RuntimeError):
    """The run stopped on NaN/inf losses or gradients (by the `nonfinite` policy)."""


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
        self.prepare_out_dir()
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if model is None:
            model, tokenizer = load_policy(cfg.model, self.device)
        self.model, self.tok = model.to(self.device), tokenizer
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.opt = make_optimizer(self.params, o.lr, (o.beta1, o.beta2), o.weight_decay, cfg.seed)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(o.schedule, o.warmup_steps, max(1, self.total_steps)))
        self.step = 0
        self.monitor = None
        self.last_checkpoint: Optional[str] = None  # the newest checkpoint of this run
        self.interrupted: Optional[int] = None      # the signal that stopped fit(), if any

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
        gradient skips the update: it would poison the weights and Adam's moments."""
        max_norm = self.cfg.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else math.inf)
        if bool(torch.isfinite(norm)):
            self.opt.step()
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

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
        for name in RUN_OUTPUTS:
            path = os.path.join(cfg.out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        print(f"rlfuse: overwrite=true: removed the previous run's checkpoints and logs in "
              f"{cfg.out_dir}", file=sys.stderr, flush=True)

    def save(self) -> str:
        self.last_checkpoint = checkpoint.save(
            self.ckpt_dir, self.step, self.model, self.tok, self.opt, self.sched,
            self.state_dict(), to_dict(self.cfg), self.cfg.keep_checkpoints,
            merge_lora=self.cfg.model.lora_merge_on_save)
        return self.last_checkpoint

    def resume(self) -> str:
        """Restore the newest readable checkpoint; returns its folder."""
        path, ckpt = checkpoint.read_newest(self.ckpt_dir)
        self.check_resume_config(ckpt["config"] or {}, path)
        self.step, extra = checkpoint.apply(ckpt, self.model, self.opt, self.sched)
        self.load_state_dict(extra)
        self.last_checkpoint = path
        print(f"rlfuse: resumed {self.name} at step {self.step} from {path}", file=sys.stderr,
              flush=True)
        return path

    def check_resume_config(self, old: dict, path: str) -> None:
        """Warn on every setting that differs from the checkpoint's; refuse RESUME_FIXED ones."""
        changes = config_changes(old, to_dict(self.cfg))
        for key, a, b in changes:
            print(f"rlfuse: warning: resuming with {key} changed: {a!r} -> {b!r}",
                  file=sys.stderr, flush=True)
        fixed = [k for k, _, _ in changes if k in RESUME_FIXED]
        if fixed:
            raise ConfigError(
                f"config key(s) {', '.join(repr(k) for k in fixed)} differ from the checkpoint "
                f"{path}; a resumed run cannot change them: restore the old value(s), or start "
                f"a new run from the checkpoint with model.path={path}")

    def fit(self, plot: bool = True) -> list[dict]:
        """Run to total_steps; returns the logged metrics rows."""
        cfg = self.cfg
        if cfg.resume:
            self.resume()
        mon = self.monitor = Monitor(cfg.out_dir, self.total_steps, self.step, cfg.alerts,
                                     cfg.progress, desc=self.name, print_every=cfg.print_every)
        saved, saved_at, bad_run = self.step if cfg.resume else -1, time.monotonic(), 0
        guard = None
        try:
            guard = Guard(self)  # the over-optimization detector (config section guard)
            with checkpoint.GracefulExit() as stop:
                while self.step < self.total_steps and not stop.requested and not guard.stopped:
                    metrics = self.train_step()
                    self.step += 1
                    bad = [k for k in ("loss", "grad_norm", "grad_norm_max")
                           if k in metrics and not math.isfinite(metrics[k])]
                    bad_run = bad_run + 1 if bad else 0
                    if bad:
                        mon.alert(self.step, f"non-finite {', '.join(bad)}: update skipped "
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
                    if not bad and ((cfg.save_every and self.step % cfg.save_every == 0) or
                                    (cfg.save_every_minutes and minutes >= cfg.save_every_minutes)):
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
