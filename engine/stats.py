"""The statistics the guardrails share: intervals, a paired test, logistic regression, AUC.

Normal quantiles and p-values come from the standard library (`statistics.NormalDist`); the rest
is a screen of torch, so the guardrails need no scipy or scikit-learn:
  - `wilson`: the Wilson score interval of a proportion (good coverage down to n ~ 10 and at
    k = 0, where the normal interval collapses to a point);
  - `bootstrap`: the percentile interval of any statistic over items resampled with replacement
    (a fixed seed, so a report is reproducible); the caller's function gets all resamples at once
    as an index matrix, so means and medians cost one vectorized op;
  - `paired_test`: two systems on the same items (prompts, or prompt x seed cells): the mean
    difference, its standard error and a two-sided normal-approximation p-value;
  - `logistic_fit`: L2-regularized logistic regression by Newton's method (a few features, so
    the Hessian is tiny), with per-row weights (a tie is half a win and half a loss);
  - `auc`: the Mann-Whitney AUC with ties counted half (weighted, so that all bootstrap
    resamples are one batched op), and `cv_auc`, its k-fold out-of-fold version for a logistic
    model.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


def z_value(confidence: float) -> float:
    """The two-sided normal quantile: 1.96 for confidence 0.95."""
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: int  # the items it rests on

    def outside(self, lo: float, hi: float) -> bool:
        """Whether the whole interval lies outside [lo, hi] (a NaN interval never does)."""
        return self.low > hi or self.high < lo

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "n": self.n}

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"


NAN_INTERVAL = Interval(math.nan, math.nan, math.nan, 0)


def wilson(k: float, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval of the proportion k / n."""
    if n <= 0:
        return NAN_INTERVAL
    z, p = z_value(confidence), k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if k == 0 else max(0.0, center - half)  # exact at the ends, not 1e-17 off
    high = 1.0 if k == n else min(1.0, center + half)
    return Interval(p, low, high, n)


def bootstrap(stat: Callable[[Tensor], Tensor], n: int, estimate: float, n_boot: int = 1000,
              confidence: float = 0.95, seed: int = 0) -> Interval:
    """Percentile interval of a statistic of n items: `stat(idx)` takes an index matrix
    [n_boot, n] (each row one resample) and returns the statistic of each row [n_boot]."""
    return bootstrap_many(lambda i: stat(i)[:, None], n, [estimate], n_boot, confidence,
                          seed)[0]


