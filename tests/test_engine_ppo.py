"""Classic RLHF PPO in the engine: reward shaping + GAE wiring, KL estimators and controller,
value clipping, the fused minibatch loss against a materialized-logits computation, the
Bradley-Terry reward model, and a short PPOTrainer run (checkpoint/resume, CLI)."""
import json
import math

import pytest
import torch

import rlfuse
from rlfuse.engine.config import ConfigError, ModelConfig, load_config
from rlfuse.engine.data import pack
from rlfuse.engine.model import char_tokenizer, tiny_model
from rlfuse.engine.ppo import KLController, PPOTrainer, ValueHead, ppo_loss, token_rewards
from rlfuse.engine.reward_model import (RewardModelScorer, bradley_terry_loss, build_reward_model,
                                        preference_accuracy, train_reward_model)

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                   intermediate_size=64)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _policy(tok, seed=0):
    torch.manual_seed(seed)
    return tiny_model(TINY, tok, max_positions=64)


def _batch(tok, n=6, seed=0):
    """Random prompt + completion rows of different lengths (right padding, masks)."""
    g = torch.Generator().manual_seed(seed)
    v = len(tok)

    def ids(lo, hi):  # a random length in [lo, hi), random non-special tokens
        return torch.randint(4, v, (int(torch.randint(lo, hi, (1,), generator=g)),),
                             generator=g).tolist()

    prompts = [[tok.bos_token_id] + ids(2, 6) for _ in range(n)]
    comps = [ids(1, 7) for _ in range(n)]
    return pack(prompts, comps, tok.pad_token_id)


# ----------------------------------------------------------------------------- reward + GAE wiring
def test_token_rewards_and_gae_hand_case():
    # row 0: 3 completion tokens then padding; row 1: 4 tokens, no KL, score 2
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    kl = torch.tensor([[0.1, 0.2, 0.3, 5.0], [0.0, 0.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, -0.1, 9.0], [0.0, 0.0, 0.0, 0.0]])
    r = token_rewards(torch.tensor([1.0, 2.0]), mask, kl, kl_coef=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, 0.85, 0.0], [0.0, 0.0, 0.0, 2.0]]))
    adv, ret = rlfuse.gae(r, values, mask, gamma=1.0, lam=0.9)
    # row 0: d2 = 0.85 + 0.1 = 0.95; d1 = -0.1 - 0.1 - 0.2 = -0.4, A1 = -0.4 + 0.9 * 0.95;
    #        d0 = -0.05 + 0.2 - 0.5 = -0.35, A0 = -0.35 + 0.9 * A1.   row 1: A_t = 2 * 0.9^(3 - t)
    a1 = -0.4 + 0.9 * 0.95
    expect = torch.tensor([[-0.35 + 0.9 * a1, a1, 0.95, 0.0], [1.458, 1.62, 1.8, 2.0]])
    torch.testing.assert_close(adv, expect)
    torch.testing.assert_close(ret, (expect + values) * mask)
    white, _ = rlfuse.gae(r, values, mask, gamma=1.0, lam=0.9, whiten=True)
    m = white[mask]
    assert abs(m.mean().item()) < 1e-5 and abs(m.std().item() - 1) < 1e-4


