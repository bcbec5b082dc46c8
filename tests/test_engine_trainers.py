"""Engine trainers on a tiny model: fused path == materialized logits, loss decreases on a fixed
batch, resume after SIGTERM == uninterrupted run, the CLI and the demo at smoke size."""
import dataclasses
import json
import math
import os
import signal

import pytest
import torch
import yaml

import rlfuse
from rlfuse.engine import checkpoint
from rlfuse.engine.cli import main as cli_main
from rlfuse.engine.config import (ConfigError, DPOConfig, GRPOConfig, ModelConfig, OptimConfig,
                                  RewardSpec, RolloutConfig, SFTConfig, TrainConfig)
from rlfuse.engine.data import IGNORE, pack, sft_batch, write_jsonl
from rlfuse.engine.dpo import DPOTrainer
from rlfuse.engine.grpo import GRPOTrainer
from rlfuse.engine.model import (LMHead, char_tokenizer, head, hidden_states, scored_hidden,
                                 sequence_logprobs, tiny_model)
from rlfuse.engine.rollout import generate, mean_metrics, rollout_and_score
from rlfuse.engine.sft import SFTTrainer, nll_loss

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                   intermediate_size=48)
ROLLOUT = RolloutConfig(prompts_per_step=2, samples_per_prompt=4, max_new_tokens=4,
                        rewards=(RewardSpec("exact_answer"),  # + a signal for a random model
                                 RewardSpec("length_penalty", 1.0, {"max_chars": 1})))
ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in
        [(12, 7), (3, 45), (60, 9), (21, 30), (8, 8), (77, 1), (5, 14), (40, 40)]]


@pytest.fixture
def tok():
    return char_tokenizer()


def model_for(tok, seed=0):
    torch.manual_seed(seed)
    return tiny_model(TINY, tok, max_positions=64)


def make_cfg(tmp_path, algo, **kw):
    os.makedirs(tmp_path, exist_ok=True)
    sft = tmp_path / "sft.jsonl"
    prompts = tmp_path / "prompts.jsonl"
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(str(sft), [{"prompt": r["prompt"], "completion": r["answer"]} for r in ROWS])
    write_jsonl(str(prompts), ROWS)
    write_jsonl(str(pairs), [{"prompt": r["prompt"], "chosen": r["answer"],
                              "rejected": r["answer"][::-1] + "1"} for r in ROWS[:4]])
    base = dict(algo=algo, steps=4, out_dir=str(tmp_path / "run"), device="cpu", max_length=32,
                progress=False, model=TINY, optim=OptimConfig(lr=3e-3),
                sft=SFTConfig(data=str(sft), batch_size=8),
                grpo=GRPOConfig(data=str(prompts), rollout=ROLLOUT,
                                loss=rlfuse.PolicyLossConfig(beta=0.05)),
                dpo=DPOConfig(data=str(pairs), batch_size=4))
    base.update(kw)
    return TrainConfig(**base)


def grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


# ----------------------------------------------------------------------------- fused == logits
def test_hidden_states_are_what_the_head_reads(tok):
    m = model_for(tok)
    b = sft_batch(tok, ["12+3=", "4+56="], ["15", "60"], 32)
    logits = m(input_ids=b.input_ids, attention_mask=b.attention_mask).logits  # [B, T, V]
    hid = hidden_states(m, b.input_ids, b.attention_mask)
    torch.testing.assert_close(hid @ head(m).weight.T, logits, rtol=1e-5, atol=1e-5)


def test_head_skips_only_columns_without_targets(tok):
    m = model_for(tok)
    b = sft_batch(tok, ["12+3=", "4+567="], ["15", "571"], 32)
    hid, c = scored_hidden(m, b)
    assert c == b.first_target == 5  # BOS + "12+3=" - 1: the shorter prompt's last position
    assert (b.targets[:, :c] == IGNORE).all() and (b.targets[:, c] != IGNORE).any()
    full = hidden_states(m, b.input_ids, b.attention_mask)[:, :-1]
    torch.testing.assert_close(hid, full[:, c:])
    h = head(m)
    want = rlfuse.linear_logprobs(full, h.weight, b.targets)
    torch.testing.assert_close(sequence_logprobs(m, b), want)
    assert nll_loss(m, b)[0].item() == pytest.approx(-want.sum().item() / b.mask.sum().item(),
                                                     rel=1e-6)


