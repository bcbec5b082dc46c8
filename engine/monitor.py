"""Per-step monitoring: JSONL log, alerts, progress output, TensorBoard (if installed), PNG plots.

`Monitor.log(step, metrics)` appends one line of strict JSON to `<run>/metrics.jsonl` (NaN/inf
become null), checks the alert rules and prints (and appends to `<run>/alerts.jsonl`) any that
fire:
  kl_seq (per-sequence KL) > 10, kl (per-token mean KL) > 1, clip_fraction > 0.3, entropy in
  steady decline, grad_norm > 10x its running median, reward_std near 0 or NaN, reward_mean NaN
  (no completion scored); and, relative to the run's own running median where the seed notes
  give no number: the zero-std-group fraction, the truncated-completion fraction, the largest
  importance ratio; PPO's explained variance below 0 and the adaptive KL controller at its clip,
  each for N steps in a row.
Progress: a tqdm bar on a terminal; otherwise (a log file, or progress=false) one plain line
every `print_every` steps. `close()` draws every metric against step into
`<run>/plots/metrics.png`.
"""
from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import time
from collections import deque

import torch

ALERT_DEFAULTS = {
    "kl_seq_max": 10.0,              # per-sequence KL (`kl_seq`): the seed's "> 10-15"
    "kl_token_max": 1.0,             # per-token mean KL (`kl`), nats: a different unit
    "clip_fraction_max": 0.3,
    "entropy_window": 10,            # steps; "steady decline": >= 80% of the changes negative
    "entropy_drop": 0.3,             # ... and the entropy fell by > 30% over the window
    "grad_norm_spike": 10.0,         # x running median of the previous grad norms
    "reward_std_min": 1e-3,
    # run-relative (the seed gives no number): against the running median of earlier steps
    "zero_std_rise": 0.25,           # zero-std-group fraction above its running median by this
    "truncated_rise": 0.2,           # truncated-completion fraction above its running median
    "ratio_max_spike": 10.0,         # largest importance ratio > this x its running median
    "explained_variance_steps": 10,  # PPO: explained variance < 0 this many logged steps in a row
    "kl_saturation_steps": 10,       # adaptive KL controller at its clip this many in a row
}
RUNNING_MIN = 5  # earlier values a running median needs before a run-relative alert can fire


