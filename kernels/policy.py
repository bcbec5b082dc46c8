"""policy_loss: the clipped policy-gradient family (PPO, GRPO, BNPO, Dr. GRPO, DAPO, CISPO, SAPO,
GSPO's sequence-level ratio) with KL-to-reference, entropy bonus and rollout-engine importance
correction, computed from the LM head's inputs without holding the [N, V] logits.

Algorithm. Every option reduces to a per-token loss l_n (the surrogate, times the top-entropy mask
and the rollout IS weight, plus beta * KL_n, minus entropy_coef * H_n) and a per-token normalizer
w_n known before the pass (the loss type's token / sequence normalization), so that
    loss = sum_n w_n * l_n      over valid tokens (mask != 0 and target != ignore_index).
Through the chunked driver (`_chunked.run`, family "policy"), token-separable configurations
(token-level ratio, no entropy quantile) and GSPO's sequence-level ratio on sequences that fit a
chunk (whole sequences per chunk) have each chunk's gradient written during the forward:
6·N·H·V FLOPs, and backward only scales it. The top-entropy threshold (a whole-batch statistic),
or sequences longer than a chunk, run two phases (the stats pass, the loss math with autograd on
[N] vectors, a recomputing gradient pass): 8·N·H·V FLOPs. Both hold one [C, V] chunk plus O(N)
row vectors. Without a gradient to compute, one stats pass (2·N·H·V). `impl="reference"`
materializes the logits (`linear_logprobs_reference`) and applies the same `_per_token`: the spec.

Formulas (r ratio, A advantage, eps_h defaults to eps_l, T_i valid tokens of row i, sg = no grad)
    ratio       token r_t = exp(logp_t - old_t);  sequence (GSPO) r_i = exp(mean_t(logp_t - old_t))
                old_logp=None -> old = sg(logp): r = 1, gradient of -A * logp
    clipped     l = -min(min(r, delta) * A, clip(r, 1 - eps_l, 1 + eps_h) * A)
                (grpo bnpo dr_grpo dapo ppo; min(r, delta) only when delta is set)
                dual_clip c: l = min(l, -c * A) where A < 0
    cispo       l = -sg(min(r, 1 + eps_h)) * A * logp    (MiniMax-M1; TRL's epsilon_high = 1+eps_h)
    sapo        l = -sigmoid(tau * (r - 1)) * 4 / tau * A,  tau = tau_pos if A > 0 else tau_neg
    entropy q   l *= [H_t >= quantile(H over valid tokens, 1 - q)]       (q = top_entropy_quantile)
    rollout IS  l *= sg(w), w = exp(old - rollout): tis min(w, cap); mis w if w <= cap else 0
    KL          d = ref - logp: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1;  l += beta * KL
                kl_times_ratio: l += beta * KL * r (r differentiable, before delta's clamp; TRL's
                use_bias_correction_kl, the unbiased reverse-KL gradient of DeepSeek-V3.2)
    entropy     l -= entropy_coef * H_t
    normalizer  grpo, sapo: 1 / (B * max(T_i, 1))       bnpo, ppo: 1 / max(sum_i T_i, 1)
                dr_grpo: 1 / (B * max_completion_length) dapo, cispo: 1 / num_items_in_batch
                (num_items_in_batch defaults to the local max(sum_i T_i, 1))
These are TRL's GRPOTrainer `_compute_loss` normalizations, less its division by the gradient
accumulation steps (the caller's job); dapo's normalizer is taken as given, where TRL divides by
num_items_in_batch / num_processes because DDP averages gradients: pass the global count divided
by the world size to reproduce TRL under DDP averaging.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional, Union

import torch
from torch import Tensor

from . import _chunked, _vocab_parallel
from ._backend import resolve
from ._checks import check_choice, check_number, check_tensor
from .logprobs import HeadOptions, check_linear_inputs, linear_logprobs_reference

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "ppo")
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "ppo")
IMPORTANCE_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
ROLLOUT_CORRECTIONS = (None, "tis", "mis")
METRICS = ("kl", "entropy", "clip_fraction_low", "clip_fraction_high", "clip_fraction",
           "ratio_mean", "ratio_min", "ratio_max", "approx_kl", "tokens")
# with rollout_correction: how far the rollout engine samples from `old`
ROLLOUT_METRICS = ("rollout_kl", "rollout_weight_mean", "rollout_capped_fraction")


# ----------------------------------------------------------------------------- config / output
@dataclass(frozen=True)
class PolicyLossConfig(HeadOptions):
    """Options of `policy_loss` (plus the shared LM-head options), validated on construction;
    formulas in the module docstring."""

    loss_type: str = "grpo"             # grpo | bnpo | dr_grpo | dapo | cispo | sapo | ppo
    importance_level: str = "token"     # token | sequence (GSPO)
    eps_low: float = 0.2
    eps_high: Optional[float] = None    # None -> eps_low (clip-higher when larger)
    delta: Optional[float] = None       # upper clamp of the unclipped ratio (two-sided clipping)
    dual_clip: Optional[float] = None   # c > 1: bound the loss of A < 0 tokens by -c * A
    beta: float = 0.0                   # KL-to-reference coefficient in the loss
    kl_estimator: str = "k3"            # k1 | k2 | k3
    kl_times_ratio: bool = False        # KL term times the ratio (TRL's use_bias_correction_kl)
    entropy_coef: float = 0.0           # entropy bonus (same normalization as the loss)
    top_entropy_quantile: float = 1.0   # keep the pg loss only on the top-q entropy tokens
    max_completion_length: Optional[int] = None   # dr_grpo normalizer
    rollout_correction: Optional[str] = None      # None | "tis" (truncate) | "mis" (mask)
    rollout_correction_cap: float = 2.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in (("loss_type", LOSS_TYPES), ("importance_level", IMPORTANCE_LEVELS),
                              ("kl_estimator", KL_ESTIMATORS),
                              ("rollout_correction", ROLLOUT_CORRECTIONS)):
            check_choice(name, getattr(self, name), allowed)
        check_number("eps_low", self.eps_low, non_negative=True)
        if self.eps_high is not None:
            check_number("eps_high", self.eps_high, non_negative=True)
        for name in ("delta", "dual_clip"):
            val = getattr(self, name)
            if val is None:
                continue
            check_number(name, val, positive=True)
            if val <= 1:
                raise ValueError(f"{name} must be > 1, got {val!r}")
            if self.loss_type not in CLIPPED:
                raise ValueError(f"{name} applies to the clipped loss types {CLIPPED}, "
                                 f"not loss_type={self.loss_type!r}")
        check_number("beta", self.beta, non_negative=True)
        check_number("entropy_coef", self.entropy_coef)
        q = self.top_entropy_quantile
        if not (isinstance(q, (int, float)) and 0 < q <= 1):
            raise ValueError(f"top_entropy_quantile must be in (0, 1], got {q!r}")
        m = self.max_completion_length
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m <= 0):
            raise ValueError(f"max_completion_length must be a positive int, got {m!r}")
        if self.loss_type == "dr_grpo" and m is None:
            raise ValueError("max_completion_length is required for loss_type='dr_grpo' "
                             "(its normalizer is B * max_completion_length)")
        for name in ("rollout_correction_cap", "sapo_temperature_pos", "sapo_temperature_neg"):
            check_number(name, getattr(self, name), positive=True)

    @property
    def eps_high_effective(self) -> float:
        return self.eps_low if self.eps_high is None else self.eps_high

    @property
    def token_separable(self) -> bool:
        """True when each token's gradient needs only its own row and up-front quantities."""
        return self.importance_level == "token" and self.top_entropy_quantile == 1.0


