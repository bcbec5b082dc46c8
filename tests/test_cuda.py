"""The Triton path on a CUDA device: every op against the fp64 reference, values and gradients.

Skipped without CUDA (CI and the CPU machines run the same kernels under TRITON_INTERPRET=1 in
test_triton.py); benches/gpu_check.sh runs this file on a lent GPU.
"""
import pytest
import torch

import rlfuse

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _inputs(n, h, v, dtype, peaked):
    g = torch.Generator().manual_seed(n * 7 + v)
    x = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) / h**0.5 * (12 if peaked else 1)
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.2] = -100
    return [a.to(CUDA) for a in (x.to(dtype), w.to(dtype), t)]


def _grads(fn, x, w):
    xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()
    out = fn(xx, ww)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).sum()
               for o in outs)
    dx, dw = torch.autograd.grad(loss, (xx, ww))
    return [o.detach() for o in outs] + [dx, dw]


def _check(fn, x, w, impl_kw):
    truth = _grads(lambda a, b: fn(a, b, impl="reference"), x.double(), w.double())
    naive = _grads(lambda a, b: fn(a, b, impl="reference"), x, w)  # torch in the inputs' dtype
    got = _grads(lambda a, b: fn(a, b, **impl_kw), x, w)
    for g, nv, tr in zip(got, naive, truth):
        err = (g.double() - tr).abs().max().item()
        budget = (nv.double() - tr).abs().max().item()
        assert err <= 2 * budget + 1e-5 * max(1.0, tr.abs().max().item()), (err, budget)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,v,chunk", [(37, 64, 507, 16), (300, 128, 4099, 128)])
@pytest.mark.parametrize("peaked", [False, True])
def test_linear_logprobs_on_device(dtype, n, h, v, chunk, peaked):
    x, w, t = _inputs(n, h, v, dtype, peaked)

    def fn(a, b, impl, chunk_size=None):
        return rlfuse.linear_logprobs(a, b, t, return_entropy=True, temperature=0.7, impl=impl,
                                      chunk_size=chunk_size)
    _check(fn, x, w, {"impl": "triton", "chunk_size": chunk})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("peaked", [False, True])
def test_policy_loss_on_device(dtype, peaked):
    b, s, h, v = 6, 29, 64, 1031
    x, w, t = _inputs(b * s, h, v, dtype, peaked)
    x, t = x.view(b, s, h), t.view(b, s).clamp(min=0)
    mask = (torch.rand(b, s, device=CUDA) < 0.8).float()
    adv = torch.randn(b, device=CUDA)
    old = -torch.rand(b, s, device=CUDA) * 3
    ref = -torch.rand(b, s, device=CUDA) * 3

    def fn(a, bb, impl):
        cfg = rlfuse.PolicyLossConfig(loss_type="dapo", eps_high=0.28, beta=0.04, impl=impl,
                                      chunk_size=32)
        return rlfuse.policy_loss(a, bb, t, mask, adv, old_logp=old, ref_logp=ref, config=cfg)[0]
    _check(fn, x, w, {"impl": "triton"})
