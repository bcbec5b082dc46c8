"""TRL 1.16's GRPOTrainer and DPOTrainer on rlfuse's fused LM-head ops: change the import only.

    from rlfuse.integrations.trl import GRPOTrainer   # instead of: from trl import GRPOTrainer

Constructor, configs (`trl.GRPOConfig`, `trl.DPOConfig`), generation (vLLM included), logging and
checkpoints stay TRL's. TRL patches each model's forward with a fused LM head
(`trl.trainer.utils.add_fused_lm_head`): `model(..., labels=..., fused_lm_head=True)` runs the
backbone and returns per-token log-probs (entropy, mean logit, is-top-1) without the
[tokens x vocab] logits. These subclasses replace that head with rlfuse's, with the transform TRL
chose (temperature, logit_scale, final_logit_softcapping, cast_lm_head_to_fp32), read from TRL's
own patch so the two cannot disagree:
  * every log-prob TRL asks for (GRPO's old and reference log-probs, DPO's policy, reference and
    precomputed reference ones) is `rlfuse.linear_logprobs` over the scored tokens only;
  * GRPO's loss is `rlfuse.policy_loss`, run inside the model's forward (`rlfuse_loss=`), so the
    DDP / FSDP / DeepSpeed hooks fire as in TRL; token-level losses get their LM-head gradient
    during the forward (6·N·H·V FLOPs instead of 8). Its metrics are TRL's, computed by TRL's
    formulas from the fused op's detached log-probs and reduced across processes as TRL does;
  * DPO's loss math stays TRL's on the per-sequence sums (every loss type, loss_weights,
    f-divergences, ld_alpha, label smoothing, rows without completion tokens: TRL's code), over
    rlfuse's differentiable log-probs.
GRPO options the fused loss does not reproduce exactly run TRL's own `_compute_loss` (over
rlfuse's log-probs), and head features rlfuse lacks run TRL's own head; each says so once, in a
warning naming the option (`GRPOTrainer._fallback`, `_Head.unsupported`).

GRPO: TRL option -> rlfuse's PolicyLossConfig (fused), or the fallback
    loss_type grpo bnpo dr_grpo dapo cispo sapo    loss_type (same normalizers; TRL's division
                                                   by the accumulation steps is applied here)
    loss_type luspo, vespo                         fallback
    epsilon, epsilon_high                          eps_low, eps_high (cispo: epsilon_high - 1;
                                                   fallback below 1)
    delta, importance_sampling_level, sapo_*       delta, importance_level, sapo_temperature_*
    beta, use_bias_correction_kl                   beta, kl_estimator="k3", kl_times_ratio
    num_items_in_batch (dapo, cispo)               num_items_in_batch: TRL's count / processes
                                                   x accumulation / steps_per_generation
    top_entropy_quantile                           top_entropy_quantile (1 process; fallback
                                                   on more: TRL's quantile spans processes)
    vllm_importance_sampling_correction (any mode) rollout_correction="mis" encoding TRL's
                                                   weight (`_sampler_weight_as_rollout`)
    mask_truncated_completions, tool_mask          the masks TRL leaves in the batch
    temperature, logit_scale, softcapping, cast_lm_head_to_fp32   the head's options
    entropy_coef (bnpo dr_grpo dapo cispo)         entropy_coef rescaled to TRL's token mean
    entropy_coef (grpo sapo; with the quantile), use_adaptive_entropy,
    off_policy_mask_threshold, router aux loss, multimodal inputs      fallback
"""
from __future__ import annotations

import functools
import inspect
import types
import warnings
from typing import Optional

import torch
import trl
from accelerate.utils import (convert_outputs_to_fp32, get_mixed_precision_context_manager,
                              is_peft_model)
from torch import Tensor
from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx, nanmax, nanmin

from .. import LogitTransform, PolicyLossConfig, linear_logprobs, policy_loss

__all__ = ["GRPOTrainer", "DPOTrainer"]

