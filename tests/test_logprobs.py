"""linear_logprobs: every impl against an fp64 reference, gradients, custom-op checks, errors."""
import math
import os
import shutil

import pytest
import torch

import rlfuse
from rlfuse._chunked import LogitTransform
from rlfuse.logprobs import linear_logprobs_reference

from conftest import CHUNKED_IMPLS, IMPL_ORDERS

IMPLS = ["reference"] + CHUNKED_IMPLS
TRANSFORMS = {
    "plain": {},
    "temp": {"temperature": 0.7},
    "all": {"temperature": 1.3, "logit_scale": 0.8, "final_logit_softcapping": 4.0},
}


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None
                    or os.environ.get("RLFUSE_NO_EXT") == "1",
                    reason="no C++ compiler, or RLFUSE_NO_EXT=1 (a deliberate install without it)")
def test_extension_built_where_a_compiler_exists():
    # The install falls back to the reference paths when the build fails; on a machine with a
    # compiler that would silently skip every cpp case, so the fallback must not go unnoticed.
    assert rlfuse._backend.cpp_ext() is not None, (
        "rlfuse._C did not build although a C++ compiler is present: see the warning printed "
        "by `pip install --no-build-isolation -e . -v`")


def _inputs(shape, h, v, dtype, bias=True, ignore_frac=0.2):
    x = torch.randn(*shape, h).to(dtype)
    w = (torch.randn(v, h) / h**0.5 * 3).to(dtype)
    b = torch.randn(v).to(dtype) if bias else None
    t = torch.randint(0, v, shape)
    t[torch.rand(shape) < ignore_frac] = -100
    return x, w, b, t


def _naive(x, w, b, t, kw):
    """PyTorch in the inputs' own dtype: the error budget the impls are held to."""
    tf = LogitTransform(**kw)
    logits = x @ w.T + (b if b is not None else 0)
    logz = tf.apply(logits).log_softmax(-1)
    valid = t != -100
    lp = logz.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    ent = -(logz.exp() * logz).sum(-1) * valid
    return lp, ent


def _run(fn, x, w, b, t, gl, ge):
    leaves = [a.detach().requires_grad_() for a in (x, w, b) if a is not None]
    xx, ww, bb = leaves[0], leaves[1], (leaves[2] if b is not None else None)
    lp, ent = fn(xx, ww, bb, t)
    grads = torch.autograd.grad((lp * gl.to(lp.dtype)).sum() + (ent * ge.to(ent.dtype)).sum(),
                                leaves)
    return [lp, ent, *grads]


