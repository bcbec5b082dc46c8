"""The fused ops as torch.library custom ops: opcheck on the exact arguments each public function
passes, torch.compile(fullgraph=True) under aot_eager and inductor against eager (values and
gradients), recompiles only on a new configuration, and the one-backward-per-forward rule."""
import pytest
import torch
import torch._dynamo.testing

import rlfuse
from rlfuse import PolicyLossConfig, PreferenceLossConfig, _chunked

from conftest import CHUNKED_IMPLS

pytestmark = pytest.mark.skipif(not CHUNKED_IMPLS, reason="C++ extension not built")
B, T, H, V = 2, 5, 16, 37


def _inputs():
    x = torch.randn(2 * B, T, H)
    w = torch.randn(V, H) / H**0.5 * 2
    b = torch.randn(V) * 0.5
    t = torch.randint(0, V, (2 * B, T))
    t[0, 1] = -100
    m = torch.ones(2 * B, T)
    m[1, :2] = 0
    side = dict(adv=torch.randn(2 * B), old=torch.randn(2 * B, T) * 0.3 - 3.5,
                ref=torch.randn(2 * B, T) * 0.3 - 3.5, ref_seq=torch.randn(2 * B) - 15)
    return x, w, b, t, m, side


POLICY = PolicyLossConfig(loss_type="dapo", beta=0.04, eps_high=0.28, impl="cpp", chunk_size=8)
PREFERENCE = PreferenceLossConfig(loss_type="sigmoid", sft_coef=0.3, impl="cpp")


def _all_losses(x, w, b, t, m, side, n_items, policy_cfg=POLICY):
    """Each op once: a policy loss, a preference loss, a log-prob term."""
    pl, po = rlfuse.policy_loss(x, w, t, m, side["adv"], old_logp=side["old"],
                                ref_logp=side["ref"], bias=b, num_items_in_batch=n_items,
                                config=policy_cfg)
    dl, do = rlfuse.preference_loss(x, w, t, m, ref_logp=side["ref_seq"], bias=b,
                                    config=PREFERENCE)
    lp, ent = rlfuse.linear_logprobs(x, w, t, bias=b, return_entropy=True, impl="cpp",
                                     chunk_size=7)
    total = pl + dl - 0.01 * (lp * m).sum() + 0.02 * ent.mean()
    return total, torch.stack([po.metrics["clip_fraction"], po.metrics["kl"],
                               do.metrics["rewards_margin"], do.chosen_logp.sum()])


def _grads(fn, x, w, b, *rest):
    leaves = [a.detach().clone().requires_grad_() for a in (x, w, b)]
    total, metrics = fn(*leaves, *rest)
    return [total, metrics, *torch.autograd.grad(total, leaves)]


@pytest.fixture
def recorded(monkeypatch):
    """The arguments of every custom-op call, as the public functions make them."""
    calls = []
    for name in ("_chunked_loss_op", "_chunked_logprobs_backward_op"):
        op = getattr(_chunked, name)

        def spy(*args, _op=op):
            calls.append((_op, args))  # (the op, not the spy)
            return _op(*args)

        monkeypatch.setattr(_chunked, name, spy)
    return calls


@pytest.mark.parametrize("policy_case", [{}, {"top_entropy_quantile": 0.5}])
@pytest.mark.parametrize("pass_order", ["rows", 16], indirect=True)  # 16: slabs, V = 37
def test_opcheck(recorded, policy_case, pass_order):
    # token-separable and two-phase policy losses, whole-pair preference, log-probs + backward
    x, w, b, t, m, side = _inputs()
    cfg = PolicyLossConfig(**{**POLICY.__dict__, **policy_case})
    _grads(lambda *a: _all_losses(*a, policy_cfg=cfg), x, w, b, t, m, side, torch.tensor(17.0))
    specs = [args[-1] for _, args in recorded]
    assert [s.split(",")[0] for s in specs] == ["('policy'", "('preference'", "('logprobs'",
                                                 "('logprobs'"]
    for op, args in recorded:
        if policy_case and not args[-1].startswith("('policy'"):
            continue  # the other ops ran as in the first case
        if op._qualname == "rlfuse::chunked_logprobs_backward":  # no double backward: constants
            args = tuple([t.detach() for t in a] if isinstance(a, list) else
                         a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    x, w, b, t, m, side = _inputs()
    n_items = torch.tensor(17.0)
    want = _grads(_all_losses, x, w, b, t, m, side, n_items)
    torch._dynamo.reset()
    got = _grads(torch.compile(_all_losses, backend=backend, fullgraph=True), x, w, b, t, m,
                 side, n_items)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_recompiles_only_on_a_new_configuration():
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    f = torch.compile(_all_losses, backend=counter, fullgraph=True)
    torch._dynamo.reset()
    x, w, b, t, m, side = _inputs()
    f(x, w, b, t, m, side, torch.tensor(17.0))
    x2, w2, b2, t2, m2, side2 = _inputs()
    f(x2, w2, b2, t2, m2, side2, torch.tensor(11.0))  # new data and per-step count
    assert counter.frame_count == 1
    cfg = PolicyLossConfig(**{**POLICY.__dict__, "beta": 0.1, "eps_low": 0.1})
    got = f(x, w, b, t, m, side, torch.tensor(17.0), cfg)
    compiled = counter.frame_count
    assert compiled > 1  # a new configuration recompiles (one graph, or two when dynamo
    # turns the changed floats into graph inputs), and computes with its own values
    torch.testing.assert_close(got, _all_losses(x, w, b, t, m, side, torch.tensor(17.0), cfg))
    f(x2, w2, b2, t2, m2, side2, torch.tensor(11.0), cfg)
    assert counter.frame_count == compiled


def test_one_backward_per_forward():
    x, w, b, t, m, side = _inputs()
    xr = x.requires_grad_()
    loss, _ = rlfuse.policy_loss(xr, w, t, m, side["adv"], old_logp=side["old"],
                                 ref_logp=side["ref"], config=POLICY)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()
    # linear_logprobs recomputes in its backward: any number of backward passes
    lp = rlfuse.linear_logprobs(xr, w, t, impl="cpp")
    (g1,) = torch.autograd.grad(lp.sum(), xr, retain_graph=True)
    (g2,) = torch.autograd.grad(lp.sum(), xr)
    torch.testing.assert_close(g1, g2)