FUSED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo")  # the fused ones TRL clips (and logs clip_ratio/*)
# Batch keys of multimodal models, whose backbones take extra inputs and slice them per row.
MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes",
              "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _warn_once(trainer, option: str, what: str) -> None:
    warned = trainer.__dict__.setdefault("_rlfuse_warned", set())
    if option not in warned:
        warned.add(option)
        warnings.warn(f"rlfuse.integrations.trl: {option}: {what}", stacklevel=3)


# ----------------------------------------------------------------------------- the LM head
class _Head:
    """rlfuse's forward in place of the one TRL's `add_fused_lm_head` put on `model`.

    `model(..., fused_lm_head=True)` returns TRL's `FusedCausalLMOutput` computed by rlfuse;
    `model(..., rlfuse_loss=fn)` returns fn(hidden [B, T-1, H], labels [B, T-1], weight, bias,
    head) for the (already shifted) positions, run inside the forward. Anything else goes to
    TRL's forward (generation included)."""

    def __init__(self, trl_forward):
        func = getattr(trl_forward, "__func__", None)
        env = {} if func is None else inspect.getclosurevars(func).nonlocals
        if "backbone_attr" not in env:
            raise RuntimeError("rlfuse.integrations.trl: the model has no TRL fused LM head to "
                               "replace (this integration is written against trl==1.16.0)")
        self.trl_forward = trl_forward
        self.backbone_attr = env["backbone_attr"]
        self.cast_fp32 = env["cast_lm_head_to_fp32"]
        self.outputs = env["outputs"]
        self.unsupported: Optional[tuple[str, str]] = None  # (option, why): TRL's head runs
        try:
            self.transform = LogitTransform(env["logit_scale"], env["final_logit_softcapping"],
                                            env["temperature"])
        except ValueError as e:
            self.unsupported = ("logit transform", str(e))
        if "log_sum_sq_probs" in self.outputs:
            self.unsupported = ("use_weighting", "WPO's log(sum p^2) is not an rlfuse output")
        if getattr(env["text_config"], "output_router_logits", False):
            self.unsupported = ("output_router_logits", "the MoE load-balancing loss")

    @property
    def options(self) -> dict:
        """The LM-head options of rlfuse's loss configs for this head."""
        tf = self.transform
        return {"temperature": tf.temperature, "logit_scale": tf.logit_scale,
                "final_logit_softcapping": tf.final_logit_softcapping}

    def forward(self, module, *args, fused_lm_head=False, rlfuse_loss=None, labels=None,
                shift_labels=None, num_items_in_batch=None, **kwargs):
        if rlfuse_loss is None and (not fused_lm_head or self.unsupported):
            return self.trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels,
                                    shift_labels=shift_labels,
                                    num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        # The backbone and the head are looked up per call: FSDP and PEFT replace them.
        hidden = getattr(module, self.backbone_attr)(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        lm_head = module.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        if isinstance(weight, torch.distributed.tensor.DTensor):  # FSDP2: gather the head once
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        dev = hidden.device.type
        if self.cast_fp32:
            hidden = hidden.float()
        elif torch.is_autocast_enabled(dev):  # TRL's head multiplies in the autocast dtype
            hidden = hidden.to(torch.get_autocast_dtype(dev))
        # From here rlfuse's dtype rule (bf16 / fp16 operands where the hardware has them, fp32
        # accumulation): autocast would recast its chunk GEMMs.
        with torch.autocast(dev, enabled=False), \
                maybe_gather_lm_head_ctx(weight, bias):
            if rlfuse_loss is not None:
                return rlfuse_loss(hidden, labels, weight, bias, self)
            return self._scores(hidden, labels, weight, bias, num_items_in_batch)

    def _scores(self, hidden, labels, weight, bias, num_items_in_batch) -> FusedCausalLMOutput:
        mask = labels != -100  # [B, T]
        x, t = hidden[mask], labels[mask]  # [M, H], [M]: only the scored tokens
        tf = self.transform
        logp, ent, *summary = linear_logprobs(  # + mean logit, is-top-1 from the same pass
            x, weight, t, bias=bias, temperature=tf.temperature, return_entropy=True,
            logit_scale=tf.logit_scale, final_logit_softcapping=tf.final_logit_softcapping,
            return_logit_summary="mean_logits" in self.outputs or "is_top1" in self.outputs)
        fields = {"log_probs": logp, "entropy": ent if "entropy" in self.outputs else None}
        for name, value in zip(("mean_logits", "is_top1"), summary):
            fields[name] = value if name in self.outputs else None
        # masked_scatter keeps an all-masked batch connected to the graph (a zero gradient)
        fields = {k: None if v is None else v.new_zeros(mask.shape).masked_scatter(mask, v)
                  for k, v in fields.items()}
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-fields["log_probs"].sum() / count, label_mask=mask,
                                   **fields)


