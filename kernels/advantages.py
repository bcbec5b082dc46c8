"""Advantage estimators and the PPO value loss: group-relative (GRPO, RLOO, Dr. GRPO) and GAE.

These are O(B) or O(B·T) elementwise work next to the O(N·H·V) LM-head ops, so they are
plain vectorized PyTorch on every device (a [P, G] view for groups, one reverse scan over T
for GAE); no kernel would pay for itself. Definitions follow TRL's GRPOTrainer /
RLOOTrainer / PPOTrainer; the docstrings say where a choice was made.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

SCALES = ("group", "batch", "none")
ESTIMATORS = ("grpo", "rloo", "dr_grpo")


def _nanstd(x: Tensor) -> Tensor:
    """Sample std (Bessel) over the non-NaN entries; NaN with fewer than two (TRL's nanstd)."""
    n = (~torch.isnan(x)).sum()
    var = torch.nanmean((x - torch.nanmean(x)) ** 2) * n / (n - 1)
    return var.sqrt()


def group_advantages(rewards: Tensor, group_size: int, *, scale: str = "group",
                     estimator: str = "grpo", eps: float = 1e-4) -> tuple[Tensor, dict]:
    """Group-relative advantages for B = prompts x group_size completions, grouped contiguously.

    grpo:    A = (r - mean_g) / (std + eps), std by `scale`: "group" (per group), "batch"
             (whole batch; still centred by the group mean, as TRL), "none" (not scaled).
    rloo:    A = r - (sum_g - r) / (G - 1)  (leave-one-out baseline), then scaled as above.
    dr_grpo: A = r - mean_g, never scaled (Dr. GRPO drops the std; `scale` is ignored).
    std is the sample std (ddof=1); a group of one has std 0 and advantage 0.

    NaN rewards are unscored completions. As in TRL's GRPOTrainer, whose total reward is a
    nansum over reward functions, they count as reward 0 in the group statistics. The reported
    reward_mean / reward_std are nanmean / nanstd over the scored completions (TRL's
    per-function `rewards/<f>/mean|std`); frac_zero_std is the fraction of groups whose std is
    ~0 (no learning signal; TRL's frac_reward_zero_std); frac_unscored counts the NaNs.
    Returns advantages [B] fp32 (fp64 for fp64) and the metrics (0-d tensors).
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        got = (f"{rewards.dtype} {tuple(rewards.shape)}" if isinstance(rewards, Tensor)
               else type(rewards).__name__)
        raise ValueError(f"rewards must be a 1-D floating tensor [B], got {got}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    b = rewards.shape[0]
    if b == 0 or b % group_size:
        raise ValueError(f"group_size={group_size} must divide the batch size B={b} (> 0)")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if bool(torch.isinf(rewards).any()):
        raise ValueError("rewards must be finite or NaN (unscored); found inf")

    dt = torch.promote_types(rewards.dtype, torch.float32)
    raw = rewards.to(dt)
    scored = ~torch.isnan(raw)
    r = torch.where(scored, raw, torch.zeros((), dtype=dt, device=raw.device))  # [B]
    g = r.view(-1, group_size)  # [P, G]
    if group_size > 1:
        group_std = g.std(dim=1, keepdim=True)  # [P, 1]
        if estimator == "rloo":
            baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)  # [P, G]
        else:
            baseline = g.mean(dim=1, keepdim=True)  # [P, 1]
    else:
        group_std = torch.zeros_like(g)
        baseline = g
    adv = g - baseline  # [P, G]
    if estimator != "dr_grpo" and scale != "none":
        if scale == "group":
            std = group_std
        else:
            std = r.std() if b > 1 else torch.zeros((), dtype=dt, device=r.device)
        adv = adv / (std + eps)
    zero_std = torch.isclose(group_std, torch.zeros_like(group_std)).squeeze(1)  # [P]
    metrics = {
        "reward_mean": torch.nanmean(raw).float(),
        "reward_std": _nanstd(raw).float(),
        "frac_zero_std": zero_std.float().mean(),
        "frac_unscored": (~scored).float().mean(),
    }
    return adv.reshape(b), metrics


def _check_bt(name: str, t: Tensor, shape) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is None:
        if t.dim() != 2:
            raise ValueError(f"{name} must be [B, T], got shape {tuple(t.shape)}")
    elif tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (like values), got "
                         f"{tuple(t.shape)}")


def _check_mask(mask: Tensor, shape) -> Tensor:
    _check_bt("mask", mask, shape)
    m = mask != 0
    if m.numel() and not bool(m.any(-1).all()):
        rows = (~m.any(-1)).nonzero().flatten().tolist()[:8]
        raise ValueError(f"mask: rows {rows} have no valid position; every row needs one")
    return m


def _check_finite(name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite")


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum()


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries, var with Bessel's correction
    (TRL's masked_whiten with shift_mean=True); masked-out entries become 0."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    n = m.sum()
    var = masked_mean((x - mean) ** 2, m) * (n / (n - 1) if n > 1 else 1.0)
    return (x - mean) * torch.rsqrt(var + eps) * m


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95,
        whiten: bool = False) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over [B, T] (one reverse scan over T).

    delta_t = r_t + gamma * V_next - V_t, A_t = delta_t + gamma * lam * A_next, where "next" is
    the next *valid* position (masked positions are skipped; past the last one V_next = 0 and
    A_next = 0). For right-padded rows this is exactly TRL's PPOTrainer / OpenRLHF's loop on
    zero-filled padding. returns = A + V (before whitening); whiten=True whitens the advantages
    with the masked mean and unbiased var (TRL). Masked positions are 0 in both outputs.
    """
    _check_bt("values", values, None)
    _check_bt("rewards", rewards, values.shape)
    m = _check_mask(mask, values.shape)
    _check_finite("rewards", rewards)
    _check_finite("values", values)
    for name, val in (("gamma", gamma), ("lam", lam)):
        if not isinstance(val, (int, float)) or not 0.0 <= val <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {val!r}")
    dt = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    r, v = rewards.detach().to(dt), values.detach().to(dt)
    zero = torch.zeros(values.shape[0], dtype=dt, device=values.device)  # [B]
    next_v, next_a = zero, zero
    adv = torch.zeros_like(v)  # [B, T]
    for t in range(v.shape[1] - 1, -1, -1):
        a_t = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a
        keep = m[:, t]
        next_a = torch.where(keep, a_t, next_a)
        next_v = torch.where(keep, v[:, t], next_v)
        adv[:, t] = torch.where(keep, a_t, zero)
    returns = (adv + v) * m
    if whiten:
        adv = masked_whiten(adv, m)
    return adv, returns


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip: Optional[float] = 0.2) -> tuple[Tensor, dict]:
    """Clipped value loss (TRL's PPOTrainer): 0.5 * masked_mean(max((V - R)^2, (Vc - R)^2)),
    Vc = old_V + clamp(V - old_V, -clip, clip); clip=None gives the unclipped 0.5 * MSE.
    Differentiable in `values`. Metrics: value_clip_fraction (share of tokens where the clipped
    error is the larger one), explained_variance = 1 - Var(R - V) / Var(R) over masked tokens
    (with the current V; NaN when the returns are constant, as in SB3 / CleanRL).
    """
    _check_bt("values", values, None)
    _check_bt("old_values", old_values, values.shape)
    _check_bt("returns", returns, values.shape)
    m = _check_mask(mask, values.shape)
    for name, t in (("values", values), ("old_values", old_values), ("returns", returns)):
        _check_finite(name, t)
    if clip is not None and (not isinstance(clip, (int, float)) or not clip > 0
                             or not math.isfinite(clip)):
        raise ValueError(f"clip must be None or a finite positive number, got {clip!r}")
    dt = torch.promote_types(values.dtype, torch.float32)
    v = values.to(dt)
    old, ret = old_values.detach().to(dt), returns.detach().to(dt)
    mf = m.to(dt)
    err = (v - ret) ** 2  # [B, T]
    if clip is None:
        worst, clipped = err, torch.zeros_like(err)
    else:
        v_clip = old + (v - old).clamp(-clip, clip)
        err_clip = (v_clip - ret) ** 2
        worst = torch.maximum(err, err_clip)
        clipped = (err_clip > err).to(dt)
    loss = 0.5 * masked_mean(worst, mf)
    with torch.no_grad():
        ret_m = masked_mean(ret, mf)
        var_r = masked_mean((ret - ret_m) ** 2, mf)
        res = ret - v.detach()
        var_res = masked_mean((res - masked_mean(res, mf)) ** 2, mf)
        metrics = {
            "value_clip_fraction": masked_mean(clipped, mf).float(),
            "explained_variance": torch.where(var_r > 0, 1 - var_res / var_r,
                                              torch.full_like(var_r, math.nan)).float(),
        }
    return loss, metrics