def _assert_close(impl_out, naive_out, truth, atol):
    for got, ref_naive, want in zip(impl_out, naive_out, truth):
        err = (got.double() - want).abs().max().item()
        budget = (ref_naive.double() - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= 2 * budget + atol * max(1.0, scale), (err, budget, scale)


@pytest.mark.parametrize("impl,pass_order", IMPL_ORDERS, indirect=["pass_order"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,h,v,chunk", [(1, 24, 31, None), (37, 24, 123, 10),
                                         (300, 24, 507, 64), (64, 24, 123, 16)])
@pytest.mark.parametrize("tfname", list(TRANSFORMS))
def test_matches_fp64_reference(impl, pass_order, dtype, n, h, v, chunk, tfname):
    kw = TRANSFORMS[tfname]
    x, w, b, t = _inputs((n,), h, v, dtype)
    gl, ge = torch.randn(n), torch.randn(n)
    truth = _run(lambda a, c, d, e: linear_logprobs_reference(
        a.double(), c.double(), e, d.double(),
        LogitTransform(**kw)), x, w, b, t, gl.double(), ge.double())
    naive = _run(lambda a, c, d, e: _naive(a, c, d, e, kw), x, w, b, t, gl, ge)
    got = _run(lambda a, c, d, e: rlfuse.linear_logprobs(
        a, c, e, bias=d, return_entropy=True, chunk_size=chunk, impl=impl, **kw),
        x, w, b, t, gl, ge)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert [g.dtype for g in got[2:]] == [dtype] * 3  # gradients in the input dtype
    assert (got[0][t == -100] == 0).all() and (got[1][t == -100] == 0).all()
    _assert_close(got, naive, truth, atol=2e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_3d_noncontiguous_no_bias(impl):
    x, w, _, t = _inputs((3, 11), 24, 123, torch.float32, bias=False)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # [3, 11, 24], non-contiguous
    wt = w.T.contiguous().T
    assert not xt.is_contiguous() and not wt.is_contiguous()
    lp, ent = rlfuse.linear_logprobs(xt, wt, t, return_entropy=True, impl=impl, chunk_size=5)
    rlp, rent = linear_logprobs_reference(x.double(), w.double(), t)
    assert lp.shape == (3, 11)
    torch.testing.assert_close(lp.double(), rlp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), rent, atol=2e-5, rtol=1e-5)


def test_gradcheck_fp64_reference():
    impl = "reference"  # the C++ path computes in fp32: see the finite-difference test below
    x, w, b, t = _inputs((5,), 6, 7, torch.float64)
    args = [a.requires_grad_() for a in (x, w, b)]

    def f(x, w, b):
        return rlfuse.linear_logprobs(x, w, t, bias=b, return_entropy=True, impl=impl,
                                      temperature=0.9, final_logit_softcapping=3.0)

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.skipif(not CHUNKED_IMPLS, reason="C++ extension not built")
def test_gradcheck_cpp_fp32_against_finite_differences():
    """The cpp path is fp32; check its analytic gradient against fp64 finite differences."""
    x, w, b, t = _inputs((4,), 5, 9, torch.float64)
    gl, ge = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)

    def loss(x, w, b, impl):
        lp, ent = rlfuse.linear_logprobs(x, w, t, bias=b, return_entropy=True, impl=impl,
                                         temperature=0.9, final_logit_softcapping=3.0)
        return (lp.double() * gl).sum() + (ent.double() * ge).sum()

    leaves = [a.float().requires_grad_() for a in (x, w, b)]
    grads = torch.autograd.grad(loss(*leaves, "cpp"), leaves)
    eps = 1e-6
    for k, (leaf, g) in enumerate(zip((x, w, b), grads)):
        flat = leaf.reshape(-1)
        for i in range(0, flat.numel(), 7):
            plus, minus = [list((x, w, b)) for _ in range(2)]
            d = torch.zeros_like(flat)
            d[i] = eps
            plus[k] = (flat + d).view_as(leaf)
            minus[k] = (flat - d).view_as(leaf)
            fd = (loss(*plus, "reference") - loss(*minus, "reference")) / (2 * eps)
            assert abs(g.reshape(-1)[i].item() - fd.item()) < 1e-4 * max(1, abs(fd.item()))


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_forward_and_single_output_grads(impl):
    x, w, b, t = _inputs((20,), 24, 31, torch.float32)
    with torch.no_grad():
        lp = rlfuse.linear_logprobs(x, w, t, bias=b, impl=impl)
    assert not lp.requires_grad
    xr = x.clone().requires_grad_()
    lp2 = rlfuse.linear_logprobs(xr, w, t, bias=b, impl=impl)  # grad through logp only
    (g,) = torch.autograd.grad(lp2.sum(), xr)
    xr64 = x.double().requires_grad_()
    (g64,) = torch.autograd.grad(linear_logprobs_reference(xr64, w.double(), t, b.double())[0]
                                 .sum(), xr64)
    torch.testing.assert_close(g.double(), g64, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lp, lp2.detach())