def test_pack_layout(tok):
    b = pack([[1, 5, 6], [1, 7]], [[8, 2], [9, 9, 2]], pad_id=0)
    assert b.input_ids.tolist() == [[1, 5, 6, 8, 2], [1, 7, 9, 9, 2]]
    assert b.targets.tolist() == [[IGNORE, IGNORE, 8, 2], [IGNORE, 9, 9, 2]]
    b = pack([[1, 5]], [[8, 2]], pad_id=0, max_length=3)
    assert b.input_ids.tolist() == [[1, 5, 8]] and b.targets.tolist() == [[IGNORE, 8]]


def test_sft_fused_equals_materialized_logits(tok):
    m = model_for(tok)
    b = sft_batch(tok, ["12+3=", "4+56=", "7+7="], ["15", "60", "14"], 32)
    loss, n = nll_loss(m, b)
    loss.backward()
    fused = grads(m)
    m.zero_grad()
    logits = m(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            b.targets.reshape(-1), ignore_index=IGNORE)
    ref.backward()
    assert n == int((b.targets != IGNORE).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(fused, grads(m)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def _policy_grads(tok, impl, batch, adv, old, ref):
    m = model_for(tok)
    h = head(m)
    hid = hidden_states(m, batch.input_ids, batch.attention_mask)[:, :-1]
    cfg = rlfuse.PolicyLossConfig(beta=0.1, eps_high=0.28, entropy_coef=0.01, impl=impl)
    loss, _ = rlfuse.policy_loss(hid, h.weight, batch.targets, batch.mask, adv,
                                 old_logp=old, ref_logp=ref, config=cfg)
    loss.backward()
    return loss.detach(), grads(m)


def test_grpo_fused_equals_materialized_logits(tok):
    m = model_for(tok)
    roll = generate(m, tok, ["12+3=", "4+56="], n=3, max_new_tokens=4)
    batch = pack(roll.prompt_ids, roll.completion_ids, tok.pad_token_id)
    adv = torch.randn(6)
    old = torch.where(batch.mask, -torch.rand(batch.targets.shape) * 3, 0.0)
    ref = torch.where(batch.mask, -torch.rand(batch.targets.shape) * 3, 0.0)
    lf, gf = _policy_grads(tok, "auto", batch, adv, old, ref)
    lr, gr = _policy_grads(tok, "reference", batch, adv, old, ref)
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-6)
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_dpo_fused_equals_reference_impl(tmp_path, tok, loss_type):
    out = []
    for impl in ("auto", "reference"):
        loss_cfg = rlfuse.PreferenceLossConfig(loss_type=loss_type, impl=impl)
        cfg = make_cfg(tmp_path, "dpo", dpo=dataclasses.replace(make_cfg(tmp_path, "dpo").dpo,
                                                                loss=loss_cfg))
        t = DPOTrainer(cfg, model_for(tok), tok)
        t.optimizer_step = lambda: 0.0  # keep the gradients for the comparison
        m = t.train_step()
        out.append((m["loss"], grads(t.model)))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5, abs=1e-6)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- loss decreases
def test_sft_loss_decreases_on_fixed_batch(tmp_path, tok):
    t = SFTTrainer(make_cfg(tmp_path, "sft"), model_for(tok), tok)  # 8 rows, batch 8: fixed
    losses = [t.train_step()["loss"] for _ in range(6)]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.3, losses


