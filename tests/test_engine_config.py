"""Engine config (YAML + overrides + validation), reward functions and monitoring alerts."""
import dataclasses
import json

import pytest

from rlfuse.engine import ALGORITHMS, trainer_for
from rlfuse.engine.config import ConfigError, TrainConfig, field_help, load_config
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


def test_override_forms_and_lenient_values(tmp_path):
    cfg = load_config(None, ["steps=3", "--seed", "4", "--log-every=2", "model.path=null",
                             "--resume", "progress=false", "grpo.loss.eps_high=0.3"])
    assert (cfg.steps, cfg.seed, cfg.log_every, cfg.model.path) == (3, 4, 2, None)
    assert cfg.resume is True and cfg.progress is False and cfg.grpo.loss.eps_high == 0.3
    assert load_config(None, ["--resume", "false"]).resume is False
    # one rule for YAML and the command line: a value counts as what it reads as
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-6\nsteps: '8'\n")
    cfg = load_config(str(path), ["grpo.rollout.samples_per_prompt=4"])
    assert cfg.optim.lr == 1e-6 and cfg.steps == 8 and cfg.grpo.rollout.samples_per_prompt == 4
    assert isinstance(cfg.optim.lr, float) and isinstance(cfg.steps, int)
    with pytest.raises(ConfigError, match="'steps'.*8.5"):
        load_config(None, ["steps=8.5"])


def test_saved_config_reads_back(tmp_path):
    import yaml

    from rlfuse.engine.config import to_dict

    cfg = load_config(None, ["algo=grpo", "grpo.rollout.rewards=[{name: length_penalty, weight: 0.5, "
                             "kwargs: {max_chars: 10}}]", "alerts={kl: 5.0}", "optim.lr=1e-6"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("overrides, match", [
    (["stepz=3"], "unknown config key 'stepz'"),
    (["grpo.loss.betta=0.1"], "unknown config key 'grpo.loss.betta'"),
    (["optim.lr=-1"], "'optim.lr' must be > 0"),
    (["optim.lr=fast"], "config key 'optim.lr': expected a float"),
    (["algo=ppo2"], "'algo' must be one of"),
    (["grpo.rollout.samples_per_prompt=1"], "'grpo.rollout.samples_per_prompt' must be >= 2"),
    (["grpo.loss.loss_type=nope"], "section 'grpo.loss': loss_type must be one of"),
    (["dpo.loss.loss_type=nope"], "dpo.loss"),
    (["grpo.rollout.rewards=[{name: nope}]"],
     r"section 'grpo.rollout.rewards\[0\]': unknown reward 'nope'"),
    (["steps.x=1"], "'steps' is a value, not a section"),
    (["grpo.rollout.top_p=0"], "'grpo.rollout.top_p' must be in"),
    (["grpo.rollout.decoder=vllm"], "'grpo.rollout.decoder' must be one of"),
    (["model.gradient_checkpointing=maybe"], "'model.gradient_checkpointing': expected a bool"),
    (["grpo.rollout.rewards=3"], "'grpo.rollout.rewards'"),
    (["grpo.reference=false", "grpo.loss.beta=0.1"], "'grpo.reference' must be true when"),
    (["grpo.mini_batches=3"], "must divide"),
    (["steps"], "key=value"),
    (["--steps"], "--steps: expected one argument"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize("text, match", [
    ("- 1\n- 2\n", "must hold a mapping"),
    ("steps: 3\ngrpo:\n  loss:\n    betta: 1\n",
     r"c.yaml: unknown config key 'grpo.loss.betta'; valid keys here: \[.*'beta'"),
    ("grpo:\n  rollout:\n    rewards:\n      - {name: exact_answer, wieght: 2}\n",
     r"unknown config key 'grpo.rollout.rewards\[0\].wieght'"),
    ("grpo:\n  loss: 3\n", "config section 'grpo.loss' must be a mapping"),
    ("steps: 3\ngrpo: [1\n", r"c.yaml:3: YAML syntax error"),
])
def test_yaml_errors(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(str(path))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


@dataclasses.dataclass(frozen=True)
class _Documented:
    # a section comment, not a meaning
    plain: int = 0
    wrapped: str = "a # b"   # first part,
                             # second part
    # another section comment
    single: float = 1.0      # one line


def test_field_help_reads_the_trailing_comments():
    from rlfuse import PolicyLossConfig

    assert field_help(_Documented) == {"wrapped": "first part, second part", "single": "one line"}
    assert field_help(TrainConfig)["steps"].startswith("optimizer steps")
    assert field_help(PolicyLossConfig)["beta"] == "KL-to-reference coefficient in the loss"


def test_one_registry_of_algorithms():
    for name in ALGORITHMS:
        assert load_config(None, [f"algo={name}"]).algo == name
        assert trainer_for(name).name == name
    with pytest.raises(ConfigError, match=r"'algo' must be one of \['sft', 'grpo', 'dpo', 'ppo'\]"):
        load_config(None, ["algo=rm"])
    with pytest.raises(ConfigError, match="algo must be one of"):
        trainer_for("rm")


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