def bootstrap_many(stat: Callable[[Tensor], Tensor], n: int, estimates: list[float],
                   n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> list[Interval]:
    """`bootstrap` of k statistics from the same resamples: stat(idx) returns [n_boot, k]."""
    if n == 0:
        return [NAN_INTERVAL] * len(estimates)
    gen = torch.Generator().manual_seed(seed)
    vals = stat(torch.randint(0, n, (n_boot, n), generator=gen)).double()  # [n_boot, k]
    a, out = (1 - confidence) / 2, []
    for est, v in zip(estimates, vals.T):
        v = v[v.isfinite()]
        if not len(v):
            out.append(Interval(est, math.nan, math.nan, n))
            continue
        lo, hi = torch.quantile(v, torch.tensor([a, 1 - a], dtype=v.dtype)).tolist()
        out.append(Interval(est, lo, hi, n))
    return out


def resample_counts(idx: Tensor, n: int) -> Tensor:
    """How often each of n items occurs in each resample [B, n] of bootstrap indices [B, n]: a
    fit weighted by these counts equals the fit on the resample."""
    return torch.zeros(len(idx), n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(idx.shape, dtype=torch.float64))


def mean_interval(x: Tensor, **kw) -> Interval:
    """Bootstrap interval of the mean of x [n]."""
    x = x.double()
    return bootstrap(lambda i: x[i].mean(-1), len(x), x.mean().item() if len(x) else math.nan,
                     **kw)


def median_interval(x: Tensor, **kw) -> Interval:
    """Bootstrap interval of the median of x [n] (the lower median, as torch.median)."""
    x = x.double()
    return bootstrap(lambda i: x[i].median(-1).values, len(x),
                     x.median().item() if len(x) else math.nan, **kw)


def paired_test(a, b, confidence: float = 0.95) -> dict:
    """b - a on the same items: mean difference, its standard error (sd / sqrt(n)), the normal
    interval and the two-sided p-value of 'no difference'."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_test needs two [n] score lists of equal length, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    d, n = b - a, len(a)
    mean = d.mean().item()
    se = d.std().item() / math.sqrt(n) if n > 1 else math.nan
    z = z_value(confidence)
    if se > 0:
        p = 2 * (1 - statistics.NormalDist().cdf(abs(mean) / se))
    else:  # every item moved by the same amount (or nothing moved)
        p = 1.0 if mean == 0 else 0.0
    return {"diff": mean, "se": se, "low": mean - z * se, "high": mean + z * se, "p": p, "n": n}


def standard_error(x) -> float:
    """Item-level standard error of the mean of x [n]: sd / sqrt(n)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    return x.std().item() / math.sqrt(len(x)) if len(x) > 1 else math.nan


def logistic_fit(x: Tensor, y: Tensor, weight: Tensor | None = None, l2: float = 1e-3,
                 intercept: bool = True, iters: int = 50) -> Tensor:
    """Coefficients [k (+1)] of P(y=1) = sigmoid(x . w (+ b)) for x [n, k], y [n] in [0, 1]
    (soft labels allowed); the intercept, when fitted, comes last and is not penalized.
    `weight` [n] weighs the rows; weight [B, n] fits B weightings at once (a bootstrap's
    resample counts) and returns [B, k (+1)]."""
    x, y = x.double(), y.double()
    if intercept:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    w = torch.ones(len(x), dtype=x.dtype) if weight is None else weight.double()
    single = w.ndim == 1
    w = w.reshape(-1, len(x))  # [B, n]
    k = x.shape[1]
    pen = l2 * w.sum(1, keepdim=True) * torch.ones(k, dtype=x.dtype)  # [B, k]
    if intercept:
        pen[:, -1] = 0.0
    beta = torch.zeros(len(w), k, dtype=x.dtype)
    eye = torch.eye(k, dtype=x.dtype)
    for _ in range(iters):
        p = torch.sigmoid(beta @ x.T)  # [B, n]
        grad = (w * (p - y)) @ x + pen * beta  # [B, k]
        hess = ((w * p * (1 - p))[:, None, :] * x.T) @ x + torch.diag_embed(pen) + 1e-9 * eye
        step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
        beta = beta - step
        if step.abs().max() < 1e-9:
            break
    return beta[0] if single else beta


def logistic_predict(x: Tensor, beta: Tensor, intercept: bool = True) -> Tensor:
    z = x.double() @ (beta[:-1] if intercept else beta)
    return torch.sigmoid(z + beta[-1] if intercept else z)


def auc(scores: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
    """P(score of a positive > score of a negative), ties counted half; NaN without both.
    `weight` [n] or [B, n] counts each item (a bootstrap's resample counts): returns [] or [B]."""
    scores, labels = scores.double(), labels.bool()
    w = torch.ones(len(scores), dtype=torch.float64) if weight is None else weight.double()
    _, group = torch.unique(scores, return_inverse=True)  # ties share a group, in score order
    g = int(group.max()) + 1 if len(group) else 0
    zero = torch.zeros(*w.shape[:-1], g, dtype=torch.float64)
    pos = zero.index_add(-1, group, w * labels)  # [.., G] weight of positives per score
    neg = zero.index_add(-1, group, w * ~labels)
    below = neg.cumsum(-1) - neg  # negatives strictly below each score
    wins = (pos * (below + 0.5 * neg)).sum(-1)
    return wins / (pos.sum(-1) * neg.sum(-1))  # 0 / 0 = NaN without both labels


def cv_auc(x: Tensor, y: Tensor, folds: int = 5, seed: int = 0, intercept: bool = False,
           n_boot: int = 1000, confidence: float = 0.95) -> Interval:
    """Out-of-fold AUC of a logistic model of y on x (each item scored by the model fitted on the
    other folds), with a bootstrap interval over the items' out-of-fold scores."""
    n = len(y)
    if n < 2 * folds:
        return NAN_INTERVAL
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    oof = torch.empty(n, dtype=torch.float64)
    for part in perm.chunk(folds):
        train = torch.ones(n, dtype=torch.bool)
        train[part] = False
        beta = logistic_fit(x[train], y[train], intercept=intercept)
        oof[part] = logistic_predict(x[part], beta, intercept)
    return bootstrap(lambda idx: auc(oof, y, resample_counts(idx, n)), n, auc(oof, y).item(), n_boot=n_boot, confidence=confidence,
                     seed=seed)