@pytest.mark.parametrize("impl,pass_order", IMPL_ORDERS, indirect=["pass_order"])
def test_frozen_head_skips_dw(impl, pass_order, monkeypatch):
    # a LoRA policy's LM head is frozen: the backward computes no dW (its GEMM and fp32 buffer)
    from rlfuse import _chunked

    allocated = []
    orig = _chunked._GradAccumulator.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        allocated.append((self.dx is not None, self.dw is not None, self.db is not None))

    monkeypatch.setattr(_chunked._GradAccumulator, "__init__", spy)
    x, w, b, t = _inputs((3, 5), 24, 31, torch.float32)
    gl = torch.randn(3, 5)
    xr, br = x.clone().requires_grad_(), b.clone().requires_grad_()
    lp = rlfuse.linear_logprobs(xr, w, t, bias=br, impl=impl, chunk_size=4)
    dx, db = torch.autograd.grad((lp * gl).sum(), (xr, br))
    assert allocated == ([(True, False, True)] if impl != "reference" else [])
    x64, b64 = x.double().requires_grad_(), b.double().requires_grad_()
    want = torch.autograd.grad((linear_logprobs_reference(x64, w.double(), t, b64)[0] * gl).sum(),
                               (x64, b64))
    torch.testing.assert_close(dx.double(), want[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(db.double(), want[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bad,match", [
    (lambda x, w, t: (x[:, :5], w, t), "hidden must have shape"),
    (lambda x, w, t: (x, w, t.float()), "targets must be an int64"),
    (lambda x, w, t: (x, w, t[:3]), "targets must have shape"),
    (lambda x, w, t: (x, w, torch.full_like(t, 31)), r"targets must be in \[0, 31\)"),
    (lambda x, w, t: (x, w, torch.full_like(t, -2)), r"targets must be in \[0, 31\)"),
    (lambda x, w, t: (x, w[:0], t), "V = 0"),
    (lambda x, w, t: (x, w.to("meta"), t), "one device"),
    (lambda x, w, t: (x.long(), w, t), "hidden must be a floating-point"),
    (lambda x, w, t: (x, w[0], t), "weight must be 2-D"),
])
def test_bad_input(bad, match):
    x, w, _, t = _inputs((6,), 24, 31, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        rlfuse.linear_logprobs(*bad(x, w, t))


@pytest.mark.parametrize("kw,match", [
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"temperature": 0.0}, "temperature"), ({"logit_scale": -1.0}, "logit_scale"),
    ({"final_logit_softcapping": float("inf")}, "final_logit_softcapping"),
    ({"impl": "cuda"}, "impl must be one of"), ({"chunk_size": -3}, "chunk_size"),
    ({"bias": torch.zeros(5)}, "bias must have shape"),
])
def test_bad_options(kw, match):
    x, w, _, t = _inputs((6,), 24, 31, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        rlfuse.linear_logprobs(x, w, t, **kw)


# ----------------------------------------------------------------------------- peaked rows
def _peaked(n, h, v, peak, offset, dtype=torch.float32):
    """Rows whose logit at one of four tokens sits `peak` above the rest (each of the four has
    a hidden dimension of its own), all shifted by `offset` through the bias: entropies down to
    ~1e-6, logits up to ~1e4."""
    x = torch.randn(n, h, dtype=torch.float64)
    w = torch.randn(v, h, dtype=torch.float64) * 0.1
    peaks = torch.randperm(v)[:4]
    w[:, -4:] = 0
    w[peaks, -4:] = torch.eye(4, dtype=torch.float64)
    j = torch.randint(0, 4, (n,))
    x[:, -4:] = 0
    x[torch.arange(n), h - 4 + j] = peak
    b = torch.randn(v, dtype=torch.float64) * 0.1 + offset
    t = torch.where(torch.arange(n) % 2 == 0, peaks[j], torch.randint(0, v, (n,)))  # peak or not
    return x.to(dtype), w.to(dtype), b.to(dtype), t


@pytest.mark.parametrize("impl,pass_order", IMPL_ORDERS, indirect=["pass_order"])
@pytest.mark.parametrize("peak,offset", [(8.0, 0.0), (20.0, 0.0), (30.0, 0.0), (12.0, 1e3),
                                         (12.0, 1e4), (0.0, 1e4)])
@pytest.mark.parametrize("tfname", ["plain", "temp"])
def test_peaked_rows_and_large_offsets(impl, pass_order, peak, offset, tfname):
    """Entropy as lse - sum p z cancels on peaked rows (an entropy of 1.3e-3 was off by 3e-6
    where fp32 PyTorch is exact to 1e-8); every impl is held to fp32 PyTorch's own error, with a
    small absolute allowance, for values and gradients."""
    kw = TRANSFORMS[tfname]
    x, w, b, t = _peaked(16, 24, 507, peak, offset)
    gl, ge = torch.randn(16), torch.randn(16)
    truth = _run(lambda a, c, d, e: linear_logprobs_reference(
        a.double(), c.double(), e, d.double(), LogitTransform(**kw)), x, w, b, t,
        gl.double(), ge.double())
    naive = _run(lambda a, c, d, e: _naive(a, c, d, e, kw), x, w, b, t, gl, ge)
    got = _run(lambda a, c, d, e: rlfuse.linear_logprobs(
        a, c, e, bias=d, return_entropy=True, chunk_size=5, impl=impl, **kw),
        x, w, b, t, gl, ge)
    if peak >= 20 and offset == 0:
        assert truth[1].max() < 1e-3  # the rows are peaked
        if impl != "reference":  # the reference is PyTorch's math
            # fp32's relative accuracy on the tiny entropies: the sum-exp's 1 at the max must
            # not swallow the other terms (it did in one fp32 lane: 1.3% off on an AVX-512
            # CPU), down to the fp64 reference's own floor (its log-softmax rounds 1 + ~1e-16)
            ent_err = (got[1].double() - truth[1]).abs().max().item()
            assert ent_err <= 1e-4 * truth[1].abs().max().item() + 1e-15, ent_err
    for got_, naive_, want in zip(got, naive, truth):
        err = (got_.double() - want).abs().max().item()
        budget = (naive_.double() - want).abs().max().item()
        assert err <= 2 * budget + 2e-7 * max(1.0, want.abs().max().item()), (err, budget)


# ----------------------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("tfname", ["plain", "all"])
@pytest.mark.parametrize("where", ["nan_weight_row", "inf_hidden", "neg_inf_bias", "nan_bias"])
@pytest.mark.parametrize("pass_order", ["rows", 7], indirect=True)  # 7: slabs, V = 31
def test_non_finite_head_gives_nan_rows_in_every_impl(where, tfname, pass_order):
    """hidden / weight / bias are not scanned: a non-finite value there makes the affected rows'
    log-prob and entropy NaN (ignored rows stay 0), identically in every impl."""
    kw = TRANSFORMS[tfname]
    x, w, b, t = _inputs((12,), 24, 31, torch.float32)
    if where == "nan_weight_row":
        w[3] = math.nan  # every row's logit 3
    elif where == "inf_hidden":
        x[2, 0] = math.inf  # row 2
    elif where == "neg_inf_bias":
        b[5] = -math.inf
    else:
        b[5] = math.nan
    outs = {impl: rlfuse.linear_logprobs(x, w, t, bias=b, return_entropy=True, impl=impl,
                                         chunk_size=5, **kw) for impl in IMPLS}
    want_lp, want_ent = outs["reference"]
    assert want_lp.isnan().any() or tfname == "all"  # softcap turns +-inf logits finite
    assert not want_lp[t == -100].isnan().any()
    for impl, (lp, ent) in outs.items():
        assert torch.equal(lp.isnan(), want_lp.isnan()), impl
        assert torch.equal(ent.isnan(), want_ent.isnan()), impl
        assert torch.equal(lp.isnan(), ent.isnan() & (t != -100)), impl
        ok = ~want_lp.isnan()
        torch.testing.assert_close(lp[ok], want_lp[ok], atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- logit summary
@pytest.mark.parametrize("impl,pass_order", IMPL_ORDERS, indirect=["pass_order"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tfname", list(TRANSFORMS))
@pytest.mark.parametrize("peak,offset", [(0.0, 0.0), (20.0, 1e3)])  # flat rows; peaked, large
def test_logit_summary_matches_fp64(impl, pass_order, dtype, tfname, peak, offset):
    """return_logit_summary (TRL's mean_logits and is_top1) from the same pass, in every impl
    and pass order: the mean transformed logit within 2x PyTorch's own error, the first argmax
    (a tie across two slabs goes to the lower id), and logp / entropy / gradients unchanged."""
    kw = TRANSFORMS[tfname]
    x, w, b, t = _peaked(36, 24, 123, peak, offset, dtype)
    # ids 3 and 122 (slabs 0 and 2) tie at the max of rows 0 and 1, exactly in any summation
    # order (products and sums of small powers of two)
    w[3] = w[-1] = 0
    w[3, :4] = w[-1, :4] = torch.tensor([1.0, 2.0, 0.5, 1.0])
    b[-1] = b[3]
    x[:2] = 0
    x[:2, :4] = 8.0
    tf = LogitTransform(**kw)
    z64 = tf.apply(x.double() @ w.double().T + b.double())  # [36, V]
    t[3:12] = z64[3:12].argmax(-1)  # top-1 targets on flat rows too
    t[0], t[1], t[2] = 122, 3, -100
    x, t, z64 = x.view(4, 9, 24), t.view(4, 9), z64.view(4, 9, -1)
    want_mean, want_top1 = z64.mean(-1), (z64.argmax(-1) == t) & (t != -100)
    naive_mean = tf.apply((x @ w.T + b).float()).mean(-1)  # PyTorch in the inputs' dtype

    xx = x.detach().requires_grad_()
    lp, ent, mean, top1 = rlfuse.linear_logprobs(
        xx, w, t, bias=b, return_entropy=True, return_logit_summary=True, chunk_size=10,
        impl=impl, **kw)
    assert mean.shape == top1.shape == t.shape
    assert mean.dtype == torch.float32 and top1.dtype == torch.bool
    assert not mean.requires_grad and not top1.requires_grad
    err = (mean.double() - want_mean).abs().max().item()
    budget = (naive_mean.double() - want_mean).abs().max().item()
    assert err <= 2 * budget + 1e-6 * max(1.0, want_mean.abs().max().item()), (err, budget)
    top2 = z64.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3 * top2[..., 0].abs().clamp(min=1)
    clear.view(-1)[:3] = True  # the tied rows and the ignored one are exact
    assert torch.equal(top1[clear], want_top1[clear])
    if not (tfname == "all" and offset):  # there the softcap ties every logit at its cap
        assert top1.view(-1)[:3].tolist() == [False, True, False]
    assert want_top1.view(-1)[3:12].all()

    (lp.sum() + ent.sum()).backward()
    xx2 = x.detach().requires_grad_()
    lp2, ent2 = rlfuse.linear_logprobs(xx2, w, t, bias=b, return_entropy=True, chunk_size=10,
                                       impl=impl, **kw)
    (lp2.sum() + ent2.sum()).backward()
    assert torch.equal(lp, lp2) and torch.equal(ent, ent2) and torch.equal(xx.grad, xx2.grad)


@pytest.mark.parametrize("impl,pass_order", IMPL_ORDERS + [(i, "auto") for i in CHUNKED_IMPLS],
                         indirect=["pass_order"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_rows(impl, pass_order, dtype):
    """An empty batch ([2, 0] targets) gives empty outputs and zero gradients, in every pass
    order and in the one `auto` picks (on CPU: slabs, whose tile has no rows here)."""
    x = torch.randn(2, 0, 24, dtype=dtype, requires_grad=True)
    w = torch.randn(123, 24, dtype=dtype, requires_grad=True)
    t = torch.zeros(2, 0, dtype=torch.long)
    lp, ent, mean, top1 = rlfuse.linear_logprobs(x, w, t, return_entropy=True, impl=impl,
                                                 return_logit_summary=True)
    assert lp.shape == ent.shape == mean.shape == top1.shape == (2, 0)
    assert lp.dtype == torch.float32
    (lp.sum() + ent.sum()).backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))
