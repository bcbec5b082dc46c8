"""The decode kernel (`rlfuse.decode_linear`, csrc/cpu/decode.cpp) against fp64, and where it runs."""
import pytest
import torch

import rlfuse
from rlfuse._backend import cpp_ext
from rlfuse.decode import FLOAT_MAX_ROWS, INT8_MAX_ROWS, decode_rows

pytestmark = pytest.mark.skipif(cpp_ext() is None, reason="C++ extension not built")


def _weight(dtype, n, k, peaked):
    w = torch.randn(n, k, dtype=torch.float64)
    if peaked:  # one large weight per row: the sum is dominated by a single term
        w[torch.arange(n), torch.randint(0, k, (n,))] = 1e3
    if dtype == torch.int8:
        scale = w.abs().amax(1) / 127
        return torch.round(w / scale[:, None]).to(torch.int8), scale.float()
    return w.to(dtype), None


# K: below one vector, odd, and past several; N: below, at and past the 4-row groups; M: below,
# at and past the 8-row blocks (every tail case)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 7), (5, 31), (13, 123), (8, 507)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 7, 8, 9, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_matches_fp64(dtype, n, k, m, bias):
    torch.manual_seed(n * 1000 + k * 10 + m)
    for peaked in (False, True):
        w, scale = _weight(dtype, n, k, peaked)
        x = torch.randn(m, k)
        b = torch.randn(n) if bias else None
        got = rlfuse.decode_linear(x, w, b, scale)
        exact = w.double() if scale is None else w.double() * scale.double()[:, None]
        want = x.double() @ exact.t() + (b.double() if bias else 0)
        # PyTorch's own fp32 product of the same (exactly converted) weight
        torch_y = torch.nn.functional.linear(x, exact.float(), b)
        torch_err = (torch_y.double() - want).abs().max().item()
        # plus fp32 accumulation of k terms, per output relative to its sum of |terms| (the
        # largest seen is 0.6 of this, on this and PyTorch's side alike)
        terms = x.double().abs() @ exact.abs().t() + (b.double().abs() if bias else 0)
        atol = 2 * k ** 0.5 * torch.finfo(torch.float32).eps * terms
        assert got.dtype == torch.float32 and got.shape == (m, n)
        assert ((got.double() - want).abs() <= 2 * torch_err + atol).all()


def test_decode_linear_keeps_leading_dims_and_dtype():
    x = torch.randn(2, 3, 40).bfloat16()
    w = torch.randn(6, 40).bfloat16()
    y = rlfuse.decode_linear(x, w)
    assert y.shape == (2, 3, 6) and y.dtype == torch.bfloat16
    want = x.double() @ w.double().t()
    assert (y.double() - want).abs().max() <= 2e-2 * want.abs().max()  # bf16 rounding of y
    assert rlfuse.decode_linear(x, w, out_dtype=torch.float32).dtype == torch.float32


def test_decode_rows_decides_where_the_kernel_runs():
    w, q = torch.randn(4, 8), torch.zeros(4, 8, dtype=torch.int8)
    assert decode_rows(FLOAT_MAX_ROWS, w) and not decode_rows(FLOAT_MAX_ROWS + 1, w)
    assert decode_rows(INT8_MAX_ROWS, q) and not decode_rows(INT8_MAX_ROWS + 1, q)
    assert not decode_rows(0, w)
    assert not decode_rows(1, w.half())  # fp16 weights: torch
    x = torch.randn(1, 8, requires_grad=True)
    assert not decode_rows(1, w, x)  # autograd records torch's op
    with torch.no_grad():
        assert decode_rows(1, w, x)
    # past the limit, decode_linear is torch's linear, with its gradient
    big = torch.randn(FLOAT_MAX_ROWS + 1, 8, requires_grad=True)
    rlfuse.decode_linear(big, w).sum().backward()
    assert torch.allclose(big.grad, w.sum(0).expand_as(big))


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 8).double(), torch.randn(3, 8)), "x must be a contiguous 2-D CPU float32"),
    ((torch.randn(2, 8), torch.randn(3, 8).half()), "w must be a contiguous 2-D CPU float32"),
    ((torch.randn(2, 8), torch.randn(3, 7)), "same in_features"),
    ((torch.randn(2, 8), torch.zeros(3, 8, dtype=torch.int8)), "scale"),
    ((torch.randn(2, 8), torch.randn(3, 8), torch.ones(3)), "scale"),
    ((torch.randn(2, 8), torch.randn(3, 8), None, torch.ones(4)), "bias must be"),
])
def test_decode_linear_kernel_names_the_bad_argument(args, match):
    with pytest.raises(RuntimeError, match=match):
        cpp_ext().decode_linear(*args, *([None] * (4 - len(args))))


@pytest.mark.parametrize("value,ok", [("off", True), ("maybe", False)])
def test_rlfuse_decode_environment_variable(value, ok):
    import os
    import subprocess
    import sys

    code = "import torch; from rlfuse.decode import decode_rows; print(decode_rows(1, torch.ones(2, 2)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "RLFUSE_DECODE": value})
    if ok:
        assert r.returncode == 0 and r.stdout.strip() == "False"
    else:
        assert r.returncode != 0 and "RLFUSE_DECODE must be one of ('auto', 'off')" in r.stderr
