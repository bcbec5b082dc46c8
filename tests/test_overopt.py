"""The over-optimization detector: the Gao et al. fit and its peak on exact and noisy curves, the
alert on a synthetic Goodhart run (and its silence on honest ones), and the Guard hook in a GRPO
run: held-out rows, the best-gold checkpoint, the Goodhart plot, and stop_at_peak."""
import dataclasses
import json
import math
import random

import pytest
import torch

from rlfuse.engine import checkpoint, judge, rewards
from rlfuse.engine.data import write_jsonl
from rlfuse.engine.config import GuardConfig, ConfigError
from rlfuse.engine.grpo import GRPOTrainer
from rlfuse.engine.overopt import Detector, Point, distinct_n, gao_curve, gao_fit
from rlfuse.engine.model import char_tokenizer
from test_engine_trainers import ROWS, make_cfg, model_for


def test_gao_fit_recovers_the_curve_and_its_peak():
    d = [0.25 * i for i in range(1, 25)]
    gain = [x * (0.8 - 0.4 * math.log(x)) for x in d]
    fit = gao_fit([0.0] + d, [0.0] + gain)
    assert fit["a"] == pytest.approx(0.8) and fit["b"] == pytest.approx(0.4)
    assert fit["peak_d"] == pytest.approx(math.exp(0.8 / 0.4 - 1))
    assert fit["peak_gain"] == pytest.approx(max(gao_curve(fit, x / 100) for x in range(1, 800)),
                                             rel=1e-3)
    rng = random.Random(0)
    noisy = gao_fit(d, [g + rng.gauss(0, 0.02) for g in gain])
    assert noisy["peak_d"] == pytest.approx(fit["peak_d"], rel=0.15)
    rising = gao_fit(d, [0.3 * x for x in d])  # no over-optimization in range: no peak
    assert rising["peak_d"] is None


def run(gold, proxy, spread=0.02, patience=2):
    det = Detector(patience)
    fired = [det.update(Point(10 * i, 0.3 * i, p, g, spread)) for i, (p, g) in
             enumerate(zip(proxy, gold))]
    return det, [i for i, a in enumerate(fired) if a]


def test_alert_fires_once_after_gold_turns_while_proxy_rises():
    d = [0.3 * i for i in range(20)]
    gold = [0.2 + gao_curve({"a": 0.5, "b": 0.4}, x) for x in d]  # peaks at d = 1.28 (i ~ 4)
    proxy = [0.1 * i for i in range(20)]
    det, fired = run(gold, proxy)
    assert len(fired) == 1
    peak = max(range(20), key=lambda i: gold[i])
    assert det.best.step == 10 * peak
    # fires only once gold is below its best by > spread on `patience` evaluations in a row
    first_below = next(i for i in range(peak, 20) if gold[peak] - gold[i] > 0.02)
    assert fired[0] == first_below + 1
    assert det.update(Point(200, 9.0, 9.0, -9.0, 0.0)) is None  # it fires once per run


@pytest.mark.parametrize("case", ["gold rises", "proxy falls too", "noise within spread"])
def test_no_alert_without_goodhart(case):
    rng = random.Random(1)
    n = 20
    proxy = [0.1 * i for i in range(n)]
    gold = [0.5 + 0.02 * i for i in range(n)]
    if case == "proxy falls too":
        gold = [0.5 - 0.02 * i for i in range(n)]
        proxy = [1 - 0.1 * i for i in range(n)]
    if case == "noise within spread":
        gold = [0.5 + rng.uniform(-0.01, 0.01) for _ in range(n)]
    assert run(gold, proxy, spread=0.02)[1] == []


def test_distinct_n():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)


def test_guard_config_errors():
    with pytest.raises(ConfigError, match="'guard.data'"):
        GuardConfig(every=2)
    with pytest.raises(ConfigError, match="'guard.seeds'"):
        GuardConfig(every=2, data="x.jsonl", seeds=())


class Rising:
    """A proxy that rises with every call (what the detector sees of a hacked reward model)."""
    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, completions, **kw):
        self.calls += 1
        return [0.1 * self.calls + 0.01 * (i % 2) for i in range(len(completions))]


class Falling:
    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, completions, **kw):
        self.calls += 1
        return [1.0 - 0.2 * self.calls] * len(completions)


