"""Classic RLHF PPO: value head, KL-shaped per-token rewards, GAE, clipped policy and value losses.

One step:
  1. rollout   `rollout.prompts_per_step` prompts x `rollout.samples_per_prompt` completions
  2. score     verifier rewards and/or a sequence-classification reward model -> score [B]
               (minus `missing_eos_penalty` for completions that never stopped); steps 1-2 are
               rollout.rollout_and_score, shared with GRPO
  3. no grad   one backbone pass per chunk gives old log-probs [B, T-1] (fused linear_logprobs)
               and old values [B, T-1] (value head on the same hidden states); reference log-probs
  4. rewards   kl_in="reward": r_t = -kl_coef * KL_t on every completion token, plus the score
               at the last one (Ziegler et al. 2019, InstructGPT; TRL's PPOTrainer);
               kl_in="loss": r_t = score at the last token, beta = kl_coef in the policy loss
  5. GAE       A, R = rlfuse.gae(r, V_old, mask, gamma, lam); A whitened over the batch
  6. optimize  `epochs` x `mini_batches` steps; per minibatch the hidden states are computed once
               and feed both rlfuse.policy_loss(loss_type="ppo", per-token A, dual clip...) and
               the value head: loss = pg + vf_coef * rlfuse.value_loss(V, V_old, R, value_clip)
  7. KL        the adaptive controller moves kl_coef toward `kl_target` (Ziegler et al. 2019)
KL_t is `rlfuse.kl_estimate` with `loss.kl_estimator` on log pi_old - log pi_ref: k1 (TRL and
OpenRLHF's default, and PPO's here), k2 or k3; the same estimator as the loss's KL term.
Cost per step: two no-grad backbone passes (policy, reference) with 2·N·H·V LM-head FLOPs each,
then epochs x (backbone forward + backward, and the fused loss's 6·N·H·V); the LM head only ever
holds one [C, V] chunk of logits, the value head a [N] vector.
Critic: critic="shared" (default) puts a linear value head on the policy's own hidden states (its
gradient reaches the backbone, scaled by vf_coef); critic="separate" gives the value head its own
trainable copy of the initial policy's backbone (one more forward/backward per minibatch).
Simplified: rollouts and training alternate on the same model; the loss uses the sampling
temperature, so old log-probs match the sampler. Under torchrun each rank samples its share of
the prompts; steps 4, 5 and 7 run on every rank's per-token vectors (gathered, [B, T]), so the
whitening, the KL controller and the critic's start see the whole batch; the losses are
normalized by every rank's token count.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch
from torch import Tensor, nn

import rlfuse

from . import distributed, vocab_parallel
from .data import IGNORE, Sampler, check_prompt_lengths, encode, read_jsonl
from .model import Reference, head, head_logprobs, hidden_chunks, hidden_states
from .rewards import Weighted, build_rewards
from .rollout import minibatch_steps, rollout_and_score
from .trainer import Trainer


class ValueHead(nn.Module):
    """V(s_t) = w . h_t + b on the policy's hidden states, fp32; w = 0 at the start (the first
    updates push no value gradients into the backbone) and b = 0 until the trainer sets it to
    the first rollout's mean score (see PPOTrainer.train_step)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor) -> Tensor:  # [B, T, H] -> [B, T] fp32
        return self.proj(hidden.float()).squeeze(-1)


class KLController:
    """kl_coef: fixed, or adaptive toward a target KL (Ziegler et al. 2019; TRL's
    AdaptiveKLController): e = clip(KL / target - 1, -0.2, 0.2), coef *= 1 + e * n / horizon,
    with KL the mean sequence KL of the last rollout and n its number of samples."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n: int) -> bool:
        """Move the coefficient; returns whether the error was clipped (the controller saturated)."""
        if self.target is not None and math.isfinite(kl):
            raw = kl / self.target - 1.0
            err = min(max(raw, -0.2), 0.2)
            self.value *= 1.0 + err * n / self.horizon
            return err != raw
        return False


def token_rewards(scores: Tensor, mask: Tensor, kl: Tensor, kl_coef: float) -> Tensor:
    """[B, T]: -kl_coef * kl on completion tokens, plus scores [B] at each row's last one."""
    r = -kl_coef * kl * mask  # [B, T]
    last = (mask.long() * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)  # [B]
    return r.index_put((torch.arange(len(scores), device=r.device), last),
                       scores.to(r), accumulate=True)


