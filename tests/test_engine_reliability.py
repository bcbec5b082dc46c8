"""No work lost: out_dir re-use, resume from the newest readable checkpoint, time-based saves, a
full disk, non-finite values, changed settings on resume, SIGTERM's exit, checkpoints as the next
stage's model.path (SFT -> GRPO -> DPO through the CLI), and plain progress lines in log files.
Tiny models, a few steps each."""
import dataclasses
import errno
import json
import math
import os
import shlex
import signal
import warnings

import pytest
import torch
from test_engine_trainers import TINY, make_cfg, model_for

from rlfuse.engine import checkpoint, sft
from rlfuse.engine import trainer as trainer_mod
from rlfuse.engine.checkpoint import CheckpointError
from rlfuse.engine.cli import main as cli_main
from rlfuse.engine.config import ConfigError, ModelConfig, OptimConfig
from rlfuse.engine.grpo import GRPOTrainer
from rlfuse.engine.model import char_tokenizer, load_policy
from rlfuse.engine.monitor import Alerts, Monitor
from rlfuse.engine.sft import SFTTrainer
from rlfuse.engine.trainer import NonFiniteError, config_changes


@pytest.fixture
def tok():
    return char_tokenizer()


def sft_run(tmp_path, tok, seed=0, **kw):
    return SFTTrainer(make_cfg(tmp_path, "sft", **kw), model_for(tok, seed), tok)


def names(t):
    return [os.path.basename(p) for p in checkpoint.checkpoints(t.ckpt_dir)]


def metric_steps(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(x)["step"] for x in f]


def strict_json(line):
    def bad(c):
        raise ValueError(f"not JSON: {c}")
    return json.loads(line, parse_constant=bad)


# ----------------------------------------------------------------------------- 1. out_dir re-use
def test_out_dir_with_a_previous_run_is_refused_and_kept(tmp_path, tok):
    first = sft_run(tmp_path, tok, steps=4, save_every=2)
    first.fit(plot=False)
    assert names(first) == ["step-000002", "step-000004"]
    with pytest.raises(ConfigError, match=r"'out_dir'.*previous run.*resume=true.*overwrite=true"):
        sft_run(tmp_path, tok, steps=2, save_every=1)
    assert names(first) == ["step-000002", "step-000004"]
    assert metric_steps(first.cfg.out_dir) == [1, 2, 3, 4]  # not truncated


def test_overwrite_replaces_the_previous_run(tmp_path, tok):
    sft_run(tmp_path, tok, steps=4, save_every=2).fit(plot=False)
    second = sft_run(tmp_path, tok, steps=2, save_every=1, overwrite=True)
    second.fit(plot=False)
    assert names(second) == ["step-000001", "step-000002"]  # its own, not pruned
    assert checkpoint.latest(second.ckpt_dir) == second.last_checkpoint
    assert second.last_checkpoint.endswith("step-000002")
    assert metric_steps(second.cfg.out_dir) == [1, 2]


def test_prune_keeps_the_checkpoint_just_written(tmp_path, tok):
    t = sft_run(tmp_path, tok, steps=1, keep_checkpoints=1)
    os.makedirs(os.path.join(t.ckpt_dir, "step-000099"))  # a stray, higher-numbered folder
    t.step = 3
    path = t.save()
    assert names(t) == ["step-000003"] and checkpoint.latest(t.ckpt_dir) == path


# ----------------------------------------------------------------------------- 2. resume
def _truncate(path, n=10):
    with open(path, "r+b") as f:
        f.truncate(n)


def _nan_weights(path):
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    next(iter(state.values()))[0] = math.nan
    save_file(state, path)


@pytest.mark.parametrize("damage", ["trainer.pt", "model.safetensors", "meta.json", "latest",
                                    "nan-weights"])