def guarded(tmp_path, tok, monkeypatch, steps=4, resume=False, **guard):
    """A 4-step GRPO run whose proxy rises at every call; gold falls at every call, unless a
    judge is given."""
    cfg = make_cfg(tmp_path, "grpo", steps=steps, resume=resume)
    monkeypatch.setattr(rewards, "build_rewards", lambda specs: Falling())
    data = str(tmp_path / "heldout.jsonl")
    write_jsonl(data, [{**r, "reference": r["answer"]} for r in ROWS[:4]])
    g = GuardConfig(every=2, data=data, seeds=(0,), patience=1, **guard)
    cfg = dataclasses.replace(cfg, guard=g, keep_checkpoints=1)
    return GRPOTrainer(cfg, model_for(tok), tok, reward_fn=Rising())


def test_guard_logs_keeps_the_best_and_plots(tmp_path, monkeypatch):
    tok = char_tokenizer()
    t = guarded(tmp_path, tok, monkeypatch)
    t.fit()
    out = tmp_path / "run"
    rows = [json.loads(x) for x in (out / "guard.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert rows[0]["d"] == pytest.approx(0.0, abs=1e-3) and rows[-1]["d"] > 0
    assert all(0 < r["distinct_1"] <= 1 and r["length"] > 0 for r in rows)
    assert rows[1]["gold"] < rows[0]["gold"] and rows[1]["proxy"] > rows[0]["proxy"]
    best = checkpoint.latest(str(out / "checkpoints" / "best-gold"))
    assert best.endswith("step-000000")  # gold only fell after the start
    alerts = [json.loads(x)["alert"] for x in (out / "alerts.jsonl").read_text().splitlines()]
    assert sum("over-optimization" in a for a in alerts) == 1
    assert (out / "plots" / "goodhart.png").read_bytes()[:4] == b"\x89PNG"
    assert t.step == 4  # no stop_at_peak: it trains on


def test_a_resumed_run_keeps_the_guards_best_gold_and_its_alert(tmp_path, monkeypatch):
    tok = char_tokenizer()
    guarded(tmp_path, tok, monkeypatch, steps=2).fit()  # evaluations at 0 (best) and 2 (alert)
    out = tmp_path / "run"
    (out / "guard.jsonl").write_text((out / "guard.jsonl").read_text()
                                     + json.dumps({"step": 3, "gold": 9.0}) + "\n")  # lost
    t = guarded(tmp_path, tok, monkeypatch, steps=4, resume=True)  # fresh rewards: gold 0.8 again
    t.fit()
    rows = [json.loads(x) for x in (out / "guard.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert t.step == 4 and rows[2]["gold"] == pytest.approx(rows[0]["gold"])
    best = checkpoint.latest(str(out / "checkpoints" / "best-gold"))
    assert best.endswith("step-000000")  # step 4 only ties the best of the first run
    alerts = [json.loads(x)["alert"] for x in (out / "alerts.jsonl").read_text().splitlines()]
    assert sum("over-optimization" in a for a in alerts) == 1  # not fired again


def test_stop_at_peak_restores_the_best_gold_policy(tmp_path, monkeypatch):
    tok = char_tokenizer()
    t = guarded(tmp_path, tok, monkeypatch, stop_at_peak=True)
    start = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()
    assert t.step == 2  # the alert at the first evaluation after the start stopped it
    now = t.model.state_dict()
    assert all(torch.equal(start[k], now[k]) for k in start)


def test_guard_with_a_judge_logs_the_controlled_win_rate(tmp_path, monkeypatch):
    def verdict(prompts, first, second):  # prefers the longer response, and the first shown
        return [1 / (1 + math.exp(-(len(a) - len(b) + 0.5))) for a, b in zip(first, second)]

    monkeypatch.setattr(judge, "load_judge", lambda path: judge.PairwiseJudge(verdict))
    tok = char_tokenizer()
    guarded(tmp_path, tok, monkeypatch, judge="any/folder").fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "guard.jsonl").read_text().splitlines()]
    for r in rows:
        assert 0 <= r["gold"] <= 1 and r["judge_failures"] == 0 and 0 <= r["judge_flip_rate"] <= 1
        assert r["winrate_lc_low"] <= r["winrate_lc"] <= r["winrate_lc_high"]
        assert r["winrate_raw"] == pytest.approx(r["gold"])  # one seed: gold is the raw win rate
