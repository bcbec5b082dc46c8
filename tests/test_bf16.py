"""bf16 / fp16 GEMMs: the run-time decision (native low-precision GEMMs vs fp32 upcasts), and
the native path's accuracy against an fp64 reference, held to 2x PyTorch's own bf16 computation
(bf16 GEMM, bf16 logits upcast to fp32 for the softmax), for values and every gradient, with
peaked rows and large logits; dW must not lose accuracy as the number of chunks grows. Each in
both pass orders of the driver (rows, vocabulary slabs); the pass-order decision itself.

The native path is forced here whatever the CPU (at small sizes: on a CPU without bf16 matmul
units it is slow, which is why `auto` does not pick it there)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import rlfuse
from rlfuse import PolicyLossConfig, PreferenceLossConfig, _backend, _chunked
from rlfuse.logprobs import linear_logprobs_reference

from conftest import CHUNKED_IMPLS

cpp = pytest.mark.skipif(not CHUNKED_IMPLS or not _backend.cpp_ext().has_lowp_gemm(torch.bfloat16),
                         reason="needs rlfuse._C with its bf16 -> fp32 GEMM (MKL)")
CPU = torch.device("cpu")


@pytest.fixture
def lowp_mode():
    """Set the GEMM mode for one test and restore it afterwards."""
    before = _backend.lowp_gemm_mode()
    yield _backend.set_lowp_gemm
    _backend.set_lowp_gemm(before)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads only add spin-up cost on a shared CPU
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- the decision
def _mock_cpu(monkeypatch, amx=False, avx512_bf16=False, amx_fp16=False):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: amx_fp16)
    _backend.cpu_native_lowp.cache_clear()


@pytest.fixture
def mocked_cpu(monkeypatch):
    yield lambda **flags: _mock_cpu(monkeypatch, **flags)
    monkeypatch.undo()
    _backend.cpu_native_lowp.cache_clear()


@cpp
def test_auto_upcasts_on_a_cpu_without_bf16_units(lowp_mode, mocked_cpu):
    lowp_mode("auto")
    mocked_cpu()
    for dt in (torch.bfloat16, torch.float16):
        assert not _backend.lowp_gemm_native(CPU, dt)
        assert _chunked.compute_dtype(torch.device("cpu"), dt) == torch.float32


@cpp
@pytest.mark.parametrize("flags,native_dtypes", [
    (dict(amx=True), {torch.bfloat16}),
    (dict(avx512_bf16=True), {torch.bfloat16}),
    (dict(amx=True, amx_fp16=True), {torch.bfloat16, torch.float16}),
])
def test_auto_goes_native_where_the_cpu_has_the_units(lowp_mode, mocked_cpu, flags,
                                                      native_dtypes):
    lowp_mode("auto")
    mocked_cpu(**flags)
    for dt in (torch.bfloat16, torch.float16):
        assert _backend.lowp_gemm_native(CPU, dt) == (dt in native_dtypes)
        want = dt if dt in native_dtypes else torch.float32
        assert _chunked.compute_dtype(torch.device("cpu"), dt) == want


def test_cuda_is_native_unless_overridden_and_fp32_never_is(lowp_mode):
    cuda = torch.device("cuda")  # the decision needs no device, only its type
    lowp_mode("auto")
    assert _backend.lowp_gemm_native(cuda, torch.bfloat16)
    assert _backend.lowp_gemm_native(cuda, torch.float16)
    for mode in ("auto", "native", "upcast"):
        lowp_mode(mode)
        assert not _backend.lowp_gemm_native(cuda, torch.float32)
        assert not _backend.lowp_gemm_native(CPU, torch.float32)
        assert not _backend.lowp_gemm_native(CPU, torch.float64)
    lowp_mode("upcast")
    assert not _backend.lowp_gemm_native(cuda, torch.bfloat16)


@cpp
def test_overrides_win_over_the_flags(lowp_mode, mocked_cpu):
    mocked_cpu(amx=True)
    lowp_mode("upcast")
    assert not _backend.lowp_gemm_native(CPU, torch.bfloat16)
    mocked_cpu()
    lowp_mode("native")
    assert _backend.lowp_gemm_native(CPU, torch.bfloat16)


def test_bad_mode_is_a_clear_error(lowp_mode):
    with pytest.raises(ValueError, match=r"set_lowp_gemm\(mode\) must be one of"):
        lowp_mode("bf16")


def test_environment_variable_sets_the_mode():
    code = "import rlfuse._backend as b; print(b.lowp_gemm_mode())"
    env = dict(os.environ, RLFUSE_LOWP_GEMM="upcast")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split()[-1] == "upcast", out.stderr
    env["RLFUSE_LOWP_GEMM"] = "fast"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "RLFUSE_LOWP_GEMM must be one of" in out.stderr


# ----------------------------------------------------------------------------- the GEMM
@cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_f32_accumulates_without_rounding(dtype):
    a = torch.randn(37, 19).to(dtype)
    b = torch.randn(23, 19).to(dtype).t()  # column-major operand
    c = torch.randn(37, 23)
    want = c.double() + a.double() @ b.double()
    _backend.cpp_ext().gemm_f32_(a, b, c, True)
    torch.testing.assert_close(c.double(), want, atol=1e-5, rtol=1e-6)  # fp32, not bf16
    _backend.cpp_ext().gemm_f32_(a[:, ::2], b[::2], c, False)  # strided, overwrite
    torch.testing.assert_close(c.double(), a[:, ::2].double() @ b[::2].double(),
                               atol=1e-5, rtol=1e-6)
    with pytest.raises(RuntimeError, match="c must be a row-major CPU float32"):
        _backend.cpp_ext().gemm_f32_(a, b, c.to(dtype), True)


# ----------------------------------------------------------------------------- accuracy
def _head_inputs(n, h, v, dtype=torch.bfloat16, big=8.0, peaked=0.3):
    """Logits of std ~`big`, a bias, and a fraction of rows peaked on their target (logit ~40)."""
    w = torch.randn(v, h) / h**0.5 * big
    x = torch.randn(n, h)
    t = torch.randint(0, v, (n,))
    rows = torch.rand(n) < peaked
    x[rows] = w[t[rows]] * (40.0 / w[t[rows]].pow(2).sum(-1, keepdim=True))
    b = torch.randn(v) * 2
    t[torch.rand(n) < 0.1] = -100
    return x.to(dtype), w.to(dtype), b.to(dtype), t


def _torch_lowp_head(x, w, b, t):
    """PyTorch's own bf16 computation: bf16 GEMM, logits upcast to fp32 for the softmax."""
    logz = F.log_softmax((x @ w.T + b).float(), -1)
    valid = t != -100
    lp = logz.gather(-1, t.clamp(min=0)[:, None])[:, 0] * valid
    ent = -(logz.exp() * logz).sum(-1) * valid
    return lp, ent


