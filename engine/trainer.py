"""What every trainer shares: device, optimizer and schedule, the step loop, checkpoints.

A trainer subclass sets up its data in `__init__` and implements `train_step()` (one
optimizer step, or one rollout step for GRPO) returning its metrics; `fit()` runs
`train_step` `total_steps` times with logging, alerts, periodic and final checkpoints,
`--resume`, and a save on SIGINT/SIGTERM.
"""
from __future__ import annotations

import ctypes
import math
import os
import random
import sys

import torch

from . import checkpoint
from .config import TrainConfig, to_dict
from .model import load_policy, quiet_transformers
from .monitor import Monitor


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


class Trainer:
    name = "train"

    def __init__(self, cfg: TrainConfig, model=None, tokenizer=None):
        quiet_transformers()
        return_freed_memory()
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if model is None:
            model, tokenizer = load_policy(cfg.model, self.device)
        self.model, self.tok = model.to(self.device), tokenizer
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        # fused: one vectorized kernel per tensor, no temporaries (~6x faster than the default
        # per-tensor loop on CPU)
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.beta1, o.beta2),
                                     weight_decay=o.weight_decay,
                                     fused=self.device.type in ("cpu", "cuda"))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(o.schedule, o.warmup_steps, max(1, self.total_steps)))
        self.step = 0
        self.monitor = None

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
        """Clip (if max_grad_norm > 0), step, schedule; returns the pre-clip grad norm."""
        max_norm = self.cfg.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else math.inf)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.cfg.out_dir, "checkpoints")

    def save(self) -> str:
        return checkpoint.save(self.ckpt_dir, self.step, self.model, self.opt, self.sched,
                               self.state_dict(), to_dict(self.cfg), self.cfg.keep_checkpoints)

    def resume(self) -> bool:
        path = checkpoint.latest(self.ckpt_dir)
        if path is None:
            return False
        self.step, extra = checkpoint.load(path, self.model, self.opt, self.sched)
        self.load_state_dict(extra)
        return True

    def fit(self, plot: bool = True) -> list[dict]:
        """Run to total_steps; returns the logged metrics rows."""
        cfg = self.cfg
        if cfg.resume and self.resume():
            print(f"rlfuse: resumed {self.name} at step {self.step} from {self.ckpt_dir}",
                  flush=True)
        mon = self.monitor = Monitor(cfg.out_dir, self.total_steps, self.step, cfg.alerts,
                                     cfg.progress, desc=self.name)
        saved = -1
        with checkpoint.GracefulExit() as stop:
            while self.step < self.total_steps and not stop.requested:
                metrics = self.train_step()
                self.step += 1
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    mon.log(self.step, {**metrics, "lr": self.sched.get_last_lr()[0]})
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
                    saved = self.step
            if saved != self.step and (stop.requested or cfg.keep_checkpoints > 0):
                path = self.save()
                if stop.requested:
                    mon.write(f"rlfuse: saved {path}; resume with resume=true")
        mon.close(plot=plot)
        return mon.history