def test_grpo_loss_decreases_on_fixed_batch(tmp_path, tok):
    cfg = make_cfg(tmp_path, "grpo")
    cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, passes=1))
    t = GRPOTrainer(cfg, model_for(tok), tok)
    roll = generate(t.model, tok, ["12+3=", "4+56="], n=4, max_new_tokens=4)
    batch = pack(roll.prompt_ids, roll.completion_ids, tok.pad_token_id)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.5, -0.5])
    old = t.reference.logprobs(batch)  # fixed sampling-policy log-probs
    h = head(t.model)
    losses = []
    for _ in range(5):
        hid = hidden_states(t.model, batch.input_ids, batch.attention_mask)[:, :-1]
        loss, out = rlfuse.policy_loss(hid, h.weight, batch.targets, batch.mask, adv,
                                       old_logp=old, ref_logp=old, config=t.loss_cfg)
        loss.backward()
        t.optimizer_step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_grpo_step_metrics(tmp_path, tok):
    t = GRPOTrainer(make_cfg(tmp_path, "grpo"), model_for(tok), tok)
    m = t.train_step()
    for k in ("loss", "reward_mean", "reward_std", "kl", "clip_fraction", "entropy",
              "grad_norm", "completion_length", "rollout_tokens_per_s", "train_tokens_per_s"):
        assert k in m and m[k] == m[k], k


GRPO_OPTIONS = [
    dict(loss_type="dapo", eps_high=0.28, kl_estimator="k1"),
    dict(loss_type="dr_grpo", max_completion_length=4, entropy_coef=0.01),
    dict(loss_type="cispo", eps_high=4.0), dict(loss_type="sapo"), dict(loss_type="bnpo"),
    dict(loss_type="grpo", importance_level="sequence", delta=1.5),
    dict(loss_type="ppo", dual_clip=3.0, top_entropy_quantile=0.5, kl_estimator="k2"),
]


def test_grpo_steps_with_loss_options(tmp_path, tok):
    cfg = make_cfg(tmp_path, "grpo")
    g = dataclasses.replace(cfg.grpo, passes=1, mini_batches=2, sft_coef=0.1,
                            advantage_estimator="rloo")
    t = GRPOTrainer(dataclasses.replace(cfg, grpo=g), model_for(tok), tok)
    m = t.train_step()
    assert "sft_nll" in m
    roll = generate(t.model, tok, ["12+3=", "4+56="], n=4, max_new_tokens=4)
    batch = pack(roll.prompt_ids, roll.completion_ids, tok.pad_token_id)
    for opts in GRPO_OPTIONS:
        t.loss_cfg = rlfuse.PolicyLossConfig(beta=0.02, **opts)
        m = t.optimize(batch, torch.randn(8))
        assert all(v == v for v in m.values()), opts


def test_dpo_steps_every_loss_type(tmp_path, tok):
    t = DPOTrainer(make_cfg(tmp_path, "dpo"), model_for(tok), tok)
    for loss_type in rlfuse.preference.LOSS_TYPES:
        extra = {"label_smoothing": 0.1} if loss_type == "exo_pair" else {}
        t.loss_cfg = rlfuse.PreferenceLossConfig(loss_type=loss_type, **extra)
        m = t.train_step()
        assert m["loss"] == m["loss"] and m["grad_norm"] > 0, loss_type


def test_dpo_loss_decreases_on_fixed_batch(tmp_path, tok):
    t = DPOTrainer(make_cfg(tmp_path, "dpo"), model_for(tok), tok)  # 4 pairs, batch 4
    rows = [t.train_step() for _ in range(6)]
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at start
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05
    assert rows[-1]["rewards_margin"] > 0


# ----------------------------------------------------------------------------- resume
class _StopAt:
    """Send SIGTERM to ourselves during step `at` (the trainer saves and stops)."""

    def __init__(self, trainer, at):
        self.step_fn, self.at, self.trainer = trainer.train_step, at, trainer
        trainer.train_step = self

    def __call__(self):
        out = self.step_fn()
        if self.trainer.step + 1 == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return out


@pytest.mark.parametrize("algo, cls", [("sft", SFTTrainer), ("grpo", GRPOTrainer),
                                       ("dpo", DPOTrainer)])