def _fp64_head(x, w, b, t):
    return linear_logprobs_reference(x, w, t, b)


def _grads(fn, x, w, b, as_dtype=None):
    """fn(x, w, b) -> (scalar, outputs...): its value, outputs and (dX, dW, db)."""
    leaves = [(a if as_dtype is None else a.to(as_dtype)).detach().requires_grad_()
              for a in (x, w, b)]
    val, *outs = fn(*leaves)
    return [val, *outs, *torch.autograd.grad(val, leaves)]


def _assert_within_2x_of_torch(got, torch_lowp, truth, atol=1e-3):
    names = ["value"] + [f"out{i}" for i in range(len(got) - 4)] + ["dX", "dW", "db"]
    for name, g, base, want in zip(names, got, torch_lowp, truth):
        assert g.dtype == base.dtype, (name, g.dtype, base.dtype)
        err = (g.double() - want).abs().max().item()
        budget = (base.double() - want).abs().max().item()
        scale = max(1.0, want.abs().max().item())
        assert err <= 2 * budget + atol * scale, (name, err, budget, scale)


@cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [123, 507])
@pytest.mark.parametrize("mode", ["native", "upcast"])  # both paths, whatever this CPU
@pytest.mark.parametrize("pass_order", ["rows", "slabs"], indirect=True)
def test_linear_logprobs_within_2x_of_torch(mode, lowp_mode, dtype, v, pass_order):
    lowp_mode(mode)
    x, w, b, t = _head_inputs(83, 40, v, dtype, big=8.0 if dtype == torch.bfloat16 else 4.0)
    gl, ge = torch.randn(83), torch.randn(83)

    def loss_of(head):
        def fn(x, w, b):
            lp, ent = head(x, w, b, t)
            return (lp * gl.to(lp.dtype)).sum() + (ent * ge.to(ent.dtype)).sum(), lp, ent
        return fn

    def rlfuse_head(x, w, b, t):
        return rlfuse.linear_logprobs(x, w, t, bias=b, return_entropy=True, chunk_size=16,
                                      impl="cpp")

    truth = _grads(loss_of(_fp64_head), x, w, b, torch.float64)
    base = _grads(loss_of(_torch_lowp_head), x, w, b)
    got = _grads(loss_of(rlfuse_head), x, w, b)
    _assert_within_2x_of_torch(got, base, truth)


