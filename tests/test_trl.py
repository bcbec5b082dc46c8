"""rlfuse.integrations.trl against TRL 1.16's own GRPOTrainer / DPOTrainer: the same tiny Qwen2
(built from a config, saved locally) and character tokenizer, on CPU.

Unit parity: `_compute_loss` on one hand-made batch, over the options, for the loss, every
parameter's gradient and the logged metrics; options that fall back must say so. End to end: a
few SGD steps of each trainer with gradient accumulation (and, for GRPO, steps_per_generation 2
and num_iterations 2, so old log-probs are used): identical completions, log_history and
parameters within fp32 tolerance.
"""
from __future__ import annotations

import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import rlfuse  # noqa: E402
from rlfuse.engine.model import char_tokenizer  # noqa: E402
from rlfuse.integrations import trl as rtrl  # noqa: E402

# fp32 on both sides; the two heads' log-probs differ by rounding (~1e-7)
RTOL, ATOL = 1e-4, 1e-6
# log_history keys that measure time, not the computation
TIMED = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second",
         "train_loss_per_second")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: torch's thread pool only spins against the other processes on a busy CPU
    # (a 50x slowdown measured at load 8 on 2 cores).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = str(tmp_path_factory.mktemp("tiny_qwen2"))
    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=128, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _common(tmp_path, **kw) -> dict:
    return dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0, **kw)


def _assert_same_training(ref, ours, loss_ref, loss_ours, mode="train"):
    assert torch.isfinite(loss_ref)
    torch.testing.assert_close(loss_ours, loss_ref, rtol=RTOL, atol=ATOL)
    for (name, p), (_, q) in zip(ref.model.named_parameters(), ours.model.named_parameters()):
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), name
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=RTOL, atol=ATOL, msg=name)
    got = {k: v for k, v in ours._metrics[mode].items()}
    want = {k: v for k, v in ref._metrics[mode].items()}
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=RTOL, abs=ATOL, nan_ok=True), k


def _count_calls(monkeypatch, name: str) -> list:
    """Record each call of rlfuse's op `name` as the integration sees it."""
    calls, op = [], getattr(rtrl, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return op(*args, **kwargs)

    monkeypatch.setattr(rtrl, name, counted)
    return calls


# ----------------------------------------------------------------------------- GRPO
def _reward(prompts, completions, **kw):
    return [float(c.count("1")) - 0.1 * len(c) for c in completions]


def _grpo(cls, model_dir, tmp_path, reward=_reward, **kw):
    args = trl.GRPOConfig(num_generations=4, max_completion_length=8,
                          per_device_train_batch_size=4, **_common(tmp_path, **kw))
    ds = datasets.Dataset.from_list([{"prompt": f"{i}+{i + 1}="} for i in range(8)])
    return cls(model=model_dir, reward_funcs=reward, args=args, train_dataset=ds,
               processing_class=char_tokenizer())


def _grpo_inputs(vocab: int, old=True, tool_mask=False) -> dict:
    g = torch.Generator().manual_seed(1)
    b, p, k = 4, 5, 7
    mask = (torch.rand(b, k, generator=g) > 0.2).long()
    mask[2] = 0  # a completion masked out whole (mask_truncated_completions)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    inputs = dict(prompt_ids=torch.randint(4, vocab, (b, p), generator=g), prompt_mask=prompt_mask,
                  completion_ids=torch.randint(4, vocab, (b, k), generator=g),
                  completion_mask=mask, advantages=torch.randn(b, generator=g),
                  ref_per_token_logps=-3.9 + 0.3 * torch.randn(b, k, generator=g),
                  num_items_in_batch=mask.sum().float() * 2)  # spans 2 micro-batches
    if old:  # near the tiny model's log-probs (~ -log 51), so ratios straddle the clip range
        inputs["old_per_token_logps"] = -3.9 + 0.3 * torch.randn(b, k, generator=g)
    if tool_mask:
        inputs["tool_mask"] = (torch.rand(b, k, generator=g) > 0.3).long()
    return inputs