def test_kl_estimators():
    logp, ref = -torch.rand(5, 7) * 3, -torch.rand(5, 7) * 3
    d = ref - logp
    torch.testing.assert_close(rlfuse.kl_estimate(logp, ref, "k1"), logp - ref)
    torch.testing.assert_close(rlfuse.kl_estimate(logp, ref, "k2"), 0.5 * d ** 2)
    torch.testing.assert_close(rlfuse.kl_estimate(logp, ref, "k3"), torch.exp(d) - d - 1)
    assert (rlfuse.kl_estimate(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="estimator must be one of"):
        rlfuse.kl_estimate(logp, ref, "k4")


def test_adaptive_kl_controller():
    fixed = KLController(0.1)
    fixed.update(50.0, 64)
    assert fixed.value == 0.1
    ctl = KLController(0.1, target=1.0, horizon=100)
    ctl.update(5.0, 10)                      # error clipped to +0.2: coef *= 1 + 0.2 * 10 / 100
    assert math.isclose(ctl.value, 0.1 * 1.02)
    ctl.update(0.9, 10)                      # error -0.1: coef *= 1 - 0.01
    assert math.isclose(ctl.value, 0.1 * 1.02 * 0.99)


def test_value_clipping_hand_case():
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    old = torch.tensor([[0.0, 0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0, 7.0]])
    v = torch.tensor([[0.5, 2.0, 3.0]], requires_grad=True)
    loss, m = rlfuse.value_loss(v, old, ret, mask, clip=0.2)
    # token 0: (0.5-1)^2 = 0.25 vs clipped (0.2-1)^2 = 0.64 -> 0.64 (clipped, no grad to v)
    # token 1: (2-1)^2 = 1 vs (0.2-1)^2 = 0.64 -> 1 (unclipped)
    assert math.isclose(loss.item(), 0.5 * (0.64 + 1.0) / 2, rel_tol=1e-6)
    assert math.isclose(m["value_clip_fraction"].item(), 0.5)
    loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, 0.5, 0.0]]))


# ------------------------------------------------------------------------- fused == materialized
def _materialized(model, vh, batch, adv, old_logp, ref_logp, old_values, returns, *, temperature,
                  eps, dual_clip, beta, vf_coef, value_clip):
    """The same PPO minibatch loss from full logits (the spec the fused path must match)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                output_hidden_states=True)
    logits = out.logits[:, :-1].float() / temperature  # [B, T-1, V]
    m = batch.mask
    logp = torch.log_softmax(logits, -1).gather(-1, batch.targets.clamp(min=0)[..., None])[..., 0]
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
    pg = torch.where(adv < 0, torch.minimum(pg, -dual_clip * adv), pg)
    d = ref_logp - logp
    per_token = pg + beta * (torch.exp(d) - d - 1)
    pg_loss = (per_token * m).sum() / m.sum()
    hid = model.get_decoder()(input_ids=batch.input_ids,
                              attention_mask=batch.attention_mask).last_hidden_state[:, :-1]
    v = vh(hid)
    v_clip = old_values + (v - old_values).clamp(-value_clip, value_clip)
    vf = 0.5 * (torch.max((v - returns) ** 2, (v_clip - returns) ** 2) * m).sum() / m.sum()
    return pg_loss + vf_coef * vf


def test_ppo_step_fused_equals_materialized(tok):
    model, batch = _policy(tok), _batch(tok, n=7)
    vh = ValueHead(TINY.hidden_size)
    torch.nn.init.normal_(vh.proj.weight, std=0.3)
    b, t = batch.targets.shape
    m = batch.mask
    g = torch.Generator().manual_seed(1)
    temperature = 0.7
    with torch.no_grad():  # old / ref log-probs near the current ones, so ratios straddle the clip
        lp = rlfuse.linear_logprobs_reference(
            model.get_decoder()(input_ids=batch.input_ids).last_hidden_state[:, :-1],
            model.lm_head.weight, batch.targets, None,
            rlfuse.LogitTransform(temperature=temperature), -100)[0]
        old_logp = (lp + 0.4 * torch.randn(b, t, generator=g)) * m
        ref_logp = (lp + 0.4 * torch.randn(b, t, generator=g)) * m
        adv = torch.randn(b, t, generator=g) * m
        old_values = torch.randn(b, t, generator=g) * m
        returns = torch.randn(b, t, generator=g) * m
    kw = dict(temperature=temperature, eps=0.2, dual_clip=3.0, beta=0.05, vf_coef=0.5,
              value_clip=0.2)
    cfg = rlfuse.PolicyLossConfig(loss_type="ppo", eps_low=0.2, dual_clip=3.0, beta=0.05,
                                  kl_estimator="k3", temperature=temperature)
    calls = []
    hook = model.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    loss, metrics = ppo_loss(model, vh, batch, adv, old_logp, old_values, returns,
                             ref_logp=ref_logp, loss_cfg=cfg, vf_coef=0.5, value_clip=0.2)
    hook.remove()
    assert len(calls) == 1  # one backbone pass feeds both the policy loss and the value head
    loss.backward()
    params = list(model.parameters()) + list(vh.parameters())
    fused_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    ref = _materialized(model, vh, batch, adv, old_logp, ref_logp, old_values, returns, **kw)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for p, gf in zip(params, fused_grads):
        torch.testing.assert_close(gf, p.grad, rtol=1e-4, atol=1e-6)
    assert 0 < metrics["clip_fraction"] < 1 and 0 < metrics["value_clip_fraction"] < 1
    for k in ("policy_loss", "value_loss", "explained_variance", "kl", "entropy"):
        assert math.isfinite(metrics[k]), k


# ----------------------------------------------------------------------------- reward model
def _toy_pairs(n, seed):
    """chosen: digits; rejected: letters (a preference a tiny RM learns in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    digits, letters = "0123456789", "abcdefghij"
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 5, (1,), generator=g))
        idx = torch.randint(0, 10, (k,), generator=g).tolist()
        out.append({"prompt": "q=", "chosen": "".join(digits[i] for i in idx),
                    "rejected": "".join(letters[i] for i in idx)})
    return out


