"""preference_loss: DPO and its variants (IPO, hinge, robust, EXO, NCA, BCO, SPPO, APO,
DiscoPOP, length-normalized DPO) plus SimPO and ORPO, from hidden states and the LM head,
without holding the [tokens x vocab] logits.

Rows [:B] of the batch are the chosen completions, rows [B:] the rejected ones (TRL's
concatenated layout). The loss couples each chosen row with its rejected row through their
sequence log-prob sums. For N = 2B*T token rows and chunks of C rows, the chunked driver
(`_chunked.run`, family "preference") picks:
  * whole pairs (2T <= C): the rows are laid out pair-major (a copy of hidden) so every chunk
    holds complete pairs; per chunk one GEMM gives the log-probs, the chunk's share of the loss
    (batch-level normalizers are known up front) is differentiated with autograd on its [2k, T]
    values, and two GEMMs write dX, dW (db): 6·N·H·V FLOPs, the minimum;
  * two phases (long sequences): the stats pass for all rows (1 GEMM / chunk), the loss on the
    [2B, T] log-probs with autograd -> a = dL/dlogp, then a pass that recomputes each chunk's
    logits and writes the gradients (3 GEMMs / chunk): 8·N·H·V FLOPs.
Either way the gradients are computed during the forward and the autograd backward only
scales them by grad_output. Extra memory: one [C, V] fp32 chunk buffer + O(N) row statistics
(+ [N, H] pair-major copies of hidden and dX on the whole-pair path), whatever T is. Under no_grad
only the log-prob pass runs (2·N·H·V FLOPs). Sequence sums and metrics are computed from the
returned log-probs, by the same `_pair_loss`.

Definitions follow TRL's DPOTrainer (1.x), CPOTrainer (simpo) and ORPOTrainer (orpo); see
`_pair_loss`. Where TRL versions differ:
  * sigmoid applies conservative-DPO label smoothing (TRL 0.x); TRL 1.x's sigmoid ignores
    label_smoothing, so the two agree at label_smoothing=0 (the default).
  * bco_pair follows TRL 1.x: -logsig(beta*c) - logsig(-beta*r) with no reward shift. TRL 0.x
    subtracted a running mean of the rewards (a stateful, cross-batch quantity); we keep the op
    stateless, so no shift is applied.
  * ORPO's NLL term is `sft_coef`: TRL's ORPOTrainer is loss_type="orpo" with sft_coef=1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _chunked, _vocab_parallel
from ._backend import resolve
from ._checks import check_choice, check_number, check_tensor
from .logprobs import HeadOptions, check_linear_inputs, linear_logprobs_reference

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair",
              "sppo_hard", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "simpo", "orpo")
# Reference-free by definition: score = length-averaged policy log-prob (CPO / ORPO trainers).
REFERENCE_FREE = ("simpo", "orpo")
SMOOTHED = ("sigmoid", "robust", "exo_pair", "simpo")  # the ones that read label_smoothing
METRIC_KEYS = ("rewards_chosen", "rewards_rejected", "rewards_accuracy", "rewards_margin",
               "logps_chosen", "logps_rejected", "nll")


@dataclass(frozen=True)
class PreferenceLossConfig(HeadOptions):
    """Options of `preference_loss` (plus the shared LM-head options), validated on
    construction."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # sigmoid (cDPO), robust, exo_pair (needs > 0), simpo
    sft_coef: float = 0.0  # NLL on chosen tokens (RPO; CPO's cpo_alpha; 1.0 for ORPO)
    simpo_gamma: float = 0.5  # SimPO margin: loss = -logsig(beta*(avg_c - avg_r) - simpo_gamma)
    discopop_tau: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_number("beta", self.beta, positive=True)
        ls = self.label_smoothing
        check_number("label_smoothing", ls, non_negative=True)
        if ls >= 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {ls!r}")
        if ls > 0 and self.loss_type not in SMOOTHED:
            raise ValueError(f"label_smoothing={ls} has no effect on loss_type "
                             f"{self.loss_type!r}; it is read by {SMOOTHED}")
        if self.loss_type == "exo_pair" and ls == 0:
            raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (the target "
                             "probability of the rejected answer; 1e-3 is the usual value)")
        check_number("sft_coef", self.sft_coef, non_negative=True)
        check_number("simpo_gamma", self.simpo_gamma)
        check_number("discopop_tau", self.discopop_tau, positive=True)


