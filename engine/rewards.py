"""Rewards and verifiers.

A reward function is any callable `fn(prompts, completions, **kw) -> list[float]`, one score
per completion; `kw` carries the dataset's extra columns (e.g. `answer`, one per completion).
Built-ins: an exact-answer verifier, a regex format check, a length penalty, a repeated
n-gram penalty and a pairwise judge (rlfuse.judge) against a baseline column. `Weighted` sums several of them and reports each one's mean.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Optional, Protocol, Sequence


class RewardFn(Protocol):
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **kw) -> list[float]:
        ...


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(text: str) -> Optional[str]:
    """The last number in `text` (after '####' or '\\boxed{}' when present), else None."""
    m = re.search(r"\\boxed\{([^}]*)\}", text) or re.search(r"####\s*(\S+)", text)
    if m:
        text = m.group(1)
    nums = _NUMBER.findall(text.replace(",", ""))
    return nums[-1] if nums else None


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip() == b.strip()


def exact_answer(prompts, completions, answer=None, strict: bool = True, **kw) -> list[float]:
    """1.0 when the completion's answer equals `answer` (per completion), else 0.0.

    strict: the whole completion (stripped) must be the answer; otherwise the last number in
    it is compared.
    """
    if answer is None:
        raise ValueError("exact_answer needs an `answer` column in the data")
    out = []
    for c, a in zip(completions, answer):
        got = c.strip() if strict else extract_answer(c)
        out.append(float(got is not None and bool(got) and _same_number(got, str(a))))
    return out


def regex_format(prompts, completions, pattern: str = r"-?\d+", penalty: float = -1.0,
                 **kw) -> list[float]:
    """0.0 when the completion (stripped) fully matches `pattern`, else `penalty`."""
    rx = re.compile(pattern, re.DOTALL)
    return [0.0 if rx.fullmatch(c.strip()) else penalty for c in completions]


def length_penalty(prompts, completions, max_chars: int = 200, **kw) -> list[float]:
    """-(excess characters over max_chars) / max_chars: 0 for completions within budget."""
    return [-max(0, len(c) - max_chars) / max_chars for c in completions]


def repeated_ngram_penalty(prompts, completions, n: int = 3, **kw) -> list[float]:
    """-(fraction of the completion's character n-grams that repeat an earlier one)."""
    out = []
    for c in completions:
        grams = [c[i:i + n] for i in range(len(c) - n + 1)]
        out.append(-(len(grams) - len(set(grams))) / len(grams) if grams else 0.0)
    return out


def pairwise_judge(prompts, completions, model: Optional[str] = None,
                   baseline: str = "reference", **kw) -> list[float]:
    """Debiased P(completion beats the `baseline` column's response) from rlfuse.judge over the
    local causal LM folder `model` (loaded once); NaN (unscored) where the judge fails."""
    if not model:
        raise ValueError("reward pairwise_judge needs kwargs.model: a local causal LM folder")
    from .judge import JudgeReward, load_judge

    return JudgeReward(load_judge(model), baseline)(prompts, completions, **kw)


BUILTINS: dict[str, Callable] = {
    "exact_answer": exact_answer,
    "regex_format": regex_format,
    "length_penalty": length_penalty,
    "repeated_ngram_penalty": repeated_ngram_penalty,
    "pairwise_judge": pairwise_judge,
}


class Weighted:
    """sum_i w_i * fn_i(prompts, completions, **kw); `last` holds each term's mean score."""

    def __init__(self, terms: Sequence[tuple[str, float, Callable]]):
        self.terms = list(terms)
        self.last: dict[str, float] = {}

    def __call__(self, prompts, completions, **kw) -> list[float]:
        total = [0.0] * len(completions)
        for name, w, fn in self.terms:
            scores = [float(s) for s in fn(prompts, completions, **kw)]
            if len(scores) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(scores)} scores for "
                                 f"{len(completions)} completions")
            scored = [s for s in scores if not math.isnan(s)]  # NaN: unscored completion
            self.last[f"reward/{name}"] = sum(scored) / len(scored) if scored else math.nan
            total = [t + w * s for t, s in zip(total, scores)]
        return total


def build_rewards(specs) -> Weighted:
    """Weighted reward from RewardSpec entries (name, weight, kwargs)."""
    terms = []
    for spec in specs:
        if spec.name not in BUILTINS:
            raise ValueError(f"unknown reward {spec.name!r}; built-ins: {sorted(BUILTINS)}")
        fn, kw = BUILTINS[spec.name], dict(spec.kwargs)
        terms.append((spec.name, spec.weight, lambda p, c, _f=fn, _k=kw, **k: _f(p, c, **{**k, **_k})))
    return Weighted(terms)
