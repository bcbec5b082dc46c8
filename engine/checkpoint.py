"""Checkpoints: complete `save_pretrained` folders, written atomically, loaded without unpickling.

Layout of `<run>/checkpoints/step-000123/`:
    config.json, model*.safetensors, generation_config.json, tokenizer files
                        the model as `save_pretrained` writes it: the folder is a valid
                        `model.path` for the next stage (for LoRA: the merged model, unless
                        model.lora_merge_on_save=false)
    adapter/            LoRA only: the adapter (peft `save_pretrained`); resume reads it
    trainer.pt          optimizer, scheduler, RNG (one per rank) and sampler states (tensors
                        and plain containers only; loaded with torch.load(weights_only=True))
    meta.json           step and config
Each is written into a temporary folder renamed into place, then `latest` (a text file, also
replaced atomically) names it, so a crash mid-save leaves the previous checkpoint intact.
Old checkpoints beyond `keep - 1` are deleted before a new one is written (never the one
`latest` names), so the disk holds at most max(keep, 2) of them. Resume takes the newest checkpoint
whose files all read back, setting aside (renaming to `*.corrupt`) newer ones that do not.
`GracefulExit` turns SIGINT/SIGTERM into a flag the loop checks: it saves, then exits.
Under torchrun rank 0 writes the checkpoint (under FSDP2 from the gathered full state, so the
folder is the one a single process writes and loads into one); every rank resumes from it, under
the same world size.
"""
from __future__ import annotations

import copy
import errno
import glob
import json
import os
import random
import re
import shutil
import signal
import sys
from typing import Optional

import torch
from safetensors.torch import load_file

from . import distributed
from .model import is_lora

STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, or none to resume from; the message names the folder
    and what to do."""


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


# ----------------------------------------------------------------------------- listing
def checkpoints(ckpt_dir: str) -> list[str]:
    """The `step-N` folders under ckpt_dir, oldest first (by step)."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = [d for d in os.listdir(ckpt_dir) if STEP_DIR.match(d)
             and os.path.isdir(os.path.join(ckpt_dir, d))]
    return [os.path.join(ckpt_dir, d) for d in sorted(names, key=lambda d: int(d[5:]))]


def latest(ckpt_dir: str) -> Optional[str]:
    """The folder `latest` names, if it exists."""
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        d = os.path.join(ckpt_dir, f.read().strip())
    return d if os.path.isdir(d) else None


