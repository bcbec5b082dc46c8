"""preference_loss: every loss_type x impl against an fp64 reference (loss, metrics, gradients),
the reference against hand-computed values, reference-free, sft_coef, no_grad, errors."""
import math

import pytest
import torch

import rlfuse
from rlfuse import PreferenceLossConfig, preference_loss
from rlfuse.preference import LOSS_TYPES, METRIC_KEYS, _pair_loss

from conftest import CHUNKED_IMPLS, IMPL_ORDERS

IMPLS = ["reference"] + CHUNKED_IMPLS
POLICY_ONLY = ("simpo", "orpo")


def _cfg(loss_type, **kw):
    ls = {"robust": 0.1, "exo_pair": 0.05, "sigmoid": 0.1, "simpo": 0.05}.get(loss_type, 0.0)
    return PreferenceLossConfig(loss_type=loss_type, label_smoothing=kw.pop("ls", ls), **kw)


def _inputs(b, t, h, v, dtype, bias=True):
    x = torch.randn(2 * b, t, h).to(dtype)
    w = (torch.randn(v, h) / h**0.5 * 2).to(dtype)
    bb = (torch.randn(v) * 0.5).to(dtype) if bias else None
    tg = torch.randint(0, v, (2 * b, t))
    tg[torch.rand(2 * b, t) < 0.15] = -100
    mask = torch.rand(2 * b, t) < 0.8
    mask[:, 1] = True
    tg[:, 1] = torch.randint(0, v, (2 * b,))  # every row keeps a valid token
    return x, w, bb, tg, mask