def peak_memory_mb() -> float:
    """Peak resident memory of this process (and peak CUDA allocation when on a GPU), MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if sys.platform == "darwin":
        rss /= 1024
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return max(rss, torch.cuda.max_memory_allocated() / 2**20)
    return rss


class Alerts:
    def __init__(self, **overrides):
        unknown = set(overrides) - set(ALERT_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown alert threshold(s) {sorted(unknown)}; "
                             f"valid: {sorted(ALERT_DEFAULTS)}")
        self.t = {**ALERT_DEFAULTS, **overrides}
        self.entropy = deque(maxlen=int(self.t["entropy_window"]) + 1)
        self.history = {k: deque(maxlen=100) for k in
                        ("grad_norm", "ratio_max", "frac_zero_std_groups", "truncated_fraction")}
        self.runs = {"explained_variance": 0, "kl_ctl_saturated": 0}  # steps in a row

    def _running(self, key: str, m: dict):
        """(value, running median of the earlier values or None); records the value."""
        if key not in m or not math.isfinite(m[key]):  # the trainer flags NaN/inf
            return None, None
        h = self.history[key]
        med = statistics.median(h) if len(h) >= RUNNING_MIN else None
        h.append(m[key])
        return m[key], med

    def _run(self, key: str, holds: bool) -> int:
        self.runs[key] = self.runs[key] + 1 if holds else 0
        return self.runs[key]

    def check(self, m: dict) -> list[str]:
        t, out = self.t, []
        if m.get("kl_seq", 0.0) > t["kl_seq_max"]:
            out.append(f"sequence KL {m['kl_seq']:.3g} > {t['kl_seq_max']}: the policy is far "
                       "from the reference")
        if m.get("kl", 0.0) > t["kl_token_max"]:
            out.append(f"per-token KL {m['kl']:.3g} > {t['kl_token_max']}: the policy is far "
                       "from the reference on every token")
        if m.get("clip_fraction", 0.0) > t["clip_fraction_max"]:
            out.append(f"clip fraction {m['clip_fraction']:.3g} > {t['clip_fraction_max']}: "
                       "learning rate or passes per batch may be too high")
        if "entropy" in m and math.isfinite(m["entropy"]):
            self.entropy.append(m["entropy"])
            e = list(self.entropy)
            if len(e) == self.entropy.maxlen:
                falls = sum(b < a for a, b in zip(e, e[1:]))
                if falls >= 0.8 * (len(e) - 1) and e[-1] < (1 - t["entropy_drop"]) * e[0]:
                    out.append(f"entropy in steady decline ({e[0]:.3g} -> {e[-1]:.3g} over "
                               f"{len(e) - 1} steps): possible collapse")
        g, med = self._running("grad_norm", m)
        if med is not None and g > t["grad_norm_spike"] * med:
            out.append(f"grad_norm {g:.3g} > {t['grad_norm_spike']}x running median "
                       f"{med:.3g}: instability")
        r, med = self._running("ratio_max", m)
        if med is not None and r > t["ratio_max_spike"] * med:
            out.append(f"largest importance ratio {r:.3g} > {t['ratio_max_spike']}x running "
                       f"median {med:.3g}: the update moved far from the sampling policy")
        z, med = self._running("frac_zero_std_groups", m)
        if med is not None and z > med + t["zero_std_rise"]:
            out.append(f"zero-std groups {z:.3g} of the batch, up from a running median of "
                       f"{med:.3g}: many prompts give no learning signal")
        c, med = self._running("truncated_fraction", m)
        if med is not None and c > med + t["truncated_rise"]:
            out.append(f"truncated completions {c:.3g}, up from a running median of {med:.3g}: "
                       "completions are growing into the token budget")
        if "explained_variance" in m and math.isfinite(m["explained_variance"]):
            n = self._run("explained_variance", m["explained_variance"] < 0)
            if n == t["explained_variance_steps"]:
                out.append(f"value head explained variance < 0 for {n} steps: the critic is "
                           "worse than a constant baseline")
        if "kl_ctl_saturated" in m:
            n = self._run("kl_ctl_saturated", m["kl_ctl_saturated"] > 0)
            if n == t["kl_saturation_steps"]:
                out.append(f"adaptive KL controller at its clip for {n} steps: the KL is far from "
                           "ppo.kl_target and the coefficient moves at its maximum rate")
        if "reward_mean" in m and math.isnan(m["reward_mean"]):
            out.append("reward_mean is NaN: no completion in the batch was scored")
        elif "reward_std" in m and not m["reward_std"] >= t["reward_std_min"]:  # NaN fires too
            out.append(f"reward std {m['reward_std']:.3g} ~ 0: no learning signal in the batch")
        return out


class Monitor:
    def __init__(self, out_dir: str, total_steps: int, start_step: int = 0, alerts: dict = None,
                 progress: bool = True, desc: str = "train", print_every: int = 10):
        self.dir = out_dir
        self.desc, self.total, self.print_every = desc, total_steps, print_every
        self.printed = self.start = start_step
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.alerts = Alerts(**(alerts or {}))
        self.history = self._read_history(start_step)
        self.file = open(self.path, "a")
        self.t0 = time.time()
        self.bar = None
        if progress and sys.stderr.isatty():  # in a log file, a bar is a run of \r lines
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True,
                            file=sys.stderr)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except Exception:  # tensorboard not installed
            pass

    def _read_history(self, start_step: int) -> list[dict]:
        """Earlier steps of a resumed run (later ones were lost with the interrupted run)."""
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            rows = [json.loads(x) for x in f if x.strip()]
        rows = [r for r in rows if r.get("step", 0) <= start_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return rows

    def log(self, step: int, metrics: dict) -> list[str]:
        m = {k: float(v) for k, v in metrics.items()}
        m["peak_memory_mb"] = peak_memory_mb()
        fired = self.alerts.check(m)
        for a in fired:
            self.alert(step, a)
        m = {k: v if math.isfinite(v) else None for k, v in m.items()}  # JSON has no NaN
        row = {"step": step, "time": round(time.time() - self.t0, 3), **m}
        if fired:
            row["alerts"] = fired
        self.history.append(row)
        self.file.write(json.dumps(row, allow_nan=False) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in m.items():
                if v is not None:
                    self.tb.add_scalar(k, v, step)
        shown = {k: "nan" if m[k] is None else f"{m[k]:.3g}"
                 for k in ("loss", "reward_mean", "kl", "kl_seq", "grad_norm") if k in m}
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(shown, refresh=False)
            self.bar.refresh()
        elif self.print_every and (step - self.printed >= self.print_every or step == self.total):
            self.printed = step
            rate = (time.time() - self.t0) / max(1, step - self.start)
            self.write(f"{self.desc} step {step}/{self.total} "
                       + " ".join(f"{k} {v}" for k, v in shown.items())
                       + f" | {rate:.2f} s/step, eta {rate * (self.total - step) / 60:.1f} min")
        return fired

    def alert(self, step: int, msg: str) -> None:
        """Print an alert and append it to alerts.jsonl."""
        with open(os.path.join(self.dir, "alerts.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "alert": msg}) + "\n")
        self.write(f"[alert] step {step}: {msg}")

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self, plot: bool = True) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if plot and self.history:
            plot_metrics(self.history, os.path.join(self.dir, "plots"))


def plot_metrics(rows: list[dict], out_dir: str) -> str:
    """One PNG, `<out_dir>/metrics.png`: a small panel per metric (value against step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    keys = sorted({k for r in rows for k, v in r.items()
                   if k not in ("step", "time") and isinstance(v, (int, float))})
    cols = min(4, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.2 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(k, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(out_dir, "metrics.png")
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path