def test_resume_after_sigterm_matches_uninterrupted(tmp_path, tok, algo, cls):
    kw = dict(steps=4, optim=OptimConfig(lr=3e-3, schedule="cosine", warmup_steps=1))
    full = cls(make_cfg(tmp_path / "a", algo, **kw), model_for(tok), tok).fit(plot=False)

    cfg = make_cfg(tmp_path / "b", algo, **kw)
    first = cls(cfg, model_for(tok), tok)
    _StopAt(first, at=2)
    part = first.fit(plot=False)
    assert [r["step"] for r in part] == [1, 2]
    assert checkpoint.latest(first.ckpt_dir).endswith("step-000002")

    # GRPO's reference is the starting policy (as with model.path): same init; the others start
    # from a different init to show the checkpoint restores the weights.
    start = model_for(tok, seed=0 if algo == "grpo" else 1)
    resumed = cls(dataclasses.replace(cfg, resume=True), start, tok)
    rows = resumed.fit(plot=False)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for a, b in zip(full, rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), (a, b)
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        assert [json.loads(x)["step"] for x in f] == [1, 2, 3, 4]


def test_checkpoint_loads_without_pickled_code(tmp_path, tok):
    t = SFTTrainer(make_cfg(tmp_path, "sft", steps=1), model_for(tok), tok)
    t.fit(plot=False)
    path = checkpoint.latest(t.ckpt_dir)
    assert {"meta.json", "model.safetensors", "config.json", "trainer.pt"} <= set(os.listdir(path))
    state = torch.load(os.path.join(path, "trainer.pt"), weights_only=True)
    assert {"optimizer", "scheduler", "rng", "extra"} <= set(state)


# ----------------------------------------------------------------------------- CLI and demo
def test_cli_train_from_yaml(tmp_path, tok, capsys):
    cfg = make_cfg(tmp_path, "sft", steps=2)
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump({"steps": 2, "sft": {"data": cfg.sft.data, "batch_size": 4},
                                    "model": dataclasses.asdict(TINY)}))
    rc = cli_main(["train", "sft", "--config", str(path), f"out_dir={tmp_path / 'cli'}",
                   "--progress", "false", "--device", "cpu"])
    assert rc == 0
    assert checkpoint.latest(str(tmp_path / "cli" / "checkpoints")) is not None
    assert os.path.exists(tmp_path / "cli" / "plots" / "metrics.png")
    assert cli_main(["train", "sft", "--config", str(path), "optim.lr=-1"]) == 2
    assert "'optim.lr' must be > 0" in capsys.readouterr().err


def test_demo_smoke(tmp_path):
    from rlfuse.engine.demo import main as demo_main

    out = tmp_path / "demo"
    assert demo_main(["--quick", f"out_dir={out}", "progress=false"]) == 0
    with open(out / "results.json") as f:
        res = json.load(f)
    assert list(res["accuracy"]) == ["base", "sft", "grpo", "dpo"]
    assert res["n_pairs"] > 0
    for stage in ("sft", "grpo", "dpo"):
        assert os.path.getsize(out / stage / "metrics.jsonl") > 0
        assert os.path.exists(out / stage / "plots" / "metrics.png")
    assert os.path.exists(out / "accuracy.png")


def test_demo_sft_stops_at_its_target_accuracy(tmp_path, tok, monkeypatch):
    """TargetSFT checks its probe every `every` steps and ends the run at the first check that
    reaches the target; an unreachable target runs every step."""
    from rlfuse.engine import demo
    from rlfuse.engine.evaluate import EvalConfig

    probe_scores = iter([0.1, 0.5, 0.9])
    monkeypatch.setattr(demo, "accuracy", lambda *a, **k: {"mean": next(probe_scores)})
    ev = EvalConfig(max_new_tokens=4, seeds=(7,))
    sft = demo.TargetSFT(make_cfg(tmp_path / "a", "sft", steps=10), model_for(tok), tok, ROWS,
                         target=0.4, every=2, ev=ev)
    sft.fit(plot=False)
    assert (sft.step, sft.reached, sft.probe_accuracy) == (4, True, 0.5)

    monkeypatch.undo()  # the real probe: a random tiny model cannot reach 1.0
    sft = demo.TargetSFT(make_cfg(tmp_path / "b", "sft", steps=4), model_for(tok), tok, ROWS,
                         target=1.0, every=2, ev=ev)
    sft.fit(plot=False)
    assert sft.step == 4 and not sft.reached and 0 <= sft.probe_accuracy < 1


