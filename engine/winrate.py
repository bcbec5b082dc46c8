"""Length- and style-controlled win rate (AlpacaEval's length-controlled GLM, Arena-Hard's style
control).

Each comparison i of a model's response a_i with a baseline's b_i has an outcome y_i in [0, 1]
(1 a win, 0 a loss, 1/2 a tie, or a judge's probability) and style covariates x_i: the
normalized length difference (len_a - len_b) / (len_a + len_b) and the differences of the
markdown header, list, bold and sycophancy-marker densities (rlfuse.engine.audit), each scaled
to unit variance. The fit is the logistic GLM
    P(a beats b) = sigmoid(theta + x_i . gamma),
and the controlled win rate is sigmoid(theta): the win rate the model would have with the
baseline's style (x = 0). AlpacaEval also has a per-instruction difficulty term; with one
baseline response per prompt it is absorbed in theta, so this is the Arena-Hard form. The raw
win rate is mean(y). Intervals are percentile bootstraps over comparisons, refitting each time;
gamma > 0 on a covariate means the judge rewards more of it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .audit import STYLE_KEYS, style_difference, style_features, word_count
from .stats import bootstrap, bootstrap_many, logistic_fit, resample_counts

COVARIATES = ("length",) + STYLE_KEYS[1:]


def style_covariates(a: Sequence[str], b: Sequence[str], count_tokens=word_count) -> torch.Tensor:
    """[n, len(COVARIATES)] fp64: a's style minus b's (see the module docstring), unscaled."""
    rows = [style_difference(style_features(x, count_tokens(x)), style_features(y, count_tokens(y)))
            for x, y in zip(a, b)]
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(COVARIATES))


def _fit(x, y, weight=None) -> torch.Tensor:
    """(controlled win rate, gamma...) [.., 1 + k] of the fit (one per row of `weight`)."""
    beta = logistic_fit(x, y, weight)  # [.., k + 1]: gamma, then theta
    return torch.cat([torch.sigmoid(beta[..., -1:]), beta[..., :-1]], -1)


def controlled_win_rate(outcomes: Sequence[float], a: Sequence[str], b: Sequence[str],
                        count_tokens=word_count, n_boot: int = 200, confidence: float = 0.95,
                        seed: int = 0) -> dict:
    """{'raw', 'controlled', 'coefficients': {covariate: interval}} (Interval objects) of model
    responses a against baseline responses b with outcomes [n] in [0, 1] (NaN: excluded)."""
    y = torch.tensor(outcomes, dtype=torch.float64)
    keep = ~y.isnan()
    if not bool(keep.any()):
        raise ValueError("controlled_win_rate: no outcome to fit (all NaN)")
    x = style_covariates(a, b, count_tokens)[keep]
    y = y[keep]
    x = x / x.std(0).clamp_min(1e-12) if len(y) > 1 else x  # a constant column stays 0
    full = _fit(x, y)  # [1 + k]
    kw = dict(n_boot=n_boot, confidence=confidence, seed=seed)
    fits = bootstrap_many(lambda idx: _fit(x, y, resample_counts(idx, len(y))), len(y),
                          full.tolist(), **kw)
    return {"raw": bootstrap(lambda i: y[i].mean(-1), len(y), y.mean().item(), **kw),
            "controlled": fits[0], "coefficients": dict(zip(COVARIATES, fits[1:])),
            "n": len(y)}