def _dapo(lp, old, ref, adv, valid, eps=0.2, beta=0.04):
    """DAPO with a k3 KL, token-mean over the batch (the published formula)."""
    ratio = torch.exp(lp - old)
    pg = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    return ((pg + beta * kl) * valid).sum() / valid.sum()


@cpp
@pytest.mark.parametrize("v", [123, 507])
@pytest.mark.parametrize("mode", ["native", "upcast"])  # both paths, whatever this CPU
@pytest.mark.parametrize("pass_order", ["rows", "slabs"], indirect=True)
def test_policy_loss_within_2x_of_torch(mode, lowp_mode, v, pass_order):
    lowp_mode(mode)
    bsz, steps, h = 6, 13, 40
    x, w, b, t = _head_inputs(bsz * steps, h, v)
    t = t.view(bsz, steps)
    mask = (torch.rand(bsz, steps) > 0.15).float()
    adv = torch.randn(bsz)[:, None].expand(bsz, steps)
    lp64 = _fp64_head(x.double(), w.double(), b.double(), t.view(-1))[0].float().view(bsz, steps)
    old, ref = lp64 + 0.3 * torch.randn(bsz, steps), lp64 + 0.2 * torch.randn(bsz, steps)
    valid = (mask > 0) & (t != -100)
    cfg = PolicyLossConfig(loss_type="dapo", beta=0.04, kl_estimator="k3", chunk_size=16,
                           impl="cpp")

    def from_head(head):
        def fn(x, w, b):
            lp, ent = head(x.view(-1, h), w, b, t.view(-1))
            lp = lp.view(bsz, steps)
            c = lambda a: a.to(lp.dtype)  # noqa: E731
            return _dapo(lp, c(old), c(ref), c(adv), valid), lp
        return fn

    def rlfuse_loss(x, w, b):
        loss, out = rlfuse.policy_loss(x.view(bsz, steps, h), w, t, mask, adv[:, 0],
                                       old_logp=old, ref_logp=ref, bias=b, config=cfg)
        return loss, out.logp

    ref_cfg = PolicyLossConfig(loss_type="dapo", beta=0.04, kl_estimator="k3",
                               impl="reference")
    truth = _grads(from_head(_fp64_head), x, w, b, torch.float64)
    via_rlfuse_ref = rlfuse.policy_loss(x.double().view(bsz, steps, h), w.double(), t, mask,
                                        adv[:, 0], old_logp=old, ref_logp=ref, bias=b.double(),
                                        config=ref_cfg)[0]
    torch.testing.assert_close(via_rlfuse_ref, truth[0])  # the test's formula is the op's
    base = _grads(from_head(_torch_lowp_head), x, w, b)
    got = _grads(rlfuse_loss, x, w, b)
    _assert_within_2x_of_torch(got, base, truth)