def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, tok, capsys, damage):
    t = sft_run(tmp_path, tok, steps=4, save_every=2, keep_checkpoints=3)
    t.fit(plot=False)
    newest = os.path.join(t.ckpt_dir, "step-000004")
    if damage == "latest":  # dangling `latest`; every step folder is good
        with open(os.path.join(t.ckpt_dir, "latest"), "w") as f:
            f.write("step-000123")
    elif damage == "nan-weights":
        _nan_weights(os.path.join(newest, "model.safetensors"))
    else:
        _truncate(os.path.join(newest, damage))
    capsys.readouterr()
    cfg = dataclasses.replace(t.cfg, resume=True, steps=4)
    resumed = SFTTrainer(cfg, model_for(tok, seed=1), tok)
    rows = resumed.fit(plot=False)
    err = capsys.readouterr().err
    want = 4 if damage == "latest" else 2
    assert f"resumed sft at step {want} from {os.path.join(t.ckpt_dir, f'step-00000{want}')}" in err
    if damage != "latest":
        assert f"skipping unreadable checkpoint {newest}" in err
        assert ("non-finite weights" if damage == "nan-weights" else damage) in err
        assert os.path.isdir(newest + ".corrupt")
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for a, b in zip(resumed.params, t.params):  # steps 3-4 again, from step 2's state
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_without_a_checkpoint_stops_and_keeps_the_metrics(tmp_path, tok):
    crashed = sft_run(tmp_path, tok, steps=3, keep_checkpoints=0)  # no checkpoint at all
    crashed.fit(plot=False)
    assert names(crashed) == []
    with pytest.raises(CheckpointError, match="resume=true but .* holds no checkpoint"):
        sft_run(tmp_path, tok, steps=3, resume=True)
    assert metric_steps(crashed.cfg.out_dir) == [1, 2, 3]


def test_resume_with_only_unreadable_checkpoints_stops(tmp_path, tok):
    t = sft_run(tmp_path, tok, steps=2)
    t.fit(plot=False)
    _truncate(os.path.join(t.last_checkpoint, "trainer.pt"))
    again = sft_run(tmp_path, tok, steps=2, resume=True)
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        again.fit(plot=False)
    assert metric_steps(t.cfg.out_dir) == [1, 2]


# ----------------------------------------------------------------------------- 3. timed saves
def test_saves_every_n_minutes(tmp_path, tok, monkeypatch):
    real, offset = trainer_mod.time.monotonic, [0.0]
    monkeypatch.setattr(trainer_mod.time, "monotonic", lambda: real() + offset[0])
    t = sft_run(tmp_path, tok, steps=6, keep_checkpoints=0, save_every_minutes=10)
    step, save, seen = t.train_step, t.save, []

    def slow_step():  # each step "takes" 4 minutes: a save after steps 3 and 6 (>= 10 min)
        offset[0] += 4 * 60
        return step()
    t.train_step = slow_step
    t.save = lambda: seen.append(t.step) or save()
    t.fit(plot=False)
    assert seen == [3, 6]


# ----------------------------------------------------------------------------- 4. full disk
def test_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, tok,
                                                                        monkeypatch):
    t = sft_run(tmp_path, tok, steps=1)
    t.fit(plot=False)
    good = t.last_checkpoint
    real_save = torch.save

    def full(obj, path):  # torch's writer on a full disk: a partial file, then this error
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(checkpoint.torch, "save", full)
    t.step = 2
    with pytest.raises(CheckpointError, match=r"no space left on device while writing "
                                              r"checkpoint .*step-000002.*step-000001 is intact"):
        t.save()
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert sorted(os.listdir(t.ckpt_dir)) == ["latest", "step-000001"]  # no .tmp left
    assert checkpoint.latest(t.ckpt_dir) == good
    checkpoint.read(good)


def test_a_disk_that_holds_keep_checkpoints_rolls_forward(tmp_path, tok, monkeypatch):
    t = sft_run(tmp_path, tok, steps=1, keep_checkpoints=2)
    real_save = torch.save

    def quota(obj, path):  # room for two checkpoint folders, counting the one being written
        folders = [d for d in os.listdir(t.ckpt_dir) if os.path.isdir(os.path.join(t.ckpt_dir, d))]
        if len(folders) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path)
    monkeypatch.setattr(checkpoint.torch, "save", quota)
    for step in range(1, 5):
        t.step = step
        t.save()
    assert names(t) == ["step-000003", "step-000004"]


# ----------------------------------------------------------------------------- 5. non-finite
def _nan_at(monkeypatch, steps):
    """SFT's loss is NaN at the given (1-based) steps."""
    real, calls = sft.nll_loss, [0]

    def nll(model, batch):
        calls[0] += 1
        loss, n = real(model, batch)
        return (loss * math.nan if calls[0] in steps else loss), n
    monkeypatch.setattr(sft, "nll_loss", nll)


