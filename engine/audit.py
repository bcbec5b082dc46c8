"""`rlfuse audit pairs.jsonl`: the biases a preference data set teaches, measured with intervals.

Reads {"prompt", "chosen", "rejected"} rows (plus, optionally, the position the chosen response
was shown in: `order_field`, 0/1, "first"/"second" or "A"/"B"). For each bias an effect size and
a `confidence` interval:
  length       P(chosen longer | lengths differ) (Wilson), the median and mean token difference
               chosen - rejected (bootstrap)
  format       per format feature (markdown headers, list items, bold spans, each per 100 tokens):
               P(chosen denser | the densities differ), and the mean density difference
  sycophancy   agreement and flattery phrases per response: P(chosen has more | they differ)
  position     P(chosen was shown first), when the order is recorded
  duplicates   repeated rows, empty responses, chosen == rejected
  style        how well a style-only logistic model (length, format and marker features of
               the two sides; sides swapped at random so both labels occur) predicts "chosen":
               the 5-fold out-of-fold AUC, 0.5 when style explains nothing
With `rm`: the reward model's Pearson correlation between score and length, and its pair
accuracy on all pairs against length-matched pairs (|token difference| <= 10%, at least 1).
With `judge`: the position-debiased pairwise judge's agreement with the labels, its flip rate
and its first-order score on identical pairs (rlfuse.judge).

A bias is flagged when its whole interval lies beyond `margin` from no effect (a win rate
outside [0.5 - margin, 0.5 + margin], the AUC above 0.5 + margin, the length correlation
outside +-2 margin), never on a point estimate: on unbiased data the intervals straddle no
effect and nothing is flagged. Duplicates are flagged when any exist (an interval's lower bound
above 0 is the same thing). Writes `json` (the numbers and `flags`), prints a summary and draws
`png` (the win rates with their intervals, and the token-difference histogram).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass
from typing import Optional

import torch

from .config import ConfigError
from .data import read_jsonl
from .stats import Interval, bootstrap, cv_auc, mean_interval, median_interval, wilson

_WORD = re.compile(r"\w+|[^\w\s]")
_HEADER = re.compile(r"^ {0,3}#{1,6}\s", re.M)
_LIST = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+\S", re.M)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")
# Agreement with the user and flattery: phrases whose frequency in the chosen side teaches
# sycophancy (Sharma et al. 2023, "Towards understanding sycophancy in language models").
SYCOPHANCY_MARKERS = (
    "you're right", "you are right", "you're absolutely right", "you are absolutely right",
    "you're correct", "you are correct", "i agree", "i completely agree", "absolutely",
    "great question", "excellent question", "good question", "what a great", "great point",
    "excellent point", "good point", "you make a great", "brilliant", "insightful",
    "thank you for pointing", "as you said", "as you mentioned", "i apologize",
    "my apologies", "you raise a", "fantastic question", "wonderful question")
_MARKERS = re.compile(r"\b(?:" + "|".join(re.escape(m) for m in SYCOPHANCY_MARKERS) + r")\b",
                      re.I)
FORMAT_FEATURES = ("headers", "lists", "bold")
FIRST = {0, "0", "first", "a", "A", "left"}
SECOND = {1, "1", "second", "b", "B", "right"}


@dataclass(frozen=True)
class AuditConfig:
    pairs: Optional[str] = None          # JSONL with "prompt", "chosen", "rejected"
    json: Optional[str] = None           # report path; None: <pairs>.audit.json
    png: Optional[str] = None            # plot path; None: <pairs>.audit.png
    rm: Optional[str] = None             # local sequence-classification reward model folder
    judge: Optional[str] = None          # local causal LM folder, judged with rlfuse.judge
    tokenizer: Optional[str] = None      # local tokenizer for lengths; None: the rm's, else words
    order_field: str = "chosen_position"  # field: where chosen was shown (0/1, first/second, A/B)
    confidence: float = 0.95             # interval coverage
    margin: float = 0.05                 # flag when the interval clears 0.5 +- margin
    n_boot: int = 1000                   # bootstrap resamples
    max_length: int = 512                # reward model: tokens per scored sequence
    seed: int = 0                        # bootstrap, fold and side-swap seed

    def __post_init__(self):
        if not self.pairs:
            raise ConfigError("rlfuse audit needs a pairs file: rlfuse audit pairs.jsonl")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"config key 'confidence' must be in (0, 1), got {self.confidence}")
        if not 0 <= self.margin < 0.5:
            raise ConfigError(f"config key 'margin' must be in [0, 0.5), got {self.margin}")
        if self.n_boot < 100:
            raise ConfigError(f"config key 'n_boot' must be >= 100, got {self.n_boot}")


# ----------------------------------------------------------------------------- style features
def word_count(text: str) -> int:
    """Words and punctuation marks: the length unit when no tokenizer is given."""
    return len(_WORD.findall(text))


def style_features(text: str, n_tokens: int) -> dict:
    """Length and, per 100 tokens, markdown headers, list items, bold spans and sycophancy
    markers of one response."""
    per = 100.0 / max(1, n_tokens)
    return {"tokens": float(n_tokens),
            "headers": per * len(_HEADER.findall(text)),
            "lists": per * len(_LIST.findall(text)),
            "bold": per * len(_BOLD.findall(text)),
            "sycophancy": float(len(_MARKERS.findall(text)))}


def style_difference(fa: dict, fb: dict) -> list[float]:
    """Style covariates of a comparison a vs b, antisymmetric (swapping a and b negates them):
    the normalized length difference (la - lb) / (la + lb) (Arena-Hard's style control) and the
    raw differences of the other features."""
    la, lb = fa["tokens"], fb["tokens"]
    return [(la - lb) / max(1.0, la + lb)] + [fa[k] - fb[k] for k in STYLE_KEYS[1:]]


STYLE_KEYS = ("tokens", *FORMAT_FEATURES, "sycophancy")


# ----------------------------------------------------------------------------- the audit
def win_rate(chosen: torch.Tensor, rejected: torch.Tensor, confidence: float) -> Interval:
    """P(chosen > rejected | they differ), Wilson interval."""
    differ = chosen != rejected
    return wilson(int((chosen > rejected)[differ].sum()), int(differ.sum()), confidence)


def flagged(ci: Interval, margin: float) -> bool:
    return ci.outside(0.5 - margin, 0.5 + margin)


def audit(rows: list[dict], cfg: AuditConfig, count_tokens=word_count, scorer=None,
          judge=None) -> dict:
    """The report (see the module docstring); `scorer(prompts, completions) -> scores` is a
    reward model, `judge` a rlfuse.judge.PairwiseJudge."""
    conf, kw = cfg.confidence, dict(n_boot=cfg.n_boot, confidence=cfg.confidence, seed=cfg.seed)
    n = len(rows)
    lc = torch.tensor([count_tokens(r["chosen"]) for r in rows], dtype=torch.float64)
    lr = torch.tensor([count_tokens(r["rejected"]) for r in rows], dtype=torch.float64)
    fc = [style_features(r["chosen"], int(t)) for r, t in zip(rows, lc)]
    fr = [style_features(r["rejected"], int(t)) for r, t in zip(rows, lr)]

    def feature(k):
        return (torch.tensor([f[k] for f in fc], dtype=torch.float64),
                torch.tensor([f[k] for f in fr], dtype=torch.float64))

    report: dict = {"n_pairs": n, "confidence": conf, "margin": cfg.margin, "flags": []}
    flags = report["flags"]

    # length
    diff = lc - lr
    length = {"p_chosen_longer": win_rate(lc, lr, conf),
              "median_token_diff": median_interval(diff, **kw),
              "mean_token_diff": mean_interval(diff, **kw),
              "mean_tokens_chosen": lc.mean().item(), "mean_tokens_rejected": lr.mean().item()}
    report["length"] = length
    if flagged(length["p_chosen_longer"], cfg.margin):
        flags.append("length")

    # format and sycophancy markers
    report["format"] = {}
    for k in FORMAT_FEATURES:
        c, r = feature(k)
        report["format"][k] = {"p_chosen_denser": win_rate(c, r, conf),
                               "mean_density_diff": mean_interval(c - r, **kw)}
    if any(flagged(v["p_chosen_denser"], cfg.margin) for v in report["format"].values()):
        flags.append("format")
    c, r = feature("sycophancy")
    report["sycophancy"] = {"p_chosen_more": win_rate(c, r, conf),
                            "mean_marker_diff": mean_interval(c - r, **kw),
                            "frac_chosen_with_markers": (c > 0).double().mean().item(),
                            "frac_rejected_with_markers": (r > 0).double().mean().item()}
    if flagged(report["sycophancy"]["p_chosen_more"], cfg.margin):
        flags.append("sycophancy")

    # position
    orders = [r.get(cfg.order_field) for r in rows]
    known = [o for o in orders if o in FIRST or o in SECOND]
    if known:
        report["position"] = {"field": cfg.order_field, "p_chosen_first":
                              wilson(sum(o in FIRST for o in known), len(known), conf),
                              "rows_without_order": n - len(known)}
        if flagged(report["position"]["p_chosen_first"], cfg.margin):
            flags.append("position")
    else:
        report["position"] = None

    # duplicates, empty and identical pairs
    seen, repeated, empty, same = set(), set(), set(), set()
    for i, r in enumerate(rows):
        key = (r["prompt"], r["chosen"], r["rejected"])
        if key in seen:
            repeated.add(i)
        seen.add(key)
        c, j = r["chosen"].strip(), r["rejected"].strip()
        if not c or not j:
            empty.add(i)
        elif c == j:
            same.add(i)
    bad_rows = repeated | empty | same
    report["duplicates"] = {"duplicate_rows": len(repeated), "empty_pairs": len(empty),
                            "identical_pairs": len(same),
                            "frac_invalid": wilson(len(bad_rows), n, conf)}
    if bad_rows:
        flags.append("duplicates")

    # style-only model: sides swapped at random so that both labels occur
    rng = random.Random(cfg.seed)
    x, y = [], []
    for a, b in zip(fc, fr):
        keep = rng.random() < 0.5
        x.append(style_difference(a, b) if keep else style_difference(b, a))
        y.append(1.0 if keep else 0.0)
    x = torch.tensor(x, dtype=torch.float64)
    x = x / x.std(0).clamp_min(1e-12)  # comparable scales for the ridge penalty
    report["style_auc"] = cv_auc(x, torch.tensor(y), seed=cfg.seed, n_boot=cfg.n_boot,
                                 confidence=conf)
    if report["style_auc"].low > 0.5 + cfg.margin:
        flags.append("style")

    if scorer is not None:
        report["reward_model"] = reward_model_report(rows, lc, lr, scorer, cfg)
        if report["reward_model"]["length_correlation"].outside(-2 * cfg.margin,
                                                                  2 * cfg.margin):
            flags.append("rm_length")
    if judge is not None:
        report["judge"] = judge_report(rows, judge, conf)
    return report


def reward_model_report(rows, lc, lr, scorer, cfg: AuditConfig) -> dict:
    prompts = [r["prompt"] for r in rows]
    sc = torch.tensor(scorer(prompts, [r["chosen"] for r in rows]), dtype=torch.float64)
    sr = torch.tensor(scorer(prompts, [r["rejected"] for r in rows]), dtype=torch.float64)
    s, lengths = torch.stack([sc, sr], 1), torch.stack([lc, lr], 1)  # [n, 2]

    def corr(idx):  # over the responses of the resampled pairs
        a, b = s[idx].flatten(-2), lengths[idx].flatten(-2)  # [.., 2n]
        a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
        return (a * b).sum(-1) / ((a * a).sum(-1) * (b * b).sum(-1)).sqrt()

    n = len(rows)
    est = corr(torch.arange(n)[None])[0].item()
    matched = (lc - lr).abs() <= torch.clamp(0.1 * torch.maximum(lc, lr), min=1.0)
    right = sc > sr
    return {"length_correlation": bootstrap(corr, n, est, n_boot=cfg.n_boot,
                                            confidence=cfg.confidence, seed=cfg.seed),
            "accuracy_all": wilson(int(right.sum()), n, cfg.confidence),
            "accuracy_length_matched": wilson(int(right[matched].sum()), int(matched.sum()),
                                              cfg.confidence),
            "mean_score_chosen": sc.mean().item(), "mean_score_rejected": sr.mean().item()}


def judge_report(rows, judge, confidence: float) -> dict:
    prompts = [r["prompt"] for r in rows]
    res = judge.compare(prompts, [r["chosen"] for r in rows], [r["rejected"] for r in rows])
    ok = [p for p in res.p if not math.isnan(p)]
    same = judge.compare(prompts, [r["chosen"] for r in rows], [r["chosen"] for r in rows])
    return {"agreement": wilson(sum(p > 0.5 for p in ok), len(ok), confidence),
            "mean_p_chosen": sum(ok) / len(ok) if ok else math.nan,
            "flip_rate": res.flip_rate, "failures": res.failures,
            "identical_first_order": same.first_order_mean}


# ----------------------------------------------------------------------------- output
def as_json(x):
    if isinstance(x, Interval):
        return as_json(x.as_dict())
    if isinstance(x, dict):
        return {k: as_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [as_json(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def summary(report: dict) -> str:
    L = report["length"]
    lines = [f"{report['n_pairs']} pairs; {report['confidence']:.0%} intervals; flagged when the "
             f"interval clears 0.5 +- {report['margin']}",
             f"length      P(chosen longer)      {L['p_chosen_longer']}",
             f"            median token diff     {L['median_token_diff']}",
             f"            mean tokens           chosen {L['mean_tokens_chosen']:.1f}, "
             f"rejected {L['mean_tokens_rejected']:.1f}"]
    for k, v in report["format"].items():
        lines.append(f"format      P(chosen more {k:<7}) {v['p_chosen_denser']}")
    lines.append(f"sycophancy  P(chosen more markers) {report['sycophancy']['p_chosen_more']}")
    pos = report["position"]
    lines.append(f"position    P(chosen shown first) {pos['p_chosen_first']}" if pos else
                 "position    (no order recorded)")
    d = report["duplicates"]
    lines.append(f"duplicates  {d['duplicate_rows']} repeated rows, {d['empty_pairs']} empty, "
                 f"{d['identical_pairs']} identical pairs")
    lines.append(f"style       style-only AUC        {report['style_auc']}")
    if "reward_model" in report:
        rm = report["reward_model"]
        lines += [f"reward model corr(score, length)  {rm['length_correlation']}",
                  f"            accuracy, all pairs    {rm['accuracy_all']}",
                  f"            accuracy, len-matched  {rm['accuracy_length_matched']}"]
    if "judge" in report:
        j = report["judge"]
        lines.append(f"judge       agreement {j['agreement']}, flip rate {j['flip_rate']:.3f}, "
                     f"{j['failures']} failures, identical pairs {j['identical_first_order']:.3f}")
    lines.append("flags: " + (", ".join(report["flags"]) or "none"))
    return "\n".join(lines)


def plot(report: dict, token_diff: list[float], path: str) -> str:
    """Left: each win rate (and the style AUC) with its interval and the 0.5 +- margin band;
    right: the histogram of chosen - rejected token counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [("length", report["length"]["p_chosen_longer"])]
    items += [(f"format: {k}", v["p_chosen_denser"]) for k, v in report["format"].items()]
    items.append(("sycophancy", report["sycophancy"]["p_chosen_more"]))
    if report["position"]:
        items.append(("position", report["position"]["p_chosen_first"]))
    items.append(("style AUC", report["style_auc"]))
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (name, ci) in enumerate(items):
        if math.isnan(ci.estimate):
            continue
        ax.errorbar(ci.estimate, i, xerr=[[ci.estimate - ci.low], [ci.high - ci.estimate]],
                    fmt="o", color="#c44e52" if flagged(ci, report["margin"]) else "#4c72b0",
                    capsize=3)
    ax.axvspan(0.5 - report["margin"], 0.5 + report["margin"], color="0.85")
    ax.axvline(0.5, color="0.4", lw=0.8)
    ax.set_yticks(range(len(items)), [n for n, _ in items], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("P(chosen has more) / AUC, with interval (red: flagged)")
    hx.hist(token_diff, bins=40, color="#4c72b0")
    hx.axvline(0, color="0.4", lw=0.8)
    hx.set_xlabel("tokens(chosen) - tokens(rejected)")
    hx.set_ylabel("pairs")
    fig.suptitle("flags: " + (", ".join(report["flags"]) or "none"), fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run(cfg: AuditConfig) -> dict:
    """Read the pairs, load the optional reward model / judge / tokenizer, audit, write the
    report and the plot, print the summary; returns the report as written."""
    from .model import quiet_transformers

    quiet_transformers()  # no per-load progress bars in the report
    rows = read_jsonl(cfg.pairs, ("prompt", "chosen", "rejected"), "pairs")
    count, scorer, judge = word_count, None, None
    tok_path = cfg.tokenizer or cfg.rm
    if tok_path:
        from transformers import AutoTokenizer

        from .model import check_local_path

        tok = AutoTokenizer.from_pretrained(tok_path, local_files_only=check_local_path(tok_path))
        count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    if cfg.rm:
        scorer = load_scorer(cfg.rm, cfg.max_length)
    if cfg.judge:
        from .judge import load_judge

        judge = load_judge(cfg.judge)
    report = audit(rows, cfg, count, scorer, judge)
    out = as_json(report)
    stem = os.path.splitext(cfg.pairs)[0]
    json_path, png_path = cfg.json or stem + ".audit.json", cfg.png or stem + ".audit.png"
    with open(json_path, "w") as f:
        json.dump(out, f, indent=1)
    diffs = [count(r["chosen"]) - count(r["rejected"]) for r in rows]
    plot(report, diffs, png_path)
    print(summary(report))
    print(f"report {json_path}, plot {png_path}")
    return out


def load_scorer(path: str, max_length: int):
    """A RewardModelScorer over a local sequence-classification checkpoint."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .model import check_local_path
    from .reward_model import RewardModelScorer

    local = check_local_path(path)
    rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
                                                            local_files_only=local)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return RewardModelScorer(rm, tok, max_length)