def _install_heads(trainer) -> None:
    """Put rlfuse's head on the policy (its base model under PEFT) and the reference model, where
    TRL put its own; idempotent (DPO's reference precompute runs inside TRL's constructor)."""
    model = trainer.model
    targets = [model.get_base_model() if is_peft_model(model) else model]
    if getattr(trainer, "ref_model", None) is not None:
        targets.append(trainer.accelerator.unwrap_model(trainer.ref_model))
    for m in targets:
        if "_rlfuse_head" in m.__dict__:
            continue
        # accelerate's mixed-precision wrapper keeps the forward it wrapped (TRL's) here
        amp = "_original_forward" in m.__dict__
        head = _Head(m.__dict__["_original_forward" if amp else "forward"])
        if head.unsupported:
            option, why = head.unsupported
            _warn_once(trainer, option, f"{why}; TRL's own LM head runs for this model")

        @functools.wraps(type(m).forward)  # generate validates model kwargs against it
        def forward(self, *args, _head=head, **kwargs):
            return _head.forward(self, *args, **kwargs)

        m._rlfuse_head = head
        m.forward = types.MethodType(forward, m)
        if amp:  # rebuild the wrapper around ours, as accelerate's prepare_model builds it
            acc = trainer.accelerator
            m._original_forward = m.forward
            ctx = get_mixed_precision_context_manager(acc.native_amp, acc.autocast_handler)
            m.forward = types.MethodType(convert_outputs_to_fp32(ctx(forward)), m)


def _head_of(model) -> _Head:
    for m in model.modules():
        head = m.__dict__.get("_rlfuse_head")
        if head is not None:
            return head
    raise RuntimeError("rlfuse.integrations.trl: no rlfuse head on the model")


# ----------------------------------------------------------------------------- GRPO
def _sampler_weight_as_rollout(weight: Tensor, old: Tensor) -> tuple[Tensor, float]:
    """TRL's precomputed sampler weight w >= 0 ([B, T] or [B, 1], finite) in rlfuse's rollout
    correction, which weighs each token by exp(old - rollout): rollout = old - log(w) gives w back
    (to fp32 rounding) under mode "mis" with a cap c above every w, and w = 0 (TRL's masked
    tokens or sequences) is sent as 2c, which "mis" zeroes. -> (rollout [B, T], c)."""
    w = weight.float().expand_as(old)
    cap = 2.0 * float(w.max()) + 1.0
    w = torch.where(w > 0, w, torch.full_like(w, 2 * cap))
    return old - torch.log(w), cap


