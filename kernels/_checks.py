"""The one input check every public op uses, so that every op applies the same rule.

The rule, for each tensor argument (errors name the argument and say what was expected):
- not a tensor, or the wrong kind of dtype (floating, integer token ids, a 0/1 mask): TypeError
  naming the dtype it got;
- the wrong shape or device: ValueError naming the expected shape;
- a mask that holds values other than 0 and 1: ValueError;
- the float side inputs a loss reads directly (advantages, old / ref / rollout log-probs,
  rewards, values, returns) must be finite where they count (at valid tokens): a NaN or inf is
  a ValueError naming the argument and the first bad index. hidden, weight and bias are not
  scanned (a full pass over them per call would cost as much as the epilogue kernels); a
  non-finite value there makes the affected rows' log-probs and entropies NaN, the same in
  every impl, and so the loss NaN.
Value checks read the data, so they are skipped while torch.compile traces. The scalar option
checks of the config dataclasses (`check_choice`, `check_number`) live here too.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

KINDS = {
    "float": "a floating-point",
    "index": "an int64 (or int32) token-id",
    "mask": "a bool, integer or floating 0/1",
}
Shape = Union[tuple, dict]  # (2, 3), or {"[B]": (2,), "[B, T]": (2, 3)}


def _kind_ok(t: Tensor, kind: str) -> bool:
    if kind == "float":
        return t.is_floating_point()
    if kind == "index":
        return t.dtype in (torch.int64, torch.int32)
    return not t.is_complex()  # mask


def check_tensor(name: str, t, kind: str = "float", *, shape: Optional[Shape] = None,
                 dim: Optional[int] = None, layout: str = "",
                 device: Optional[torch.device] = None,
                 finite: bool = False, where: Optional[Tensor] = None,
                 allow_nan: bool = False) -> None:
    """Check one tensor argument (see the module docstring for the rule).

    shape: the exact shape, or {description: shape} of the allowed ones; dim: the number of
    dimensions when the sizes are free (layout, e.g. "[B, T, H]", names them); finite: reject
    NaN / inf (inf only with allow_nan) at the positions `where` (broadcast to t's shape)
    holds, everywhere when it is None.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not _kind_ok(t, kind):
        raise TypeError(f"{name} must be {KINDS[kind]} tensor, got dtype {t.dtype}")
    got = tuple(t.shape)
    if shape is not None:
        shapes = shape if isinstance(shape, dict) else {"": shape}
        if got not in [tuple(s) for s in shapes.values()]:
            want = " or ".join(f"{k} = {tuple(s)}" if k else str(tuple(s))
                               for k, s in shapes.items())
            raise ValueError(f"{name} must have shape {want}, got {got}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D{' ' + layout if layout else ''}, got shape "
                         f"{got}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (hidden's device), got {t.device}")
    if torch.compiler.is_compiling() or not t.numel():
        return
    if kind == "mask" and t.dtype != torch.bool and not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(f"{name} must hold 0/1 (or bool) values")
    if finite:
        bad = torch.isinf(t) if allow_nan else ~torch.isfinite(t)
        if where is not None:
            bad = bad & where
        if bool(bad.any()):
            idx = tuple(bad.nonzero()[0].tolist())
            what = "finite or NaN" if allow_nan else "finite"
            scope = " at valid tokens" if where is not None else ""
            raise ValueError(f"{name} must be {what}{scope}; found {t[idx].item()} at index "
                             f"{list(idx)}")


def check_choice(name: str, val, allowed: tuple) -> None:
    if val not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {val!r}")


def check_number(name: str, val, *, positive: bool = False, non_negative: bool = False) -> None:
    """A finite real number (not a bool), optionally > 0 or >= 0."""
    ok = isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val)
    if ok and positive:
        ok = val > 0
    if ok and non_negative:
        ok = val >= 0
    if not ok:
        what = "positive " if positive else "non-negative " if non_negative else ""
        raise ValueError(f"{name} must be a finite {what}number, got {val!r}")