def test_bradley_terry_loss():
    c, r = torch.randn(9), torch.randn(9)
    loss, m = bradley_terry_loss(c, r)
    torch.testing.assert_close(loss, -torch.log(torch.sigmoid(c - r)).mean())
    assert math.isclose(m["accuracy"], (c > r).float().mean().item())
    loss_c, _ = bradley_terry_loss(c, r, center_coef=0.1)
    torch.testing.assert_close(loss_c, loss + 0.1 * ((c + r) ** 2).mean())


def test_reward_model_learns_toy_preferences(tok):
    policy = _policy(tok)
    rm = build_reward_model(policy, tok)
    assert rm.config.num_labels == 1
    torch.testing.assert_close(rm.base_model.embed_tokens.weight,
                               policy.get_decoder().embed_tokens.weight)
    train, held = _toy_pairs(64, 0), _toy_pairs(32, 1)
    hist = train_reward_model(rm, tok, train, steps=15, batch_size=16, lr=5e-3, seed=0)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert preference_accuracy(rm, tok, held) >= 0.9
    scores = RewardModelScorer(rm, tok)(["q=", "q="], ["123", "abc"])
    assert len(scores) == 2 and scores[0] > scores[1]


# ----------------------------------------------------------------------------- trainer
@pytest.fixture()
def prompt_file(tmp_path):
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(1, 5) for b in range(3)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["answer"],
                                         "rejected": r["answer"] + "x"}) + "\n" for r in rows))
    return path, pairs


def _cfg(tmp_path, prompts, *extra):
    return load_config(None, [
        "algo=ppo", "steps=2", "device=cpu", f"out_dir={tmp_path / 'run'}", "progress=false",
        "keep_checkpoints=1", "max_length=16", "model.hidden_size=32", "model.num_layers=1",
        "model.intermediate_size=64", f"ppo.data={prompts}", "ppo.rollout.prompts_per_step=4",
        "ppo.rollout.samples_per_prompt=2", "ppo.rollout.max_new_tokens=4", "ppo.epochs=2",
        *extra])


