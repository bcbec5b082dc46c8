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

from ._checks import check_choice, check_number, check_tensor

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
    check_tensor("rewards", rewards, dim=1, layout="[B]", finite=True, allow_nan=True)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    b = rewards.shape[0]
    if b == 0 or b % group_size:
        raise ValueError(f"group_size={group_size} must divide the batch size B={b} (> 0)")
    check_choice("scale", scale, SCALES)
    check_choice("estimator", estimator, ESTIMATORS)
    check_number("eps", eps, non_negative=True)

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


def _check_bt(mask: Tensor, values: Tensor, **others: Tensor) -> Tensor:
    """values and `others`: floating [B, T] tensors of one shape, finite where mask is set;
    mask: 0/1 of that shape with a valid position in every row. Returns mask != 0."""
    check_tensor("values", values, dim=2, layout="[B, T]")
    like = {"values.shape": values.shape}
    check_tensor("mask", mask, "mask", shape=like, device=values.device)
    m = mask != 0
    if m.numel() and not bool(m.any(-1).all()):
        rows = (~m.any(-1)).nonzero().flatten().tolist()[:8]
        raise ValueError(f"mask: rows {rows} have no valid position; every row needs one")
    for name, t in {"values": values, **others}.items():
        check_tensor(name, t, shape=like, device=values.device, finite=True, where=m)
    return m


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
    m = _check_bt(mask, values, rewards=rewards)
    for name, val in (("gamma", gamma), ("lam", lam)):
        if not isinstance(val, (int, float)) or not 0.0 <= val <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {val!r}")
    dt = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    r, v = (torch.where(m, x.detach().to(dt), 0) for x in (rewards, values))  # [B, T] each
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
    m = _check_bt(mask, values, old_values=old_values, returns=returns)
    if clip is not None:
        check_number("clip (None or a number)", clip, positive=True)
    dt = torch.promote_types(values.dtype, torch.float32)
    v = torch.where(m, values.to(dt), 0)  # masked positions may hold anything
    old, ret = (torch.where(m, x.detach().to(dt), 0) for x in (old_values, returns))
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