def test_nonfinite_step_is_skipped_with_an_alert(tmp_path, tok, monkeypatch):
    _nan_at(monkeypatch, {2})
    t = sft_run(tmp_path, tok, steps=3, keep_checkpoints=1)
    weights = []
    step = t.train_step
    t.train_step = lambda: (weights.append([p.detach().clone() for p in t.params]), step())[1]
    rows = t.fit(plot=False)
    before, after = weights[1], [p.detach() for p in t.params]  # before step 2 / after step 3
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))  # step 2 skipped
    assert not all(torch.equal(a, b) for a, b in zip(before, after))  # step 3 trained
    assert rows[1]["loss"] is None and rows[1]["grad_norm"] is None
    with open(os.path.join(t.cfg.out_dir, "metrics.jsonl")) as f:
        lines = [strict_json(x) for x in f]
    assert [r["step"] for r in lines] == [1, 2, 3]
    with open(os.path.join(t.cfg.out_dir, "alerts.jsonl")) as f:
        alerts = [json.loads(x) for x in f]
    assert any(a["step"] == 2 and "non-finite loss, grad_norm" in a["alert"] for a in alerts)
    checkpoint.read(t.last_checkpoint)


@pytest.mark.parametrize("policy, limit, stop_at", [("stop", 5, 2), ("skip", 2, 3)])
def test_nonfinite_policy_stops_the_run(tmp_path, tok, monkeypatch, policy, limit, stop_at):
    _nan_at(monkeypatch, {2, 3, 4})
    t = sft_run(tmp_path, tok, steps=5, save_every=1, keep_checkpoints=5, nonfinite=policy,
                max_nonfinite_skips=limit)
    with pytest.raises(NonFiniteError, match=f"stopped at step {stop_at}: non-finite loss"):
        t.fit(plot=False)
    assert names(t) == ["step-000001"]  # a skipped step is not saved
    assert metric_steps(t.cfg.out_dir)[-1] == stop_at


def test_nonfinite_weights_are_never_saved(tmp_path, tok):
    t = sft_run(tmp_path, tok, steps=1)
    t.fit(plot=False)
    with torch.no_grad():
        t.params[0][0, 0] = math.inf
    t.step = 2
    with pytest.raises(CheckpointError, match=r"not saving step 2: the weights hold NaN/inf"):
        t.save()
    assert names(t) == ["step-000001"]


@pytest.mark.parametrize("metrics", [{"reward_mean": math.nan, "reward_std": math.nan},
                                     {"reward_mean": 0.5, "reward_std": math.nan},
                                     {"reward_mean": 0.5, "reward_std": 0.0}])
def test_reward_alerts_fire_on_nan(metrics):
    assert len(Alerts().check(metrics)) == 1
    assert Alerts().check({"reward_mean": 0.5, "reward_std": 0.2}) == []


def test_grpo_reward_mean_is_over_scored_completions(tmp_path, tok):
    given = []

    def half_scored(prompts, completions, **kw):  # odd completions unscored
        out = [float(len(c)) if i % 2 == 0 else math.nan for i, c in enumerate(completions)]
        given.append(out)
        return out
    t = GRPOTrainer(make_cfg(tmp_path, "grpo", steps=1), model_for(tok), tok, reward_fn=half_scored)
    m = t.train_step()
    scored = [x for x in given[0] if not math.isnan(x)]
    assert m["reward_mean"] == pytest.approx(sum(scored) / len(scored))
    assert m["frac_unscored"] == 0.5 and math.isfinite(m["loss"])


def test_ppo_refuses_unscored_completions(tmp_path, tok):
    from rlfuse.engine.config import PPOConfig
    from rlfuse.engine.ppo import PPOTrainer

    cfg = make_cfg(tmp_path, "ppo", steps=1)
    from rlfuse.engine.config import RolloutConfig

    cfg = dataclasses.replace(cfg, ppo=PPOConfig(
        data=cfg.grpo.data, rollout=RolloutConfig(prompts_per_step=2, samples_per_prompt=1,
                                                  max_new_tokens=3), epochs=1, mini_batches=1))
    t = PPOTrainer(cfg, model_for(tok), tok,
                   reward_fn=lambda p, c, **kw: [math.nan] + [1.0] * (len(c) - 1))
    with pytest.raises(ValueError, match="finite score for every completion.*1 of 2"):
        t.train_step()


