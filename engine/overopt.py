"""Over-optimization detector: proxy reward against a gold signal as the policy drifts (Goodhart).

Every `guard.every` steps (and once before the first), on the held-out prompts of `guard.data`
with fixed sampling (`guard.seeds`, `guard.temperature`; the RNG state is kept), the `Guard`
hook measures
  proxy    the trainer's own reward function (what is optimized: a reward model, a verifier);
  gold     the `guard.gold` verifier(s), or with `guard.judge` the debiased judge's win
           probability against the data's `guard.baseline` column (rlfuse.judge);
  d        sqrt(KL(pi || pi_start)): the per-sequence k3 estimate, summed over completion tokens,
           averaged over samples; pi_start is the trainer's reference (its starting policy) or
           a frozen copy taken at the first evaluation;
  length, distinct-1/2 (distinct completion-token n-grams / all of them);
  with a judge, the style-controlled win rate against the baseline (rlfuse.engine.winrate).
It fits gold - gold_start against d with Gao et al. 2022's RL form R(d) = d (a - b log d)
(linear least squares in a, b); for b > 0 the predicted peak is at d* = exp(a/b - 1), where
R(d*) = b d*. The alert fires when the proxy is above its value at the best-gold evaluation
while gold has fallen below its best by more than the spread (the larger of the seed std and
the item-level standard error, at the best and now), `guard.patience` evaluations in a row. The
best-gold policy is saved to <run>/checkpoints/best-gold/; with `guard.stop_at_peak` the alert
restores it and ends training. Rows go to <run>/guard.jsonl, the alert to alerts.jsonl, and the
Goodhart plot (proxy and gold against d, the fit and its peak) to <run>/plots/goodhart.png.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Optional

import torch

import rlfuse

from . import checkpoint
from .stats import standard_error

GUARD_LOG = "guard.jsonl"


# ----------------------------------------------------------------------------- the fit
def gao_fit(d, gain) -> dict:
    """Least-squares a, b of gain(d) = d (a - b log d) over points with d > 0 (gain: the gold
    signal minus its value at d = 0); the peak (d*, gain(d*)) when b > 0, else None."""
    pts = [(x, y) for x, y in zip(d, gain) if x > 0 and math.isfinite(x) and math.isfinite(y)]
    if len(pts) < 2:
        return {"a": math.nan, "b": math.nan, "peak_d": None, "peak_gain": None}
    f = torch.tensor([[x, -x * math.log(x)] for x, _ in pts], dtype=torch.float64)  # [m, 2]
    y = torch.tensor([g for _, g in pts], dtype=torch.float64)
    a, b = torch.linalg.lstsq(f, y[:, None]).solution[:, 0].tolist()
    # no interior maximum: gold rises (or falls) monotonically in d, or b is a rounding error
    # of 0 on straight-line data (its peak beyond any float)
    if b <= 0 or a / b - 1 > 700:
        return {"a": a, "b": b, "peak_d": None, "peak_gain": None}
    peak = math.exp(a / b - 1)
    return {"a": a, "b": b, "peak_d": peak, "peak_gain": b * peak}


def gao_curve(fit: dict, d: float) -> float:
    return d * (fit["a"] - fit["b"] * math.log(d)) if d > 0 else 0.0


# ----------------------------------------------------------------------------- the alert
@dataclass
class Point:
    step: int
    d: float
    proxy: float
    gold: float
    spread: float


@dataclass
class Detector:
    """The alert rule on a sequence of evaluations (see the module docstring)."""
    patience: int = 2
    points: list = field(default_factory=list)
    best: Optional[Point] = None
    streak: int = 0
    fired: bool = False

    def update(self, p: Point) -> Optional[str]:
        """Add an evaluation; returns the alert message the first time the rule holds."""
        self.points.append(p)
        if self.best is None or p.gold > self.best.gold:
            self.best, self.streak = p, 0
            return None
        b = self.best
        margin = max(b.spread, p.spread)
        if p.proxy > b.proxy and b.gold - p.gold > margin:
            self.streak += 1
        else:
            self.streak = 0
        if self.streak >= self.patience and not self.fired:
            self.fired = True
            return (f"over-optimization: proxy reward rose {b.proxy:.3g} -> {p.proxy:.3g} while "
                    f"gold fell {b.gold:.3g} -> {p.gold:.3g} (more than the spread {margin:.3g}) "
                    f"since step {b.step}, d = sqrt(KL) {b.d:.3g} -> {p.d:.3g}; the best-gold "
                    f"policy (step {b.step}) is in checkpoints/best-gold")
        return None


# ----------------------------------------------------------------------------- the hook
def distinct_n(completions: list[list[int]], n: int) -> float:
    grams = [tuple(c[i:i + n]) for c in completions for i in range(len(c) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


class Guard:
    """The trainer's over-optimization hook: `after_step()` every step, `close()` at the end;
    `stopped` once it ended the run at the best-gold checkpoint. Inert when guard.every is 0."""

    def __init__(self, trainer):
        self.trainer, self.cfg = trainer, trainer.cfg.guard
        self.stopped = False
        self.rows: list[dict] = []
        if not self.cfg.every:
            return
        from .data import read_jsonl
        from .evaluate import EvalConfig
        from .model import Reference
        from .rewards import build_rewards

        self.data = read_jsonl(self.cfg.data, ("prompt",), "guard.data")[:self.cfg.max_prompts]
        budget = self.cfg.max_new_tokens or trainer_budget(trainer.cfg)
        self.eval_cfg = EvalConfig(temperature=self.cfg.temperature, max_new_tokens=budget,
                                   seeds=tuple(self.cfg.seeds))
        self.proxy = getattr(trainer, "reward_fn", None)
        self.gold = build_rewards(self.cfg.gold)
        self.judge = None
        if self.cfg.judge:
            from .judge import load_judge

            self.judge = load_judge(self.cfg.judge)
        self.start = (getattr(trainer, "reference", None)
                      or Reference(trainer.model, trainer.cfg.model.reference))
        self.detector = Detector(self.cfg.patience)
        self.path = os.path.join(trainer.cfg.out_dir, GUARD_LOG)
        self.best_dir = os.path.join(trainer.ckpt_dir, "best-gold")
        if trainer.step == 0:
            self.evaluate()
        else:
            self.replay(trainer.step)

    def replay(self, step: int) -> None:
        """A resumed run: the evaluations up to its checkpoint's step, back into the rows and
        the detector (its best-gold point, streak and whether it fired); later ones were lost
        with the interrupted run and are dropped from the log, as metrics.jsonl's are."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            rows = [json.loads(x) for x in f if x.strip()]
        self.rows = [r for r in rows if r["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)
        nan = lambda v: math.nan if v is None else v  # noqa: E731  (JSON null: not finite)
        for r in self.rows:
            self.detector.update(Point(r["step"], nan(r["d"]), nan(r["proxy"]), nan(r["gold"]),
                                       nan(r["gold_spread"])))

    def after_step(self) -> None:
        if self.cfg.every and self.trainer.step % self.cfg.every == 0:
            self.evaluate()

    @torch.no_grad()
    def evaluate(self) -> dict:
        from .data import pack
        from .evaluate import samples
        from .model import sequence_logprobs

        t = self.trainer
        prompts = [r["prompt"] for r in self.data]
        columns = {k: [r.get(k) for r in self.data] for k in self.data[0] if k != "prompt"}
        temp = self.eval_cfg.temperature
        gold, proxy, kl, lengths, comps, judged = [], [], [], [], [], None
        for i, roll in enumerate(samples(t.model, t.tok, prompts, self.eval_cfg)):
            if self.judge is not None:
                res = self.judge.compare(prompts, roll.texts, columns[self.cfg.baseline])
                gold.append(res.p)
                if i == 0:
                    judged = (res, roll.texts)
            else:
                gold.append(self.gold(prompts, roll.texts, **columns))
            if self.proxy is not None:
                proxy.append(self.proxy(prompts, roll.texts, **columns))
            batch = pack(roll.prompt_ids, roll.completion_ids, t.tok.pad_token_id,
                         t.cfg.max_length).to(t.device)
            logp = sequence_logprobs(t.model, batch, temp)
            ref = self.start.logprobs(batch, temp)
            kl.append((rlfuse.kl_estimate(logp, ref, "k3") * batch.mask).sum(-1).mean().item())
            lengths += roll.lengths
            comps += [c[:-1] if c and c[-1] == t.tok.eos_token_id else c
                      for c in roll.completion_ids]
        per_seed = [_nanmean(g) for g in gold]
        per_item = [_nanmean(col) for col in zip(*gold)]
        spread = max(statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
                     standard_error([x for x in per_item if math.isfinite(x)]))
        row = {"step": t.step, "d": math.sqrt(max(0.0, statistics.fmean(kl))),
               "kl_seq": statistics.fmean(kl), "gold": statistics.fmean(per_seed),
               "gold_spread": spread,
               "proxy": statistics.fmean(_nanmean(p) for p in proxy) if proxy else math.nan,
               "length": statistics.fmean(lengths), "distinct_1": distinct_n(comps, 1),
               "distinct_2": distinct_n(comps, 2)}
        if judged is not None:
            from .winrate import controlled_win_rate

            res, texts = judged
            wr = controlled_win_rate(res.p, texts, columns[self.cfg.baseline])
            row.update({"winrate_raw": wr["raw"].estimate, "winrate_lc": wr["controlled"].estimate,
                        "winrate_lc_low": wr["controlled"].low,
                        "winrate_lc_high": wr["controlled"].high,
                        "judge_flip_rate": res.flip_rate, "judge_failures": res.failures})
        self.record(row)
        return row

    def record(self, row: dict) -> None:
        t = self.trainer
        start = self.rows[0] if self.rows else row
        self.rows.append(row)
        fit = gao_fit([r["d"] for r in self.rows], [r["gold"] - start["gold"] for r in self.rows])
        row["fit"] = fit
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _finite(v) for k, v in row.items()}) + "\n")
        if self.detector.best is None or row["gold"] > self.detector.best.gold:
            t.save(self.best_dir, keep=1)
        alert = self.detector.update(Point(t.step, row["d"], row["proxy"], row["gold"],
                                           row["gold_spread"]))
        if alert is None:
            return
        if fit["peak_d"] is not None:
            alert += (f"; Gao fit gold gain = d({fit['a']:.3g} - {fit['b']:.3g} log d) peaks at "
                      f"d = {fit['peak_d']:.3g}")
        t.monitor.alert(t.step, alert)
        if self.cfg.stop_at_peak:
            path = checkpoint.latest(self.best_dir)
            checkpoint.apply(checkpoint.read(path), t.model)
            t.monitor.alert(t.step, f"guard.stop_at_peak: restored the best-gold policy of step "
                                    f"{self.detector.best.step} ({path}) and stopped")
            self.stopped = True

    def close(self) -> None:
        if len(self.rows) >= 2:
            goodhart_plot(self.rows, os.path.join(self.trainer.cfg.out_dir, "plots",
                                                  "goodhart.png"))


