"""policy_loss: every loss type x importance level x impl against the fp64 reference (loss,
per-token outputs, metrics, gradients), the reference against values computed by hand from the
published formulas, masks, dapo's global normalizer, fused / two-phase routing, bad inputs."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlfuse import PolicyLossConfig, policy_loss
from rlfuse import policy
from rlfuse.logprobs import linear_logprobs_reference

from conftest import CHUNKED_IMPLS, IMPL_ORDERS

IMPLS = ["reference"] + CHUNKED_IMPLS
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "ppo"]
LEVELS = ["token", "sequence"]
B, T, H, V = 5, 7, 24, 123
EXTRA = {"grpo": {"delta": 1.4}, "ppo": {"dual_clip": 3.0}, "dapo": {"dual_clip": 2.0}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: intra-op threads only add spin-up cost (20x under a shared, loaded CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(dtype, adv_2d=False, bias=True, v=V, noise=0.4):
    x = torch.randn(B, T, H).to(dtype)
    w = (torch.randn(v, H) / H**0.5 * 3).to(dtype)
    b = torch.randn(v).to(dtype) if bias else None
    t = torch.randint(0, v, (B, T))
    t[0, 2] = -100
    m = (torch.rand(B, T) > 0.2).float()
    m[1] = 0  # an empty row
    m[0, :4] = 1
    adv = torch.randn(B, T) if adv_2d else torch.randn(B)
    with torch.no_grad():
        lp = linear_logprobs_reference(x.double(), w.double(), t,
                                       None if b is None else b.double())[0].float()
    old = lp + noise * torch.randn(B, T)  # ratios exp(N(0, noise)): clipped on both sides
    return dict(x=x, w=w, b=b, t=t, m=m, adv=adv, old=old, ref=lp + 0.3 * torch.randn(B, T),
                rollout=old + 0.5 * torch.randn(B, T))


def _run(inp, cfg, as_dtype=None, **kw):
    """Loss, per-token outputs and (hidden, weight, bias) gradients; metrics separately."""
    cast = (lambda a: a.to(as_dtype)) if as_dtype is not None else (lambda a: a)
    leaves = [cast(a).detach().requires_grad_() for a in (inp["x"], inp["w"], inp["b"])
              if a is not None]
    x, w = leaves[:2]
    b = leaves[2] if inp["b"] is not None else None
    opt = dict(old_logp=inp["old"], ref_logp=inp["ref"])
    if cfg.rollout_correction is not None:
        opt["rollout_logp"] = inp["rollout"]
    opt.update(kw)
    loss, out = policy_loss(x, w, inp["t"], inp["m"], inp["adv"], bias=b, config=cfg, **opt)
    grads = torch.autograd.grad(loss, leaves)
    return [loss, out.logp, out.entropy, out.kl, *grads], out


def _assert_matches(inp, cfg, dtype, atol, **kw):
    truth, tout = _run(inp, PolicyLossConfig(**{**cfg.__dict__, "impl": "reference"}),
                       torch.float64, **kw)
    naive, _ = _run(inp, PolicyLossConfig(**{**cfg.__dict__, "impl": "reference"}), **kw)
    got, out = _run(inp, cfg, **kw)
    assert got[0].dtype == torch.float32 and out.logp.dtype == torch.float32
    assert [g.dtype for g in got[4:]] == [dtype] * len(got[4:])
    for name, g, n, want in zip(["loss", "logp", "entropy", "kl", "dx", "dw", "db"],
                                got, naive, truth):
        err = (g.double() - want).abs().max().item()
        budget = (n.double() - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= 2 * budget + atol * max(1.0, scale), (name, err, budget, scale)
    rollout = policy.ROLLOUT_METRICS if cfg.rollout_correction else ()
    assert set(out.metrics) == {*policy.METRICS, *rollout}
    for k, val in out.metrics.items():
        assert val.dim() == 0 and val.dtype == torch.float32
        torch.testing.assert_close(val.double(), tout.metrics[k].double(), atol=1e-5, rtol=1e-4,
                                   msg=k)
    return out


@pytest.mark.parametrize("impl,pass_order", IMPL_ORDERS, indirect=["pass_order"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_fp64_reference(loss_type, level, dtype, impl, pass_order):
    inp = _inputs(dtype)
    cfg = PolicyLossConfig(loss_type=loss_type, importance_level=level, eps_high=0.28, beta=0.04,
                           entropy_coef=0.01, temperature=0.9, max_completion_length=9,
                           chunk_size=8, impl=impl, **EXTRA.get(loss_type, {}))
    out = _assert_matches(inp, cfg, dtype, atol=1e-5 if dtype == torch.float32 else 4e-3)
    assert out.metrics["tokens"].item() == ((inp["m"] != 0) & (inp["t"] != -100)).sum().item()
    if loss_type in ("grpo", "ppo", "dapo") and level == "token":
        assert out.metrics["clip_fraction"].item() > 0  # the inputs exercise the clipping


OPTIONS = {
    "k1": dict(beta=0.1, kl_estimator="k1"),
    "k2": dict(beta=0.1, kl_estimator="k2"),
    "tis": dict(rollout_correction="tis", rollout_correction_cap=1.5),
    "mis": dict(rollout_correction="mis", rollout_correction_cap=1.5),
    "entropy_quantile": dict(top_entropy_quantile=0.4, entropy_coef=0.05),
    "softcap": dict(logit_scale=0.7, final_logit_softcapping=3.0, temperature=1.3),
    "clip_higher_delta": dict(eps_low=0.1, eps_high=0.3, delta=1.25),
}


@pytest.mark.parametrize("impl,pass_order", IMPL_ORDERS, indirect=["pass_order"])
@pytest.mark.parametrize("adv_2d", [False, True])
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_options_match_fp64_reference(opt, adv_2d, impl, pass_order):
    inp = _inputs(torch.float32, adv_2d=adv_2d, bias=opt != "k1", v=31)
    cfg = PolicyLossConfig(loss_type="dapo" if adv_2d else "grpo", chunk_size=6, impl=impl,
                           **OPTIONS[opt])
    _assert_matches(inp, cfg, torch.float32, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["grpo", "cispo", "sapo"])
def test_on_policy_without_old_logp(loss_type, impl):
    """old_logp=None: ratio exp(logp - logp.detach()) = 1, gradient of -A * logp (normalized)."""
    inp = _inputs(torch.float32, v=31)
    cfg = PolicyLossConfig(loss_type=loss_type, impl=impl, chunk_size=5)
    out = _assert_matches(inp, cfg, torch.float32, atol=1e-5, old_logp=None)
    assert out.metrics["ratio_min"] == 1 and out.metrics["ratio_max"] == 1
    assert out.metrics["clip_fraction"] == 0 and out.metrics["approx_kl"] == 0
    # With r = 1 every surrogate's gradient is the policy gradient's -A * dlogp (sapo's gate has
    # slope 1 at r = 1): compare with the clipped type of the same normalizer.
    twin = {"grpo": "grpo", "sapo": "grpo", "cispo": "dapo"}[loss_type]
    want, _ = _run(inp, PolicyLossConfig(loss_type=twin, impl="reference"), torch.float64,
                   old_logp=None)
    got, _ = _run(inp, PolicyLossConfig(loss_type=loss_type, impl="reference"), torch.float64,
                  old_logp=None)
    for g, w_ in zip(got[4:], want[4:]):
        torch.testing.assert_close(g, w_)


# ----------------------------------------------------------------------------- by hand
def _hand_loss(cfg, logp, ent, ratio, adv, mask, ref, n_items=None):
    """The published formulas in plain python over lists of rows (TRL normalizations)."""
    eps_l, eps_h = cfg.eps_low, cfg.eps_high if cfg.eps_high is not None else cfg.eps_low
    per, total = [], 0.0
    for i, row in enumerate(ratio):
        toks = [j for j, m in enumerate(mask[i]) if m]
        if cfg.importance_level == "sequence":
            s = sum(math.log(row[j]) for j in toks) / max(len(toks), 1)
            row = [math.exp(s)] * len(row)
        a = adv[i]
        out = []
        for j, r in enumerate(row):
            if cfg.loss_type == "cispo":
                l = -min(r, 1 + eps_h) * a * logp[i][j]
            elif cfg.loss_type == "sapo":
                tau = cfg.sapo_temperature_pos if a > 0 else cfg.sapo_temperature_neg
                l = -1 / (1 + math.exp(-tau * (r - 1))) * 4 / tau * a
            else:
                l = -min(r * a, min(max(r, 1 - eps_l), 1 + eps_h) * a)
            d = ref[i][j] - logp[i][j]
            l += cfg.beta * (math.exp(d) - d - 1) - cfg.entropy_coef * ent[i][j]
            out.append(l if mask[i][j] else 0.0)
        per.append((out, len(toks)))
    n_b, n_tok = len(ratio), sum(n for _, n in per)
    if cfg.loss_type in ("grpo", "sapo"):
        return sum(sum(o) / max(n, 1) for o, n in per) / n_b
    total = sum(sum(o) for o, _ in per)
    if cfg.loss_type in ("bnpo", "ppo"):
        return total / max(n_tok, 1)
    if cfg.loss_type == "dr_grpo":
        return total / (n_b * cfg.max_completion_length)
    return total / (n_items if n_items is not None else max(n_tok, 1))


def _hand_inputs(ratios, mask, advs):
    """weight = I (V = H) so logits = hidden: logp / entropy in plain python from the rows."""
    b, t = len(ratios), len(ratios[0])
    z = torch.randn(b, t, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (b, t))
    logp, ent = [], []
    for i in range(b):
        lrow, erow = [], []
        for j in range(t):
            zs = z[i, j].tolist()
            lse = math.log(sum(math.exp(u) for u in zs))
            lrow.append(zs[y[i, j]] - lse)
            erow.append(-sum(math.exp(u - lse) * (u - lse) for u in zs))
        logp.append(lrow)
        ent.append(erow)
    old = [[logp[i][j] - math.log(ratios[i][j]) for j in range(t)] for i in range(b)]
    ref = [[logp[i][j] + 0.3 * (j - 1) for j in range(t)] for i in range(b)]
    tens = dict(x=z, w=torch.eye(5, dtype=torch.float64), t=y,
                m=torch.tensor(mask, dtype=torch.float64),
                adv=torch.tensor(advs, dtype=torch.float64),
                old=torch.tensor(old, dtype=torch.float64),
                ref=torch.tensor(ref, dtype=torch.float64))
    return tens, logp, ent, ref


def test_grpo_1x3_by_hand():
    """Ratios 0.7, 1.1, 1.5 with A = +0.8, eps 0.2: -min(rA, clip(r)A) = -0.56, -0.88, -0.96."""
    tens, logp, _, _ = _hand_inputs([[0.7, 1.1, 1.5]], [[1, 1, 1]], [0.8])
    x = tens["x"].clone().requires_grad_()
    loss, out = policy_loss(x, tens["w"], tens["t"], tens["m"], tens["adv"],
                            old_logp=tens["old"], config=PolicyLossConfig(impl="reference"))
    assert loss.item() == pytest.approx(-(0.56 + 0.88 + 0.96) / 3, abs=1e-12)
    assert out.metrics["clip_fraction_high"].item() == pytest.approx(1 / 3)
    assert out.metrics["ratio_max"].item() == pytest.approx(1.5)
    # dL/dlogp: -A r / 3 on the unclipped tokens, 0 on the clipped one; dL/dz = a (onehot - p).
    loss.backward()
    a = [-0.8 * 0.7 / 3, -0.8 * 1.1 / 3, 0.0]
    p = torch.softmax(tens["x"][0], -1)
    want = torch.stack([a[j] * (torch.nn.functional.one_hot(tens["t"][0, j], 5) - p[j])
                        for j in range(3)])
    torch.testing.assert_close(x.grad[0], want)
    torch.testing.assert_close(out.logp[0], torch.tensor(logp[0], dtype=torch.float64))


def test_cispo_and_dual_clip_1x3_by_hand():
    tens, logp, _, _ = _hand_inputs([[0.5, 1.0, 1.6]], [[1, 1, 1]], [-1.5])
    x = tens["x"].clone().requires_grad_()
    cfg = PolicyLossConfig(loss_type="cispo", eps_high=0.3, impl="reference")
    loss, out = policy_loss(x, tens["w"], tens["t"], tens["m"], tens["adv"],
                            old_logp=tens["old"], num_items_in_batch=4, config=cfg)
    w = [0.5, 1.0, 1.3]  # sg(min(r, 1 + eps_high))
    assert loss.item() == pytest.approx(sum(1.5 * w[j] * logp[0][j] for j in range(3)) / 4)
    loss.backward()
    p = torch.softmax(tens["x"][0], -1)
    want = torch.stack([1.5 * w[j] / 4 * (torch.nn.functional.one_hot(tens["t"][0, j], 5) - p[j])
                        for j in range(3)])
    torch.testing.assert_close(x.grad[0], want)
    # dual clip c = 3, A = -1.5: token losses 1.5 * max(r, 0.8), bounded by 3 * 1.5 = 4.5.
    tens, _, _, _ = _hand_inputs([[0.5, 2.0, 4.0]], [[1, 1, 1]], [-1.5])
    cfg = PolicyLossConfig(loss_type="ppo", dual_clip=3.0, impl="reference")
    loss, _ = policy_loss(tens["x"], tens["w"], tens["t"], tens["m"], tens["adv"],
                          old_logp=tens["old"], config=cfg)
    assert loss.item() == pytest.approx((1.5 * 0.8 + 1.5 * 2.0 + 4.5) / 3)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_reference_by_hand(loss_type, level):
    """2 x 4 rows of unequal lengths (so the normalizations differ), KL and entropy bonus on."""
    ratios = [[0.7, 1.1, 1.5, 0.95], [1.3, 0.6, 1.02, 2.0]]
    mask = [[1, 1, 1, 0], [1, 1, 0, 0]]
    tens, logp, ent, ref = _hand_inputs(ratios, mask, [0.8, -1.2])
    cfg = PolicyLossConfig(loss_type=loss_type, importance_level=level, eps_high=0.28,
                           beta=0.05, entropy_coef=0.02, max_completion_length=6,
                           sapo_temperature_pos=1.5, sapo_temperature_neg=2.0, impl="reference")
    n_items = 11 if loss_type in ("dapo", "cispo") else None
    loss, out = policy_loss(tens["x"], tens["w"], tens["t"], tens["m"], tens["adv"],
                            old_logp=tens["old"], ref_logp=tens["ref"], config=cfg,
                            num_items_in_batch=n_items)
    want = _hand_loss(cfg, logp, ent, ratios, [0.8, -1.2], mask, ref, n_items)
    assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    kl = [math.exp(r - l) - (r - l) - 1 for r, l in zip(ref[0][:3] + ref[1][:2],
                                                        logp[0][:3] + logp[1][:2])]
    assert out.metrics["kl"].item() == pytest.approx(sum(kl) / 5, rel=1e-6)
    assert out.metrics["entropy"].item() == pytest.approx(sum(ent[0][:3] + ent[1][:2]) / 5,
                                                          rel=1e-6)
    assert out.metrics["tokens"].item() == 5


def test_reference_sequence_ratio_and_normalizers_by_hand():
    """GSPO ratio = exp(mean log r) over the row's valid tokens; normalizer constants by name."""
    ratios = [[0.7, 1.1, 1.5, 0.95], [1.3, 0.6, 1.02, 2.0]]
    mask = [[1, 1, 1, 0], [1, 1, 0, 0]]
    tens, _, _, _ = _hand_inputs(ratios, mask, [0.8, -1.2])
    cfg = PolicyLossConfig(importance_level="sequence", impl="reference")
    _, out = policy_loss(tens["x"], tens["w"], tens["t"], tens["m"], tens["adv"],
                         old_logp=tens["old"], config=cfg)
    r0 = (0.7 * 1.1 * 1.5) ** (1 / 3)
    r1 = (1.3 * 0.6) ** 0.5
    assert out.metrics["ratio_mean"].item() == pytest.approx((3 * r0 + 2 * r1) / 5, rel=1e-6)
    assert out.metrics["ratio_min"].item() == pytest.approx(min(r0, r1), rel=1e-6)
    # one-token losses l_n = 1 on valid tokens (A = -1, r = 1): the loss is sum_n w_n.
    adv = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    for lt, want in [("grpo", (3 / 3 + 2 / 2) / 2), ("bnpo", 1.0), ("ppo", 1.0),
                     ("dr_grpo", 5 / (2 * 10)), ("dapo", 5 / 20)]:
        cfg = PolicyLossConfig(loss_type=lt, max_completion_length=10, impl="reference")
        loss, _ = policy_loss(tens["x"], tens["w"], tens["t"], tens["m"], adv, config=cfg,
                              num_items_in_batch=20)
        assert loss.item() == pytest.approx(want, rel=1e-12), lt


