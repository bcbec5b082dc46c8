"""GRPO: group sampling, verifiable rewards, group-relative advantages, clipped policy loss.

One step:
  1. rollout   `rollout.prompts_per_step` prompts x `rollout.samples_per_prompt` samples (KV
               cache, temperature, top_p, max_new_tokens, stop at EOS; `decoder=hf` uses
               model.generate); rollout.rollout_and_score, shared with PPO
  2. rewards   weighted reward functions -> [B]; `rlfuse.group_advantages` -> A [B]
  3. no grad   old log-probs of the sampling policy and reference log-probs (frozen copy,
               or the LoRA base with the adapter off), both [B, T-1] via linear_logprobs
  4. optimize  `passes` passes x `mini_batches` optimizer steps of `rlfuse.policy_loss`
               (every PolicyLossConfig option: grpo/bnpo/dr_grpo/dapo/cispo/sapo/ppo, GSPO,
               clip-higher, KL estimators, entropy bonus...) + optional NLL on SFT data.
Simplified: rollouts and training alternate on the same model; the loss uses the sampling
temperature (as TRL does), so old log-probs match the sampling distribution. Under torchrun each
rank samples the groups of its share of the prompts; the advantages come from every rank's
rewards (gathered), and token-normalized losses from every rank's token count.
"""
from __future__ import annotations

import time

import rlfuse

from . import distributed, vocab_parallel
from .config import ConfigError
from .data import IGNORE, Sampler, read_jsonl
from .model import Reference, head, scored_hidden, sequence_logprobs
from .rewards import build_rewards
from .rollout import minibatch_steps, rollout_and_score
from .sft import Demonstrations, nll_loss
from .trainer import Trainer

# The loss types whose normalizer is a token count (kernels/policy.py `_normalizer`); the others
# average over sequences, which the wrappers' gradient averaging keeps global as it is.
TOKEN_NORMALIZED = ("bnpo", "ppo", "dapo", "cispo")


class GRPOTrainer(Trainer):
    name = "grpo"

    def __init__(self, cfg, model=None, tokenizer=None, reward_fn=None):
        super().__init__(cfg, model, tokenizer)
        g = cfg.grpo
        if not g.data:
            raise ValueError("GRPO needs prompts: set grpo.data to a JSONL file with a "
                             "'prompt' field (and 'answer' for the exact_answer verifier)")
        self.prompts = read_jsonl(g.data, ("prompt",))
        distributed.check_share("grpo.rollout.prompts_per_step", g.rollout.prompts_per_step)
        if g.rollout.completions_per_step // distributed.world() % g.mini_batches:
            raise ConfigError(f"config key 'grpo.mini_batches' must divide each rank's "
                              f"{g.rollout.completions_per_step // distributed.world()} "
                              f"completions per step under {distributed.world()} processes")
        self.sampler = Sampler(len(self.prompts), g.rollout.prompts_per_step, cfg.seed)
        self.reward_fn = reward_fn or build_rewards(g.rollout.rewards)
        self.reference = Reference(self.model, cfg.model.reference) if g.reference else None
        self.loss_cfg = head(self.model).loss_config(g.loss, "grpo.loss", g.rollout.temperature)
        self.sft = None
        if g.sft_coef > 0:
            if not cfg.sft.data:
                raise ValueError("grpo.sft_coef > 0 needs SFT demonstrations in sft.data")
            self.sft = Demonstrations(read_jsonl(cfg.sft.data, ("prompt", "completion")),
                                      self.tok, cfg.sft.batch_size, cfg.max_length, cfg.seed + 1)
        self.prepare()

    def train_step(self) -> dict:
        g = self.cfg.grpo
        rows = [self.prompts[i] for i in distributed.share(self.sampler.next())]

        # 1-2. rollout: G samples per prompt, grouped contiguously, and their rewards
        with self.wrapped.inference():
            scored = self.forward(rollout_and_score, self.model, self.tok, rows, g.rollout,
                                  self.reward_fn, self.cfg.max_length,
                                  self.loss_cfg.rollout_correction is not None)
        batch = scored.batch
        # group-relative advantages, over every rank's groups
        rewards, mine = distributed.gather_rows(scored.rewards)
        adv, adv_stats = rlfuse.group_advantages(rewards, g.rollout.samples_per_prompt,
                                                 scale=g.advantage_scale,
                                                 estimator=g.advantage_estimator)
        adv = adv[mine]

        # 3-4. old / reference log-probs, then the optimization passes
        t1 = time.perf_counter()
        stats = self.optimize(batch, adv.to(self.device))
        t_train = time.perf_counter() - t1

        n_tokens = batch.attention_mask.sum().item()
        return {**stats,
                "reward_mean": adv_stats["reward_mean"].item(),  # over scored completions
                "reward_std": adv_stats["reward_std"].item(),
                "frac_unscored": adv_stats["frac_unscored"].item(),
                "frac_zero_std_groups": float(adv_stats.get("frac_zero_std", 0.0)),
                **getattr(self.reward_fn, "last", {}),
                **scored.metrics(),
                "train_tokens_per_s": n_tokens * g.passes / t_train}

    def optimize(self, batch, adv) -> dict:
        """`passes` x `mini_batches` optimizer steps of the policy loss on one rollout batch."""
        g = self.cfg.grpo
        t = self.loss_cfg.temperature
        # old log-probs of the sampling policy (on-policy ratio when there is one update)
        with self.wrapped.inference():
            old = self.forward(sequence_logprobs, self.model, batch, t) \
                if g.passes * g.mini_batches > 1 else None
            ref = self.reference.logprobs(batch, t) if self.reference else None
        token_normalized = self.loss_cfg.loss_type in TOKEN_NORMALIZED

        def losses(mb):  # inside the wrapper's forward
            b, h = batch[mb], head(self.model)
            hid, c = scored_hidden(self.model, b)
            # a vocab-parallel head scores every rank's rows: its loss is the global one
            hid, targets, a, old_mb, ref_mb, roll_mb, _ = vocab_parallel.whole_batch(
                h, hid, b.targets[:, c:], adv[mb], None if old is None else old[mb, c:],
                None if ref is None else ref[mb, c:],
                None if b.rollout_logp is None else b.rollout_logp[:, c:])
            loss, out = rlfuse.policy_loss(
                hid, h.weight, targets, targets != IGNORE, a, bias=h.bias, old_logp=old_mb,
                ref_logp=ref_mb, rollout_logp=roll_mb, config=self.loss_cfg,
                vocab_group=h.vocab_group)
            if token_normalized:
                loss = loss * distributed.token_share(out.metrics["tokens"])
            metrics = {"loss": loss.item(), **{k: v.item() for k, v in out.metrics.items()}}
            if ref is not None:  # per-token mean x tokens / rows: the mean sequence KL
                metrics["kl_seq"] = metrics["kl"] * metrics["tokens"] / targets.shape[0]
            if h.vocab is not None:
                metrics = vocab_parallel.local_tokens(metrics, b.mask)
            if self.sft is not None:
                nll, _ = nll_loss(self.model, self.sft.next(self.device))
                loss = loss + g.sft_coef * nll
                metrics["sft_nll"] = nll.item()
            return loss, metrics

        def step(mb):
            return self.forward(losses, mb)

        return minibatch_steps(self, batch.input_ids.shape[0], g.passes, g.mini_batches, step)

    def state_dict(self) -> dict:
        state = {"sampler": self.sampler.state_dict()}
        if self.sft is not None:
            state["sft_sampler"] = self.sft.sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        if self.sft is not None and "sft_sampler" in state:
            self.sft.sampler.load_state_dict(state["sft_sampler"])