@cpp
@pytest.mark.parametrize("mode", ["native", "upcast"])  # both paths, whatever this CPU
@pytest.mark.parametrize("pass_order", ["rows", "slabs"], indirect=True)
def test_preference_loss_within_2x_of_torch(mode, lowp_mode, pass_order):
    lowp_mode(mode)
    pairs, steps, h, v = 3, 11, 40, 123
    x, w, b, t = _head_inputs(2 * pairs * steps, h, v)
    t = t.view(2 * pairs, steps)
    mask = (torch.rand(2 * pairs, steps) > 0.2).float()
    valid = (mask > 0) & (t != -100)
    ref_logp = torch.randn(2 * pairs) * 3 - 30
    beta = 0.1
    cfg = PreferenceLossConfig(loss_type="sigmoid", beta=beta, chunk_size=16, impl="cpp")

    def from_head(head):
        def fn(x, w, b):
            lp, _ = head(x.view(-1, h), w, b, t.view(-1))
            seq = (lp.view(2 * pairs, steps) * valid).sum(-1)
            ratio = (seq - ref_logp.to(seq.dtype))
            loss = -F.logsigmoid(beta * (ratio[:pairs] - ratio[pairs:])).mean()
            return loss, seq
        return fn

    def rlfuse_loss(x, w, b):
        loss, out = rlfuse.preference_loss(x.view(2 * pairs, steps, h), w, t, mask,
                                           ref_logp=ref_logp, bias=b, config=cfg)
        return loss, torch.cat([out.chosen_logp, out.rejected_logp])

    truth = _grads(from_head(_fp64_head), x, w, b, torch.float64)
    base = _grads(from_head(_torch_lowp_head), x, w, b)
    got = _grads(rlfuse_loss, x, w, b)
    _assert_within_2x_of_torch(got, base, truth)


@cpp
@pytest.mark.parametrize("pass_order", ["rows", "slabs"], indirect=True)
def test_weight_gradient_error_does_not_grow_with_the_chunk_count(lowp_mode, pass_order):
    """dW accumulates in fp32 and is rounded once (in the slab order: a slab's fp32 accumulator,
    over every row chunk): 64 chunks give the dW of one chunk, up to the rare element whose fp32
    sum lands on the other side of a bf16 rounding boundary. (Measured at this shape: rounding
    each chunk's dZ^T @ X_c to bf16 before an fp32 sum gives 1.2x the error and changes ~37% of
    the elements; a bf16 accumulator gives 1.8x at 8 chunks, 3x at 64.)"""
    lowp_mode("native")
    n, h, v = 512, 32, 123
    x, w, b, t = _head_inputs(n, h, v, big=3.0, peaked=0.0)
    gl = torch.randn(n)

    def dw(chunk):
        ww = w.detach().requires_grad_()
        lp = rlfuse.linear_logprobs(x, ww, t, bias=b, chunk_size=chunk, impl="cpp")
        (lp * gl).sum().backward()
        return ww.grad.double()

    w64 = w.double().requires_grad_()
    (linear_logprobs_reference(x.double(), w64, t, b.double())[0] * gl.double()).sum().backward()

    def rel_err(g):
        return ((g - w64.grad).norm() / w64.grad.norm()).item()

    one, many = dw(n), dw(8)
    assert rel_err(many) <= 1.02 * rel_err(one), (rel_err(many), rel_err(one))
    assert (many != one).double().mean().item() < 0.01