def test_top_entropy_mask_follows_trl():
    """Keep tokens with entropy >= torch.quantile(valid entropies, 1 - q)."""
    ent = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7, 2.0, 0.2, 0.8, 1.1, 0.4])
    valid = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    keep = policy._top_entropy_mask(ent, valid, 0.25)
    thr = torch.quantile(ent[valid], 0.75)
    assert torch.equal(keep, (ent >= thr) & valid) and keep.sum() == 3
    x = torch.randn(1001)
    for q in (0.0, 0.13, 0.5, 0.8, 1.0):
        assert policy._quantile(x, q) == pytest.approx(torch.quantile(x, q).item(), abs=1e-6)
    assert not policy._top_entropy_mask(ent, torch.zeros_like(valid), 0.5).any()


# ----------------------------------------------------------------------------- masks, dapo
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_zero_mask_gives_zero_loss(loss_type, level, impl):
    inp = _inputs(torch.float32, v=31)
    inp["m"] = torch.zeros(B, T)
    cfg = PolicyLossConfig(loss_type=loss_type, importance_level=level, beta=0.1,
                           entropy_coef=0.1, max_completion_length=9, impl=impl, chunk_size=4)
    got, out = _run(inp, cfg)
    assert got[0].item() == 0 and all((g == 0).all() for g in got[4:])
    assert out.metrics["tokens"].item() == 0
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_global_token_count_splits_into_micro_batches(loss_type, level, impl):
    """With num_items_in_batch = the global count, micro-batch losses and gradients add up to the
    whole batch's (what gradient accumulation and DDP summing rely on)."""
    inp = _inputs(torch.float32, v=31)
    count = int(((inp["m"] != 0) & (inp["t"] != -100)).sum())
    cfg = PolicyLossConfig(loss_type=loss_type, importance_level=level, beta=0.04, impl=impl)
    whole, _ = _run(inp, cfg)
    default, _ = _run(inp, cfg, num_items_in_batch=None)
    explicit, _ = _run(inp, cfg, num_items_in_batch=torch.tensor(float(count)))
    torch.testing.assert_close(whole[0], default[0])
    torch.testing.assert_close(whole[0], explicit[0])
    x = inp["x"].clone().requires_grad_()
    w = inp["w"].clone().requires_grad_()
    total = 0
    for sl in (slice(0, 2), slice(2, B)):
        loss, _ = policy_loss(x[sl], w, inp["t"][sl], inp["m"][sl], inp["adv"][sl],
                              old_logp=inp["old"][sl], ref_logp=inp["ref"][sl], bias=inp["b"],
                              num_items_in_batch=count, config=cfg)
        total = total + loss
    dx, dw = torch.autograd.grad(total, (x, w))
    torch.testing.assert_close(total, whole[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dx, whole[4], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dw, whole[5], atol=1e-6, rtol=1e-5)
    doubled, _ = _run(inp, cfg, num_items_in_batch=2 * count)
    torch.testing.assert_close(doubled[0] * 2, whole[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_head_gets_no_gradient(impl, monkeypatch):
    # a LoRA policy's LM head is frozen: no dW (its GEMM and fp32 buffer are skipped)
    allocated = []
    orig = policy._chunked._GradAccumulator.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        allocated.append(self.dw is not None)

    monkeypatch.setattr(policy._chunked._GradAccumulator, "__init__", spy)
    inp = _inputs(torch.float32, bias=False)
    cfg = PolicyLossConfig(impl=impl, beta=0.1)
    x = inp["x"].clone().requires_grad_()
    loss, _ = policy_loss(x, inp["w"], inp["t"], inp["m"], inp["adv"], old_logp=inp["old"],
                          ref_logp=inp["ref"], config=cfg)
    loss.backward()
    assert inp["w"].grad is None
    assert allocated == ([False] if impl != "reference" else [])
    want, _ = _run({**inp, "b": None}, PolicyLossConfig(impl="reference", beta=0.1))
    torch.testing.assert_close(x.grad, want[4], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- routing
@pytest.mark.skipif(not CHUNKED_IMPLS, reason="C++ extension not built")
@pytest.mark.parametrize("case,fused", [
    ({}, True),
    ({"importance_level": "sequence"}, True),  # T = 7 rows fit a chunk: whole sequences
    ({"importance_level": "sequence", "chunk_size": T - 2}, False),
    ({"top_entropy_quantile": 0.5}, False),  # a whole-batch threshold
])
@pytest.mark.parametrize("pass_order", ["rows", 7], indirect=True)  # slabs: always two phases
def test_fused_when_groups_fit_a_chunk(case, fused, pass_order, monkeypatch):
    calls = {"fused": 0, "stats": 0, "backward": 0}
    for name, key in (("_whole_groups", "fused"), ("forward_stats", "stats"),
                      ("backward", "backward")):
        orig = getattr(policy._chunked, name)

        def spy(*a, _orig=orig, _key=key, **k):
            calls[_key] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(policy._chunked, name, spy)
    inp = _inputs(torch.float32, v=31)
    cfg = PolicyLossConfig(impl="cpp", **{"chunk_size": 8, **case})
    got, _ = _run(inp, cfg)
    fused = fused and pass_order == "rows"
    assert calls == ({"fused": 1, "stats": 0, "backward": 0} if fused else
                     {"fused": 0, "stats": 1, "backward": 1})
    want, _ = _run(inp, PolicyLossConfig(**{**cfg.__dict__, "impl": "reference"}))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # no gradient needed: one stats pass, whatever the loss
        calls.update(fused=0, stats=0, backward=0)
        loss, _ = policy_loss(inp["x"], inp["w"], inp["t"], inp["m"], inp["adv"], bias=inp["b"],
                              old_logp=inp["old"], ref_logp=inp["ref"], config=cfg)
        assert calls == {"fused": 0, "stats": 1, "backward": 0}
    torch.testing.assert_close(loss, got[0].detach())


# ----------------------------------------------------------------------------- bad input
def _call(inp, cfg=PolicyLossConfig(), **kw):
    args = dict(hidden=inp["x"], weight=inp["w"], targets=inp["t"], mask=inp["m"],
                advantages=inp["adv"])
    opts = dict(old_logp=inp["old"], config=cfg)
    for k, v in kw.items():
        (args if k in args else opts)[k] = v
    return policy_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"),
                       args.pop("mask"), args.pop("advantages"), **opts)


@pytest.mark.parametrize("kw,match", [
    (dict(hidden=torch.randn(B * T, H)), r"hidden must be 3-D \[B, T, H\]"),
    (dict(targets=torch.zeros(B, T + 1, dtype=torch.long)), "targets must have shape"),
    (dict(mask=torch.ones(B, T - 1)), r"mask must have shape \[B, T\]"),
    (dict(mask=torch.full((B, T), 0.5)), "mask must hold 0/1"),
    (dict(advantages=torch.randn(B + 1)), r"advantages must have shape \[B\] = \(5,\) or"),
    (dict(advantages=torch.randn(B, T, 1)), "advantages must have shape"),
    (dict(advantages=torch.ones(B, dtype=torch.long)), "advantages must be a floating-point"),
    (dict(old_logp=torch.randn(B, T + 2)), r"old_logp must have shape \[B, T\] = \(5, 7\)"),
    (dict(ref_logp=torch.randn(B)), "ref_logp must have shape"),
    (dict(config=PolicyLossConfig(beta=0.1)), "ref_logp is required"),
    (dict(config=PolicyLossConfig(rollout_correction="tis")), "rollout_logp is required"),
    (dict(rollout_logp=torch.randn(B, T)), "rollout_correction is None"),
    (dict(config=PolicyLossConfig(loss_type="dapo"), num_items_in_batch=0), "num_items_in_batch"),
    (dict(config=PolicyLossConfig(loss_type="dapo"), num_items_in_batch=torch.ones(2)),
     "num_items_in_batch"),
    (dict(config="grpo"), "config must be a PolicyLossConfig"),
    (dict(hidden=torch.randn(B, 0, H), targets=torch.zeros(B, 0, dtype=torch.long),
          mask=torch.zeros(B, 0), old_logp=None), "at least one position"),
])
def test_bad_input(kw, match):
    inp = _inputs(torch.float32, v=31)
    with pytest.raises((ValueError, TypeError), match=match):
        _call(inp, **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(loss_type="gspo"), "loss_type must be one of"),
    (dict(importance_level="seq"), "importance_level must be one of"),
    (dict(kl_estimator="k4"), "kl_estimator must be one of"),
    (dict(rollout_correction="is"), "rollout_correction must be one of"),
    (dict(eps_low=-0.1), "eps_low"), (dict(eps_high=-0.2), "eps_high"),
    (dict(eps_low=float("nan")), "eps_low"),
    (dict(dual_clip=1.0), "dual_clip must be > 1"), (dict(dual_clip=0.5), "dual_clip must be > 1"),
    (dict(loss_type="cispo", dual_clip=3.0), "dual_clip applies to the clipped"),
    (dict(delta=0.9), "delta must be > 1"), (dict(loss_type="sapo", delta=2.0), "delta applies"),
    (dict(beta=-1.0), "beta"), (dict(top_entropy_quantile=0.0), "top_entropy_quantile"),
    (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
    (dict(loss_type="dr_grpo"), "max_completion_length is required"),
    (dict(max_completion_length=0), "max_completion_length"),
    (dict(rollout_correction_cap=0.0), "rollout_correction_cap"),
    (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg"),
    (dict(temperature=0.0), "temperature"), (dict(impl="cuda"), "impl must be one of"),
    (dict(chunk_size=0), "chunk_size"), (dict(final_logit_softcapping=-1.0), "softcapping"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kw)


# ----------------------------------------------------------------------------- triton
@pytest.mark.skipif(not (Path(policy.__file__).parent / "_triton.py").exists(),
                    reason="kernels/_triton.py not present")
def test_triton_interpreter_matches_reference():
    """The fused (token-level) dapo loss through the Triton epilogues, on CPU tensors."""
    code = r"""
import torch, rlfuse
from rlfuse import PolicyLossConfig, policy_loss
torch.manual_seed(0)
x = torch.randn(2, 7, 24); w = torch.randn(31, 24) / 3; t = torch.randint(0, 31, (2, 7))
m = torch.ones(2, 7); m[1, 4:] = 0; adv = torch.randn(2); old = -3.4 + 0.3 * torch.randn(2, 7)
res = []
for impl in ("reference", "triton"):
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    cfg = PolicyLossConfig(loss_type="dapo", beta=0.1, eps_high=0.28, impl=impl, chunk_size=5)
    loss, out = policy_loss(xx, ww, t, m, adv, old_logp=old, ref_logp=old - 0.1, config=cfg)
    loss.backward()
    res.append((loss, out.logp, out.metrics["clip_fraction"], xx.grad, ww.grad))
for a, b in zip(*res):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


# ----------------------------------------------------------------------------- one NaN / dtype rule
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["advantages", "old_logp", "ref_logp", "rollout_logp"])
def test_side_inputs_must_be_finite_at_valid_tokens(name, impl):
    """The rule shared with preference_loss and gae / value_loss: a NaN or inf that the loss
    would read is an error naming the argument; one at a masked position is never read."""
    inp = _inputs(torch.float32, adv_2d=True, v=31)
    cfg = PolicyLossConfig(beta=0.1, rollout_correction="tis", impl=impl)
    side = dict(advantages=inp["adv"], old_logp=inp["old"], ref_logp=inp["ref"],
                rollout_logp=inp["rollout"])
    valid = (inp["m"] != 0) & (inp["t"] != -100)
    for bad in (math.nan, math.inf, -math.inf):
        ten = side[name].clone()
        ten[tuple(valid.nonzero()[0].tolist())] = bad
        with pytest.raises(ValueError, match=f"{name} must be finite at valid tokens"):
            _call(inp, cfg, **{**side, name: ten})
        ten = side[name].clone()
        ten[~valid] = bad  # never read
        loss, _ = _call(inp, cfg, **{**side, name: ten})
        assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["advantages", "old_logp", "ref_logp"])
def test_integer_side_inputs_name_the_dtype(name):
    inp = _inputs(torch.float32, v=31)
    kw = {"advantages": inp["adv"], "old_logp": inp["old"], "ref_logp": inp["ref"]}
    kw[name] = kw[name].long()
    with pytest.raises(TypeError, match=f"{name} must be a floating-point tensor, got dtype "
                                        "torch.int64"):
        _call(inp, PolicyLossConfig(beta=0.1), **kw)


def test_choice_tuples_are_exported():
    assert policy.LOSS_TYPES == tuple(LOSS_TYPES)
    for name in ("IMPORTANCE_LEVELS", "KL_ESTIMATORS", "ROLLOUT_CORRECTIONS", "METRICS",
                 "ROLLOUT_METRICS"):
        assert isinstance(getattr(policy, name), tuple)


@pytest.mark.parametrize("old", ["given", "none"])
@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_rollout_correction_metrics(mode, old):
    """rollout_kl, rollout_weight_mean and rollout_capped_fraction over the valid tokens, from
    w = exp(old - rollout) (old = logp when old_logp is None)."""
    inp = _inputs(torch.float32, v=31)
    cfg = PolicyLossConfig(rollout_correction=mode, rollout_correction_cap=1.5)
    kw = {} if old == "given" else {"old_logp": None}
    _, out = _run(inp, cfg, **kw)
    valid = (inp["m"] != 0) & (inp["t"] != -100)
    base = inp["old"] if old == "given" else out.logp
    log_w = (base - inp["rollout"])[valid].double()
    w = log_w.exp()
    m = out.metrics
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["rollout_kl"].double(), (w - 1 - log_w).mean(), **close)
    torch.testing.assert_close(m["rollout_weight_mean"].double(), w.mean(), **close)
    frac = (w > 1.5).double().mean()
    assert 0 < frac < 1 and m["rollout_capped_fraction"].double() == pytest.approx(frac.item(),
                                                                                 abs=1e-6)
    assert "rollout_kl" not in _run(inp, PolicyLossConfig())[1].metrics