def test_engine_bench_smoke(tmp_path, capsys):
    rc = cli_main(["bench", "engine", f"out={tmp_path}", "hidden_size=32", "num_layers=1",
                   "intermediate_size=48", "vocab_size=100", "steps=1", "warmup=0",
                   "group_size=2", "max_new_tokens=3", "dpo_pairs=2", "dpo_tokens=10",
                   "systems=rlfuse,rlfuse-reference"])
    assert rc == 0
    with open(tmp_path / "engine_cpu.json") as f:
        rows = json.load(f)["rows"]
    assert {(r["trainer"], r["system"]) for r in rows} == {
        (t, s) for t in ("grpo", "dpo") for s in ("rlfuse", "rlfuse-reference")}
    for r in rows:
        assert r["step_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["tokens_per_step"] == (2 * 2 * 10 if r["trainer"] == "dpo" else
                                        pytest.approx(r["tokens_per_s"] * r["step_s"]))
    assert "x TRL" in capsys.readouterr().out


def test_engine_bench_rejects_unknown_systems(capsys):
    assert cli_main(["bench", "engine", "systems=rlfuse,vllm"]) == 2
    assert "systems: unknown 'vllm'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- LoRA
def test_lora_grpo_trains_adapters_against_the_base_as_reference(tmp_path, tok):
    pytest.importorskip("peft")
    cfg = make_cfg(tmp_path, "grpo", steps=3, optim=OptimConfig(lr=3e-2),
                   model=dataclasses.replace(TINY, lora_r=4))
    t = GRPOTrainer(cfg, tokenizer=tok)
    assert t.reference.copy is None  # the reference is the base: no frozen copy in memory
    trained = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    frozen = {n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad}
    roll = generate(t.model, tok, ["12+3=", "4+56="], n=2, max_new_tokens=4)
    batch = pack(roll.prompt_ids, roll.completion_ids, tok.pad_token_id)
    start = sequence_logprobs(t.model, batch)  # LoRA B starts at 0: policy == base

    rows = t.fit(plot=False)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for n, p in t.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    torch.testing.assert_close(t.reference.logprobs(batch), start)
    assert not torch.allclose(sequence_logprobs(t.model, batch), start)
    assert rows[-1]["kl"] > 0

    # the checkpoint holds the adapters; a resumed run picks up at step 3
    resumed = GRPOTrainer(dataclasses.replace(cfg, steps=4, resume=True), tokenizer=tok)
    assert resumed.resume() and resumed.step == 3
    now = dict(t.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, now[n]), n
    assert [r["step"] for r in resumed.fit(plot=False)] == [1, 2, 3, 4]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_bench_against_trl(tmp_path, dtype):
    pytest.importorskip("trl")
    rc = cli_main(["bench", "engine", f"out={tmp_path}", "hidden_size=32", "num_layers=1",
                   "intermediate_size=48", "vocab_size=100", "steps=1", "warmup=1",
                   "group_size=2", "max_new_tokens=3", "dpo_pairs=2", "dpo_tokens=10",
                   "systems=rlfuse,trl", f"dtype={dtype}"])
    assert rc == 0
    with open(tmp_path / "engine_cpu.json") as f:
        rows = {(r["trainer"], r["system"]): r for r in json.load(f)["rows"]}
    assert set(rows) == {(t, s) for t in ("grpo", "dpo") for s in ("rlfuse", "trl")}
    assert rows["dpo", "rlfuse"]["tokens_per_step"] == rows["dpo", "trl"]["tokens_per_step"] == 40
    for s in ("rlfuse", "trl"):
        assert 0 < rows["grpo", s]["tokens_per_step"] <= 2 * 3  # completions x max_new_tokens
        assert rows["grpo", s]["speedup_vs_trl"] > 0 and rows["dpo", s]["rss_vs_trl"] > 0
    assert rows["grpo", "trl"]["speedup_vs_trl"] == rows["dpo", "trl"]["rss_vs_trl"] == 1.0
    assert {r["weights_dtype"] for r in rows.values()} == {f"torch.{dtype}"}