# ----------------------------------------------------------------------------- saving
def save(ckpt_dir: str, step: int, model, tokenizer, state: dict,
         config: Optional[dict] = None, keep: int = 2, merge_lora: bool = True,
         weights: Optional[dict] = None) -> str:
    """Write checkpoint `step` under ckpt_dir atomically; keep the newest `keep` (at least 1).
    `state` is trainer.pt's contents (optimizer, scheduler, rng, extra); `weights`, when given
    (FSDP2: the gathered full state), is saved instead of the model's own parameters."""
    _check_finite(weights if weights is not None else
                  {n: p for n, p in model.named_parameters() if p.requires_grad}, step, ckpt_dir)
    os.makedirs(ckpt_dir, exist_ok=True)
    name = f"step-{step:06d}"
    final, tmp = os.path.join(ckpt_dir, name), os.path.join(ckpt_dir, f".{name}.tmp")
    # Make room first, so a disk that holds `keep` checkpoints can roll forward; the newest
    # (the previous good one) survives whatever happens below.
    _prune(ckpt_dir, max(1, keep - 1), protect=latest(ckpt_dir))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        _write_model(model, tokenizer, tmp, merge_lora, weights)
        torch.save(state, os.path.join(tmp, "trainer.pt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "config": config}, f, indent=1)
        _fsync_tree(tmp)
    except (OSError, RuntimeError) as err:  # torch's writer reports ENOSPC as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(err):
            prev = latest(ckpt_dir)
            raise CheckpointError(
                f"no space left on device while writing checkpoint {final} ({err}); removed the "
                f"partial folder; the previous checkpoint {prev or '(none)'} is intact. Free "
                "space (or lower keep_checkpoints) and resume with resume=true") from None
        raise
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(os.path.join(ckpt_dir, "latest"), name)
    _prune(ckpt_dir, max(1, keep), protect=final)
    return final


def _write_model(model, tokenizer, folder: str, merge_lora: bool,
                 weights: Optional[dict]) -> None:
    if weights is not None:
        model.save_pretrained(folder, state_dict=weights)
    elif is_lora(model):
        model.save_pretrained(os.path.join(folder, "adapter"))
        if merge_lora:  # on a copy: merging in place and back would round the base weights
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(folder)
            del merged
    else:
        model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _check_finite(weights: dict, step: int, ckpt_dir: str) -> None:
    bad = [n for n, p in weights.items() if p.is_floating_point()
           and not bool(torch.isfinite(p.detach()).all())]
    if bad:
        raise CheckpointError(
            f"not saving step {step}: the weights hold NaN/inf ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); the last good checkpoint is "
            f"{latest(ckpt_dir) or '(none)'}")


def _disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return any(s in text for s in ("No space left", "os error 28", "inline_container",
                                   "unexpected pos"))


def _prune(ckpt_dir: str, keep: int, protect: Optional[str]) -> None:
    """Delete the oldest step folders until `keep` remain, never `protect`."""
    old = [d for d in checkpoints(ckpt_dir) if d != protect]
    kept = max(0, keep - (protect is not None and os.path.isdir(protect)))
    for d in old[:max(0, len(old) - kept)]:
        shutil.rmtree(d, ignore_errors=True)


def _fsync_tree(folder: str) -> None:
    """Flush the files to disk before the rename makes the folder a checkpoint."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- loading
def read(path: str) -> dict:
    """Every file of a checkpoint read into memory: {"step", "config", "weights", "trainer",
    "lora"}. Raises CheckpointError naming the file that does not read back."""
    f = os.path.join(path, "meta.json")
    try:
        with open(f) as fh:
            meta = json.load(fh)
        step = int(meta["step"])
        adapter = os.path.join(path, "adapter")
        lora = os.path.isdir(adapter)
        files = [os.path.join(adapter, "adapter_model.safetensors")] if lora else \
            sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise FileNotFoundError("no *.safetensors weights")
        weights = {}
        for f in files:
            weights.update(load_file(f))
        bad = [k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:  # older versions could save NaN weights; never resume from them
            raise ValueError(f"non-finite weights ({', '.join(bad[:3])})")
        f = os.path.join(path, "trainer.pt")
        trainer = torch.load(f, weights_only=True, map_location="cpu")
    except Exception as err:  # any unreadable file: JSON, safetensors, unpickling refused ...
        raise CheckpointError(f"{f}: {type(err).__name__}: {err}") from None
    return {"step": step, "config": meta.get("config"), "weights": weights, "trainer": trainer,
            "lora": lora}


def read_newest(ckpt_dir: str) -> tuple[str, dict]:
    """(path, contents) of the newest checkpoint that reads back. Newer ones that do not are
    renamed `<name>.corrupt` with a warning naming them; none at all raises CheckpointError."""
    candidates = checkpoints(ckpt_dir)
    for path in reversed(candidates):
        try:
            return path, read(path)
        except CheckpointError as err:
            aside = path + ".corrupt"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            print(f"rlfuse: warning: skipping unreadable checkpoint {path} (moved to {aside}): "
                  f"{err}", file=sys.stderr, flush=True)
    raise CheckpointError(
        f"resume=true but {ckpt_dir} holds no readable checkpoint"
        f"{' (all ' + str(len(candidates)) + ' set aside as *.corrupt)' if candidates else ''}; "
        "set resume=false (with overwrite=true to replace the old run) to start over")


def apply(ckpt: dict, model, optimizer=None, scheduler=None, load=None) -> tuple[int, dict]:
    """Restore contents from `read` into model/optimizer/scheduler and this rank's RNGs;
    (step, extra). `load(weights, optimizer_state)`, when given (FSDP2: into the sharded model),
    loads the weights and the optimizer state instead and returns the keys the weights lacked."""
    trainer = ckpt["trainer"]
    if len(trainer["rng"]) != distributed.world():
        raise CheckpointError(
            f"checkpoint of step {ckpt['step']} was written by {len(trainer['rng'])} process(es); "
            f"resume it under the same world size (now {distributed.world()}), or start a new run "
            "from it with model.path=<its folder>")
    device = next(model.parameters()).device
    weights = {k: v.to(device) for k, v in ckpt["weights"].items()}
    if ckpt["lora"] != is_lora(model):
        raise CheckpointError(f"checkpoint {'has' if ckpt['lora'] else 'has no'} LoRA adapter "
                              f"but the model {'has none' if ckpt['lora'] else 'is LoRA'}")
    unexpected: list = []
    if load is not None:
        missing = load(weights, trainer["optimizer"])
    elif ckpt["lora"]:
        from peft import set_peft_model_state_dict

        unexpected = set_peft_model_state_dict(model, weights).unexpected_keys
        missing = []
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = sorted(set(missing) - tied)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit the model (missing {missing[:5]}, "
                              f"unexpected {list(unexpected)[:5]})")
    if optimizer is not None and load is None:
        optimizer.load_state_dict(trainer["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"][distributed.rank()])
    return ckpt["step"], _to(trainer["extra"], device)


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


class GracefulExit:
    """While active, SIGINT/SIGTERM set `signal` (the loop saves and stops); a second SIGINT
    interrupts at once."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nrlfuse: got {signal.Signals(signum).name}; saving a checkpoint, then stopping "
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
