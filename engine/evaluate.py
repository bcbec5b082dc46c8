"""Evaluation: one fixed sampling setup, held-out prompts, several seeds.

Accuracy under sampling varies with the seed; reporting the mean and the spread across seeds
(std and min..max) says whether a difference between two models is larger than that noise.
Beside the seed spread, `accuracy` keeps each prompt's mean score over the seeds (`per_item`)
and its item-level standard error: the uncertainty from the finite prompt set, which the seed
spread does not see. `compare` is the paired test of two stages on the same prompts and seeds
(the demo's "> spread" column). `at_n` gives best@n (unbiased pass@k, Chen et al. 2021) and
maj@n (the majority completion of n, verified; self-consistency, Wang et al. 2022). `RegressionSet` decodes a frozen
prompt set greedily after each stage and diffs the outputs against the stage before.
The global RNG state is restored afterwards, so evaluating does not perturb training.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from dataclasses import dataclass

import torch

from .rewards import exact_answer
from .rollout import Rollout, generate
from .stats import paired_test, standard_error


@dataclass(frozen=True)
class EvalConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    seeds: tuple = (0, 1, 2)


def samples(model, tokenizer, prompts: list[str], cfg: EvalConfig, n: int = 1) -> list[Rollout]:
    """One rollout of n completions per prompt for each seed of cfg; the RNG state is kept."""
    state = torch.get_rng_state()
    out = []
    try:
        for seed in cfg.seeds:
            torch.manual_seed(seed)
            out.append(generate(model, tokenizer, prompts, n=n, temperature=cfg.temperature,
                                top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens))
    finally:
        torch.set_rng_state(state)
    return out


def accuracy(model, tokenizer, prompts: list[str], answers: list[str],
             cfg: EvalConfig = EvalConfig(), verifier=exact_answer) -> dict:
    """{'mean', 'std', 'min', 'max', 'per_seed', 'se', 'per_item'}: fraction verified correct
    per seed; per prompt, the mean over seeds; se, the item-level standard error of the mean."""
    scores = [verifier(prompts, roll.texts, answer=answers)
              for roll in samples(model, tokenizer, prompts, cfg)]  # [seeds][prompts]
    per_seed = [sum(s) / len(s) for s in scores]
    per_item = [sum(col) / len(col) for col in zip(*scores)]
    return {"mean": statistics.fmean(per_seed),
            "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
            "min": min(per_seed), "max": max(per_seed), "per_seed": per_seed,
            "se": standard_error(per_item), "per_item": per_item}


def compare(before: dict, after: dict, confidence: float = 0.95) -> dict:
    """Paired test of two `accuracy` results on the same prompts and seeds: per prompt, the
    difference of the seed-mean scores; {'diff', 'se', 'low', 'high', 'p', 'n'} and
    'significant' (the interval excludes 0) and 'beats_spread' (the gain exceeds the larger
    seed std)."""
    t = paired_test(before["per_item"], after["per_item"], confidence)
    return {**t, "significant": t["low"] > 0 or t["high"] < 0,
            "beats_spread": t["diff"] > max(before["std"], after["std"])}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased P(at least one of k draws is correct) from n samples with c correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority(texts: list[str]) -> str | None:
    """The most common completion, whitespace-stripped (the first to reach the top count wins a
    tie); None when all are empty. Voting on the completions themselves, and verifying the
    winner with the same verifier, keeps maj@n <= best@n."""
    votes = [t.strip() for t in texts if t.strip()]
    if not votes:
        return None
    counts = Counter(votes)
    top = max(counts.values())
    return next(a for a in votes if counts[a] == top)


def at_n(model, tokenizer, prompts: list[str], answers: list[str], n: int,
         cfg: EvalConfig = EvalConfig(), verifier=exact_answer) -> dict:
    """best@k for k = 1 and n (any of k samples verified), and maj@n (the majority answer of
    n samples verified), averaged over prompts and then seeds: {'best@1', 'best@n', 'maj@n'}
    with their seed std."""
    rows = {"best@1": [], f"best@{n}": [], f"maj@{n}": []}
    for roll in samples(model, tokenizer, prompts, cfg, n=n):
        per = [roll.texts[i * n:(i + 1) * n] for i in range(len(prompts))]
        best1, bestn, maj = [], [], []
        for p, texts, a in zip(prompts, per, answers):
            c = int(sum(verifier([p] * n, texts, answer=[a] * n)))
            best1.append(pass_at_k(n, c, 1))
            bestn.append(pass_at_k(n, c, n))
            vote = majority(texts)
            maj.append(0.0 if vote is None else verifier([p], [vote], answer=[a])[0])
        for key, vals in zip(rows, (best1, bestn, maj)):
            rows[key].append(sum(vals) / len(vals))
    out = {}
    for key, per_seed in rows.items():
        out[key] = statistics.fmean(per_seed)
        out[key + "_std"] = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
    return out


class RegressionSet:
    """A frozen prompt set decoded greedily after each stage; `check(stage, model)` writes
    <out_dir>/<stage>.jsonl and returns its diff with the previous stage: outputs changed and,
    where the set has answers, newly right and newly wrong prompts."""

    def __init__(self, path: str, tokenizer, out_dir: str, max_new_tokens: int = 32):
        from .data import read_jsonl

        self.rows = read_jsonl(path, ("prompt",), "regression set")
        self.tok, self.out_dir, self.max_new_tokens = tokenizer, out_dir, max_new_tokens
        self.previous: list[dict] | None = None

    def check(self, stage: str, model) -> dict:
        prompts = [r["prompt"] for r in self.rows]
        texts = generate(model, self.tok, prompts, greedy=True,
                         max_new_tokens=self.max_new_tokens).texts
        now = []
        for r, t in zip(self.rows, texts):
            row = {"prompt": r["prompt"], "output": t}
            if "answer" in r:
                row["correct"] = bool(exact_answer([r["prompt"]], [t], answer=[r["answer"]])[0])
            now.append(row)
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"{stage}.jsonl"), "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in now)
        diff = {"stage": stage, "n": len(now)}
        if "correct" in now[0]:
            diff["accuracy"] = sum(x["correct"] for x in now) / len(now)
        if self.previous is not None:
            pairs = list(zip(self.previous, now))
            diff["changed"] = sum(a["output"] != b["output"] for a, b in pairs)
            if "correct" in now[0]:
                diff["newly_right"] = [b["prompt"] for a, b in pairs
                                       if b["correct"] and not a["correct"]]
                diff["newly_wrong"] = [b["prompt"] for a, b in pairs
                                       if a["correct"] and not b["correct"]]
        self.previous = now
        return diff