def test_metrics_jsonl_is_strict_json(tmp_path):
    mon = Monitor(str(tmp_path), 2, progress=False, print_every=0)
    mon.log(1, {"loss": math.nan, "kl": math.inf, "reward_mean": 1.0})
    mon.close(plot=True)
    with open(tmp_path / "metrics.jsonl") as f:
        row = strict_json(f.readline())
    assert row["loss"] is None and row["kl"] is None and row["reward_mean"] == 1.0


# ----------------------------------------------------------------------------- 6. changed settings
def test_config_changes_lists_dotted_keys():
    from rlfuse.engine.config import TrainConfig, to_dict

    a = to_dict(TrainConfig())
    b = to_dict(TrainConfig(optim=OptimConfig(lr=1e-3), resume=True, steps=7))
    assert config_changes(json.loads(json.dumps(a)), b) == [
        ("optim.lr", a["optim"]["lr"], 1e-3), ("steps", a["steps"], 7)]


def test_resume_warns_on_changed_settings(tmp_path, tok, capsys):
    sft_run(tmp_path, tok, steps=2).fit(plot=False)
    t = sft_run(tmp_path, tok, steps=3, resume=True, log_every=2)
    rows = t.fit(plot=False)
    err = capsys.readouterr().err
    assert "resuming with log_every changed: 1 -> 2" in err
    assert "resuming with steps changed: 2 -> 3" in err
    assert [r["step"] for r in rows] == [1, 2, 3]


@pytest.mark.parametrize("change", [dict(optim=OptimConfig(lr=1e-2)),
                                    dict(model=dataclasses.replace(TINY, path="elsewhere"))])
def test_resume_refuses_settings_it_cannot_honour(tmp_path, tok, change):
    sft_run(tmp_path, tok, steps=2).fit(plot=False)
    t = sft_run(tmp_path, tok, steps=3, resume=True, **change)
    key = "optim.lr" if "optim" in change else "model.path"
    with pytest.raises(ConfigError, match=f"'{key}' differ from the checkpoint .*model.path="):
        t.fit(plot=False)


def test_resume_refuses_a_changed_group_size(tmp_path, tok):
    cfg = make_cfg(tmp_path, "grpo", steps=1)
    GRPOTrainer(cfg, model_for(tok), tok).fit(plot=False)
    rollout = dataclasses.replace(cfg.grpo.rollout, samples_per_prompt=2)
    cfg = dataclasses.replace(cfg, resume=True, steps=2,
                              grpo=dataclasses.replace(cfg.grpo, rollout=rollout))
    with pytest.raises(ConfigError, match="'grpo.rollout.samples_per_prompt'"):
        GRPOTrainer(cfg, model_for(tok), tok).fit(plot=False)


# ----------------------------------------------------------------------------- 7. SIGTERM exit
def _tiny_args(tmp_path):
    cfg = make_cfg(tmp_path, "sft")
    return [f"model.{k}={v}" for k, v in dataclasses.asdict(TINY).items() if v is not None] + \
        [f"sft.data={cfg.sft.data}", "sft.batch_size=4", "device=cpu", "progress=false",
         "max_length=32"]


def test_cli_sigterm_says_how_to_resume_and_exits_143(tmp_path, capsys, monkeypatch):
    step = SFTTrainer.train_step

    def term_at_2(self):
        out = step(self)
        if self.step + 1 == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr(SFTTrainer, "train_step", term_at_2)
    args = ["sft", "steps=4", f"out_dir={tmp_path / 'run'}", "--overwrite", "true",
            *_tiny_args(tmp_path)]
    assert cli_main(["train", *args]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "interrupted" in x)
    assert "interrupted by SIGTERM at step 2, saved " in line
    assert os.path.isdir(line.split("saved ")[1].split(";")[0])
    command = shlex.split(line.split("resume with: ")[1])
    assert command[:3] == ["rlfuse", "train", "sft"] and command[-1] == "resume=true"
    monkeypatch.setattr(SFTTrainer, "train_step", step)
    assert cli_main(command[1:]) == 0
    assert metric_steps(str(tmp_path / "run")) == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- 9. chain stages