def _ref_logp(x, w, bb, tg, mask, spread=2.0):
    """Reference sums near the policy's own, so the log-ratios are O(1)."""
    with torch.no_grad():
        logz = (x.double() @ w.double().T + (bb.double() if bb is not None else 0)).log_softmax(-1)
        lp = logz.gather(-1, tg.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        seq = (lp * (mask & (tg != -100))).sum(-1)
    return (seq + spread * torch.randn_like(seq)).float()


def _naive(x, w, bb, tg, mask, ref, cfg):
    """Materialized PyTorch in the inputs' own dtype: the error budget the impls are held to."""
    logz = (x @ w.T + (bb if bb is not None else 0)).log_softmax(-1)
    lp = logz.gather(-1, tg.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
    loss, seq, metrics = _pair_loss(lp, mask & (tg != -100), ref, cfg)
    return loss, seq, metrics


def _run(fn, x, w, bb, g=1.7):
    leaves = [a.detach().requires_grad_() for a in (x, w, bb) if a is not None]
    loss, seq, metrics = fn(*leaves, *([None] if bb is None else []))
    grads = torch.autograd.grad(loss * g, leaves)
    return [loss, seq, metrics, *grads]


def _rlfuse(cfg, tg, mask, ref):
    def fn(x, w, bb):
        loss, out = preference_loss(x, w, tg, mask, ref_logp=ref, bias=bb, config=cfg)
        metrics = torch.stack([out.metrics[k] for k in METRIC_KEYS])
        return loss, torch.cat([out.chosen_logp, out.rejected_logp]), metrics
    return fn


def _assert_close(got, naive, truth, atol):
    for i, (a, n, want) in enumerate(zip(got, naive, truth)):
        want = want.double()
        err = (a.double() - want).abs().max().item()
        budget = (n.double() - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= 2 * budget + atol * max(1.0, scale), (i, err, budget, scale)


@pytest.mark.parametrize("impl,pass_order", IMPL_ORDERS, indirect=["pass_order"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
# chunk 5 < 2T: two-phase path; 30 and None hold whole pairs (one chunk pass; two phases in the
# slab order).
@pytest.mark.parametrize("b,t,h,v,chunk", [(3, 7, 24, 31, 5), (3, 7, 24, 31, 30),
                                         (2, 7, 24, 123, None)])
def test_matches_fp64_reference(impl, pass_order, dtype, loss_type, b, t, h, v, chunk):
    x, w, bb, tg, mask = _inputs(b, t, h, v, dtype)
    ref = None if loss_type in POLICY_ONLY else _ref_logp(x, w, bb, tg, mask)
    cfg = _cfg(loss_type, sft_coef=0.3, chunk_size=chunk, impl=impl)
    truth = _run(_rlfuse(_cfg(loss_type, sft_coef=0.3, impl="reference"), tg, mask,
                         None if ref is None else ref.double()),
                 x.double(), w.double(), bb.double())
    naive = _run(lambda a, c, d: _naive(a, c, d, tg, mask, ref, cfg), x, w, bb)
    got = _run(_rlfuse(cfg, tg, mask, ref), x, w, bb)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    assert [g.dtype for g in got[3:]] == [dtype] * 3  # gradients in the input dtype
    _assert_close(got, naive, truth, atol=2e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "bco_pair", "discopop"])
def test_reference_free_is_zero_reference(impl, loss_type):
    x, w, bb, tg, mask = _inputs(2, 7, 24, 31, torch.float32, bias=False)
    cfg = _cfg(loss_type, impl=impl, chunk_size=4)
    free = _run(_rlfuse(cfg, tg, mask, None), x, w, None)
    zero = _run(_rlfuse(cfg, tg, mask, torch.zeros(4)), x, w, None)
    truth = _run(_rlfuse(_cfg(loss_type, impl="reference"), tg, mask, None),
                 x.double(), w.double(), None)
    for a, z in zip(free, zero):
        torch.testing.assert_close(a, z)
    _assert_close(free, free, truth, atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo"])
@pytest.mark.parametrize("chunk", [6, 14])
def test_logit_transform_and_ignore_index(impl, loss_type, chunk):
    x, w, bb, tg, mask = _inputs(2, 7, 24, 31, torch.float32)
    tg = torch.where(tg == -100, -1, tg)
    ref = None if loss_type in POLICY_ONLY else _ref_logp(x, w, bb, tg.clamp(min=0), mask)
    kw = dict(temperature=1.3, logit_scale=0.8, final_logit_softcapping=4.0, ignore_index=-1)
    got = _run(_rlfuse(_cfg(loss_type, impl=impl, chunk_size=chunk, **kw), tg, mask, ref), x, w,
               bb)
    truth = _run(_rlfuse(_cfg(loss_type, impl="reference", **kw), tg, mask,
                         None if ref is None else ref.double()),
                 x.double(), w.double(), bb.double())
    _assert_close(got, got, truth, atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_sft_coef_adds_chosen_token_nll(impl):
    x, w, bb, tg, mask = _inputs(3, 7, 24, 31, torch.float32)
    ref = _ref_logp(x, w, bb, tg, mask)
    l0, o0 = preference_loss(x, w, tg, mask, ref_logp=ref, bias=bb,
                             config=_cfg("sigmoid", impl=impl))
    l1, o1 = preference_loss(x, w, tg, mask, ref_logp=ref, bias=bb,
                             config=_cfg("sigmoid", impl=impl, sft_coef=0.7))
    valid = mask & (tg != -100)
    nll = -o0.chosen_logp.sum() / valid[:3].sum()
    torch.testing.assert_close(o0.metrics["nll"], nll)
    torch.testing.assert_close(l1 - l0, 0.7 * nll, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_matches_and_noncontiguous(impl):
    x, w, bb, tg, mask = _inputs(2, 7, 24, 123, torch.float32)
    ref = _ref_logp(x, w, bb, tg, mask)
    cfg = _cfg("sigmoid", impl=impl, chunk_size=3)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    with torch.no_grad():
        l_ng, o_ng = preference_loss(xt, w, tg, mask, ref_logp=ref, bias=bb, config=cfg)
    xx = xt.detach().requires_grad_()
    l_g, o_g = preference_loss(xx, w, tg, mask, ref_logp=ref, bias=bb, config=cfg)
    torch.testing.assert_close(l_ng, l_g.detach())
    torch.testing.assert_close(o_ng.chosen_logp, o_g.chosen_logp)
    l_g.backward()
    assert xx.grad.shape == x.shape and torch.isfinite(xx.grad).all()
    assert sorted(o_g.metrics) == sorted(METRIC_KEYS)
    assert all(m.dtype == torch.float32 and m.dim() == 0 for m in o_g.metrics.values())


# ----------------------------------------------------------------------------- by hand
def _hand_logps(x, w, tg, mask):
    """Sequence sums and token counts with plain python math."""
    sums, counts = [], []
    for row_x, row_t, row_m in zip(x.tolist(), tg.tolist(), mask.tolist()):
        s, n = 0.0, 0
        for xv, tt, mm in zip(row_x, row_t, row_m):
            if not mm or tt == -100:
                continue
            logits = [sum(a * c for a, c in zip(xv, wr)) for wr in w.tolist()]
            mx = max(logits)
            lse = mx + math.log(sum(math.exp(z - mx) for z in logits))
            s += logits[tt] - lse
            n += 1
        sums.append(s)
        counts.append(n)
    return sums, counts


def _logsig(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def _sig(z):
    return 1 / (1 + math.exp(-z))


def test_reference_against_hand_computed():
    b, beta = 2, 0.3
    x, w, _, tg, mask = _inputs(b, 4, 3, 5, torch.float64, bias=False)
    ref = torch.tensor([-6.0, -5.5, -7.0, -4.0], dtype=torch.float64)
    s, n = _hand_logps(x, w, tg, mask)
    rt = ref.tolist()
    c = [s[i] - rt[i] for i in range(b)]
    r = [s[b + i] - rt[b + i] for i in range(b)]
    ac = [s[i] / n[i] for i in range(b)]
    ar = [s[b + i] / n[b + i] for i in range(b)]
    ls, gamma = 0.1, 0.5
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    expected = {
        "sigmoid": mean([-(1 - ls) * _logsig(beta * (c[i] - r[i]))
                         - ls * _logsig(-beta * (c[i] - r[i])) for i in range(b)]),
        "ipo": mean([(c[i] / n[i] - r[i] / n[b + i] - 1 / (2 * beta)) ** 2 for i in range(b)]),
        "hinge": mean([max(0.0, 1 - beta * (c[i] - r[i])) for i in range(b)]),
        "simpo": mean([-(1 - ls) * _logsig(beta * (ac[i] - ar[i]) - gamma)
                       - ls * _logsig(-(beta * (ac[i] - ar[i]) - gamma)) for i in range(b)]),
        "orpo": mean([-beta * _logsig((ac[i] - ar[i]) - (math.log(1 - math.exp(ac[i]))
                                                          - math.log(1 - math.exp(ar[i]))))
                      for i in range(b)]),
        "apo_zero": mean([1 - _sig(beta * c[i]) + _sig(beta * r[i]) for i in range(b)]),
    }
    for lt, want in expected.items():
        cfg = PreferenceLossConfig(loss_type=lt, beta=beta, simpo_gamma=gamma, impl="reference",
                                   label_smoothing=ls if lt in ("sigmoid", "simpo") else 0.0)
        loss, out = preference_loss(x, w, tg, mask, ref_logp=None if lt in POLICY_ONLY else ref,
                                    config=cfg)
        assert loss.item() == pytest.approx(want, rel=1e-9, abs=1e-12), lt
        if lt in POLICY_ONLY:
            rc, rr, lc = [beta * a for a in ac], [beta * a for a in ar], ac
        else:
            rc, rr, lc = [beta * a for a in c], [beta * a for a in r], s[:b]
        m = out.metrics
        assert m["rewards_chosen"].item() == pytest.approx(mean(rc), rel=1e-6)
        assert m["rewards_rejected"].item() == pytest.approx(mean(rr), rel=1e-6)
        assert m["rewards_margin"].item() == pytest.approx(mean(rc) - mean(rr), rel=1e-5,
                                                           abs=1e-6)
        assert m["rewards_accuracy"].item() == mean([float(p > q) for p, q in zip(rc, rr)])
        assert m["logps_chosen"].item() == pytest.approx(mean(lc), rel=1e-6)
        assert m["nll"].item() == pytest.approx(-sum(s[:b]) / sum(n[:b]), rel=1e-6)
        torch.testing.assert_close(out.chosen_logp, torch.tensor(s[:b]), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    x, w, bb, tg, mask = _inputs(2, 5, 8, 11, torch.float32)

    def call(**kw):
        args = dict(hidden=x, weight=w, targets=tg, mask=mask, ref_logp=None,
                    config=PreferenceLossConfig())
        args.update(kw)
        return preference_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"),
                               args.pop("mask"), **args)

    with pytest.raises(ValueError, match="even"):
        call(hidden=x[:3], targets=tg[:3], mask=mask[:3])
    with pytest.raises(ValueError, match="mask"):
        call(mask=mask[:, :4])
    with pytest.raises(ValueError, match="ref_logp"):
        call(ref_logp=torch.zeros(3))
    with pytest.raises(ValueError, match="ref_logp"):
        call(ref_logp=torch.full((4,), math.inf))
    with pytest.raises(ValueError, match="loss_type"):
        call(config=PreferenceLossConfig(loss_type="kto"))
    with pytest.raises(ValueError, match="beta"):
        call(config=PreferenceLossConfig(beta=0.0))
    for ls in (0.5, -0.1):
        with pytest.raises(ValueError, match="label_smoothing"):
            call(config=PreferenceLossConfig(loss_type="robust", label_smoothing=ls))
    with pytest.raises(ValueError, match="label_smoothing"):
        call(config=PreferenceLossConfig(loss_type="hinge", label_smoothing=0.1))
    with pytest.raises(ValueError, match="label_smoothing"):
        call(config=PreferenceLossConfig(loss_type="exo_pair"))
    with pytest.raises(ValueError, match="ref_logp"):
        call(ref_logp=torch.zeros(4), config=PreferenceLossConfig(loss_type="simpo"))
    with pytest.raises(ValueError, match="sft_coef"):
        call(config=PreferenceLossConfig(sft_coef=-1.0))
    empty = mask.clone()
    empty[2] = False
    with pytest.raises(ValueError, match="mask: rows \\[2\\]"):
        call(mask=empty)
    with pytest.raises(ValueError, match="targets"):
        call(targets=tg.clamp(min=0) + 100)
    with pytest.raises(ValueError, match="hidden"):
        call(hidden=x[..., :4])
    with pytest.raises(ValueError, match="impl"):
        call(config=PreferenceLossConfig(impl="cuda"))


def test_exported():
    assert rlfuse.preference_loss is preference_loss
    assert rlfuse.PreferenceLossConfig is PreferenceLossConfig


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk_size", [None, 5])  # whole pairs per chunk / two phases
def test_frozen_head_gets_no_gradient(impl, chunk_size):
    x, w, _, tg, mask = _inputs(3, 7, 16, 41, torch.float32, bias=False)
    ref = _ref_logp(x, w, None, tg, mask)
    cfg = _cfg("sigmoid", impl=impl, chunk_size=chunk_size)
    xg = x.clone().requires_grad_()
    loss, _ = preference_loss(xg, w, tg, mask, ref_logp=ref, config=cfg)
    (loss * 1.7).backward()
    assert w.grad is None
    want = _run(_rlfuse(_cfg("sigmoid", impl="reference"), tg, mask, ref), x, w, None)
    torch.testing.assert_close(xg.grad, want[3], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- one NaN / dtype rule
@pytest.mark.parametrize("impl", IMPLS)
def test_ref_logp_rule_matches_policy_loss(impl):
    x, w, bb, tg, mask = _inputs(2, 5, 8, 11, torch.float32)
    cfg = PreferenceLossConfig(impl=impl)
    for bad in (math.nan, math.inf):
        ref = torch.zeros(4)
        ref[1] = bad
        with pytest.raises(ValueError, match="ref_logp must be finite; found .* at index \\[1\\]"):
            preference_loss(x, w, tg, mask, ref_logp=ref, config=cfg)
    with pytest.raises(TypeError, match="ref_logp must be a floating-point tensor, got dtype "
                                        "torch.int64"):
        preference_loss(x, w, tg, mask, ref_logp=torch.zeros(4, dtype=torch.long), config=cfg)
    with pytest.raises(ValueError, match="mask must hold 0/1"):
        preference_loss(x, w, tg, mask.float() * 0.5 + 0.5, config=cfg)


def test_config_validates_on_construction():
    for kw, match in ((dict(loss_type="kto"), "loss_type must be one of"),
                      (dict(beta=0.0), "beta"), (dict(beta=math.nan), "beta"),
                      (dict(discopop_tau=0.0), "discopop_tau"),
                      (dict(simpo_gamma=math.inf), "simpo_gamma"),
                      (dict(temperature=-1.0), "temperature")):
        with pytest.raises(ValueError, match=match):
            PreferenceLossConfig(**kw)
    from rlfuse import preference
    assert "sigmoid" in preference.LOSS_TYPES and set(preference.REFERENCE_FREE) <= set(
        preference.LOSS_TYPES) and set(preference.SMOOTHED) <= set(preference.LOSS_TYPES)