GRPO_CASES = {
    "dapo_default": dict(),
    "grpo_kl_bias_corrected": dict(loss_type="grpo", beta=0.1),
    "grpo_kl_plain": dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=False),
    "bnpo_clip_higher": dict(loss_type="bnpo", epsilon_high=0.28),
    "dr_grpo": dict(loss_type="dr_grpo", beta=0.05),
    "dapo_delta": dict(delta=1.2, beta=0.05),
    "cispo": dict(loss_type="cispo", epsilon_high=1.1),
    "sapo": dict(loss_type="sapo", beta=0.05),
    "gspo_sequence": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1),
    "top_entropy": dict(top_entropy_quantile=0.5),
    "temperature": dict(temperature=0.7, loss_type="bnpo"),
    "cast_lm_head_to_fp32": dict(cast_lm_head_to_fp32=True, beta=0.1),
    "tool_mask": dict(loss_type="grpo"),
    "on_policy_no_old": dict(loss_type="grpo", beta=0.1),
    "eval_mode": dict(loss_type="dapo", beta=0.1),
    # TRL's entropy bonus (a token mean over the mask) where rlfuse's entropy_coef can carry it
    "entropy_bonus_bnpo": dict(loss_type="bnpo", entropy_coef=0.05),
    "entropy_bonus_dapo": dict(entropy_coef=0.05, beta=0.1),
    "entropy_bonus_dr_grpo": dict(loss_type="dr_grpo", entropy_coef=0.05),
    "entropy_bonus_cispo_eval": dict(loss_type="cispo", epsilon_high=1.1, entropy_coef=0.05),
    # vLLM's importance-sampling weight, as TRL's generation step leaves it in the batch
    "vllm_is_token": dict(loss_type="grpo", beta=0.1),
    "vllm_is_sequence": dict(loss_type="dapo"),
}
GRPO_FALLBACKS = {
    "luspo": (dict(loss_type="luspo"), "loss_type='luspo'"),
    "vespo": (dict(loss_type="vespo"), "loss_type='vespo'"),
    "entropy_bonus_grpo": (dict(loss_type="grpo", entropy_coef=0.01), "entropy_coef"),
    "adaptive_entropy": (dict(loss_type="bnpo", use_adaptive_entropy=True), "entropy_coef"),
    "cispo_cap_below_1": (dict(loss_type="cispo", epsilon_high=0.28), "epsilon_high"),
}


