"""`rlfuse.judge`: a position-debiased pairwise judge over a local causal LM or any callable.

A verdict function `verdict(prompts, first, second) -> [P(first is better)]` judges one order;
NaN (or None, or a value outside [0, 1]) marks a failure. `PairwiseJudge.compare` asks it in
both orders and combines them (the two-order average the seed notes recommend):
    p(a > b) = 1/2 [ P(a > b | a shown first) + 1 - P(b > a | b shown first) ]
A pair is a flip when the preferred response changes with the order. Failures (in either order)
are excluded and counted, never scored as a loss. On identical pairs the debiased p is 1/2 by
construction; the first-order mean there is the judge's position bias (1/2 when it has none).

`LMVerdict` asks a transformers causal LM with a template ending where the verdict token goes,
and reads the log-probs of the two verdict tokens ("A", "B") at that position with
`rlfuse.linear_logprobs` (the fused LM-head op: no [rows, vocab] logits are kept). The verdict
is deterministic, the temperature-0 setting of the notes: nothing is sampled, and
P(first) = sigmoid(logp(A) - logp(B)), the model's distribution renormalized to the two
tokens. When the two tokens together hold less than `min_mass` of the next-token probability
the model did not answer with a verdict: a failure.

`JudgeReward` is a reward function (rlfuse.engine.rewards.RewardFn): each completion's debiased
win probability against a baseline column of the data (a failure is NaN: unscored); in a config
it is the built-in reward `pairwise_judge` (kwargs: `model`, a local causal LM folder loaded
once, and `baseline`, the column).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

import rlfuse

Verdict = Callable[[Sequence[str], Sequence[str], Sequence[str]], Sequence[float]]

TEMPLATE = ("Which response answers the question better?\n\nQuestion: {prompt}\n\n"
            "Response A: {first}\n\nResponse B: {second}\n\nThe better response is")


@dataclass(frozen=True)
class JudgeResult:
    p: list[float]            # debiased P(a > b) per pair; NaN where the judge failed
    p_first: list[float]      # P(a > b) with a shown first
    p_second: list[float]     # P(b > a) with b shown first
    failures: int             # pairs with a failed verdict in either order
    flip_rate: float          # among judged pairs: the preferred response changed with order

    @property
    def judged(self) -> list[float]:
        return [p for p in self.p if not math.isnan(p)]

    @property
    def mean(self) -> float:
        ok = self.judged
        return sum(ok) / len(ok) if ok else math.nan

    @property
    def first_order_mean(self) -> float:
        """Mean P(first is better) over judged pairs (on identical pairs: the position bias)."""
        ok = [p for p, q in zip(self.p_first, self.p) if not math.isnan(q)]
        return sum(ok) / len(ok) if ok else math.nan


def _valid(x) -> float:
    x = math.nan if x is None else float(x)
    return x if 0.0 <= x <= 1.0 else math.nan  # NaN fails the test too


class PairwiseJudge:
    def __init__(self, verdict: Verdict):
        self.verdict = verdict

    @classmethod
    def from_pretrained(cls, path: str, **kw) -> "PairwiseJudge":
        """A judge over a local causal LM folder (see LMVerdict for the options)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .model import check_local_path

        local = check_local_path(path)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=local)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
        return cls(LMVerdict(model, tok, **kw))

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> JudgeResult:
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"compare: {len(prompts)} prompts, {len(a)} and {len(b)} responses")
        ab = [_valid(x) for x in self.verdict(prompts, a, b)]
        ba = [_valid(x) for x in self.verdict(prompts, b, a)]
        if len(ab) != len(prompts) or len(ba) != len(prompts):
            raise ValueError(f"the verdict function returned {len(ab)} / {len(ba)} values for "
                             f"{len(prompts)} pairs")
        p = [0.5 * (x + 1.0 - y) for x, y in zip(ab, ba)]  # NaN if either failed
        ok = [(x, y) for x, y, q in zip(ab, ba, p) if not math.isnan(q)]
        flips = sum((x > 0.5) != (y < 0.5) for x, y in ok)
        return JudgeResult(p, ab, ba, len(p) - len(ok), flips / len(ok) if ok else math.nan)


class LMVerdict:
    """P(first is better) from a causal LM's next-token log-probs of the two verdict tokens."""

    def __init__(self, model, tokenizer, template: str = TEMPLATE, tokens=(" A", " B"),
                 min_mass: float = 0.5, batch_size: int = 16, max_length: int = 2048):
        self.model, self.tok, self.template = model, tokenizer, template
        self.min_mass, self.batch_size, self.max_length = min_mass, batch_size, max_length
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in tokens]
        if len(ids) != 2 or any(len(i) != 1 for i in ids) or ids[0] == ids[1]:
            raise ValueError(f"judge verdict tokens {tokens!r} must be two strings that the "
                             f"tokenizer encodes as one distinct token each, got ids {ids}")
        self.ids = torch.tensor([ids[0][0], ids[1][0]])

    @torch.no_grad()
    def __call__(self, prompts, first, second) -> list[float]:
        from .data import encode
        from .model import head, hidden_states

        h = head(self.model)
        device = h.weight.device
        texts = [self.template.format(prompt=p, first=a, second=b)
                 for p, a, b in zip(prompts, first, second)]
        out = []
        for s in range(0, len(texts), self.batch_size):
            ids = [x[-self.max_length:] for x in encode(self.tok, texts[s:s + self.batch_size])]
            t = max(len(x) for x in ids)  # right-padded: positions start at 0 in every row
            inp = torch.tensor([x + [self.tok.pad_token_id] * (t - len(x)) for x in ids],
                               device=device)
            att = torch.tensor([[1] * len(x) + [0] * (t - len(x)) for x in ids], device=device)
            hid = hidden_states(self.model, inp, att)  # [b, t, H]
            last = hid[torch.arange(len(ids)), torch.tensor([len(x) - 1 for x in ids])]  # [b, H]
            logp = rlfuse.linear_logprobs(
                last.repeat_interleave(2, 0), h.weight, self.ids.to(device).repeat(len(ids)),
                bias=h.bias, logit_scale=h.logit_scale,
                final_logit_softcapping=h.final_logit_softcapping).view(-1, 2)  # [b, 2] fp32
            mass = logp.exp().sum(-1)
            p = torch.sigmoid(logp[:, 0] - logp[:, 1])
            out += torch.where(mass >= self.min_mass, p, math.nan).tolist()
        return out


@functools.cache  # one model per folder, however many rewards and hooks ask for it
def load_judge(path: str) -> PairwiseJudge:
    return PairwiseJudge.from_pretrained(path)


class JudgeReward:
    """reward(prompts, completions, **columns): debiased P(completion beats columns[baseline])."""

    def __init__(self, judge: PairwiseJudge, baseline: str = "reference"):
        self.judge, self.baseline = judge, baseline

    def __call__(self, prompts, completions, **kw) -> list[float]:
        if self.baseline not in kw:
            raise ValueError(f"JudgeReward needs a {self.baseline!r} column in the data (the "
                             f"baseline response each completion is compared with)")
        return self.judge.compare(prompts, completions, kw[self.baseline]).p