class GRPOTrainer(trl.GRPOTrainer):
    """`trl.GRPOTrainer` with the loss, the old and the reference log-probs computed by rlfuse's
    fused ops (module docstring). Same constructor and `trl.GRPOConfig`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _install_heads(self)

    def _fallback(self, inputs) -> Optional[tuple[str, str]]:
        """(option, why) when the fused loss would not be TRL's exactly; None when it is."""
        lt = self.loss_type
        if lt not in FUSED_LOSS_TYPES:
            return f"loss_type={lt!r}", "not an rlfuse loss type"
        if self._sampler_weight(inputs) is not None and (
                inputs.get("old_per_token_logps") is None
                or not bool(torch.isfinite(inputs["importance_sampling_ratio"]).all())):
            return ("vllm_importance_sampling_correction",
                    "a non-finite sampler weight, or no old log-probs to encode it against")
        if self.off_policy_mask_threshold is not None:
            return "off_policy_mask_threshold", "a sequence mask from the new log-probs"
        if self._entropy_bonus_enabled and (self.use_adaptive_entropy or lt in ("grpo", "sapo")
                                            or self.top_entropy_quantile < 1.0):
            return ("entropy_coef / use_adaptive_entropy",
                    "TRL's bonus is a token mean that rlfuse's entropy_coef matches only at a "
                    "fixed coefficient, on all tokens, under a per-token-constant normalizer")
        if self.top_entropy_quantile < 1.0 and self.accelerator.num_processes > 1:
            return "top_entropy_quantile", "TRL's threshold is a quantile across processes"
        if self.aux_loss_enabled:
            return "router_aux_loss_coef", "the MoE load-balancing loss"
        if lt == "cispo" and self.epsilon_high < 1:
            return "epsilon_high", "cispo's ratio cap below 1"
        if lt in CLIPPED and self.args.delta is not None and self.args.delta <= 1:
            return "delta", "a two-sided clip bound <= 1"
        extra = [k for k in MULTIMODAL if inputs.get(k) is not None]
        if extra:
            return f"inputs {extra}", "multimodal inputs"
        return None

    def _sampler_weight(self, inputs) -> Optional[Tensor]:
        """TRL's vLLM importance-sampling weight ([B, T] or [B, 1]) where the loss applies it."""
        if self.use_vllm and self.vllm_importance_sampling_correction and \
                self.loss_type != "vespo":
            return inputs["importance_sampling_ratio"]
        return None

    def _loss_config(self, head: _Head, **extra) -> PolicyLossConfig:
        """TRL's loss options as rlfuse's (the table in the module docstring)."""
        lt, a = self.loss_type, self.args
        return PolicyLossConfig(
            loss_type=lt, importance_level=self.importance_sampling_level,
            eps_low=self.epsilon_low,
            # TRL's cispo caps the ratio at epsilon_high; rlfuse's at 1 + eps_high
            eps_high=self.epsilon_high - 1 if lt == "cispo" else self.epsilon_high,
            delta=a.delta if lt in CLIPPED else None,
            beta=self.beta, kl_estimator="k3", kl_times_ratio=bool(a.use_bias_correction_kl),
            top_entropy_quantile=self.top_entropy_quantile,
            max_completion_length=self.max_completion_length if lt == "dr_grpo" else None,
            sapo_temperature_pos=a.sapo_temperature_pos,
            sapo_temperature_neg=a.sapo_temperature_neg, **head.options, **extra)

    def _compute_loss(self, model, inputs):
        head = _head_of(model)
        reason = head.unsupported or self._fallback(inputs)
        if reason:
            _warn_once(self, reason[0], f"{reason[1]}; GRPOTrainer runs TRL's own loss "
                                        "computation for it (on rlfuse's log-probs where the "
                                        "head is rlfuse's)")
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        k = completion_ids.size(1)
        mask = completion_mask * inputs["tool_mask"] if "tool_mask" in inputs else completion_mask
        labels = input_ids.masked_fill(attention_mask == 0, -100)  # TRL's labels
        labels[:, :-k] = -100
        old = inputs.get("old_per_token_logps")
        ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1
        num_items, scale = None, 1.0 / accum  # scale: of the op's loss, as TRL scales its own
        if self.loss_type in ("dapo", "cispo"):  # TRL's normalizer: generation batch -> window
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * accum / self.args.steps_per_generation
            scale = 1.0
        entropy_coef, w = 0.0, 0.0
        if self._entropy_bonus_enabled:
            # TRL's bonus is entropy_coef * (sum of H over the mask / its count) / accum; rlfuse's
            # is scale * c * w * (sum of H over the mask), w its per-token weight (constant for
            # the loss types that get here, see _fallback).
            count = float(mask.sum().clamp(min=1.0))
            if num_items is not None:  # dapo, cispo
                w = 1.0 / float(num_items)
            elif self.loss_type == "dr_grpo":
                w = 1.0 / (mask.shape[0] * self.max_completion_length)
            else:  # bnpo
                w = 1.0 / count
            entropy_coef = self.entropy_coef / (count * w * scale * accum)

        rollout_logp, rollout = None, {}
        if self._sampler_weight(inputs) is not None:
            rollout_logp, cap = _sampler_weight_as_rollout(self._sampler_weight(inputs), old)
            rollout = {"rollout_correction": "mis", "rollout_correction_cap": cap}

        def fused_loss(hidden, shifted_labels, weight, bias, head):
            return policy_loss(hidden[:, -k:], weight, shifted_labels[:, -k:], mask,
                               inputs["advantages"], old_logp=old, ref_logp=ref,
                               rollout_logp=rollout_logp, bias=bias,
                               num_items_in_batch=num_items,
                               config=self._loss_config(head, entropy_coef=entropy_coef,
                                                        **rollout))

        loss, out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          fused_lm_head=True, rlfuse_loss=fused_loss)
        if self._entropy_bonus_enabled:  # TRL's logs: the loss before the bonus, the coefficient
            bonus = entropy_coef * w * (out.entropy * mask).sum()
            self._metrics[mode]["policy_loss"].append(
                self.accelerator.gather(loss.detach() + bonus).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        self._log_loss_metrics(mode, out.logp, out.entropy, old, ref, inputs["advantages"], mask)
        return loss * scale

    @torch.no_grad()
    def _log_loss_metrics(self, mode, logp, entropies, old, ref, advantages, mask) -> None:
        """TRL's `_compute_loss` metrics, by TRL's formulas and cross-process reductions."""
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        log_ratio = logp - (logp if old is None else old)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef_1 = torch.exp(log_ratio)

        def masked_seq_mean(x):
            if x.shape[1] == 1:
                return x.squeeze(1)
            return (x * mask).sum(-1) / mask.sum(-1)

        def global_masked_mean(x):
            if x.shape[1] == 1:
                local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
            else:
                local_sum, local_count = (x * mask).sum(), mask.sum().float()
            totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        m = self._metrics[mode]
        if self.beta != 0.0:
            kl = torch.exp(ref - logp) - (ref - logp) - 1
            if self.args.use_bias_correction_kl:
                kl = kl * coef_1
            m["kl"].append(global_masked_mean(kl))
        m["entropy"].append(global_masked_mean(entropies))
        if self.loss_type in CLIPPED:
            if self.args.delta is not None:  # TRL's clip metrics read the delta-clamped ratio
                coef_1 = coef_1.clamp(max=self.args.delta)
            low = ((coef_1 < 1 - self.epsilon_low) & (advantages < 0)).float()
            high = ((coef_1 > 1 + self.epsilon_high) & (advantages > 0)).float()
            m["clip_ratio/low_mean"].append(global_masked_mean(low))
            m["clip_ratio/high_mean"].append(global_masked_mean(high))
            m["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
            m["clip_ratio/low_min"].append(
                nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
            m["clip_ratio/high_max"].append(
                nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
        elif self.loss_type == "cispo":
            clipped = ((coef_1 > self.epsilon_high) & (advantages > 0)).float()
            m["cispo_clip_ratio"].append(global_masked_mean(clipped))


# ----------------------------------------------------------------------------- DPO
class DPOTrainer(trl.DPOTrainer):
    """`trl.DPOTrainer` whose policy, reference and precomputed reference log-probs (and the
    entropy / logits / token-accuracy metrics) come from rlfuse's fused ops, under TRL's own loss
    math (module docstring). Same constructor and `trl.DPOConfig`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _install_heads(self)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        _install_heads(self)  # TRL's constructor precomputes before ours returns
        return super()._precompute_ref_logps(dataset, name, batch_size)
