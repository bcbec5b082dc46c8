"""Engine config (YAML + overrides + validation), reward functions and monitoring alerts."""
import json

import pytest

from rlfuse.engine.config import ConfigError, load_config, parse_overrides
from rlfuse.engine.monitor import Alerts, plot_metrics
from rlfuse.engine.rewards import (build_rewards, exact_answer, extract_answer, length_penalty,
                                   regex_format, repeated_ngram_penalty)
from rlfuse.engine.config import RewardSpec


# ----------------------------------------------------------------------------- config
def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo: grpo\nsteps: 7\noptim:\n  lr: 0.001\ngrpo:\n"
                    "  loss:\n    loss_type: dapo\n    eps_high: 0.28\n"
                    "  rollout:\n    samples_per_prompt: 4\n"
                    "    rewards:\n      - {name: exact_answer, weight: 1.0}\n"
                    "      - {name: length_penalty, weight: 0.5, kwargs: {max_chars: 10}}\n")
    cfg = load_config(str(path), ["grpo.loss.beta=0.04", "--optim.lr", "3e-4", "--seed=5",
                                  "model.lora_r=8", "grpo.reference=true"])
    assert cfg.algo == "grpo" and cfg.steps == 7 and cfg.seed == 5
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.grpo.rollout.samples_per_prompt == 4 and cfg.grpo.reference is True
    assert cfg.grpo.loss.loss_type == "dapo" and cfg.grpo.loss.beta == pytest.approx(0.04)
    assert cfg.grpo.loss.eps_high == pytest.approx(0.28)
    assert cfg.model.lora_r == 8
    assert [r.name for r in cfg.grpo.rollout.rewards] == ["exact_answer", "length_penalty"]
    assert cfg.grpo.rollout.rewards[1].kwargs == {"max_chars": 10}


def test_parse_overrides_forms():
    assert parse_overrides(["a.b=1", "--c", "x", "--d=2.5", "e=null", "f=true"]) == {
        "a": {"b": 1}, "c": "x", "d": 2.5, "e": None, "f": True}


@pytest.mark.parametrize("overrides, match", [
    (["stepz=3"], "unknown config key 'stepz'"),
    (["grpo.loss.betta=0.1"], "unknown config key 'grpo.loss.betta'"),
    (["optim.lr=-1"], "'optim.lr' must be > 0"),
    (["optim.lr=fast"], "'optim.lr' must be float"),
    (["algo=ppo2"], "'algo' must be one of"),
    (["grpo.rollout.samples_per_prompt=1"], "'grpo.rollout.samples_per_prompt' must be >= 2"),
    (["grpo.loss.loss_type=nope"], "loss_type must be one of"),
    (["dpo.loss.loss_type=nope"], "dpo.loss"),
    (["grpo.rollout.top_p=0"], "'grpo.rollout.top_p' must be in"),
    (["grpo.rollout.decoder=vllm"], "'grpo.rollout.decoder' must be one of"),
    (["model.gradient_checkpointing=maybe"], "must be true or false"),
    (["grpo.rollout.rewards=3"], "must be a list"),
    (["grpo.reference=false", "grpo.loss.beta=0.1"], "'grpo.reference' must be true when"),
    (["grpo.mini_batches=3"], "must divide"),
    (["steps"], "key=value"),
    (["--steps"], "needs a value"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_yaml_must_be_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(path))


# ----------------------------------------------------------------------------- rewards
def test_exact_answer():
    p = ["1+2=", "3+4=", "5+5=", "1+1="]
    assert exact_answer(p, ["3", " 7 ", "11", ""], answer=["3", "7", "10", "2"]) == [1, 1, 0, 0]
    # non-strict: the last number of a longer completion
    assert exact_answer(p[:2], ["so it is 3", "#### 7"], answer=["3", "7"], strict=False) == [1, 1]
    assert extract_answer("x \\boxed{42} y 7") == "42"
    assert extract_answer("1,234 apples") == "1234"
    assert extract_answer("none") is None
    with pytest.raises(ValueError, match="answer"):
        exact_answer(p, ["3"] * 4)


def test_format_length_ngram():
    assert regex_format([""] * 3, ["12", "12a", " 7 "], pattern=r"\d+") == [0.0, -1.0, 0.0]
    assert length_penalty([""] * 2, ["a" * 5, "a" * 15], max_chars=10) == [0.0, -0.5]
    assert repeated_ngram_penalty([""] * 3, ["abcabc", "abcdef", "ab"], n=3) == [
        pytest.approx(-0.25), 0.0, 0.0]


def test_weighted_rewards():
    fn = build_rewards([RewardSpec("exact_answer", 1.0),
                        RewardSpec("regex_format", 0.5, {"pattern": r"\d+", "penalty": -2.0})])
    r = fn(["1+1=", "1+1="], ["2", "x"], answer=["2", "2"])
    assert r == [1.0, -1.0]
    assert fn.last == {"reward/exact_answer": 0.5, "reward/regex_format": -1.0}
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        build_rewards([RewardSpec("nope")])


# ----------------------------------------------------------------------------- monitoring
def test_alerts_fire():
    a = Alerts()
    assert a.check({"kl": 1.0, "clip_fraction": 0.1, "reward_std": 0.5}) == []
    fired = a.check({"kl": 12.0, "clip_fraction": 0.4, "reward_std": 0.0})
    assert len(fired) == 3 and "KL" in fired[0] and "clip" in fired[1] and "reward std" in fired[2]
    for g in [1.0, 1.1, 0.9, 1.0, 1.2]:
        assert a.check({"grad_norm": g}) == []
    assert "grad_norm" in a.check({"grad_norm": 50.0})[0]
    ent = [2.0 * 0.9 ** i for i in range(11)]
    out = [a.check({"entropy": e}) for e in ent]
    assert out[-1] and "entropy" in out[-1][0] and not any(out[:-1])
    with pytest.raises(ValueError, match="unknown alert"):
        Alerts(kl=3)


def test_plot_metrics(tmp_path):
    rows = [{"step": i, "loss": 1.0 / (i + 1), "kl": 0.1 * i} for i in range(5)]
    path = plot_metrics(rows, str(tmp_path))
    with open(path, "rb") as f:
        assert f.read(4) == b"\x89PNG"
    json.dumps(rows)
