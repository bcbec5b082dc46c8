"""group_advantages, gae, value_loss against hand-computed values and plain-python loops."""
import math
import statistics

import pytest
import torch

import rlfuse
from rlfuse import gae, group_advantages, value_loss


# ----------------------------------------------------------------------------- group
def test_grpo_by_hand_with_zero_std_group():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv, m = group_advantages(r, 3)
    want = [-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4), 0.0, 0.0, 0.0]
    torch.testing.assert_close(adv, torch.tensor(want))
    assert m["frac_zero_std"].item() == 0.5
    assert m["reward_mean"].item() == pytest.approx(21 / 6)
    assert m["reward_std"].item() == pytest.approx(statistics.stdev([1, 2, 3, 5, 5, 5]))
    assert m["frac_unscored"].item() == 0.0


def test_scales_and_estimators_match_python_loops():
    torch.manual_seed(0)
    g, p = 5, 4
    r = torch.randn(p * g, dtype=torch.float64)
    rl = r.tolist()
    std_b = statistics.stdev(rl)
    for scale in ("group", "batch", "none"):
        for est in ("grpo", "rloo", "dr_grpo"):
            adv, _ = group_advantages(r, g, scale=scale, estimator=est, eps=1e-3)
            want = []
            for k in range(p):
                grp = rl[k * g:(k + 1) * g]
                for i, x in enumerate(grp):
                    if est == "rloo":
                        a = x - (sum(grp) - x) / (g - 1)
                    else:
                        a = x - statistics.mean(grp)
                    if est != "dr_grpo" and scale != "none":
                        a /= (statistics.stdev(grp) if scale == "group" else std_b) + 1e-3
                    want.append(a)
            torch.testing.assert_close(adv, torch.tensor(want, dtype=torch.float64),
                                       msg=f"{scale} {est}")


def test_rloo_by_hand():
    adv, _ = group_advantages(torch.tensor([1.0, 2.0, 4.0]), 3, scale="none", estimator="rloo")
    torch.testing.assert_close(adv, torch.tensor([1 - 3.0, 2 - 2.5, 4 - 1.5]))


def test_nan_rewards_count_as_zero_and_are_left_out_of_metrics():
    r = torch.tensor([1.0, math.nan, 3.0, 2.0, 2.0, math.nan])
    adv, m = group_advantages(r, 3, scale="none")
    # TRL sums rewards with nansum: an unscored completion contributes reward 0.
    torch.testing.assert_close(adv, torch.tensor([1 - 4 / 3, -4 / 3, 3 - 4 / 3,
                                                  2 - 4 / 3, 2 - 4 / 3, -4 / 3]))
    assert torch.isfinite(adv).all()
    assert m["reward_mean"].item() == pytest.approx(2.0)  # nanmean of 1, 3, 2, 2
    assert m["reward_std"].item() == pytest.approx(statistics.stdev([1, 3, 2, 2]))
    assert m["frac_unscored"].item() == pytest.approx(2 / 6)


def test_group_of_one_and_bf16():
    adv, m = group_advantages(torch.tensor([0.3, -1.0]), 1)
    assert (adv == 0).all() and m["frac_zero_std"].item() == 1.0
    adv, _ = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16), 2)
    assert adv.dtype == torch.float32


def test_group_errors():
    r = torch.randn(6)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 0)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, 3, scale="global")
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(r, 3, estimator="ppo")
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(r.view(2, 3), 3)
    with pytest.raises(ValueError, match="inf"):
        group_advantages(torch.tensor([1.0, math.inf, 0.0]), 3)
    with pytest.raises(ValueError, match="eps"):
        group_advantages(r, 3, eps=-1.0)


# ----------------------------------------------------------------------------- gae
def _gae_by_hand(r, v, gamma, lam):
    """Plain python, valid tokens only (the next value past the end is 0)."""
    n = len(r)
    adv = [0.0] * n
    nxt_a, nxt_v = 0.0, 0.0
    for t in reversed(range(n)):
        delta = r[t] + gamma * nxt_v - v[t]
        adv[t] = delta + gamma * lam * nxt_a
        nxt_a, nxt_v = adv[t], v[t]
    return adv, [a + b for a, b in zip(adv, v)]


def test_gae_1x4_by_hand():
    r, v, gamma, lam = [0.0, 0.5, 0.0, 1.0], [0.2, -0.3, 0.4, 0.1], 0.9, 0.8
    # Unrolled: d3 = 1 - 0.1 = 0.9; d2 = 0 + 0.9*0.1 - 0.4 = -0.31; d1 = 0.5 + 0.9*0.4 + 0.3
    # = 1.16; d0 = 0 + 0.9*(-0.3) - 0.2 = -0.47; A_t = d_t + 0.72 * A_{t+1}.
    a3 = 0.9
    a2 = -0.31 + 0.72 * a3
    a1 = 1.16 + 0.72 * a2
    a0 = -0.47 + 0.72 * a1
    adv, ret = gae(torch.tensor([r]), torch.tensor([v]), torch.ones(1, 4), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, a3]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.2, a1 - 0.3, a2 + 0.4, a3 + 0.1]]))
    assert _gae_by_hand(r, v, gamma, lam)[0] == pytest.approx([a0, a1, a2, a3])