@pytest.mark.parametrize("extra", [
    ("ppo.kl_in=reward", "ppo.kl_target=0.01", "ppo.kl_horizon=10"),
    ("ppo.kl_in=loss", "ppo.loss.kl_estimator=k3", "ppo.loss.dual_clip=3",
     "ppo.missing_eos_penalty=1"),
    ("ppo.critic=separate", "ppo.value_clip=null"),
])
def test_ppo_trainer_runs_and_resumes(tmp_path, prompt_file, extra):
    prompts, _ = prompt_file

    def reward_fn(prompts, completions, **kw):  # varied scores, so every head gets gradients
        return [float(len(c) % 3) for c in completions]

    tr = PPOTrainer(_cfg(tmp_path, prompts, *extra), reward_fn=reward_fn)
    hist = tr.fit(plot=False)
    row = hist[-1]
    for k in ("policy_loss", "value_loss", "value_clip_fraction", "explained_variance", "kl",
              "entropy", "clip_fraction", "reward_mean", "non_score_reward", "kl_coef",
              "grad_norm"):
        assert k in row, k
    assert all(math.isfinite(r["loss"]) for r in hist)
    # the critic starts at the first rollout's mean score: w = 0, so V = b on every token
    assert hist[0]["value_mean"] == pytest.approx(hist[0]["reward_mean"], abs=1e-6)
    if "ppo.kl_target=0.01" in extra:  # adaptive: one controller update from step 1's KL
        err = min(max(hist[0]["kl_seq"] / 0.01 - 1, -0.2), 0.2)
        assert hist[1]["kl_coef"] == pytest.approx(0.05 * (1 + err * 8 / 10))
    # the value head joined the optimizer and the checkpoint
    assert any(p is tr.value_head.proj.weight for g in tr.opt.param_groups for p in g["params"])
    tr2 = PPOTrainer(_cfg(tmp_path, prompts, *extra, "resume=true", "steps=3"),
                     reward_fn=reward_fn)
    assert tr2.resume() and tr2.step == 2
    torch.testing.assert_close(tr2.value_head.proj.weight, tr.value_head.proj.weight)
    assert tr2.kl_ctl.value == pytest.approx(tr.kl_ctl.value)
    if tr.critic is not None:  # its own backbone: trained, saved, distinct from the policy's
        w = tr.critic.embed_tokens.weight
        assert not torch.equal(w, tr.model.get_decoder().embed_tokens.weight)
        assert not torch.equal(w, tr.reference.copy.get_decoder().embed_tokens.weight)
        torch.testing.assert_close(tr2.critic.embed_tokens.weight, w)


def test_ppo_value_head_learns_a_predictable_return(tmp_path, prompt_file):
    """A score that the prompt decides (1 when it starts with 1 or 2): the value target is that
    score, so the critic must explain most of the return variance after a few steps."""
    prompts, _ = prompt_file

    def reward_fn(prompts, completions, **kw):
        return [float(p[0] in "12") for p in prompts]

    cfg = _cfg(tmp_path, prompts, "steps=12", "keep_checkpoints=0",
               "ppo.rollout.prompts_per_step=12", "ppo.rollout.samples_per_prompt=1",
               "ppo.mini_batches=1", "ppo.epochs=4",
               "ppo.vf_coef=1", "ppo.value_clip=null", "ppo.kl_coef=0", "optim.lr=1e-3")
    ev = [r["explained_variance"] for r in PPOTrainer(cfg, reward_fn=reward_fn).fit(plot=False)]
    assert ev[0] < 0.3  # V starts at the mean score (EV 0); step 1 averages 4 updates from there
    assert sum(ev[-3:]) / 3 > 0.6  # ~0.85 at seeds 0, 1, 2