def test_default_chunk_is_sized_per_device():
    from rlfuse._chunked import default_chunk_size

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_chunk_size(10_000, 32_000, cpu, torch.float32) == 256
    assert default_chunk_size(10_000, 151_936, cpu, torch.float32) == 256  # 148 MiB of fp32
    assert default_chunk_size(100, 32_000, cpu, torch.float32) == 100  # never more than N
    # a GPU gets 1-2k rows at a 128k vocabulary (bf16 logits: 2048 x 131072 x 2 B = 512 MiB)
    assert default_chunk_size(16_384, 131_072, cuda, torch.bfloat16) == 2048
    assert default_chunk_size(16_384, 262_144, cuda, torch.float32) == 1024


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@cpp
def test_fp32_inputs_opt_in_to_bf16_gemms_with_torchs_precision_switch(lowp_mode,
                                                                       matmul_precision):
    """"medium" where bf16 is native: fp32 inputs run the GEMMs of their bf16 rounding (the same
    numbers as bf16 inputs, fp32 gradients back); "highest" (torch's default), or no native bf16,
    keeps exact fp32."""
    x, w, b, t = _head_inputs(83, 40, 123, torch.float32, big=8.0)
    b = b.bfloat16().float()  # a bias of bf16 values: both runs below add the same one

    def run(x, w, b):
        leaves = [a.detach().requires_grad_() for a in (x, w, b)]
        lp, ent = rlfuse.linear_logprobs(leaves[0], leaves[1], t, bias=leaves[2],
                                         return_entropy=True, chunk_size=16, impl="cpp")
        grads = torch.autograd.grad(lp.sum() + ent.sum(), leaves)
        return [lp, ent, *grads]

    lowp_mode("native")
    exact = rlfuse.linear_logprobs_reference(x, w, t, b)[0]
    assert torch.allclose(run(x, w, b)[0], exact, atol=1e-5)  # "highest": fp32 GEMMs
    matmul_precision("medium")
    opted = run(x, w, b)
    as_bf16 = run(x.bfloat16(), w.bfloat16(), b.bfloat16())  # the same GEMM operands
    assert all(g.dtype == torch.float32 for g in opted)
    for got, want in zip(opted[:2], as_bf16[:2]):  # the values: to fp32 summation order
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    # the gradients: those of bf16 inputs come back rounded to bf16, the opt-in's in fp32
    for got, want in zip(opted[2:], as_bf16[2:]):
        assert torch.allclose(got.bfloat16().float(), want.float(), rtol=2**-7, atol=1e-6)
    assert (opted[0] - exact).abs().max() > 1e-4  # it did run on rounded operands
    lowp_mode("upcast")  # rlfuse rounds nothing: its fp32 GEMMs are torch's own
    upcast = run(x, w, b)[0]
    if _backend.cpu_native_lowp(torch.bfloat16):
        # where bf16 is native, torch's own fp32 mm honours "medium" too (oneDNN rounds to bf16)
        assert torch.allclose(upcast, linear_logprobs_reference(x, w, t, b)[0], atol=1e-4)
    else:  # a CPU without native bf16: the opt-in is a no-op
        assert torch.allclose(upcast, exact, atol=1e-5)


# ----------------------------------------------------------------------------- the pass order
QWEN = dict(n=2048, h=896, v=151936)  # the qwen-0.5b head
ALL, FROZEN, NONE = (True, True, True), (True, False, False), (False, False, False)


@pytest.fixture
def slab_mode():
    before = _backend.vocab_slab_mode()
    yield _backend.set_vocab_slab
    _backend.set_vocab_slab(before)


def _order(dtype, needs, chunk=256, same_flops=False, device=CPU, **shape):
    """`pass_order` at the qwen-0.5b head (or `shape`): (rows per chunk, slab rows or 0)."""
    shape = {**QWEN, **shape}
    return _chunked.pass_order(shape["n"], shape["h"], shape["v"], device, dtype, chunk, needs,
                               same_flops)


def _slab(*args, **kwargs):
    return _order(*args, **kwargs)[1]


def _slab_buffer_bytes(dtype, needs, rows, chunk=256, h=896):
    """What the slab order holds per slab: the weight slab in the GEMM dtype when that is not the
    input dtype, dW's fp32 slab accumulator, the [C, Vs] logits (and dZ in the GEMM dtype)."""
    gemm = _chunked.compute_dtype(CPU, dtype)
    size = lambda dt: torch.finfo(dt).bits // 8  # noqa: E731
    copy = rows * h * size(gemm) if gemm != dtype else 0
    acc = rows * h * 4 if needs[1] else 0
    dz = chunk * rows * size(gemm) if gemm != torch.float32 and any(needs) else 0
    return copy + acc + chunk * rows * 4 + dz


