"""Reward models: a `transformers` sequence-classification model that scores prompt + completion,
trained in the engine from preference pairs with the Bradley-Terry loss.

Score r(x, y): the one-logit head's output at the last non-pad token of `prompt + completion +
EOS` (the EOS is always appended, in training and in scoring, so both see the same layout).
Bradley-Terry: P(y_c > y_r | x) = sigmoid(r_c - r_r); the loss is the mean of
-log sigmoid(r_c - r_r) over pairs (TRL's RewardTrainer, InstructGPT), plus
`center_coef * mean((r_c + r_r)^2)` when asked (TRL's center_rewards_coefficient), which pins
the scores' offset. A model built here copies the policy's backbone (InstructGPT starts its RM
from the SFT model), so a tiny demo RM starts from features that already know the task.
Cost: one backbone forward per sequence (two rows per pair in training); the head is [H, 1], so
nothing vocabulary-sized is ever held.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import Sampler, encode, pack, read_jsonl
from .model import is_lora
from .optim import make_optimizer


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, center_coef: float = 0.0
                       ) -> tuple[Tensor, dict]:
    """-mean(log sigmoid(r_c - r_r)) (+ center_coef * mean((r_c + r_r)^2)) for scores [B]."""
    margin = chosen.float() - rejected.float()  # [B]
    loss = -F.logsigmoid(margin).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen.float() + rejected.float()) ** 2).mean()
    with torch.no_grad():
        metrics = {"accuracy": (margin > 0).float().mean().item(),
                   "margin": margin.mean().item(),
                   "reward_chosen": chosen.float().mean().item(),
                   "reward_rejected": rejected.float().mean().item()}
    return loss, metrics


def build_reward_model(policy, tokenizer, path: str | None = None, init_from_policy: bool = True):
    """A one-label sequence-classification model: from a checkpoint `path`, or the policy's
    architecture (its backbone weights copied when `init_from_policy`)."""
    from transformers import AutoModelForSequenceClassification

    device = next(policy.parameters()).device
    if path:
        rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    else:
        config = copy.deepcopy(policy.config)
        config.num_labels = 1
        config.pad_token_id = tokenizer.pad_token_id
        rm = AutoModelForSequenceClassification.from_config(config)
        if init_from_policy:
            if is_lora(policy):
                raise ValueError("reward_model.init_from_policy with a LoRA policy: give "
                                 "reward_model.path, or set init_from_policy=false")
            rm.base_model.load_state_dict(policy.get_decoder().state_dict())
    if rm.config.pad_token_id is None:
        rm.config.pad_token_id = tokenizer.pad_token_id
    return rm.to(device=device, dtype=next(policy.parameters()).dtype)


def _batch(tokenizer, prompts, completions, max_length, device):
    return pack(encode(tokenizer, prompts), encode(tokenizer, completions, add_eos=True),
                tokenizer.pad_token_id, max_length).to(device)


def score(rm, batch) -> Tensor:
    """Scores [B] fp32 of a packed batch (right-padded prompt + completion rows)."""
    out = rm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.logits[:, 0].float()


class RewardModelScorer:
    """A reward function (rewards.RewardFn) from a reward model: r(prompt, completion), no grad."""

    def __init__(self, rm, tokenizer, max_length: int = 512, batch_size: int = 64):
        self.rm, self.tok = rm.eval().requires_grad_(False), tokenizer
        self.max_length, self.batch_size = max_length, batch_size

    @torch.no_grad()
    def __call__(self, prompts, completions, **kw) -> list[float]:
        device = next(self.rm.parameters()).device
        out = []
        for s in range(0, len(prompts), self.batch_size):
            b = _batch(self.tok, prompts[s:s + self.batch_size],
                       completions[s:s + self.batch_size], self.max_length, device)
            out += score(self.rm, b).tolist()
        return out


def train_reward_model(rm, tokenizer, pairs: list[dict], *, steps: int, batch_size: int,
                       lr: float, seed: int = 0, max_length: int = 512, center_coef: float = 0.0,
                       monitor=None) -> list[dict]:
    """Bradley-Terry training on {"prompt", "chosen", "rejected"} records; per-step metrics."""
    rm.train().requires_grad_(True)
    device = next(rm.parameters()).device
    opt = make_optimizer(list(rm.parameters()), lr, (0.9, 0.999), 0.0, seed)
    sampler = Sampler(len(pairs), min(batch_size, len(pairs)), seed)
    history = []
    for step in range(1, steps + 1):
        rows = [pairs[i] for i in sampler.next()]
        prompts = [r["prompt"] for r in rows]
        b = _batch(tokenizer, prompts + prompts, [r["chosen"] for r in rows]
                   + [r["rejected"] for r in rows], max_length, device)  # [2B, T]
        chosen, rejected = score(rm, b).chunk(2)
        loss, metrics = bradley_terry_loss(chosen, rejected, center_coef)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        row = {"loss": loss.item(), "grad_norm": float(grad_norm), **metrics}
        history.append(row)
        if monitor is not None:
            monitor.log(step, row)
    rm.eval()
    return history


@torch.no_grad()
def preference_accuracy(rm, tokenizer, pairs: list[dict], max_length: int = 512) -> float:
    """Fraction of pairs whose chosen completion scores higher."""
    scorer = RewardModelScorer(rm, tokenizer, max_length)
    prompts = [r["prompt"] for r in pairs]
    c = scorer(prompts, [r["chosen"] for r in pairs])
    r = scorer(prompts, [r["rejected"] for r in pairs])
    return sum(a > b for a, b in zip(c, r)) / max(1, len(pairs))


def load_or_train(cfg, policy, tokenizer, out_dir: str, seed: int = 0, max_length: int = 512,
                  progress: bool = False) -> RewardModelScorer:
    """The reward function of `ppo.reward_model`: a trained checkpoint (`path`), or a model built
    from the policy and trained on `pairs` (saved to <out_dir>/reward_model for reuse)."""
    from .monitor import Monitor

    if not cfg.path and not cfg.pairs:
        raise ValueError("ppo.reward='model' needs ppo.reward_model.path (a trained "
                         "sequence-classification checkpoint) or ppo.reward_model.pairs (JSONL "
                         "'prompt', 'chosen', 'rejected' to train one)")
    rm = build_reward_model(policy, tokenizer, cfg.path, cfg.init_from_policy)
    if cfg.pairs:
        pairs = read_jsonl(cfg.pairs, ("prompt", "chosen", "rejected"))
        rm_dir = os.path.join(out_dir, "reward_model")
        mon = Monitor(rm_dir, cfg.steps, progress=progress, desc="reward_model")
        hist = train_reward_model(rm, tokenizer, pairs, steps=cfg.steps,
                                  batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                                  max_length=max_length, monitor=mon)
        mon.close(plot=True)
        rm.save_pretrained(rm_dir)
        tokenizer.save_pretrained(rm_dir)
        acc = preference_accuracy(rm, tokenizer, pairs, max_length)
        print(f"rlfuse: reward model trained on {len(pairs)} pairs, {cfg.steps} steps: "
              f"last loss {hist[-1]['loss']:.3f}, train pair accuracy {acc:.3f}; saved {rm_dir}",
              flush=True)
    return RewardModelScorer(rm, tokenizer, max_length)