# ----------------------------------------------------------------------------- LM head, RL core
def test_head_is_a_frozen_typed_lm_head(tok):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    m = model_for(tok)
    h = head(m)
    assert isinstance(h, LMHead) and h.weight is m.lm_head.weight and h.bias is None
    assert (h.logit_scale, h.final_logit_softcapping) == (1.0, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.logit_scale = 2.0
    g = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, head_dim=16,
                                       final_logit_softcapping=2.0))
    assert head(g).final_logit_softcapping == 2.0


def test_loss_config_takes_the_head_transform_and_refuses_overwrites(tok):
    h = dataclasses.replace(head(model_for(tok)), logit_scale=0.5, final_logit_softcapping=30.0)
    cfg = h.loss_config(rlfuse.PolicyLossConfig(beta=0.1), "grpo.loss", temperature=0.7)
    assert (cfg.temperature, cfg.logit_scale, cfg.final_logit_softcapping, cfg.beta) == \
        (0.7, 0.5, 30.0, 0.1)
    with pytest.raises(ConfigError, match=r"'grpo.loss.temperature' is 0.9.*grpo.rollout.temp"):
        h.loss_config(rlfuse.PolicyLossConfig(temperature=0.9), "grpo.loss", temperature=0.7)
    with pytest.raises(ConfigError, match="'dpo.loss.logit_scale' is 2.0.*model config"):
        h.loss_config(rlfuse.PreferenceLossConfig(logit_scale=2.0), "dpo.loss")
    # DPO does not fix the temperature: the user's value stays
    assert h.loss_config(rlfuse.PreferenceLossConfig(temperature=0.9), "dpo.loss").temperature \
        == 0.9


def test_trainers_refuse_a_loss_temperature_that_differs_from_the_rollout(tmp_path, tok):
    cfg = make_cfg(tmp_path, "grpo")
    bad = dataclasses.replace(cfg.grpo, loss=rlfuse.PolicyLossConfig(temperature=0.5))
    with pytest.raises(ConfigError, match="'grpo.loss.temperature'"):
        GRPOTrainer(dataclasses.replace(cfg, grpo=bad), model_for(tok), tok)
    with pytest.raises(ConfigError, match="'dpo.loss.final_logit_softcapping'"):
        loss = rlfuse.PreferenceLossConfig(final_logit_softcapping=5.0)
        DPOTrainer(make_cfg(tmp_path, "dpo", dpo=DPOConfig(data=cfg.dpo.data, loss=loss)),
                   model_for(tok), tok)


def test_mean_metrics_skips_nan_rows():
    rows = [{"a": 1.0, "b": math.nan}, {"a": math.nan, "b": math.nan}, {"a": 3.0, "b": math.nan}]
    out = mean_metrics(rows)
    assert out["a"] == 2.0 and math.isnan(out["b"])


def test_grpo_and_ppo_share_the_rollout_core(tmp_path, tok):
    """rollout_and_score: samples grouped per prompt, the rows' columns passed per completion."""
    seen = {}

    def reward_fn(prompts, completions, answer):
        seen.update(prompts=prompts, answer=answer)
        return [float(len(c)) for c in completions]

    cfg = RolloutConfig(prompts_per_step=2, samples_per_prompt=3, max_new_tokens=3)
    out = rollout_and_score(model_for(tok), tok, ROWS[:2], cfg, reward_fn, max_length=32)
    assert seen["prompts"] == [ROWS[0]["prompt"]] * 3 + [ROWS[1]["prompt"]] * 3
    assert seen["answer"] == [ROWS[0]["answer"]] * 3 + [ROWS[1]["answer"]] * 3
    assert out.rewards.tolist() == [float(len(t)) for t in out.rollout.texts]
    assert out.batch.input_ids.shape[0] == 6
    assert out.metrics()["completion_length"] == sum(out.rollout.lengths) / 6