def test_checkpoint_is_a_pretrained_folder(tmp_path, tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = sft_run(tmp_path, tok, steps=1)
    t.fit(plot=False)
    path = t.last_checkpoint
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "trainer.pt", "meta.json"} <= set(os.listdir(path))
    m = AutoModelForCausalLM.from_pretrained(path)
    tk = AutoTokenizer.from_pretrained(path)
    ids = tok(["12+7=19"], return_tensors="pt").input_ids
    assert tk(["12+7=19"], return_tensors="pt").input_ids.tolist() == ids.tolist()
    assert tk.pad_token == tok.pad_token and tk.eos_token == tok.eos_token
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, t.model(ids).logits)


def test_sft_grpo_dpo_chain_through_checkpoints_with_the_cli(tmp_path, capsys):
    """The README's three commands, at test size."""
    args = _tiny_args(tmp_path)
    cfg = make_cfg(tmp_path, "grpo")
    sft_dir, grpo_dir, dpo_dir = (tmp_path / s for s in ("sft", "grpo", "dpo"))
    assert cli_main(["train", "sft", "steps=2", f"out_dir={sft_dir}", *args]) == 0
    sft_ckpt = checkpoint.latest(str(sft_dir / "checkpoints"))
    assert cli_main(["train", "grpo", "steps=1", f"out_dir={grpo_dir}", f"model.path={sft_ckpt}",
                     f"grpo.data={cfg.grpo.data}", "grpo.rollout.prompts_per_step=2",
                     "grpo.rollout.samples_per_prompt=2", "grpo.rollout.max_new_tokens=3", "device=cpu",
                     "progress=false", "max_length=32"]) == 0
    grpo_ckpt = checkpoint.latest(str(grpo_dir / "checkpoints"))
    assert cli_main(["train", "dpo", "steps=1", f"out_dir={dpo_dir}", f"model.path={grpo_ckpt}",
                     f"dpo.data={cfg.dpo.data}", "dpo.batch_size=2", "device=cpu",
                     "progress=false", "max_length=32"]) == 0
    dpo_ckpt = checkpoint.latest(str(dpo_dir / "checkpoints"))
    model, _ = load_policy(ModelConfig(path=dpo_ckpt), torch.device("cpu"))
    base, _ = load_policy(ModelConfig(path=sft_ckpt), torch.device("cpu"))
    assert model.config.hidden_size == TINY.hidden_size
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))


@pytest.mark.parametrize("merge", [True, False])
def test_lora_checkpoint_is_the_next_model_path_and_resumes(tmp_path, tok, merge):
    pytest.importorskip("peft")
    base = sft_run(tmp_path / "sft", tok, steps=1)
    base.fit(plot=False)
    cfg = make_cfg(tmp_path / "lora", "grpo", steps=1,
                   model=ModelConfig(path=base.last_checkpoint, lora_r=4, lora_merge_on_save=merge))
    t = GRPOTrainer(cfg, tokenizer=None)
    with torch.no_grad():  # a non-zero adapter, so merged != base
        for n, p in t.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    t.fit(plot=False)
    path = t.last_checkpoint
    assert os.path.exists(os.path.join(path, "adapter", "adapter_config.json"))
    assert os.path.exists(os.path.join(path, "config.json")) == merge
    merged, _ = load_policy(ModelConfig(path=path), torch.device("cpu"))
    ids = tok(["12+7="], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, t.model(ids).logits, rtol=1e-4, atol=1e-5)
    again = GRPOTrainer(dataclasses.replace(cfg, resume=True, steps=1))
    again.fit(plot=False)
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, t.model(ids).logits)


# ----------------------------------------------------------------------------- 13. output
def test_plain_progress_lines_without_a_terminal(tmp_path, tok, capsys):
    t = sft_run(tmp_path, tok, steps=5, progress=True, print_every=2, keep_checkpoints=0)
    t.fit(plot=False)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("sft step ")]
    assert [x.split()[2] for x in lines] == ["2/5", "4/5", "5/5"]
    assert "loss " in lines[0] and "\r" not in err


def test_gradient_checkpointing_gives_no_warning(tmp_path, tok):
    cfg = dataclasses.replace(TINY, gradient_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, tk = load_policy(cfg, torch.device("cpu"), tok)
        assert model.is_activation_checkpointing
        ids = tk(["12+7=19"], return_tensors="pt").input_ids
        model(ids).logits.sum().backward()