@cpp
@pytest.mark.parametrize("mode", ["native", "upcast"])
def test_auto_runs_slabs_where_the_row_order_holds_weight_sized_fp32_buffers(mode, lowp_mode,
                                                                             slab_mode):
    """At the qwen-0.5b head, bf16: the row order's fp32 dW accumulator (545 MB) and, upcasting,
    its fp32 weight copy (545 MB) are past the budget: slabs whose buffers fit SLAB_BYTES, with
    GEMM-sized slabs. fp32 inputs and small heads keep the row order."""
    lowp_mode(mode)
    slab_mode("auto")
    bf16 = torch.bfloat16
    rows = _slab(bf16, ALL)
    assert rows > 0 and rows % _chunked.SLAB_MULTIPLE == 0 and rows >= 4096
    assert _slab_buffer_bytes(bf16, ALL, rows) <= _chunked.SLAB_BYTES
    # no gradient: only the upcast holds a weight-sized buffer (the fp32 copy); a frozen head
    # (LoRA) has no dW accumulator either
    for needs in (NONE, FROZEN):
        got = _slab(bf16, needs)
        assert (got > 0) == (mode == "upcast"), (needs, got)
        if got:
            assert _slab_buffer_bytes(bf16, needs, got) <= _chunked.SLAB_BYTES
    assert _slab(torch.float32, ALL) == 0 and _slab(torch.float32, NONE) == 0
    assert _slab(bf16, ALL, v=32000, h=512) == 0  # copy + dW, 2 x 62.5 MiB: in budget
    assert _slab(bf16, ALL, v=1000) == 0


@cpp
@pytest.mark.parametrize("mode", ["native", "upcast"])
def test_auto_runs_tall_slabs_on_cpu_where_both_orders_do_the_same_flops(mode, lowp_mode,
                                                                          slab_mode):
    """Log-probs and losses without gradients do the same GEMMs in both orders: on CPU `auto`
    runs slabs there, with chunks of SLAB_CHUNK_ROWS rows (never more than N) and buffers in
    SLAB_BYTES. A fused loss with gradients (3 GEMMs a chunk in the row order, 4 in the other)
    and CUDA (2048-row chunks in the row order already) keep the row order."""
    lowp_mode(mode)
    slab_mode("auto")
    tall = _chunked.SLAB_CHUNK_ROWS
    for dtype in (torch.float32, torch.bfloat16):
        for needs in (ALL, FROZEN, NONE):
            chunk, rows = _order(dtype, needs, chunk=None, same_flops=True)
            assert chunk == tall and rows % _chunked.SLAB_MULTIPLE == 0 and rows >= 2048
            assert _slab_buffer_bytes(dtype, needs, rows, chunk) <= _chunked.SLAB_BYTES
    assert _order(torch.float32, NONE, chunk=None, same_flops=True, n=100)[0] == 100
    assert _order(torch.float32, NONE, chunk=64, same_flops=True)[0] == 64  # as given
    assert _order(torch.float32, ALL, chunk=None) == (256, 0)
    cuda = torch.device("cuda")
    assert _order(torch.float32, NONE, chunk=None, same_flops=True, device=cuda)[1] == 0


@cpp
def test_losses_in_two_phases_take_the_tall_slabs(slab_mode):
    """A loss whose groups do not fit a row chunk, or that couples the whole batch, does 4 GEMMs
    a chunk in either order: on CPU `auto` runs it in the slab order's tall chunks. A loss whose
    groups fit keeps the row order (3 GEMMs a chunk), unless it computes no gradient."""
    from types import SimpleNamespace

    slab_mode("auto")
    x, w = torch.zeros(600, 8), torch.zeros(1000, 8)
    inputs = _chunked.Inputs(x, w, None, torch.zeros(600, dtype=torch.long))
    for needs, group, want in ((ALL, 1, (256, 0)), (ALL, 256, (256, 0)), (ALL, 300, (600, 1000)),
                               (ALL, None, (600, 1000)), (NONE, 1, (600, 1000))):
        spec = _chunked._parse(_chunked._spec_string("policy", PolicyLossConfig(), "cpp",
                                                     needs, ""))
        plan = spec.plan(inputs, SimpleNamespace(group=group))
        assert (plan.chunk, plan.slab) == want, (needs, group)