def test_demo_stops_at_a_sigterm_and_runs_no_later_stage(tmp_path, monkeypatch, capsys):
    from rlfuse.engine import demo

    real = demo.GRPOTrainer.train_step

    def step(self):  # a real SIGTERM to this process, inside the GRPO stage's first step
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self)
    monkeypatch.setattr(demo.GRPOTrainer, "train_step", step)
    out = tmp_path / "demo"
    assert demo.main(["--quick", f"out_dir={out}", "progress=false"]) == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM in its grpo stage" in capsys.readouterr().err
    assert not (out / "dpo").exists() and not (out / "results.json").exists()


# ----------------------------------------------------------------------------- int8 reference
def test_int8_reference_quantizes_the_linear_layers_and_stays_close(tmp_path):
    from rlfuse.engine.model import Int8Linear, Reference

    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, hidden_size=64, num_layers=2, intermediate_size=96)
    policy = tiny_model(cfg, char_tokenizer())
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    full, small = Reference(policy), Reference(policy, "int8")
    linears = [m for m in full.copy.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in small.copy.modules() if isinstance(m, Int8Linear)]
    assert len(quantized) == len(linears) - 1  # all but the LM head
    assert all(m.qweight.dtype == torch.int8 for m in quantized)
    assert isinstance(small.copy.get_output_embeddings(), torch.nn.Linear)
    ptrs = {p.data_ptr() for p in policy.parameters()}
    assert not ptrs & {t.data_ptr() for t in [*small.copy.parameters(), *small.copy.buffers()]}
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())  # untouched
    bytes_of = lambda m: sum(t.numel() * t.element_size()  # noqa: E731
                             for t in [*m.parameters(), *m.buffers()] if t.dtype != torch.int64)
    lin_bytes = sum(m.weight.numel() * 4 for m in linears[:-1])
    assert bytes_of(full.copy) - bytes_of(small.copy) > 0.7 * lin_bytes  # 4 bytes -> ~1
    # per-token log-probs of random sequences: int8 rounding moves them by a few 1e-3 nats
    ids = torch.randint(4, 40, (6, 24))
    with torch.no_grad():
        a, b = (r.copy(ids).logits.log_softmax(-1) for r in (full, small))
    assert 0 < (a - b).abs().mean() < 5e-3 and (a - b).abs().max() < 5e-2


def test_grpo_trains_with_an_int8_reference(tmp_path):
    from rlfuse.engine.model import Int8Linear

    base = make_cfg(tmp_path, "grpo")
    cfg = dataclasses.replace(base, steps=2, model=dataclasses.replace(TINY, reference="int8"))
    t = GRPOTrainer(cfg)
    assert any(isinstance(m, Int8Linear) for m in t.reference.copy.modules())
    rows = t.fit(plot=False)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["kl"]) and r["kl"] >= 0 for r in rows)
    with pytest.raises(ConfigError, match="'model.reference' must be copy with model.lora_r"):
        ModelConfig(reference="int8", lora_r=4)


# ----------------------------------------------------------------------------- int8 sampler
@pytest.mark.parametrize("algo,dtype", [("grpo", "float32"), ("ppo", "float32"),
                                        ("grpo", "bfloat16")])
