"""Triton epilogues (rlfuse._triton) under TRITON_INTERPRET=1 on CPU tensors.

Triton reads TRITON_INTERPRET when a kernel is defined, so the interpreter must not leak into
the rest of the suite: in a normal run this file only spawns itself in a fresh interpreter
with TRITON_INTERPRET=1 and asserts that sub-run passed (its output is shown on failure).
Run the cases directly with `TRITON_INTERPRET=1 pytest tests/test_triton.py`.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import rlfuse  # noqa: E402
from rlfuse._chunked import LogitTransform  # noqa: E402
from rlfuse.logprobs import linear_logprobs_reference  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

TRANSFORMS = {  # (scale, softcap, temperature)
    "plain": (1.0, 0.0, 1.0),
    "temp": (1.0, 0.0, 0.7),
    "all": (0.8, 4.0, 1.3),
}


def _torch_stats_and_grad(z, t, a, e, scale, cap, temp, ignore_index):
    """fp64 autograd of L = sum a*logp + e*entropy through the same transform: the spec."""
    raw = z.double().requires_grad_()
    zz = LogitTransform(scale, cap or None, temp).apply(raw)  # [C, V] fp64
    logz = zz.log_softmax(-1)
    valid = t != ignore_index
    logp = logz.gather(1, torch.where(valid, t, 0)[:, None])[:, 0] * valid
    ent = -(logz.exp() * logz).sum(-1) * valid
    (g,) = torch.autograd.grad((logp * a.double()).sum() + (ent * e.double()).sum(), raw)
    return zz.detach().logsumexp(-1), logp.detach(), ent.detach(), g


def _close(got, want, dtype=torch.float32, atol=1e-5):
    """err <= (one ulp of `dtype` + atol) x scale. One ulp, not half: the interpreter casts
    fp32 -> bf16 by truncation (compiled Triton rounds to nearest)."""
    err = (got.double() - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    assert err <= (torch.finfo(dtype).eps + atol) * scale, (err, scale)


if not INTERPRETED:

    def test_cases_pass_under_the_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
        r = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[1], capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"sub-run failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
        assert " passed" in r.stdout.splitlines()[-1], r.stdout  # not all skipped

    @pytest.mark.parametrize("zdtype", ["fp32", "bf16"])
    def test_kernels_compile_for_sm90(zdtype):
        """Ahead-of-time compile to a cubin (no GPU needed): catches what the interpreter
        lets through (types of loop-carried values, casts, scalar/tensor mixes)."""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from rlfuse import _triton

        if "nvidia" not in triton.backends.backends:
            pytest.skip("triton built without the NVIDIA backend")
        rows = {"lse_ptr": "*fp64", "logp_ptr": "*fp32", "ent_ptr": "*fp32"}
        grads = {"lse_ptr": "*fp64", "ent_ptr": "*fp32", "a_ptr": "*fp32", "e_ptr": "*fp32",
                 "V": "i32", "vocab_start": "i64", "vocab_size": "i64"}
        partials = {"part_ptr": "*fp32", "C": "i32", "V": "i32", "vocab_start": "i64"}
        scalars = {"V": "i32", "k": "fp32", "cap_in": "fp32", "cap_out": "fp32",
                   "ignore_index": "i32", "HAS_CAP": "constexpr", "BLOCK": "constexpr"}
        for kernel, row_args in ((_triton._stats_kernel, rows), (_triton._grad_kernel, grads),
                                 (_triton._partials_kernel, partials)):
            params = kernel.arg_names
            for cap in (False, True):
                sig = {"z_ptr": f"*{zdtype}", "tgt_ptr": "*i64", **row_args, **scalars}
                sig = {name: sig[name] for name in params}  # the kernel's own order
                src = ASTSource(kernel, sig, constexprs={"HAS_CAP": cap, "BLOCK": 4096})
                out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                     options={"num_warps": 8, "enable_fp_fusion": True})
                assert "cubin" in out.asm

    def test_cpu_tensors_without_interpreter_is_a_clear_error():
        x, w, t = torch.randn(4, 8), torch.randn(31, 8), torch.randint(0, 31, (4,))
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            rlfuse.linear_logprobs(x, w, t, impl="triton")

else:
    from rlfuse import _triton

    CPP = rlfuse._backend.cpp_ext()

    # Tile caps that split V = 123 and 507 into two tiles, the last one partial (the default
    # cap gives one tile per row at these sizes). Few tiles: the interpreter is slow.
    TILE = {31: None, 123: 64, 507: 256}

    def _tiles(monkeypatch, v):
        if TILE[v]:
            monkeypatch.setattr(_triton, "MAX_BLOCK", TILE[v])

    def _chunk(c, v, dtype, ignore_index=-100, mag=4.0):
        z = (torch.randn(c, v) * mag).to(dtype)  # [C, V]
        t = torch.randint(0, v, (c,))
        t[::4] = ignore_index
        a, e = torch.randn(c), torch.randn(c)
        return z, t, a, e

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("v", [31, 123, 507])
    @pytest.mark.parametrize("tfname", list(TRANSFORMS))
    def test_kernels_match_torch(dtype, v, tfname, monkeypatch):
        _tiles(monkeypatch, v)
        scale, cap, temp = TRANSFORMS[tfname]
        ignore_index = -1 if v == 123 else -100
        z, t, a, e = _chunk(6, v, dtype, ignore_index)
        lse, logp, ent = _triton.logits_stats(z, t, scale, cap, 1 / temp, ignore_index)
        want = _torch_stats_and_grad(z, t, a, e, scale, cap, temp, ignore_index)
        assert lse.dtype == torch.float64 and lse.shape == (6,)
        assert all(x.dtype == torch.float32 and x.shape == (6,) for x in (logp, ent))
        # The stats see z's exact values, upcast: fp32 accuracy whatever z's dtype.
        for got, ref in zip((lse, logp, ent), want):
            _close(got, ref)
        zg = z.clone()
        _triton.logits_grad_(zg, t, lse, ent, a, e, scale, cap, 1 / temp, ignore_index)
        assert zg.dtype == dtype
        assert (zg[t == ignore_index] == 0).all()
        _close(zg, want[3], dtype)

    def test_fp64_logits_computed_in_fp32():
        z, t, a, e = _chunk(4, 123, torch.float64)
        args = (0.8, 4.0, 1 / 1.3, -100)
        lse, logp, ent = _triton.logits_stats(z, t, *args)
        want = _torch_stats_and_grad(z, t, a, e, 0.8, 4.0, 1.3, -100)
        for got, ref in zip((lse, logp, ent), want):
            _close(got, ref)
        _triton.logits_grad_(z, t, lse, ent, a, e, *args)
        assert z.dtype == torch.float64
        _close(z, want[3])

    @pytest.mark.skipif(CPP is None, reason="C++ extension not built")
    @pytest.mark.parametrize("tfname", list(TRANSFORMS))
    def test_kernels_match_cpp(tfname, monkeypatch):
        _tiles(monkeypatch, 507)
        args = (*TRANSFORMS[tfname][:2], 1 / TRANSFORMS[tfname][2], -100)
        z, t, a, e = _chunk(11, 507, torch.float32)
        got, ref = _triton.logits_stats(z, t, *args), CPP.logits_stats(z, t, *args)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-5)
        zg, zc = z.clone(), z.clone()
        _triton.logits_grad_(zg, t, *got[::2], a, e, *args)
        CPP.logits_grad_(zc, t, *ref[::2], a, e, *args)
        torch.testing.assert_close(zg, zc, atol=1e-5, rtol=1e-4)

    def _torch_fp32(z, t, a, e, scale, cap, temp, ignore_index):
        """The same autograd in fp32: the error budget of the peaked-row test."""
        raw = z.float().requires_grad_()
        logz = LogitTransform(scale, cap or None, temp).apply(raw).log_softmax(-1)
        valid = t != ignore_index
        logp = logz.gather(1, torch.where(valid, t, 0)[:, None])[:, 0] * valid
        ent = -(logz.exp() * logz).sum(-1) * valid
        (g,) = torch.autograd.grad((logp * a).sum() + (ent * e).sum(), raw)
        return logp.detach(), ent.detach(), g

    @pytest.mark.parametrize("peak,offset", [(20.0, 0.0), (30.0, 0.0), (12.0, 1e3),
                                             (12.0, 1e4)])
    @pytest.mark.parametrize("tfname", ["plain", "temp"])
    def test_peaked_rows_and_large_offsets(peak, offset, tfname, monkeypatch):
        """Entropy and its gradient on shifted values: held to fp32 PyTorch's own error on rows
        where one logit dominates (entropy ~1e-6) and on logits offset by up to 1e4."""
        _tiles(monkeypatch, 507)
        scale, cap, temp = TRANSFORMS[tfname]
        z = torch.randn(6, 507) * 0.3 + offset
        k = torch.randint(0, 507, (6,))
        z[torch.arange(6), k] += peak
        t = torch.where(torch.arange(6) % 2 == 0, k, torch.randint(0, 507, (6,)))
        a, e = torch.randn(6), torch.randn(6)
        args = (scale, cap, 1 / temp, -100)
        lse, logp, ent = _triton.logits_stats(z, t, *args)
        zg = z.clone()
        _triton.logits_grad_(zg, t, lse, ent, a, e, *args)
        want = _torch_stats_and_grad(z, t, a, e, scale, cap, temp, -100)[1:]
        budget = _torch_fp32(z, t, a, e, scale, cap, temp, -100)
        for got, n, w in zip((logp, ent, zg), budget, want):
            err = (got.double() - w).abs().max().item()
            allowed = 2 * (n.double() - w).abs().max().item() + 2e-7 * max(1.0, w.abs().max())
            assert err <= allowed, (err, allowed)
        if offset == 0:  # fp32's relative accuracy on the tiny entropies (the C++ test's check)
            assert (ent.double() - want[1]).abs().max() <= 1e-4 * want[1].abs().max() + 1e-15

    def test_extreme_logits_and_tiny_rows():
        # |z| ~ 1e4: the online max keeps exp finite; softcap saturates tanh cleanly.
        z, t, a, e = _chunk(5, 123, torch.float32, mag=1e4)
        for scale, cap, temp in TRANSFORMS.values():
            stats = _triton.logits_stats(z, t, scale, cap, 1 / temp, -100)
            want = _torch_stats_and_grad(z, t, a, e, scale, cap, temp, -100)
            for got, ref in zip(stats, want):
                _close(got, ref, atol=1e-6 if cap else 1e-5)  # scale-relative
            zg = z.clone()
            _triton.logits_grad_(zg, t, stats[0], stats[2], a, e, scale, cap, 1 / temp, -100)
            assert torch.isfinite(zg).all()
            _close(zg, want[3])
        # V = 1: logp = 0, entropy = 0, gradient 0.
        z1, t1 = torch.randn(3, 1), torch.zeros(3, dtype=torch.long)
        lse, logp, ent = _triton.logits_stats(z1, t1, 1.0, 0.0, 1.0, -100)
        torch.testing.assert_close(lse, z1[:, 0].double())
        assert (logp == 0).all() and (ent.abs() < 1e-7).all()
        # C = 0: empty outputs, no launch.
        out = _triton.logits_stats(torch.empty(0, 7), torch.empty(0, dtype=torch.long),
                                   1.0, 0.0, 1.0, -100)
        assert [x.shape for x in out] == [(0,)] * 3

    @pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN
    def test_non_finite_logits_give_nan_rows_like_cpp_and_reference():
        z, t, a, e = _chunk(5, 31, torch.float32)
        t[:] = torch.tensor([1, 2, 3, -100, 4])
        z[0, 7], z[1, 8], z[2, 9], z[3, 5] = math.nan, math.inf, -math.inf, math.nan
        lse, logp, ent = _triton.logits_stats(z, t, 1.0, 0.0, 1.0, -100)
        assert logp[:3].isnan().all() and ent[:3].isnan().all()
        assert logp[3] == 0 and ent[3] == 0 and logp[4].isfinite() and ent[4].isfinite()
        ref_lp, ref_ent = linear_logprobs_reference(z, torch.eye(31), t)
        assert torch.equal(logp.isnan(), ref_lp.isnan()) and torch.equal(ent.isnan(),
                                                                         ref_ent.isnan())
        if CPP is not None:
            for g, c in zip((logp, ent), CPP.logits_stats(z, t, 1.0, 0.0, 1.0, -100)[1:]):
                assert torch.equal(g.isnan(), c.isnan())
        _triton.logits_grad_(z, t, lse, ent, a, e, 1.0, 0.0, 1.0, -100)
        assert z[:3].isnan().all() and (z[3] == 0).all() and z[4].isfinite().all()

    def test_out_of_range_target_is_nan_not_a_bad_read():
        z, t, a, e = _chunk(3, 31, torch.float32)
        t[:] = torch.tensor([31, -100, 2])
        lse, logp, ent = _triton.logits_stats(z, t, 1.0, 0.0, 1.0, -100)
        assert logp[0].isnan() and ent[0].isnan() and logp[1] == 0 and logp[2].isfinite()
        _triton.logits_grad_(z, t, lse, ent, a, e, 1.0, 0.0, 1.0, -100)
        assert z[0].isnan().all() and (z[1] == 0).all() and z[2].isfinite().all()

    @pytest.mark.parametrize("dtype,tfname,bias", [
        (torch.float64, "all", True), (torch.float64, "plain", False),
        (torch.float32, "temp", True), (torch.float32, "all", False),
        (torch.bfloat16, "all", True),
    ])
    def test_linear_logprobs_matches_reference(dtype, tfname, bias):
        scale, cap, temp = TRANSFORMS[tfname]
        kw = dict(temperature=temp, logit_scale=scale, final_logit_softcapping=cap or None)
        n, h, v = 23, 16, 123
        x = torch.randn(n, h).to(dtype)
        w = (torch.randn(v, h) / h**0.5 * 3).to(dtype)
        b = torch.randn(v).to(dtype) if bias else None
        t = torch.randint(0, v, (n,))
        t[torch.rand(n) < 0.2] = -100
        gl, ge = torch.randn(n), torch.randn(n)

        def run(fn, dt):
            leaves = [u.detach().to(dt).requires_grad_() for u in (x, w, b) if u is not None]
            lp, ent = fn(*leaves[:2], leaves[2] if bias else None)
            grads = torch.autograd.grad((lp * gl.to(lp.dtype)).sum()
                                        + (ent * ge.to(ent.dtype)).sum(), leaves)
            return [lp, ent, *grads]

        tf = LogitTransform(scale, cap or None, temp)
        truth = run(lambda x_, w_, b_: linear_logprobs_reference(x_, w_, t, b_, tf), torch.float64)
        ref = run(lambda x_, w_, b_: rlfuse.linear_logprobs(
            x_, w_, t, bias=b_, return_entropy=True, impl="reference", **kw), dtype)
        got = run(lambda x_, w_, b_: rlfuse.linear_logprobs(
            x_, w_, t, bias=b_, return_entropy=True, impl="triton", chunk_size=10, **kw), dtype)
        assert got[0].dtype == got[1].dtype == torch.float32
        assert [g.dtype for g in got[2:]] == [dtype] * len(got[2:])
        assert (got[0][t == -100] == 0).all() and (got[1][t == -100] == 0).all()
        # The chunked path computes in fp32 (fp64 inputs included); bf16 grads round to bf16.
        for g, r, want in zip(got, ref, truth):
            budget = (r.double() - want).abs().max().item() if dtype != torch.float64 else 0.0
            err = (g.double() - want).abs().max().item()
            scale_ = max(1.0, want.abs().max().item())
            atol = 2e-5 if dtype != torch.bfloat16 else 1e-2
            assert err <= 2 * budget + atol * scale_, (err, budget, scale_)
        # the logit summary (TRL's mean_logits, is_top1) from the same pass
        _, mean, top1 = rlfuse.linear_logprobs(x, w, t, bias=b, return_logit_summary=True,
                                               impl="triton", chunk_size=10, **kw)
        z = tf.apply(x.double() @ w.double().T + (0 if b is None else b.double()))
        assert (mean.double() - z.mean(-1)).abs().max() <= 1e-5 * max(1.0, z.abs().max())
        top2 = z.topk(2, -1).values
        clear = top2[:, 0] - top2[:, 1] > 1e-3 * top2[:, 0].abs().clamp(min=1)
        assert torch.equal(top1[clear], ((z.argmax(-1) == t) & (t != -100))[clear])

    @pytest.mark.skipif(CPP is None, reason="C++ extension not built")
    def test_fused_loss_matches_cpp():
        # one token-separable and one batch-coupled loss: both driver paths
        from rlfuse import _chunked

        n, h, v = 23, 16, 123
        x, w, b = torch.randn(n, h), torch.randn(v, h) / 2, torch.randn(v)
        t = torch.randint(0, v, (n,))
        t[::5] = -100
        coef = torch.randn(n)

        class Rows(_chunked.LossMath):
            def loss(self, s, e, lp, ent):
                return (coef[s:e] * lp).sum() / n - 0.1 * ent.sum() / n

        class Coupled(_chunked.LossMath):
            group = None

            def loss(self, s, e, lp, ent):
                return (coef * lp).sum() ** 2 / n - 0.1 * ent.sum() / n

        tf = LogitTransform(0.8, 4.0, 1.3)
        inputs = _chunked.Inputs(x, w, b, t)
        for loss_math in (Rows(), Coupled()):
            got, ref = (_chunked.run_loss(inputs, _chunked.ChunkPlan(tf, -100, 10, impl), loss_math,
                                          (True, True, True))
                        for impl in ("triton", "cpp"))
            for g, r in zip([*got[:3], *got[3]], [*ref[:3], *ref[3]]):
                torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)

    @pytest.mark.parametrize("bad,match", [
        (lambda z, t, r: (z[0], t, r), "logits must be a 2-D"),
        (lambda z, t, r: (z.long(), t, r), "logits must be float32"),
        (lambda z, t, r: (z.T, t[:1].repeat(31), r), "logits must be contiguous"),
        (lambda z, t, r: (z[:, :0], t, r), "V >= 1"),
        (lambda z, t, r: (z, t.int(), r), "targets must be an int64 tensor of shape"),
        (lambda z, t, r: (z, t[:2], r), "targets must be an int64 tensor of shape"),
        (lambda z, t, r: (z, t, r.float()), "lse must be a contiguous float64"),
        (lambda z, t, r: (z, t, r[:2]), "lse must be a contiguous float64"),
    ])
    def test_bad_input(bad, match):
        z, t, a, e = _chunk(4, 31, torch.float32)
        zz, tt, lse = bad(z, t, torch.zeros(4, dtype=torch.float64))
        with pytest.raises((ValueError, TypeError), match=match):
            _triton.logits_grad_(zz, tt, lse, torch.zeros(lse.shape[0]), a[:lse.shape[0]],
                                 e[:lse.shape[0]], 1.0, 0.0, 1.0, -100)
        if "lse" not in match:
            with pytest.raises((ValueError, TypeError), match=match):
                _triton.logits_stats(zz, tt, 1.0, 0.0, 1.0, -100)
        with pytest.raises(ValueError, match="grad_entropy must be"):
            _triton.logits_grad_(z, t, a.double(), a, a, e.double(), 1.0, 0.0, 1.0, -100)