def test_pass_order_overrides(slab_mode):
    slab_mode("off")
    assert _slab(torch.bfloat16, ALL) == 0
    slab_mode("on")
    assert _slab(torch.float32, ALL, v=123, h=40) == 123  # one slab: the budget holds V
    assert 0 < _slab(torch.float32, ALL) < QWEN["v"]
    slab_mode(50)
    assert _slab(torch.float32, NONE, v=123) == 50
    assert _slab(torch.float32, NONE, v=31) == 31  # never more than V
    slab_mode("7")  # as the environment variable spells it
    assert _backend.vocab_slab_mode() == 7


@pytest.mark.parametrize("bad", ["slabs", 0, -3, 2.5, True, "1e3"])
def test_bad_pass_order_is_a_clear_error(slab_mode, bad):
    with pytest.raises(ValueError, match=r"set_vocab_slab\(mode\) must be one of"):
        slab_mode(bad)


def test_environment_variable_sets_the_pass_order():
    code = "import rlfuse._backend as b; print(b.vocab_slab_mode())"
    for value, want in (("off", "off"), ("4096", "4096")):
        env = dict(os.environ, RLFUSE_VOCAB_SLAB=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True)
        assert out.returncode == 0 and out.stdout.split()[-1] == want, out.stderr
    env["RLFUSE_VOCAB_SLAB"] = "rows"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "RLFUSE_VOCAB_SLAB must be one of" in out.stderr


def _largest_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) while fn() runs, from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([e.cpu_memory_usage for e in prof.events()] + [0])


@cpp
@pytest.mark.parametrize("mode", ["native", "upcast"])
@pytest.mark.parametrize("pass_order", ["rows", "slabs"], indirect=True)
def test_slab_order_holds_no_weight_sized_fp32_buffer(mode, lowp_mode, pass_order):
    """bf16 inputs: in the slab order nothing larger than the bf16 dW itself is allocated, in the
    no-grad forward nothing weight-sized at all, and autograd's backward of a fused loss
    allocates nothing weight-sized (its unused outputs' gradients are not materialized as
    zeros). The row order holds an fp32 dW accumulator (and, upcasting, an fp32 weight copy):
    twice the bf16 dW."""
    lowp_mode(mode)
    n, h, v = 48, 64, 4096
    x, w, _, t = _head_inputs(n, h, v, big=3.0)
    w_bytes = w.numel() * w.element_size()
    cfg = PolicyLossConfig(loss_type="dapo", beta=0.04, chunk_size=16, impl="cpp")
    xs, ws = x.view(1, n, h).requires_grad_(), w.clone().requires_grad_()
    old = torch.full((1, n), -8.0)
    out = {}

    def forward():
        out["loss"] = rlfuse.policy_loss(xs, ws, t.view(1, n), torch.ones(1, n), torch.ones(1),
                                         old_logp=old, ref_logp=old, config=cfg)[0]

    fwd = _largest_allocation(forward)
    bwd = _largest_allocation(lambda: out["loss"].backward())
    with torch.no_grad():
        nograd = _largest_allocation(lambda: rlfuse.linear_logprobs(x, w, t, impl="cpp"))
    assert bwd < w_bytes / 4, bwd
    if pass_order == "slabs":
        # the bf16 dW output (an op's count includes its small neighbours), never 2 bytes more a
        # weight
        assert w_bytes <= fwd < 1.5 * w_bytes and nograd < w_bytes / 4, (fwd, nograd)
    else:
        assert fwd >= 2 * w_bytes, fwd
        assert (nograd >= 2 * w_bytes) == (mode == "upcast"), nograd
    assert torch.isfinite(ws.grad.float()).all() and ws.grad.dtype == torch.bfloat16
