"""Evaluation: one fixed sampling setup, held-out prompts, several seeds.

Accuracy under sampling varies with the seed; reporting the mean and the spread across seeds
(std and min..max) says whether a difference between two models is larger than that noise.
The global RNG state is restored afterwards, so evaluating does not perturb training.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from .rewards import exact_answer
from .rollout import generate


@dataclass(frozen=True)
class EvalConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    seeds: tuple = (0, 1, 2)


def accuracy(model, tokenizer, prompts: list[str], answers: list[str],
             cfg: EvalConfig = EvalConfig(), verifier=exact_answer) -> dict:
    """{'mean', 'std', 'min', 'max', 'per_seed'}: fraction verified correct, per seed."""
    state = torch.get_rng_state()
    per_seed = []
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        roll = generate(model, tokenizer, prompts, temperature=cfg.temperature, top_p=cfg.top_p,
                        max_new_tokens=cfg.max_new_tokens)
        scores = verifier(prompts, roll.texts, answer=answers)
        per_seed.append(sum(scores) / len(scores))
    torch.set_rng_state(state)
    return {"mean": statistics.fmean(per_seed),
            "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
            "min": min(per_seed), "max": max(per_seed), "per_seed": per_seed}