def critic_hidden(critic, batch) -> Tensor:
    """Hidden states [B, T-1, H] of a separate critic backbone (a decoder stack)."""
    out = critic(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.last_hidden_state[:, :-1]


def ppo_loss(model, value_head, batch, adv, old_logp, old_values, returns, *, ref_logp=None,
             loss_cfg, vf_coef: float, value_clip: float | None, critic=None
             ) -> tuple[Tensor, dict]:
    """pg + vf_coef * value loss of one minibatch; without a separate `critic` backbone, the
    policy's backbone runs once and its hidden states feed both heads."""
    h = head(model)
    hid = hidden_states(model, batch.input_ids, batch.attention_mask)[:, :-1]  # [b, T-1, H]
    c = batch.first_target  # the LM head skips the columns that are prompt in every row
    # a vocab-parallel head scores every rank's rows: pg is then the global loss already
    x, targets, a, old, ref, roll, _ = vocab_parallel.whole_batch(
        h, hid[:, c:], batch.targets[:, c:], adv[:, c:], old_logp[:, c:],
        None if ref_logp is None else ref_logp[:, c:],
        None if batch.rollout_logp is None else batch.rollout_logp[:, c:])
    pg, out = rlfuse.policy_loss(x, h.weight, targets, targets != IGNORE, a, old_logp=old,
                                 ref_logp=ref, rollout_logp=roll, bias=h.bias, config=loss_cfg,
                                 vocab_group=h.vocab_group)
    values = value_head(hid if critic is None else critic_hidden(critic, batch))  # [b, T-1] fp32
    vf, vm = rlfuse.value_loss(values, old_values, returns, batch.mask, clip=value_clip)
    loss = (pg * distributed.token_share(out.metrics["tokens"])
            + vf_coef * vf * distributed.token_share(batch.mask.sum()))
    metrics = {"loss": loss.item(), "policy_loss": pg.item(), "value_loss": vf.item(),
               **{k: v.item() for k, v in vm.items()},
               **{k: v.item() for k, v in out.metrics.items()}}
    if h.vocab is not None:
        metrics = vocab_parallel.local_tokens(metrics, batch.mask)
    return loss, metrics


@torch.no_grad()
def rollout_stats(model, value_head, batch, temperature: float, critic=None):
    """Old log-probs and values [B, T-1] fp32, one policy backbone pass per chunk of rows."""
    h = head(model)
    logps, values = [], []
    for b, hid in hidden_chunks(model, batch):  # hid [b, T-1, H]
        logps.append(head_logprobs(hid, b, h, temperature))
        values.append(value_head(hid if critic is None else critic_hidden(critic, b)) * b.mask)
    return torch.cat(logps), torch.cat(values)


class PPOTrainer(Trainer):
    name = "ppo"

    def __init__(self, cfg, model=None, tokenizer=None, reward_fn=None):
        super().__init__(cfg, model, tokenizer)
        p = cfg.ppo
        if not p.data:
            raise ValueError("PPO needs prompts: set ppo.data to a JSONL file with a 'prompt' "
                             "field (and 'answer' for the exact_answer verifier)")
        self.prompts = read_jsonl(p.data, ("prompt",))
        distributed.check_share("ppo.rollout.prompts_per_step", p.rollout.prompts_per_step)
        if distributed.world() > 1:  # a rank that dropped rows (train_step's `keep`) would run
            # fewer minibatch forwards than the others, and the ranks' collectives would not pair
            check_prompt_lengths(encode(self.tok, [r["prompt"] for r in self.prompts]),
                                 cfg.max_length, p.data)
        self.sampler = Sampler(len(self.prompts), p.rollout.prompts_per_step, cfg.seed)
        self.reward_fn = reward_fn or self.build_reward()
        self.reference = Reference(self.model, cfg.model.reference)
        h = head(self.model)
        self.value_head = ValueHead(h.weight.shape[1]).to(self.device)
        self.critic = None  # separate: a trainable copy of the initial policy's backbone
        if p.critic == "separate":
            self.critic = copy.deepcopy(self.model.get_decoder()).train()
        self.kl_ctl = KLController(p.kl_coef, p.kl_target, p.kl_horizon)
        self.loss_cfg = h.loss_config(p.loss, "ppo.loss", p.rollout.temperature)
        # the value head (and critic) join the policy's AdamW (lr x value_lr_scale) and schedule
        critic = {"critic": self.critic} if self.critic is not None else {}
        self.prepare({"value_head": self.value_head, **critic}, p.value_lr_scale)

    def build_reward(self) -> Weighted:
        p = self.cfg.ppo
        terms = build_rewards(p.rollout.rewards).terms if p.reward in ("verifier", "both") else []
        if p.reward in ("model", "both"):
            from .reward_model import load_or_train

            scorer = load_or_train(p.reward_model, self.model, self.tok, self.cfg.out_dir,
                                   self.cfg.seed, self.cfg.max_length, self.cfg.progress)
            terms.append(("reward_model", 1.0, scorer))
        return Weighted(terms)

    def train_step(self) -> dict:
        p = self.cfg.ppo
        rows = [self.prompts[i] for i in distributed.share(self.sampler.next())]

        # 1-2. rollout and score
        with self.wrapped.inference():
            scored = self.forward(rollout_and_score, self.model, self.tok, rows, p.rollout,
                                  self.reward_fn, self.cfg.max_length,
                                  self.loss_cfg.rollout_correction is not None)
        scores, batch = scored.rewards, scored.batch
        if not bool(scores.isfinite().all()):  # GAE has no "unscored": NaN would reach the critic
            raise ValueError(f"PPO needs a finite score for every completion; the reward gave "
                             f"{int((~scores.isfinite()).sum())} of {len(scores)} NaN/inf")
        if p.missing_eos_penalty is not None:
            eos = self.tok.eos_token_id
            stopped = torch.tensor([bool(c) and c[-1] == eos
                                    for c in scored.rollout.completion_ids])
            scores = scores - p.missing_eos_penalty * (~stopped).float()
        keep = batch.mask.any(-1)  # rows whose completion max_length cut away (one process only)
        if not bool(keep.all()):
            batch, scores = batch[keep], scores[keep.cpu()]
        scores, mask = scores.to(self.device), batch.mask
        all_scores, _ = distributed.gather_rows(scores)
        if self.step == 0:
            # The critic starts at the score's scale, as TRL's and OpenRLHF's start from the reward
            # model: b <- mean score (with gamma = 1 the value of a final-token score is its
            # expectation). From b = 0, Adam moves b by ~lr a step, so for hundreds of steps the
            # weights would carry the mean instead, unevenly over positions: explained variance
            # went negative (to -0.46 on the demo) and the advantages carried that noise.
            with torch.no_grad():
                self.value_head.proj.bias.fill_(all_scores.mean().item())

        # 3. old log-probs and values, reference log-probs (at the loss's = sampling temperature)
        t1 = time.perf_counter()
        t = self.loss_cfg.temperature
        with self.wrapped.inference():
            old_logp, old_values = self.forward(rollout_stats, self.model, self.value_head, batch,
                                                t, self.critic)
        ref_logp = self.reference.logprobs(batch, t)

        # 4. per-token rewards (KL in the reward, or only the score) and 5. GAE, over every
        # rank's rows ([B, T-1] each, padded to the longest T)
        kl_coef = self.kl_ctl.value
        kl = rlfuse.kl_estimate(old_logp, ref_logp, self.loss_cfg.kl_estimator) * mask  # [B, T-1]
        all_mask, mine = distributed.gather_rows(mask)
        all_kl, all_values = (distributed.gather_rows(x)[0] for x in (kl, old_values))
        shaped = token_rewards(all_scores, all_mask, all_kl,
                               kl_coef if p.kl_in == "reward" else 0.0)
        all_adv, all_returns = rlfuse.gae(shaped, all_values, all_mask, gamma=p.gamma, lam=p.lam,
                                          whiten=p.whiten_advantages)
        adv, returns = (x[mine, :mask.shape[1]] for x in (all_adv, all_returns))

        # 6. PPO epochs over minibatches
        loss_cfg = self.loss_cfg
        if p.kl_in == "loss":
            loss_cfg = dataclasses.replace(loss_cfg, beta=kl_coef)

        def step(mb):
            return self.forward(ppo_loss, self.model, self.value_head, batch[mb], adv[mb],
                                old_logp[mb], old_values[mb], returns[mb], ref_logp=ref_logp[mb],
                                loss_cfg=loss_cfg, vf_coef=p.vf_coef, value_clip=p.value_clip,
                                critic=self.critic)

        stats = minibatch_steps(self, len(scores), p.epochs, p.mini_batches, step)
        t_train = time.perf_counter() - t1

        # 7. KL controller, on the rollout's mean sequence KL (every rank's rows)
        kl_seq = all_kl.sum(-1).mean().item()
        saturated = self.kl_ctl.update(kl_seq, len(all_scores))
        non_score = -(kl_coef * all_kl.sum(-1)).mean().item() if p.kl_in == "reward" else 0.0
        m = all_mask.float()
        return {**stats,
                "reward_mean": all_scores.mean().item(),
                "reward_std": all_scores.std().item() if len(all_scores) > 1 else 0.0,
                "non_score_reward": non_score,
                "rlhf_reward": all_scores.mean().item() + non_score,
                "kl_seq": kl_seq, "kl_coef": kl_coef,
                **({"kl_ctl_saturated": float(saturated)} if p.kl_target is not None else {}),
                "value_mean": ((all_values * m).sum() / m.sum()).item(),
                "returns_mean": ((all_returns * m).sum() / m.sum()).item(),
                **getattr(self.reward_fn, "last", {}),
                **scored.metrics(),
                "train_tokens_per_s": batch.attention_mask.sum().item() * p.epochs / t_train}

    def state_dict(self) -> dict:  # the value head and critic: Trainer.save (prepare's extra)
        return {"sampler": self.sampler.state_dict(),
                "kl_coef": torch.tensor(self.kl_ctl.value, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.kl_ctl.value = float(state["kl_coef"])