@dataclass
class PolicyLossOutput:
    logp: Tensor      # [B, T] fp32, detached (0 at ignore_index targets)
    entropy: Tensor   # [B, T] fp32, detached
    kl: Tensor        # [B, T] fp32 per-token KL estimate to the reference, detached (0 without it)
    metrics: dict = field(default_factory=dict)   # name -> 0-d fp32: METRICS (+ ROLLOUT_METRICS)


# ----------------------------------------------------------------------------- per-row inputs
@dataclass(frozen=True)
class _Rows:
    """Per-token inputs flattened to [N] = [B*T] so that a chunk of rows just slices them."""

    valid: Tensor                 # [N] bool: mask != 0 and target != ignore_index
    weight: Tensor                # [N] normalizer w_n, 0 where not valid
    adv: Tensor                   # [N]
    old: Optional[Tensor]         # [N], 0 where not valid (padding is never read: no NaN, no
                                  # overflow of exp)
    ref: Optional[Tensor]
    rollout: Optional[Tensor]
    shape: tuple                  # (B, T); a slice of whole sequences keeps its own (b, T)

    def slice(self, s: int, e: int) -> "_Rows":
        cut = {f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[s:e])
               for f in fields(self) if f.name != "shape"}
        t = self.shape[1]
        return _Rows(**cut, shape=((e - s) // t, t))

    def rollout_log_weight(self, lp: Tensor) -> Tensor:
        """log w = old - rollout (old = sg(lp) on-policy): the rollout correction's weight."""
        return (lp if self.old is None else self.old).detach() - self.rollout

    def pack(self) -> list[Optional[Tensor]]:
        """The per-row tensors as the driver takes them (valid [B, T] carries the shape)."""
        return [self.valid.view(self.shape), self.weight, self.adv, self.old, self.ref,
                self.rollout]

    @staticmethod
    def unpack(rows: list[Tensor]) -> "_Rows":
        valid, weight, adv, *logps = rows
        old, ref, rollout = (None if t.numel() == 0 else t for t in logps)
        return _Rows(valid.reshape(-1), weight, adv, old, ref, rollout, tuple(valid.shape))


def _normalizer(cfg: PolicyLossConfig, valid: Tensor, num_items_in_batch) -> Tensor:
    """w_n for valid [B, T] -> [B, T]: TRL's token / sequence normalization per loss type."""
    b = valid.shape[0]
    v = valid.to(torch.float64)
    if cfg.loss_type in ("grpo", "sapo"):      # token mean per sequence, then mean over B
        denom = b * v.sum(-1, keepdim=True).clamp(min=1)
    elif cfg.loss_type in ("bnpo", "ppo"):     # token mean over the local batch
        denom = v.sum().clamp(min=1)
    elif cfg.loss_type == "dr_grpo":           # constant B * max_completion_length
        denom = torch.tensor(float(b * cfg.max_completion_length), dtype=v.dtype)
    elif num_items_in_batch is not None:       # dapo, cispo: global token count
        denom = torch.as_tensor(num_items_in_batch, dtype=v.dtype, device=v.device)
    else:
        denom = v.sum().clamp(min=1)
    return v / denom.to(v.device)


def _rows(cfg, targets, mask, advantages, logps: dict, num_items_in_batch, dtype) -> _Rows:
    valid = (mask != 0) & (targets != cfg.ignore_index)  # [B, T]
    adv = advantages if advantages.dim() == 2 else advantages[:, None]

    def flat(t):
        return None if t is None else torch.where(valid, t, 0).to(dtype).reshape(-1)

    return _Rows(valid=valid.reshape(-1),
                 weight=_normalizer(cfg, valid, num_items_in_batch).to(dtype).reshape(-1),
                 adv=flat(adv.expand(valid.shape)),
                 old=flat(logps["old_logp"]), ref=flat(logps["ref_logp"]),
                 rollout=flat(logps["rollout_logp"]),
                 shape=tuple(valid.shape))


# ----------------------------------------------------------------------------- the loss math
def _quantile(x: Tensor, q: float) -> Tensor:
    """torch.quantile(x, q) (linear interpolation) without its input-size limit."""
    xs = x.sort().values
    pos = q * (xs.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def _top_entropy_mask(entropy: Tensor, valid: Tensor, q: float) -> Tensor:
    """Tokens whose entropy is >= the (1 - q)-quantile of the valid tokens' entropies."""
    vals = entropy[valid]
    if vals.numel() == 0:
        return torch.zeros_like(valid)
    return (entropy >= _quantile(vals, 1.0 - q)) & valid


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3; module
    docstring): the loss's KL term, and the engine's KL-shaped PPO rewards."""
    check_choice("estimator", estimator, KL_ESTIMATORS)
    d = ref_logp - logp  # log(pi_ref / pi)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1


def _surrogate(cfg: PolicyLossConfig, ratio: Tensor, adv: Tensor, logp: Tensor) -> Tensor:
    eps_h = cfg.eps_high_effective
    if cfg.loss_type == "cispo":
        return -ratio.clamp(max=1 + eps_h).detach() * adv * logp
    if cfg.loss_type == "sapo":
        tau = torch.full_like(adv, cfg.sapo_temperature_neg).masked_fill(
            adv > 0, cfg.sapo_temperature_pos)
        return -torch.sigmoid(tau * (ratio - 1)) * (4 / tau) * adv
    unclipped = ratio if cfg.delta is None else ratio.clamp(max=cfg.delta)
    clipped = ratio.clamp(1 - cfg.eps_low, 1 + eps_h)
    loss = -torch.min(unclipped * adv, clipped * adv)
    if cfg.dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -cfg.dual_clip * adv), loss)
    return loss


def _per_token(cfg: PolicyLossConfig, logp: Tensor, entropy: Tensor, rows: _Rows):
    """Per-token loss l_n, ratio and KL ([n] each) for rows `rows` (a slice when token-separable).

    The scalar loss is (l * rows.weight).sum(). Differentiable in logp and entropy.
    """
    lp = torch.where(rows.valid, logp, 0)
    old = lp.detach() if rows.old is None else rows.old
    log_ratio = lp - old
    if cfg.importance_level == "sequence":  # GSPO: length-normalized sequence log-ratio
        b, t = rows.shape
        v = rows.valid.view(b, t)
        seq = log_ratio.view(b, t).sum(-1) / v.sum(-1).clamp(min=1)
        log_ratio = seq[:, None].expand(b, t).reshape(-1)
    ratio = torch.exp(log_ratio)
    loss = _surrogate(cfg, ratio, rows.adv, lp)
    if cfg.top_entropy_quantile < 1.0:
        loss = loss * _top_entropy_mask(entropy.detach(), rows.valid, cfg.top_entropy_quantile)
    if cfg.rollout_correction is not None:
        w = torch.exp(rows.rollout_log_weight(lp))
        cap = cfg.rollout_correction_cap
        w = w.clamp(max=cap) if cfg.rollout_correction == "tis" else w.masked_fill(w > cap, 0)
        loss = loss * w
    kl = torch.zeros_like(lp) if rows.ref is None else kl_estimate(lp, rows.ref, cfg.kl_estimator)
    if cfg.beta:
        loss = loss + cfg.beta * (kl * ratio if cfg.kl_times_ratio else kl)
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * entropy
    return loss, ratio, kl


@torch.no_grad()
def _metrics(cfg: PolicyLossConfig, logp, entropy, ratio, kl, rows: _Rows) -> dict:
    v = rows.valid
    n = v.sum()
    count = n.clamp(min=1).to(logp.dtype)

    def mean(x):
        return torch.where(v, x.to(logp.dtype), 0).sum() / count

    adv = rows.adv
    high = (ratio > 1 + cfg.eps_high_effective) & (adv > 0)
    low = (ratio < 1 - cfg.eps_low) & (adv < 0) if cfg.loss_type != "cispo" else torch.zeros_like(v)
    d = torch.where(v, logp, 0) - (rows.old if rows.old is not None else torch.where(v, logp, 0))
    empty = n == 0
    out = {
        "kl": mean(kl), "entropy": mean(entropy),
        "clip_fraction_low": mean(low), "clip_fraction_high": mean(high),
        "clip_fraction": mean(low | high),
        "ratio_mean": mean(ratio),
        "ratio_min": torch.where(empty, 0, torch.where(v, ratio, math.inf).min()),
        "ratio_max": torch.where(empty, 0, torch.where(v, ratio, -math.inf).max()),
        "approx_kl": mean(torch.expm1(d) - d),   # k3 estimate of KL(old || new)
        "tokens": n,
    }
    if cfg.rollout_correction is not None:  # ROLLOUT_METRICS
        log_w = torch.where(v, rows.rollout_log_weight(logp), 0)
        w = torch.exp(log_w)
        out["rollout_kl"] = mean(torch.expm1(log_w) - log_w)  # k3 of KL(rollout || old)
        out["rollout_weight_mean"] = mean(w)                 # before the cap
        out["rollout_capped_fraction"] = mean(w > cfg.rollout_correction_cap)
    return {k: t.detach().to(torch.float32) for k, t in out.items()}


# ----------------------------------------------------------------------------- fused path
class _PolicyMath(_chunked.LossMath):
    """The driver's view of the loss: sum_n w_n * l_n over rows, whole sequences per chunk for
    GSPO's sequence ratio, the whole batch for the top-entropy threshold."""

    def __init__(self, cfg: PolicyLossConfig, rows: list[Tensor]):
        self.cfg = cfg
        self.rows = _Rows.unpack(rows)
        seq = cfg.importance_level == "sequence"
        self.group = None if cfg.top_entropy_quantile < 1.0 else self.rows.shape[1] if seq else 1

    def loss(self, s, e, logp, entropy):
        r = self.rows.slice(s, e)
        per_token, _, _ = _per_token(self.cfg, logp, entropy, r)
        return (per_token * r.weight).sum()


_chunked.register_family("policy", PolicyLossConfig, _PolicyMath)


# ----------------------------------------------------------------------------- public API
def _check(hidden, weight, targets, mask, advantages, *, logps: dict, bias, num_items_in_batch,
           cfg, vocab) -> None:
    if not isinstance(cfg, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(cfg).__name__}")
    check_tensor("hidden", hidden, dim=3, layout="[B, T, H]")
    check_linear_inputs(hidden, weight, targets, bias, cfg.ignore_index, vocab)
    b, t = targets.shape
    if b * t == 0:
        raise ValueError(f"hidden must hold at least one position, got shape {tuple(hidden.shape)}")
    dev = hidden.device
    check_tensor("mask", mask, "mask", shape={"[B, T]": (b, t)}, device=dev)
    valid = (mask != 0) & (targets != cfg.ignore_index)  # [B, T]
    per_token = isinstance(advantages, Tensor) and advantages.dim() == 2
    check_tensor("advantages", advantages, shape={"[B]": (b,), "[B, T]": (b, t)}, device=dev,
                 finite=True, where=valid if per_token else valid.any(-1))
    for name, lp in logps.items():
        if lp is not None:
            check_tensor(name, lp, shape={"[B, T]": (b, t)}, device=dev, finite=True,
                         where=valid)
    if cfg.beta > 0 and logps["ref_logp"] is None:
        raise ValueError("ref_logp is required when config.beta > 0")
    if cfg.rollout_correction is not None and logps["rollout_logp"] is None:
        raise ValueError(f"rollout_logp is required when config.rollout_correction="
                         f"{cfg.rollout_correction!r}")
    if cfg.rollout_correction is None and logps["rollout_logp"] is not None:
        raise ValueError("rollout_logp was given but config.rollout_correction is None; "
                         "set it to 'tis' or 'mis'")
    if num_items_in_batch is not None and cfg.loss_type in ("dapo", "cispo"):
        n = num_items_in_batch
        if isinstance(n, Tensor):
            if n.numel() != 1:
                raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(n.shape)}")
            n = n.item() if not torch.compiler.is_compiling() else 1
        check_number("num_items_in_batch (a token count)", n, positive=True)


def policy_loss(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor,
                advantages: Tensor, *, old_logp: Optional[Tensor] = None,
                ref_logp: Optional[Tensor] = None, rollout_logp: Optional[Tensor] = None,
                bias: Optional[Tensor] = None,
                num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
                config: PolicyLossConfig = PolicyLossConfig(), vocab_group=None
                ) -> tuple[Tensor, PolicyLossOutput]:
    """Policy-gradient loss of the LM head `softmax(transform(hidden @ weight^T + bias))`.

    hidden [B, T, H], weight [V, H], targets [B, T] int (the sampled tokens), mask [B, T] (1 = a
    completion token that counts), advantages [B] or [B, T]; old_logp (the policy that sampled, or
    the one before this epoch's updates), ref_logp (the KL reference) and rollout_logp (the
    rollout engine's log-probs, for `rollout_correction`) are [B, T] and treated as constants.
    num_items_in_batch is dapo / cispo's global token count (ignored by the other loss types).
    Returns the fp32 scalar loss, differentiable in hidden, weight and bias, and a
    PolicyLossOutput (per-token logp / entropy / KL and metrics, all detached).

    The chunked impls compute the gradients during the forward (an op of `_chunked`, compile-safe:
    torch.compile(fullgraph=True) traces it), so each call supports one backward: a second
    backward through the same graph (retain_graph=True) raises; call the loss again.

    An all-zero mask is not an error: the loss is 0 with zero gradients and metrics["tokens"] is 0,
    as in TRL (normalizers are clamped to >= 1); micro-batches whose completions were all filtered
    (e.g. overlong filtering) are legitimate and must not stop a run.
    vocab_group: weight and bias are this rank's vocabulary shard, as in `linear_logprobs`;
    every other input is the same on every rank, and so are the loss and the outputs.
    """
    weight, bias, vocab = _vocab_parallel.shard(weight, bias, vocab_group)
    logps = {"old_logp": old_logp, "ref_logp": ref_logp, "rollout_logp": rollout_logp}
    _check(hidden, weight, targets, mask, advantages, logps=logps, bias=bias,
           num_items_in_batch=num_items_in_batch, cfg=config, vocab=vocab)
    cfg = config
    impl = resolve(cfg.impl, hidden.device)
    b, t = targets.shape
    fp64 = impl == "reference" and hidden.dtype == torch.float64
    dtype = torch.float64 if fp64 else torch.float32
    rows = _rows(cfg, targets, mask, advantages, logps, num_items_in_batch, dtype)
    if impl == "reference":
        logp, ent = linear_logprobs_reference(hidden, weight, targets, bias, cfg.transform(),
                                              cfg.ignore_index, vocab and vocab.group)
        logp, ent = logp.reshape(-1), ent.reshape(-1)
        per_token, ratio, kl = _per_token(cfg, logp, ent, rows)
        loss = (per_token * rows.weight).sum()
    else:
        inputs = _chunked.Inputs(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                 targets.reshape(-1).long())
        loss, logp, ent, _ = _chunked.run("policy", cfg, impl, inputs, rows.pack(), vocab)
        with torch.no_grad():
            _, ratio, kl = _per_token(cfg, logp, ent, rows)

    logp, ent, ratio, kl = (x.detach() for x in (logp, ent, ratio, kl))
    out = PolicyLossOutput(logp=logp.view(b, t), entropy=ent.view(b, t), kl=kl.view(b, t),
                           metrics=_metrics(cfg, logp, ent, ratio, kl, rows))
    return loss, out