@dataclass
class PreferenceLossOutput:
    chosen_logp: Tensor  # [B] fp32 sequence log-prob sums, detached
    rejected_logp: Tensor  # [B]
    metrics: dict[str, Tensor] = field(default_factory=dict)  # METRIC_KEYS, 0-d fp32


# ----------------------------------------------------------------------------- loss math
def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2."""
    cut = -math.log(2.0)
    # Each branch sees only its own range, so the unused one has finite gradients.
    near = torch.log(-torch.expm1(x.clamp(min=cut)))
    far = torch.log1p(-torch.exp(x.clamp(max=cut)))
    return torch.where(x > cut, near, far)


def _pair_loss(logp: Tensor, valid: Tensor, ref_logp: Optional[Tensor],
               cfg: PreferenceLossConfig, norm: Optional[tuple[int, Tensor]] = None
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The spec, shared by every impl. logp [2b, T] per-token log-probs (b chosen rows, then
    their b rejected rows), valid [2b, T] bool, ref_logp [2b] or None (= 0, reference-free)
    -> loss (scalar), seq [2b] log-prob sums, metrics [len(METRIC_KEYS)] (detached).
    norm = (pairs, chosen tokens) of the whole batch when this call sees only some of its
    pairs; loss and metrics are then this slice's additive share of the batch values."""
    lp = torch.where(valid, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    seq = lp.sum(-1)  # [2b]
    n_tok = valid.sum(-1).to(logp.dtype)  # [2b], >= 1 (checked)
    b = seq.shape[0] // 2
    n_pairs, n_chosen = norm if norm is not None else (b, n_tok[:b].sum())
    beta, ls, lt = cfg.beta, cfg.label_smoothing, cfg.loss_type
    logsig = F.logsigmoid

    if lt in REFERENCE_FREE:
        avg = seq / n_tok  # [2B] length-averaged log-probs
        c, r = avg[:b], avg[b:]
        if lt == "simpo":
            z = beta * (c - r) - cfg.simpo_gamma
            per = -(1 - ls) * logsig(z) - ls * logsig(-z)
        else:  # orpo: log odds ratio of the average-token likelihoods
            log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
            per = -beta * logsig(log_odds)
        rew_c, rew_r, logps = beta * c, beta * r, avg
    else:
        ratio = seq if ref_logp is None else seq - ref_logp  # [2B] log pi/pi_ref
        c, r = ratio[:b], ratio[b:]
        z = beta * (c - r)  # [B]
        if lt == "sigmoid":
            per = -(1 - ls) * logsig(z) - ls * logsig(-z)
        elif lt == "hinge":
            per = torch.relu(1 - z)
        elif lt == "ipo":  # TRL averages the log-ratios over completion tokens
            n_c, n_r = n_tok[:b], n_tok[b:]
            per = (c / n_c - r / n_r - 1 / (2 * beta)) ** 2
        elif lt == "sigmoid_norm":
            n_c, n_r = n_tok[:b], n_tok[b:]
            per = -logsig(beta * (c / n_c - r / n_r))
        elif lt == "robust":
            per = (-(1 - ls) * logsig(z) + ls * logsig(-z)) / (1 - 2 * ls)
        elif lt == "exo_pair":
            per = (torch.sigmoid(z) * (logsig(z) - math.log1p(-ls))
                   + torch.sigmoid(-z) * (logsig(-z) - math.log(ls)))
        elif lt == "nca_pair":
            per = -logsig(beta * c) - 0.5 * logsig(-beta * c) - 0.5 * logsig(-beta * r)
        elif lt == "bco_pair":
            per = -logsig(beta * c) - logsig(-beta * r)
        elif lt == "sppo_hard":
            per = (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
        elif lt == "apo_zero":
            per = (1 - torch.sigmoid(beta * c)) + torch.sigmoid(beta * r)
        elif lt == "apo_down":
            per = torch.sigmoid(beta * c) + (1 - torch.sigmoid(z))
        elif lt == "discopop":
            mod = torch.sigmoid(z / cfg.discopop_tau)
            per = -logsig(z) * (1 - mod) + torch.exp(-z) * mod
        else:
            raise ValueError(f"unknown loss_type {lt!r}")
        rew_c, rew_r, logps = beta * c, beta * r, seq

    # NLL: token mean over all chosen tokens (TRL's cross-entropy on the chosen half).
    nll = -seq[:b].sum() / n_chosen
    loss = per.sum() / n_pairs
    if cfg.sft_coef:
        loss = loss + cfg.sft_coef * nll
    with torch.no_grad():
        rew_c, rew_r = rew_c.detach(), rew_r.detach()
        sums = torch.stack([rew_c.sum(), rew_r.sum(), (rew_c > rew_r).to(seq.dtype).sum(),
                            (rew_c - rew_r).sum(), logps[:b].sum(), logps[b:].sum()])
        metrics = torch.cat([sums / n_pairs, nll.detach().view(1)])
    return loss, seq, metrics


# ----------------------------------------------------------------------------- fused path
def _pair_major(t: Tensor, b: int, steps: int) -> Tensor:
    """[2B*T, ...] chosen-then-rejected rows -> [B*2*T, ...] with each pair's rows adjacent."""
    return t.reshape(2, b, steps, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _batch_order(t: Tensor, b: int, steps: int) -> Tensor:
    """The inverse of `_pair_major`."""
    return t.reshape(b, 2, steps, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


class _PreferenceMath(_chunked.LossMath):
    """The driver's view of the loss: rows in pair-major order (each chosen row next to its
    rejected row), so that a chunk of whole pairs has its share of the loss final (batch-level
    normalizers are known up front). Pairs longer than a chunk run two phases."""

    def __init__(self, cfg: PreferenceLossConfig, rows: list[Tensor]):
        valid, ref = rows  # [2B, T] bool, [2B] fp32 (empty: reference-free)
        self.cfg = cfg
        self.b, self.steps = valid.shape[0] // 2, valid.shape[1]
        self.group = 2 * self.steps
        self.valid = valid.view(2, self.b, self.steps)  # [2, B, T]
        self.ref = None if ref.numel() == 0 else ref.view(2, self.b)  # [2, B]
        self.norm = (self.b, self.valid[0].sum().to(torch.float32))

    def layout(self, t):
        return _pair_major(t, self.b, self.steps)

    def restore(self, t):
        return _batch_order(t, self.b, self.steps)

    def loss(self, s, e, logp, entropy):
        p0, p1 = s // self.group, e // self.group
        lp = logp.view(p1 - p0, 2, self.steps).transpose(0, 1).reshape(-1, self.steps)  # [2k, T]
        ref = None if self.ref is None else self.ref[:, p0:p1].reshape(-1)
        valid = self.valid[:, p0:p1].reshape(-1, self.steps)
        loss, _, _ = _pair_loss(lp, valid, ref, self.cfg, self.norm)
        return loss


_chunked.register_family("preference", PreferenceLossConfig, _PreferenceMath)


# ----------------------------------------------------------------------------- public API
def _check_inputs(hidden, weight, targets, mask, ref_logp, bias, cfg, vocab) -> Tensor:
    """Validates everything; returns the valid-token mask [2B, T] bool."""
    if not isinstance(cfg, PreferenceLossConfig):
        raise TypeError(f"config must be a PreferenceLossConfig, got {type(cfg).__name__}")
    check_tensor("hidden", hidden, dim=3, layout="[2B, T, H] (chosen rows, then rejected)")
    check_linear_inputs(hidden, weight, targets, bias, cfg.ignore_index, vocab)
    rows, steps = targets.shape
    if rows == 0 or rows % 2:
        raise ValueError(f"hidden.shape[0] must be even and > 0 (rows [:B] chosen, [B:] "
                         f"rejected), got {rows}")
    check_tensor("mask", mask, "mask", shape={"[2B, T]": (rows, steps)}, device=hidden.device)
    if ref_logp is not None:
        if cfg.loss_type in REFERENCE_FREE:
            raise ValueError(f"loss_type {cfg.loss_type!r} is reference-free: pass ref_logp=None")
        check_tensor("ref_logp", ref_logp, shape={"[2B] (sequence log-prob sums)": (rows,)},
                     device=hidden.device, finite=True)
    valid = (mask != 0) & (targets != cfg.ignore_index)  # [2B, T]
    if not torch.compiler.is_compiling():
        empty = (~valid.any(-1)).nonzero().flatten()
        if empty.numel():
            raise ValueError(f"mask: rows {empty.tolist()[:8]} have no valid token (mask and "
                             f"targets != ignore_index); every sequence needs at least one")
    return valid


def preference_loss(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, *,
                    ref_logp: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    config: PreferenceLossConfig = PreferenceLossConfig(), vocab_group=None
                    ) -> tuple[Tensor, PreferenceLossOutput]:
    """Pairwise preference loss over sequence log-probs under the LM head.

    hidden [2B, T, H] (chosen rows then rejected rows), weight [V, H], targets [2B, T] int,
    mask [2B, T] (nonzero = completion token; positions whose target is ignore_index are
    excluded too). ref_logp [2B]: reference sequence log-prob sums in the same order, or None
    (reference-free: ref = 0). Returns the scalar loss (fp32; fp64 for fp64 inputs on the
    reference path), differentiable in hidden, weight and bias, and a PreferenceLossOutput.
    The chunked impls compute the gradients during the forward (an op of `_chunked`, compile-safe:
    torch.compile(fullgraph=True) traces it), so each call supports one backward: a second
    backward through the same graph (retain_graph=True) raises; call the loss again.
    Metrics follow TRL: rewards are beta * log-ratio sums (beta * average log-prob for simpo /
    orpo), logps_* are the sequence scores the loss reads (sums; averages for simpo / orpo),
    nll is the token-mean NLL of the chosen completions.
    vocab_group: weight and bias are this rank's vocabulary shard, as in `linear_logprobs`;
    every other input is the same on every rank, and so are the loss and the outputs.
    """
    cfg = config
    weight, bias, vocab = _vocab_parallel.shard(weight, bias, vocab_group)
    valid = _check_inputs(hidden, weight, targets, mask, ref_logp, bias, cfg, vocab)
    impl = resolve(cfg.impl, hidden.device)
    rows, steps = targets.shape
    if impl == "reference":
        logp, _ = linear_logprobs_reference(hidden, weight, targets, bias, cfg.transform(),
                                            cfg.ignore_index, vocab and vocab.group)
        ref = None if ref_logp is None else ref_logp.to(logp.dtype)
        loss, seq, metrics = _pair_loss(logp, valid, ref, cfg)
    else:
        inputs = _chunked.Inputs(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                 targets.reshape(-1).long())
        ref = None if ref_logp is None else ref_logp.float()
        loss, logp, _, _ = _chunked.run("preference", cfg, impl, inputs, [valid, ref], vocab)
        with torch.no_grad():
            _, seq, metrics = _pair_loss(logp.view(rows, steps), valid, ref, cfg)
    b = rows // 2
    seq = seq.detach().float()
    out = PreferenceLossOutput(seq[:b], seq[b:],
                               dict(zip(METRIC_KEYS, metrics.detach().float().unbind())))
    return loss, out