def test_ppo_with_trained_reward_model_and_cli(tmp_path, prompt_file, monkeypatch):
    from rlfuse.engine.cli import main

    monkeypatch.setattr("rlfuse.engine.monitor.plot_metrics", lambda *a, **k: None)  # slow
    prompts, pairs = prompt_file
    args = ["steps=1", "device=cpu", f"out_dir={tmp_path / 'cli'}", "progress=false",
            "keep_checkpoints=0", "max_length=16", "model.hidden_size=32", "model.num_layers=1",
            "model.intermediate_size=64", f"ppo.data={prompts}", "ppo.rollout.prompts_per_step=4",
            "ppo.rollout.max_new_tokens=4", "ppo.reward=both", f"ppo.reward_model.pairs={pairs}",
            "ppo.reward_model.steps=2", "ppo.reward_model.batch_size=4"]
    assert main(["train", "ppo", *args]) == 0
    rows = [json.loads(x) for x in open(tmp_path / "cli" / "metrics.jsonl")]
    assert "reward/reward_model" in rows[-1] and "reward/exact_answer" in rows[-1]
    assert (tmp_path / "cli" / "reward_model" / "config.json").exists()


def test_ppo_config_errors(tmp_path, prompt_file):
    prompts, _ = prompt_file
    with pytest.raises(ConfigError, match="ppo.kl_in"):
        load_config(None, ["ppo.kl_in=both"])
    with pytest.raises(ConfigError, match="dual_clip"):
        load_config(None, ["ppo.loss.dual_clip=0.5"])
    with pytest.raises(ConfigError, match="ppo.mini_batches"):
        load_config(None, ["ppo.rollout.prompts_per_step=3", "ppo.mini_batches=2"])
    with pytest.raises(ConfigError, match="'ppo.rollout.temperature' must be > 0"):
        load_config(None, ["ppo.rollout.temperature=0"])
    with pytest.raises(ConfigError, match="'ppo.loss.loss_type' must be one of \\['ppo'\\]"):
        load_config(None, ["ppo.loss.loss_type=grpo"])
    with pytest.raises(ConfigError, match="'ppo.loss.beta' must be 0: the KL coefficient is "
                                          "ppo.kl_coef"):
        load_config(None, ["ppo.loss.beta=0.1"])
    with pytest.raises(ValueError, match="ppo.data"):
        PPOTrainer(load_config(None, ["algo=ppo", "device=cpu", "model.hidden_size=32",
                                      "model.num_layers=1"]))
    with pytest.raises(ValueError, match="ppo.reward_model"):
        PPOTrainer(_cfg(tmp_path, prompts, "ppo.reward=model"))


def test_ppo_sections_keep_their_defaults_under_partial_overrides():
    """ppo.rollout and ppo.loss default to PPO's own values (32 prompts x 1 completion; the
    "ppo" loss with the k1 KL): overriding one key of a section keeps the others."""
    cfg = load_config(None, ["ppo.rollout.temperature=0.7", "ppo.loss.eps_high=0.28"]).ppo
    assert (cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt) == (32, 1)
    assert cfg.rollout.temperature == pytest.approx(0.7)
    assert (cfg.loss.loss_type, cfg.loss.kl_estimator) == ("ppo", "k1")
    assert cfg.loss.eps_high == pytest.approx(0.28)
    grpo = load_config(None, ["grpo.rollout.top_p=0.9"]).grpo.rollout
    assert (grpo.prompts_per_step, grpo.samples_per_prompt) == (16, 8)


@pytest.mark.parametrize("override, key", [
    ("ppo.loss.temperature=0.5", "ppo.loss.temperature"),
    ("ppo.loss.logit_scale=2", "ppo.loss.logit_scale"),
    ("ppo.loss.final_logit_softcapping=30", "ppo.loss.final_logit_softcapping"),
])
def test_ppo_refuses_head_options_it_would_overwrite(tmp_path, prompt_file, override, key):
    prompts, _ = prompt_file
    with pytest.raises(ConfigError, match=f"'{key}' is .* the trainer sets it"):
        PPOTrainer(_cfg(tmp_path, prompts, override))
    # the value the trainer would set anyway is no conflict
    same = PPOTrainer(_cfg(tmp_path, prompts, "ppo.rollout.temperature=0.5",
                           "ppo.loss.temperature=0.5"))
    assert same.loss_cfg.temperature == 0.5
