"""Rollouts: sample completions with the model's own `generate` (KV cache), stop at EOS.

Prompts are left-padded for generation; each completion is cut after its first EOS (kept in
the ids, so training teaches the model to stop) and decoded without special tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import encode


@dataclass
class Rollout:
    prompt_ids: list[list[int]]       # per completion (prompts repeated n times)
    completion_ids: list[list[int]]   # ends with EOS unless cut by max_new_tokens
    texts: list[str]

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.completion_ids]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, n: int = 1, temperature: float = 1.0,
             top_p: float = 1.0, max_new_tokens: int = 32, greedy: bool = False,
             batch_size: int = 512) -> Rollout:
    """n completions per prompt, grouped contiguously: [p0, p0, ..., p1, p1, ...]."""
    ids = [x for x in encode(tokenizer, prompts) for _ in range(n)]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    comps = []
    for s in range(0, len(ids), batch_size):
        chunk = ids[s:s + batch_size]
        t = max(len(x) for x in chunk)
        inp = torch.tensor([[pad] * (t - len(x)) + x for x in chunk], device=device)
        att = torch.tensor([[0] * (t - len(x)) + [1] * len(x) for x in chunk], device=device)
        sample = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        out = model.generate(input_ids=inp, attention_mask=att, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=pad, use_cache=True,
                             **({"do_sample": False} if greedy else sample))
        for row in out[:, t:].tolist():
            comps.append(row[:row.index(eos) + 1] if eos in row else row)
    model.train(was_training)
    texts = tokenizer.batch_decode(comps, skip_special_tokens=True)
    return Rollout(ids, comps, texts)
