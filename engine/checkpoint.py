"""Checkpoints: written atomically, loaded without unpickling code.

Layout of `<run>/checkpoints/step-000123/`:
    model.safetensors   trainable model state (safetensors)
    trainer.pt          optimizer, scheduler, RNG and sampler states (tensors and plain
                        containers only; loaded with torch.load(weights_only=True))
    meta.json           step and config
Each is written into a temporary folder renamed into place, then `latest` (a text file, also
replaced atomically) names it, so a crash mid-save leaves the previous checkpoint intact.
`GracefulExit` turns SIGINT/SIGTERM into a flag the loop checks: it saves, then exits.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
from typing import Optional

import torch
from safetensors.torch import load_file, save_file


def _model_state(model) -> dict:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    seen, out = {}, {}
    for k, v in state.items():  # safetensors refuses aliased tensors (tied embeddings)
        key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else None
        if key in seen:
            continue
        seen[key] = k
        out[k] = v.clone() if key is None else v
    return out


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save(ckpt_dir: str, step: int, model, optimizer, scheduler, extra: Optional[dict] = None,
         config: Optional[dict] = None, keep: int = 2) -> str:
    """Write checkpoint `step` under ckpt_dir atomically; keep the newest `keep`."""
    os.makedirs(ckpt_dir, exist_ok=True)
    name = f"step-{step:06d}"
    final, tmp = os.path.join(ckpt_dir, name), os.path.join(ckpt_dir, f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(_model_state(model), os.path.join(tmp, "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), "extra": extra or {}}, os.path.join(tmp, "trainer.pt"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"step": step, "config": config}, f, indent=1)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(os.path.join(ckpt_dir, "latest"), name)
    old = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step-"))[:-max(1, keep)]
    for d in old:
        shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
    return final


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest(ckpt_dir: str) -> Optional[str]:
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        d = os.path.join(ckpt_dir, f.read().strip())
    return d if os.path.isdir(d) else None


def load(path: str, model, optimizer=None, scheduler=None) -> tuple[int, dict]:
    """Restore a checkpoint into model/optimizer/scheduler and the RNGs; (step, extra)."""
    state = load_file(os.path.join(path, "model.safetensors"), device=str(_device(model)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{path}: checkpoint does not fit the model (missing "
                           f"{sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]})")
    trainer = torch.load(os.path.join(path, "trainer.pt"), weights_only=True,
                         map_location=_device(model))
    if optimizer is not None:
        optimizer.load_state_dict(trainer["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state({k: (v.cpu() if k == "torch" else v) for k, v in trainer["rng"].items()})
    with open(os.path.join(path, "meta.json")) as f:
        step = json.load(f)["step"]
    return step, trainer["extra"]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _is_tied(model, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return key in tied


class GracefulExit:
    """While active, SIGINT/SIGTERM set `requested` (the loop saves and stops); a second
    SIGINT interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nrlfuse: got signal {signum}; saving a checkpoint, then stopping "
              "(Ctrl-C again to abort)", flush=True)

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False