def test_rl_trains_from_an_int8_sampler_with_the_rollout_correction(tmp_path, monkeypatch, algo,
                                                                    dtype):
    from rlfuse.engine import grpo as grpo_mod
    from rlfuse.engine import ppo
    from rlfuse.engine.config import PPOConfig

    base = make_cfg(tmp_path, algo, steps=2, model=dataclasses.replace(TINY, dtype=dtype),
                    ppo=PPOConfig(data=str(tmp_path / "prompts.jsonl"), rollout=ROLLOUT))
    section = getattr(base, algo)
    cfg = dataclasses.replace(base, **{algo: dataclasses.replace(
        section, rollout=dataclasses.replace(section.rollout, weights="int8"),
        loss=dataclasses.replace(section.loss, rollout_correction="tis"))})
    module = grpo_mod if algo == "grpo" else ppo
    seen = []

    def spy(model, *args):  # the sampler's and the policy's log-probs of each rollout
        scored = rollout_and_score(model, *args)
        b = scored.batch
        seen.append((b, sequence_logprobs(model, b, section.rollout.temperature)))
        return scored
    monkeypatch.setattr(module, "rollout_and_score", spy)
    t = (GRPOTrainer if algo == "grpo" else ppo.PPOTrainer)(cfg)
    rows = t.fit(plot=False)
    assert [r["step"] for r in rows] == [1, 2] and len(seen) == 2
    for r in rows:
        assert math.isfinite(r["loss"]) and r["rollout_kl"] >= 0
        assert 0 < r["rollout_weight_mean"] < 2 and 0 <= r["rollout_capped_fraction"] < 0.5
    for b, policy_lp in seen:
        assert b.rollout_logp is not None and b.rollout_logp.shape == b.targets.shape
        assert (b.rollout_logp[~b.mask] == 0).all() and (b.rollout_logp[b.mask] < 0).all()
        # the sampler was the int8 copy: its log-probs are close to the policy's, not equal
        gap = (policy_lp - b.rollout_logp)[b.mask].abs()
        assert 0 < gap.max() < 0.1


def test_int8_sampler_config_errors(tmp_path):
    from rlfuse.engine.config import PPOConfig
    from rlfuse.engine.trainer import _check_device, _check_distributed

    int8 = dataclasses.replace(ROLLOUT, weights="int8")
    with pytest.raises(ConfigError, match="'grpo.loss.rollout_correction' must be tis or mis"):
        GRPOConfig(rollout=int8)
    with pytest.raises(ConfigError, match="'ppo.loss.rollout_correction' must be tis or mis"):
        PPOConfig(rollout=int8)
    with pytest.raises(ConfigError, match="'grpo.rollout.decoder' must be rlfuse"):
        GRPOConfig(rollout=dataclasses.replace(ROLLOUT, decoder="hf"),
                   loss=rlfuse.PolicyLossConfig(rollout_correction="mis"))
    with pytest.raises(ConfigError, match="'grpo.rollout.weights' must be one of"):
        GRPOConfig(rollout=dataclasses.replace(ROLLOUT, weights="int4"))
    base = make_cfg(tmp_path, "grpo")
    tis = rlfuse.PolicyLossConfig(rollout_correction="tis")
    cfg = dataclasses.replace(base, grpo=dataclasses.replace(base.grpo, rollout=int8, loss=tis))
    with pytest.raises(ConfigError, match="'grpo.rollout.weights': int8 runs on CPU only"):
        _check_device(cfg, torch.device("cuda"))
    with pytest.raises(ConfigError, match="'grpo.rollout.weights': int8 runs in one process"):
        _check_distributed(cfg)
    _check_device(cfg, torch.device("cpu"))
    _check_device(base, torch.device("cuda"))  # the policy's own weights: anywhere


def test_int8_sampler_merges_lora_adapters(tok):
    pytest.importorskip("peft")
    from rlfuse.engine.model import Int8Linear, int8_copy, load_policy

    torch.manual_seed(0)
    m, _ = load_policy(dataclasses.replace(TINY, lora_r=4), torch.device("cpu"), tok)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a trained adapter: the policy is no longer its base
        q = int8_copy(m, rollout=True)
    assert any(isinstance(x, Int8Linear) for x in q.modules())
    assert not any("lora_" in n for n, _ in q.named_modules())  # merged into the int8 weights
    ids = torch.randint(4, len(tok), (2, 9))
    with torch.no_grad():
        policy = m(input_ids=ids).logits.log_softmax(-1)
        sampler = q(input_ids=ids).logits.log_softmax(-1)
        with m.disable_adapter():
            base = m(input_ids=ids).logits.log_softmax(-1)
    assert (policy - sampler).abs().max() < 0.1 < (policy - base).abs().max()
