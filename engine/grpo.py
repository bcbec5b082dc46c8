"""GRPO: group sampling, verifiable rewards, group-relative advantages, clipped policy loss.

One step:
  1. rollout   `prompts_per_step` prompts x `group_size` samples (KV cache, temperature,
               top_p, max_new_tokens, stop at EOS; `decoder=hf` uses model.generate)
  2. rewards   weighted reward functions -> [B]; `rlfuse.group_advantages` -> A [B]
  3. no grad   old log-probs of the sampling policy and reference log-probs (frozen copy,
               or the LoRA base with the adapter off), both [B, T-1] via linear_logprobs
  4. optimize  `passes` passes x `mini_batches` optimizer steps of `rlfuse.policy_loss`
               (every PolicyLossConfig option: grpo/bnpo/dr_grpo/dapo/cispo/sapo/ppo, GSPO,
               clip-higher, KL estimators, entropy bonus...) + optional NLL on SFT data.
Simplified: one process, rollouts and training alternate on the same model; the loss uses the
sampling temperature (as TRL does), so old log-probs match the sampling distribution.
"""
from __future__ import annotations

import dataclasses
import time

import torch

import rlfuse

from .data import Sampler, pack, read_jsonl, sft_batch
from .model import Reference, head, scored_hidden, sequence_logprobs
from .rewards import build_rewards
from .rollout import generate
from .sft import nll_loss
from .trainer import Trainer


def _mean(rows: list[dict]) -> dict:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


class GRPOTrainer(Trainer):
    name = "grpo"

    def __init__(self, cfg, model=None, tokenizer=None, reward_fn=None):
        super().__init__(cfg, model, tokenizer)
        g = cfg.grpo
        if not g.data:
            raise ValueError("GRPO needs prompts: set grpo.data to a JSONL file with a "
                             "'prompt' field (and 'answer' for the exact_answer verifier)")
        self.prompts = read_jsonl(g.data, ("prompt",))
        self.sampler = Sampler(len(self.prompts), g.prompts_per_step, cfg.seed)
        self.reward_fn = reward_fn or build_rewards(g.rewards)
        self.reference = Reference(self.model) if g.reference or g.loss.beta > 0 else None
        h = head(self.model)
        self.loss_cfg = dataclasses.replace(
            g.loss, temperature=g.temperature, logit_scale=h["logit_scale"],
            final_logit_softcapping=h["final_logit_softcapping"])
        self.sft = None
        if g.sft_coef > 0:
            if not cfg.sft.data:
                raise ValueError("grpo.sft_coef > 0 needs SFT demonstrations in sft.data")
            self.sft = read_jsonl(cfg.sft.data, ("prompt", "completion"))
            self.sft_sampler = Sampler(len(self.sft), cfg.sft.batch_size, cfg.seed + 1)

    def train_step(self) -> dict:
        g, G = self.cfg.grpo, self.cfg.grpo.group_size
        rows = [self.prompts[i] for i in self.sampler.next()]

        # 1. rollout: G samples per prompt, grouped contiguously
        t0 = time.perf_counter()
        prompts = [r["prompt"] for r in rows for _ in range(G)]
        roll = generate(self.model, self.tok, [r["prompt"] for r in rows], n=G,
                        temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens,
                        decoder=g.decoder)
        t_gen = time.perf_counter() - t0

        # 2. rewards -> group-relative advantages
        columns = {k: [r[k] for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
        rewards = torch.tensor(self.reward_fn(prompts, roll.texts, **columns), dtype=torch.float32)
        adv, adv_stats = rlfuse.group_advantages(rewards, G, scale=g.advantage_scale,
                                                 estimator=g.advantage_estimator)
        batch = pack(roll.prompt_ids, roll.completion_ids, self.tok.pad_token_id,
                     self.cfg.max_length).to(self.device)
        adv = adv.to(self.device)

        # 3-4. old / reference log-probs, then the optimization passes
        t1 = time.perf_counter()
        stats = self.optimize(batch, adv)
        t_train = time.perf_counter() - t1

        n_tokens = batch.attention_mask.sum().item()
        return {**stats,
                "reward_mean": adv_stats["reward_mean"].item(),  # over scored completions
                "reward_std": adv_stats["reward_std"].item(),
                "frac_unscored": adv_stats["frac_unscored"].item(),
                "frac_zero_std_groups": float(adv_stats.get("frac_zero_std", 0.0)),
                **getattr(self.reward_fn, "last", {}),
                "completion_length": sum(roll.lengths) / len(roll.lengths),
                "rollout_tokens_per_s": sum(roll.lengths) / t_gen,
                "train_tokens_per_s": n_tokens * g.passes / t_train}

    def optimize(self, batch, adv) -> dict:
        """`passes` x `mini_batches` optimizer steps of the policy loss on one rollout batch."""
        g = self.cfg.grpo
        # old log-probs of the sampling policy (on-policy ratio when there is one update)
        old = sequence_logprobs(self.model, batch, g.temperature) \
            if g.passes * g.mini_batches > 1 else None
        ref = self.reference.logprobs(batch, g.temperature) if self.reference else None
        h, stats = head(self.model), []
        for _ in range(g.passes):
            for mb in torch.randperm(batch.input_ids.shape[0]).chunk(g.mini_batches):
                b = batch[mb]
                hid, c = scored_hidden(self.model, b)
                loss, out = rlfuse.policy_loss(
                    hid, h["weight"], b.targets[:, c:], b.mask[:, c:], adv[mb], bias=h["bias"],
                    old_logp=None if old is None else old[mb, c:],
                    ref_logp=None if ref is None else ref[mb, c:], config=self.loss_cfg)
                step = {"loss": loss.item(), **{k: v.item() for k, v in out.metrics.items()}}
                if self.sft is not None:
                    nll, _ = nll_loss(self.model, self.sft_batch())
                    loss = loss + g.sft_coef * nll
                    step["sft_nll"] = nll.item()
                loss.backward()
                step["grad_norm"] = self.optimizer_step()
                stats.append(step)
        return {**_mean(stats), "grad_norm_max": max(s["grad_norm"] for s in stats)}

    def sft_batch(self):
        rows = [self.sft[i] for i in self.sft_sampler.next()]
        return sft_batch(self.tok, [r["prompt"] for r in rows], [r["completion"] for r in rows],
                         self.cfg.max_length).to(self.device)

    def state_dict(self) -> dict:
        state = {"sampler": self.sampler.state_dict()}
        if self.sft is not None:
            state["sft_sampler"] = self.sft_sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        if self.sft is not None and "sft_sampler" in state:
            self.sft_sampler.load_state_dict(state["sft_sampler"])