def _grpo_step(trainer, inputs, mode):
    trainer.model.train(mode == "train")
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("case", list(GRPO_CASES) + list(GRPO_FALLBACKS))
def test_grpo_compute_loss_matches_trl(model_dir, tmp_path, case, monkeypatch):
    kw, warn = GRPO_CASES.get(case), None
    if case in GRPO_FALLBACKS:
        kw, warn = GRPO_FALLBACKS[case]
    kw = {**kw, "steps_per_generation": 2}
    ref = _grpo(trl.GRPOTrainer, model_dir, tmp_path / "trl", **kw)
    ours = _grpo(rtrl.GRPOTrainer, model_dir, tmp_path / "ours", **kw)
    inputs = _grpo_inputs(len(ours.processing_class), old=case != "on_policy_no_old",
                          tool_mask=case == "tool_mask")
    if case.startswith("vllm_is"):  # no vllm here: set what TRL's use_vllm path reads
        b, k = inputs["completion_mask"].shape
        w = torch.rand(b, k if case == "vllm_is_token" else 1) * 3
        w[w > 2.5] = 0  # TRL's masked (token_mask / sequence_mask) weights
        inputs["importance_sampling_ratio"] = w
        for t in (ref, ours):
            t.use_vllm = t.vllm_importance_sampling_correction = True
    mode = "eval" if "eval" in case else "train"
    loss_ref = _grpo_step(ref, inputs, mode)
    fused, scored = (_count_calls(monkeypatch, n) for n in ("policy_loss", "linear_logprobs"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_ours = _grpo_step(ours, inputs, mode)
    ours_warnings = [str(w.message) for w in caught if "rlfuse.integrations.trl" in str(w.message)]
    if warn is None:  # rlfuse's fused loss ran, and nothing else scored the tokens
        assert ours_warnings == [] and fused == ["policy_loss"] and scored == []
    else:  # TRL's loss math, on rlfuse's log-probs
        assert fused == [] and scored == ["linear_logprobs"]
        assert len(ours_warnings) == 1 and warn in ours_warnings[0], ours_warnings
        _grpo_step(ours, inputs, mode)  # the warning is one-time
        ours._metrics[mode].clear()
        ref._metrics[mode].clear()
        loss_ref = _grpo_step(ref, inputs, mode)
        loss_ours = _grpo_step(ours, inputs, mode)
    _assert_same_training(ref, ours, loss_ref, loss_ours, mode)


def test_grpo_training_matches_trl(model_dir, tmp_path, monkeypatch):
    """SGD steps with accumulation 2, steps_per_generation 2, num_iterations 2 (old log-probs
    computed and used), beta > 0 (reference log-probs), TRL's default loss (dapo)."""
    fused = _count_calls(monkeypatch, "policy_loss")
    runs = {}
    for name, cls in (("trl", trl.GRPOTrainer), ("ours", rtrl.GRPOTrainer)):
        seen = []

        def reward(prompts, completions, _seen=seen, **kw):
            _seen.append(list(completions))
            return _reward(prompts, completions)

        t = _grpo(cls, model_dir, tmp_path / name, reward=reward, max_steps=4,
                  gradient_accumulation_steps=2, steps_per_generation=2, num_iterations=2,
                  beta=0.1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
                  temperature=0.9)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t.train()
        assert not [w for w in caught if "rlfuse.integrations.trl" in str(w.message)]
        runs[name] = (t, seen)
    assert len(fused) == 4 * 2  # every micro-batch's loss was rlfuse's fused one
    (ref, ref_seen), (ours, ours_seen) = runs["trl"], runs["ours"]
    assert len(ref_seen) == 2 and ours_seen == ref_seen  # two generation rounds, same samples
    logs_ref = [{k: v for k, v in h.items() if k not in TIMED} for h in ref.state.log_history]
    logs_ours = [{k: v for k, v in h.items() if k not in TIMED} for h in ours.state.log_history]
    assert [h.keys() for h in logs_ours] == [h.keys() for h in logs_ref]
    assert any("kl" in h and h["kl"] > 0 for h in logs_ref)
    for h_ref, h_ours in zip(logs_ref, logs_ours):
        for k, v in h_ref.items():
            assert h_ours[k] == pytest.approx(v, rel=RTOL, abs=1e-5, nan_ok=True), k
    _assert_same_parameters(ref.model, ours.model, model_dir)


def _assert_same_parameters(ref, ours, model_dir):
    for (name, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    start = type(ref).from_pretrained(model_dir)
    assert any(not torch.allclose(p, s) for p, s in zip(ref.parameters(), start.parameters()))


def test_policy_loss_kl_times_ratio_fused_matches_reference():
    """The option TRL's use_bias_correction_kl maps to: fused path == the reference spec."""
    torch.manual_seed(0)
    b, t, h, v = 3, 5, 16, 37
    x = torch.randn(b, t, h, requires_grad=True)
    w = torch.randn(v, h, requires_grad=True)
    tg = torch.randint(0, v, (b, t))
    mask = torch.ones(b, t)
    adv, old, ref = torch.randn(b), torch.randn(b, t) - 3.5, torch.randn(b, t) - 3.5
    grads = []
    for impl in ("reference", "auto"):
        cfg = rlfuse.PolicyLossConfig(loss_type="grpo", beta=0.3, kl_times_ratio=True, impl=impl)
        loss, _ = rlfuse.policy_loss(x, w, tg, mask, adv, old_logp=old, ref_logp=ref, config=cfg)
        grads.append((loss.detach(), *torch.autograd.grad(loss, (x, w))))
    for a, c in zip(*grads):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
    plain = rlfuse.PolicyLossConfig(loss_type="grpo", beta=0.3, impl="reference")
    loss_plain, _ = rlfuse.policy_loss(x, w, tg, mask, adv, old_logp=old, ref_logp=ref,
                                       config=plain)
    assert not torch.isclose(loss_plain.detach(), grads[0][0])


# ----------------------------------------------------------------------------- DPO
def _pairs(n: int) -> list[dict]:
    import random

    rng = random.Random(0)
    word = lambda k: "".join(rng.choice("abcdefgh ") for _ in range(k))  # noqa: E731
    return [{"prompt": word(rng.randrange(3, 7)), "chosen": word(rng.randrange(2, 7)),
             "rejected": word(rng.randrange(2, 7))} for _ in range(n)]


def _dpo(cls, model_dir, tmp_path, n=8, **kw):
    args = trl.DPOConfig(**_common(tmp_path, **{"per_device_train_batch_size": 4, **kw}))
    return cls(model=model_dir, args=args, train_dataset=datasets.Dataset.from_list(_pairs(n)),
               processing_class=char_tokenizer())


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
                  "sigmoid_norm")
DPO_CASES = {
    **{lt: dict(loss_type=[lt]) for lt in DPO_LOSS_TYPES},
    "exo_pair": dict(loss_type=["exo_pair"], label_smoothing=1e-3),  # TRL requires it > 0
    "robust_smoothed": dict(loss_type=["robust"], label_smoothing=0.1),
    "sigmoid_smoothing_ignored": dict(loss_type=["sigmoid"], label_smoothing=0.1),
    "aot_smoothed": dict(loss_type=["aot"], label_smoothing=0.1),
    "sigmoid_plus_sft": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "precompute_ref": dict(loss_type=["sigmoid"], precompute_ref_log_probs=True),
    "empty_completion_row": dict(loss_type=["ipo"]),
    "js_divergence": dict(loss_type=["sigmoid"], f_divergence_type="js_divergence"),
    "ld_alpha": dict(loss_type=["sigmoid"], ld_alpha=0.5),
}


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_compute_loss_matches_trl(model_dir, tmp_path, case, monkeypatch):
    kw = DPO_CASES[case]
    scored = _count_calls(monkeypatch, "linear_logprobs")
    trainers = [_dpo(cls, model_dir, tmp_path / name, **kw)
                for name, cls in (("trl", trl.DPOTrainer), ("ours", rtrl.DPOTrainer))]
    precompute = kw.get("precompute_ref_log_probs", False)
    assert bool(scored) == precompute  # rlfuse scored the reference in our constructor
    scored.clear()
    losses = []
    for t in trainers:
        if kw.get("precompute_ref_log_probs"):
            for col in ("ref_chosen_logps", "ref_rejected_logps"):
                torch.testing.assert_close(torch.tensor(t.train_dataset[col]),
                                           torch.tensor(trainers[0].train_dataset[col]),
                                           rtol=RTOL, atol=ATOL)
        batch = t.data_collator([t.train_dataset[i] for i in range(4)])
        if case == "empty_completion_row":
            batch["completion_mask"][1] = 0  # pair 1's chosen completion truncated away
        t.model.train()
        t.model.zero_grad()
        loss = t._compute_loss(t.model, batch, return_outputs=False)
        loss.backward()
        losses.append(loss.detach())
    ref, ours = trainers
    assert len(scored) == (1 if precompute else 2)  # the policy, and the reference

    _assert_same_training(ref, ours, *losses)
    assert {"rewards/chosen", "logps/rejected", "logits/chosen", "entropy",
            "mean_token_accuracy"} <= ref._metrics["train"].keys()


def test_dpo_weighting_falls_back_with_a_warning(model_dir, tmp_path):
    with pytest.warns(UserWarning, match="use_weighting"):
        _dpo(rtrl.DPOTrainer, model_dir, tmp_path, use_weighting=True)


def test_dpo_metrics_come_from_the_scoring_pass(model_dir, tmp_path, monkeypatch):
    # logits/* and mean_token_accuracy (checked against TRL's in test_dpo_matches_trl) come from
    # the policy's own linear_logprobs call: no second pass over the LM head
    t = _dpo(rtrl.DPOTrainer, model_dir, tmp_path, precompute_ref_log_probs=True)
    asked, op = [], rtrl.linear_logprobs
    monkeypatch.setattr(rtrl, "linear_logprobs",
                        lambda *a, **kw: asked.append(kw["return_logit_summary"]) or op(*a, **kw))
    t._compute_loss(t.model, t.data_collator([t.train_dataset[i] for i in range(4)]),
                    return_outputs=False)
    assert asked == [True]
    assert not hasattr(rtrl, "_logit_summary")


def test_dpo_training_matches_trl(model_dir, tmp_path):
    runs = {}
    for name, cls in (("trl", trl.DPOTrainer), ("ours", rtrl.DPOTrainer)):
        t = _dpo(cls, model_dir, tmp_path / name, n=16, max_steps=2,
                 gradient_accumulation_steps=2, per_device_train_batch_size=2, optim="sgd",
                 learning_rate=0.5, lr_scheduler_type="constant", loss_type=["sigmoid", "sft"],
                 loss_weights=[1.0, 0.3])
        t.train()
        runs[name] = t
    ref, ours = runs["trl"], runs["ours"]
    logs_ref = [{k: v for k, v in h.items() if k not in TIMED} for h in ref.state.log_history]
    logs_ours = [{k: v for k, v in h.items() if k not in TIMED} for h in ours.state.log_history]
    assert [h.keys() for h in logs_ours] == [h.keys() for h in logs_ref]
    for h_ref, h_ours in zip(logs_ref, logs_ours):
        for k, v in h_ref.items():
            assert h_ours[k] == pytest.approx(v, rel=RTOL, abs=1e-5), k
    _assert_same_parameters(ref.model, ours.model, model_dir)


def test_grpo_lora_matches_trl(model_dir, tmp_path, monkeypatch):
    """A LoRA policy: rlfuse's head on the PEFT base model, the reference = adapter off."""
    peft = pytest.importorskip("peft")
    trainers = []
    for name, cls in (("trl", trl.GRPOTrainer), ("ours", rtrl.GRPOTrainer)):
        torch.manual_seed(0)  # the same adapter initialization
        args = trl.GRPOConfig(num_generations=4, max_completion_length=8,
                              per_device_train_batch_size=4, beta=0.1, loss_type="grpo",
                              **_common(tmp_path / name))
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                               init_lora_weights=False)  # nonzero B: the adapter matters
        trainers.append(cls(model=model_dir, reward_funcs=_reward, args=args,
                            train_dataset=datasets.Dataset.from_list([{"prompt": "1+1="}] * 4),
                            processing_class=char_tokenizer(), peft_config=lora))
    ref, ours = trainers
    fused = _count_calls(monkeypatch, "policy_loss")
    inputs = _grpo_inputs(len(ours.processing_class))
    with torch.no_grad():  # the reference log-probs through each trainer's own head
        for t in trainers:
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            with t.accelerator.unwrap_model(t.model).disable_adapter():
                t._ref, _, _ = t._get_per_token_logps_and_entropies(t.model, ids, am, 7)
    torch.testing.assert_close(ours._ref, ref._ref, rtol=RTOL, atol=ATOL)
    losses = [_grpo_step(t, {**inputs, "ref_per_token_logps": t._ref}, "train")
              for t in trainers]
    assert fused == ["policy_loss"]
    _assert_same_training(ref, ours, *losses)