def test_gae_padding_and_masked_positions_are_skipped():
    torch.manual_seed(0)
    b, t = 3, 9
    r, v = torch.randn(b, t, dtype=torch.float64), torch.randn(b, t, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 6:] = False  # right padding
    mask[1, 2] = mask[1, 5] = False  # holes (e.g. tool output) are skipped
    mask[2, 8] = False
    adv, ret = gae(r, v, mask, 0.95, 0.9)
    for i in range(b):
        keep = mask[i].nonzero().flatten()
        a_h, ret_h = _gae_by_hand(r[i, keep].tolist(), v[i, keep].tolist(), 0.95, 0.9)
        torch.testing.assert_close(adv[i, keep], torch.tensor(a_h, dtype=torch.float64))
        torch.testing.assert_close(ret[i, keep], torch.tensor(ret_h, dtype=torch.float64))
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()

    white, ret_w = gae(r, v, mask, 0.95, 0.9, whiten=True)
    sel = adv[mask].tolist()
    mu, sd = statistics.mean(sel), statistics.stdev(sel)
    torch.testing.assert_close(white[mask], (adv[mask] - mu) / math.sqrt(sd**2 + 1e-8))
    assert (white[~mask] == 0).all()
    torch.testing.assert_close(ret_w, ret)


def test_gae_errors():
    r, v, m = torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4)
    with pytest.raises(ValueError, match="rewards"):
        gae(r[:, :3], v, m)
    with pytest.raises(ValueError, match="mask"):
        gae(r, v, m[:1])
    m0 = m.clone()
    m0[1] = 0
    with pytest.raises(ValueError, match="mask: rows \\[1\\]"):
        gae(r, v, m0)
    with pytest.raises(ValueError, match="gamma"):
        gae(r, v, m, gamma=1.5)
    with pytest.raises(ValueError, match="values"):
        gae(r, torch.full((2, 4), math.nan), m)


# ----------------------------------------------------------------------------- value loss
def test_value_loss_by_hand():
    vals = [[0.5, 1.0, -0.2, 0.0]]
    old = [[0.2, 1.05, 0.3, 9.0]]
    ret = [[0.6, 0.0, 0.0, 9.0]]
    mask = torch.tensor([[1, 1, 1, 0]])
    clip = 0.2
    terms, clipped = [], []
    for v, o, r in zip(vals[0][:3], old[0][:3], ret[0][:3]):
        vc = o + max(-clip, min(clip, v - o))
        e1, e2 = (v - r) ** 2, (vc - r) ** 2
        terms.append(max(e1, e2))
        clipped.append(float(e2 > e1))
    v = torch.tensor(vals, requires_grad=True)
    loss, m = value_loss(v, torch.tensor(old), torch.tensor(ret), mask, clip)
    assert loss.item() == pytest.approx(0.5 * sum(terms) / 3)
    assert m["value_clip_fraction"].item() == pytest.approx(sum(clipped) / 3)
    res = [r - x for r, x in zip(ret[0][:3], vals[0][:3])]
    ev = 1 - statistics.pvariance(res) / statistics.pvariance(ret[0][:3])
    assert m["explained_variance"].item() == pytest.approx(ev, rel=1e-5)
    loss.backward()
    assert v.grad[0, 3] == 0  # masked position gets no gradient
    # Position 0 is clipped (0.5 -> 0.4): the loss is flat in v there.
    assert v.grad[0, 0] == 0 and clipped[0] == 1.0


def test_value_loss_gradcheck_and_unclipped():
    torch.manual_seed(0)
    v = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    old, ret = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    mask = torch.rand(2, 5) < 0.7
    mask[:, 0] = True
    assert torch.autograd.gradcheck(lambda x: value_loss(x, old, ret, mask, 0.3)[0], (v,))
    loss, m = value_loss(v, old, ret, mask, clip=None)
    torch.testing.assert_close(loss, 0.5 * ((v - ret) ** 2)[mask].mean())
    assert m["value_clip_fraction"].item() == 0.0


def test_value_loss_errors():
    v = torch.randn(2, 3)
    with pytest.raises(ValueError, match="old_values"):
        value_loss(v, v[:1], v, torch.ones(2, 3))
    with pytest.raises(ValueError, match="clip"):
        value_loss(v, v, v, torch.ones(2, 3), clip=0.0)
    with pytest.raises(ValueError, match="returns"):
        value_loss(v, v, torch.full((2, 3), math.inf), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        value_loss(v, v, v, torch.zeros(2, 3))


def test_exported():
    assert rlfuse.group_advantages is group_advantages and rlfuse.gae is gae
    assert rlfuse.value_loss is value_loss


def test_one_nan_and_dtype_rule():
    """gae / value_loss follow the ops' rule: finite where the mask is set (masked positions
    are never read), floating dtypes, errors naming the argument."""
    r, v, m = torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4)
    m[1, 3] = 0
    bad = r.clone()
    bad[0, 1] = math.nan
    with pytest.raises(ValueError, match=r"rewards must be finite at valid tokens; found nan at "
                                         r"index \[0, 1\]"):
        gae(bad, v, m)
    bad = r.clone()
    bad[1, 3] = math.nan  # masked
    adv, ret = gae(bad, v, m)
    torch.testing.assert_close(adv, gae(r, v, m)[0])
    assert torch.isfinite(ret).all()
    with pytest.raises(TypeError, match="rewards must be a floating-point tensor, got dtype"):
        gae(r.long(), v, m)
    old = v.clone()
    old[1, 3] = math.inf  # masked
    loss, _ = value_loss(v, old, r, m)
    assert torch.isfinite(loss)
    old[0, 0] = math.inf
    with pytest.raises(ValueError, match="old_values must be finite at valid tokens"):
        value_loss(v, old, r, m)
    with pytest.raises(TypeError, match="rewards must be a floating-point tensor"):
        group_advantages(torch.ones(4, dtype=torch.long), 2)