def trainer_budget(cfg) -> int:
    """The completion budget of the trainer's rollouts (32 for trainers without one)."""
    section = getattr(cfg, cfg.algo)
    return section.rollout.max_new_tokens if hasattr(section, "rollout") else 32


def _nanmean(xs) -> float:
    ok = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    return sum(ok) / len(ok) if ok else math.nan


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    return v


def goodhart_plot(rows: list[dict], path: str) -> str:
    """Proxy and gold (relative to their start) against d = sqrt(KL), the Gao fit and its peak,
    and the best-gold point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = [r["d"] for r in rows]
    gold = [r["gold"] - rows[0]["gold"] for r in rows]
    fit = rows[-1]["fit"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(d, gold, "o-", color="#dd8452", label="gold - start")
    proxy = [r["proxy"] for r in rows]
    if all(math.isfinite(p) for p in proxy):
        ax2 = ax.twinx()
        ax2.plot(d, proxy, "s--", color="#4c72b0", label="proxy")
        ax2.set_ylabel("proxy reward", color="#4c72b0")
    if math.isfinite(fit["a"]) and max(d) > 0:
        xs = [max(d) * 1.2 * i / 100 for i in range(1, 101)]
        ax.plot(xs, [gao_curve(fit, x) for x in xs], color="#dd8452", lw=0.8, alpha=0.6,
                label="d(a - b log d)")
        if fit["peak_d"] is not None:
            ax.axvline(fit["peak_d"], color="#dd8452", ls=":", lw=1,
                       label=f"predicted peak d={fit['peak_d']:.2g}")
    best = max(range(len(rows)), key=lambda i: rows[i]["gold"])
    ax.scatter([d[best]], [gold[best]], s=90, facecolors="none", edgecolors="k",
               label=f"best gold (step {rows[best]['step']})")
    ax.set_xlabel("d = sqrt(KL(policy || start))")
    ax.set_ylabel("gold signal gain", color="#dd8452")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("Goodhart plot: proxy vs gold as the policy drifts", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
