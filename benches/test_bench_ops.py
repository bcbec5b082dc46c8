"""pytest-benchmark suites: op x provider x mode at the tiny and small presets.

    pytest benches/ --benchmark-only
    RLFUSE_BENCH_SHAPES=tiny pytest benches/ --benchmark-only -k "policy_loss and full"
    RLFUSE_BENCH_DTYPE=bf16 RLFUSE_BENCH_ROUNDS=3 pytest benches/ --benchmark-only
The inputs come from the same setups as `rlfuse bench` (`cases.build_case`). Each provider must
pass the correctness guard on a slice before it is timed; providers that cannot run here (an
implementation for another device, a peer not installed) are skipped with the reason. Memory is
the CLI's job (a fresh subprocess per provider), not this suite's.
"""
import os

import pytest
import torch

from rlfuse.benches import cases, measure, providers

SHAPES = [s for s in os.environ.get("RLFUSE_BENCH_SHAPES", "tiny,small").split(",") if s]
DTYPE = os.environ.get("RLFUSE_BENCH_DTYPE", "fp32")
ROUNDS = int(os.environ.get("RLFUSE_BENCH_ROUNDS", "5"))
DEVICE = torch.device("cpu")

PARAMS = [pytest.param(shape, op, name, mode, id=f"{shape}-{op}-{name}-{mode}")
          for shape in SHAPES for op, spec in cases.OPS.items()
          for name in providers.PROVIDERS[op] for mode in spec.modes]

_cache: dict = {}


def _setup(shape: str, op: str):
    """(case, guard slice, reference outputs on the slice), one (shape, op) held at a time."""
    key = (shape, op)
    if key not in _cache:
        _cache.clear()
        case = cases.build_case(op, cases.get_shape(shape), cases.get_dtype(DTYPE), 0, DEVICE)
        small = cases.check_case(case)
        _cache[key] = (case, small, measure.reference_outputs(small), {})
    return _cache[key]


@pytest.mark.parametrize("shape,op,provider,mode", PARAMS)
def test_op(benchmark, shape, op, provider, mode):
    why = cases.op_unavailable(cases.OPS[op])
    if why:
        pytest.skip(why)
    p = providers.get_provider(op, provider)
    why = p.unavailable(DEVICE)
    if why:
        pytest.skip(why)
    case, small, expected, checked = _setup(shape, op)
    if p.run is not None:
        if provider not in checked:
            ref = providers.get_provider(op, cases.OPS[op].reference)
            checked[provider] = measure.check(small, p, ref, expected)
        res = checked[provider]
        assert res.ok, f"{provider} disagrees with the reference: {res.detail}"
    pre, step = measure.make_step(case, p, mode)
    benchmark.extra_info.update(op=op, shape=shape, dtype=DTYPE, mode=mode, provider=provider)
    flops = cases.OPS[op].flops(case.shape, mode)
    if flops:
        benchmark.extra_info["gemm_flops"] = flops
    benchmark.pedantic(step, setup=pre, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    case.zero_grad()
