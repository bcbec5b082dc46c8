"""Alerts in the right units: sequence KL vs per-token KL, and the run-relative ones (zero-std
groups, truncated completions, largest importance ratio), PPO's explained variance and the KL
controller at its clip, N steps in a row; the metrics the trainers log for them."""
import pytest

from rlfuse.engine.monitor import ALERT_DEFAULTS, Alerts, RUNNING_MIN
from rlfuse.engine.ppo import KLController


def test_kl_alerts_use_their_own_units():
    a = Alerts()
    # a 40-token completion with 0.3 nats per token: 12 nats per sequence
    fired = a.check({"kl": 0.3, "kl_seq": 12.0})
    assert len(fired) == 1 and "sequence KL 12" in fired[0]
    fired = a.check({"kl": 1.5, "kl_seq": 3.0})
    assert len(fired) == 1 and "per-token KL 1.5" in fired[0]
    assert a.check({"kl": 0.3, "kl_seq": 9.0}) == []


@pytest.mark.parametrize("key, calm, spike, word", [
    ("frac_zero_std_groups", 0.1, 0.5, "zero-std groups"),
    ("truncated_fraction", 0.05, 0.4, "truncated"),
    ("ratio_max", 1.5, 20.0, "importance ratio"),
])
def test_run_relative_alerts(key, calm, spike, word):
    a = Alerts()
    assert a.check({key: spike}) == []  # no history yet: nothing to be relative to
    a = Alerts()
    for _ in range(RUNNING_MIN):
        assert a.check({key: calm}) == []
    fired = a.check({key: spike})
    assert len(fired) == 1 and word in fired[0]
    a = Alerts()
    for _ in range(RUNNING_MIN):
        a.check({key: spike})
    assert a.check({key: spike}) == []  # high from the start: the run's normal


@pytest.mark.parametrize("key, bad, good", [("explained_variance", -0.2, 0.1),
                                            ("kl_ctl_saturated", 1.0, 0.0)])
def test_streak_alerts_fire_once_after_n_steps(key, bad, good):
    n = 4
    a = Alerts(**{"explained_variance_steps": n, "kl_saturation_steps": n})
    out = [a.check({key: bad}) for _ in range(n - 1)] + [a.check({key: good})]
    assert not any(out)  # interrupted: the count restarts
    out = [a.check({key: bad}) for _ in range(2 * n)]
    assert [bool(x) for x in out] == [False] * (n - 1) + [True] + [False] * n


def test_kl_controller_reports_saturation():
    ctl = KLController(0.1, target=1.0, horizon=100)
    assert ctl.update(5.0, 10) is True and ctl.value == pytest.approx(0.1 * 1.02)
    assert ctl.update(1.1, 10) is False
    assert KLController(0.1).update(5.0, 10) is False  # fixed coefficient: never


def test_every_threshold_is_overridable():
    with pytest.raises(ValueError, match="unknown alert"):
        Alerts(kl_max=3)
    assert Alerts(**{k: v for k, v in ALERT_DEFAULTS.items()}).t == ALERT_DEFAULTS
