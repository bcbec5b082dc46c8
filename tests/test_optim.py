"""bf16 training: the stochastic-rounding AdamW against fp32 AdamW, and every trainer end to end
with model.dtype=bfloat16 (tiny sizes: a bf16 GEMM is slow on a CPU without native bf16)."""
import dataclasses
import functools
import math

import pytest
import torch

from rlfuse.engine import trainer_for
from rlfuse.engine.config import PPOConfig
from rlfuse.engine.optim import StochasticRoundingAdamW, make_optimizer, round_stochastic_

from test_engine_trainers import TINY, make_cfg  # the shared tiny-run config


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    gen = torch.Generator().manual_seed(0)
    lo = torch.tensor(1.0)
    hi = torch.nextafter(lo.bfloat16(), torch.tensor(2.0, dtype=torch.bfloat16)).float()
    x = lo + 0.3 * (hi - lo)                    # 30% of the way to the next bf16 value
    out = torch.empty(200_000, dtype=torch.bfloat16)
    round_stochastic_(out, x.expand(out.shape).clone(), gen)
    assert set(out.float().unique().tolist()) == {lo.item(), hi.item()}
    frac_up = (out.float() == hi).double().mean().item()
    assert abs(frac_up - 0.3) < 4 * (0.3 * 0.7 / out.numel()) ** 0.5
    neg = torch.empty(200_000, dtype=torch.bfloat16)  # the sign does not bias it
    round_stochastic_(neg, (-x).expand(neg.shape).clone(), gen)
    assert abs(neg.double().mean().item() + x.item()) < 4 * (hi - lo).item() / out.numel() ** 0.5


@pytest.fixture(params=["kernel", "torch ops"])
def sr_path(request, monkeypatch):
    """StochasticRoundingAdamW's two paths: rlfuse's CPU kernel, and the torch ops it replaces
    (used where the extension is missing, and on CUDA)."""
    from rlfuse._backend import cpp_ext

    if request.param == "torch ops":
        monkeypatch.setattr("rlfuse.engine.optim.cpp_ext", lambda: None)
    elif cpp_ext() is None:
        pytest.skip("the C++ extension is not built")
    return request.param


def _run(opt_cls_or_dtype, steps, lr, grad_fn, dtype):
    w = torch.full((4096,), 1.0, dtype=dtype, requires_grad=True)
    opt = (torch.optim.AdamW([w], lr=lr, weight_decay=0.0) if opt_cls_or_dtype == "torch"
           else StochasticRoundingAdamW([w], lr=lr, seed=1))
    for k in range(steps):
        w.grad = grad_fn(k).to(dtype).expand_as(w).clone()
        opt.step()
    return w.detach().double()


def test_small_updates_add_up_where_nearest_rounding_loses_them(sr_path):
    # Adam's step is ~lr = 1e-4 a step, 1/80 of bf16's spacing at 1.0: nearest rounding drops it.
    grad = lambda k: torch.tensor(1.0 + 0.1 * (k % 3))  # noqa: E731
    fp32 = _run("torch", 200, 1e-4, grad, torch.float32)
    nearest = _run("torch", 200, 1e-4, grad, torch.bfloat16)
    ours = _run("sr", 200, 1e-4, grad, torch.bfloat16)
    assert (nearest == 1.0).all()  # why the recipe exists: plain bf16 AdamW never moves
    moved = 1.0 - fp32.mean().item()
    assert moved == pytest.approx(0.02, rel=0.05)
    # Unbiased: the mean over 4096 weights follows fp32 to a small share of the distance moved.
    assert abs(ours.mean().item() - fp32.mean().item()) < 0.02 * moved


def test_matches_fp32_adamw_on_a_regression(sr_path):
    torch.manual_seed(0)
    x, y = torch.randn(256, 32), torch.randn(256, 1)

    def fit(dtype, opt_of):
        torch.manual_seed(1)
        lin = torch.nn.Linear(32, 1).to(dtype)
        opt = opt_of(list(lin.parameters()))
        for _ in range(300):
            loss = ((lin(x.to(dtype)).float() - y) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        return ((lin(x.to(dtype)).float() - y) ** 2).mean().item()

    fp32 = fit(torch.float32, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01))
    bf16 = fit(torch.bfloat16, lambda p: make_optimizer(p, 1e-2, (0.9, 0.999), 0.01, seed=0))
    start = (y ** 2).mean().item()
    assert bf16 < start - 0.9 * (start - fp32)  # 90% of fp32's improvement at least


def test_state_dict_resumes_bit_for_bit(sr_path):
    def make():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(3000, dtype=torch.bfloat16))
        return w, StochasticRoundingAdamW([w], lr=1e-3, weight_decay=0.1, seed=5)

    def steps(w, opt, ks):
        for k in ks:
            w.grad = torch.sin(torch.arange(3000.0) + k).bfloat16()
            opt.step()

    w1, o1 = make()
    steps(w1, o1, range(6))
    w2, o2 = make()
    steps(w2, o2, range(3))
    saved_w, saved = w2.detach().clone(), o2.state_dict()
    w3, o3 = make()
    with torch.no_grad():
        w3.copy_(saved_w)
    o3.load_state_dict(saved)
    steps(w3, o3, range(3, 6))
    assert torch.equal(w1, w3)
    assert all(o3.state[w3][k].dtype == torch.bfloat16 for k in ("exp_avg", "exp_avg_sq"))


def _one_step(make, threads: int, seed: int) -> torch.Tensor:
    """The weights after one step of make(seed)'s (parameter, optimizer), built from torch seed 1
    and stepped on `threads` threads with torch seed `seed`."""
    torch.manual_seed(1)
    q, opt = make(seed)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        opt.step()
    finally:
        torch.set_num_threads(before)
    return q.detach().clone()


def test_bf16_kernel_step_is_the_fp32_step_rounded_to_a_neighbour():
    """The kernel's weights and moments are one fp32 AdamW step from the same bf16 state (the
    torch ops' formulas), each rounded to a bf16 neighbour, the weights without bias; the
    noise follows the optimizer's generator, not the thread count."""
    from rlfuse._backend import cpp_ext

    if cpp_ext() is None:
        pytest.skip("the C++ extension is not built")
    n, lr, (b1, b2), wd, eps = 40_000 + 37, 1e-3, (0.9, 0.999), 0.1, 1e-8
    torch.manual_seed(0)
    w = torch.nn.Parameter((torch.randn(n) * 0.02).bfloat16())
    opt = StochasticRoundingAdamW([w], lr=lr, betas=(b1, b2), weight_decay=wd, eps=eps, seed=3)
    for step in range(1, 4):
        w.grad = (torch.randn(n) * torch.rand(n) ** 4).bfloat16()
        st = opt.state[w]
        w32, g32 = w.detach().float(), w.grad.float()
        m32, v32 = ((st[k].float() for k in ("exp_avg", "exp_avg_sq")) if st
                    else (torch.zeros(n), torch.zeros(n)))
        m32 = m32.lerp(g32, 1 - b1)
        v32 = v32 * b2 + (1 - b2) * g32 * g32
        w32 = w32 * (1 - lr * wd) - lr / (1 - b1 ** step) * m32 / (
            v32.sqrt() / (1 - b2 ** step) ** 0.5 + eps)
        opt.step()
        for mine, ref in ((w.detach(), w32), (st["exp_avg"], m32), (st["exp_avg_sq"], v32)):
            spacing = torch.ldexp(torch.ones(n), torch.frexp(ref)[1] - 8)  # bf16's, at |ref|
            assert bool(((mine.float() - ref).abs() <= spacing * 1.001).all())
        err = (w.detach().float() - w32) / torch.ldexp(torch.ones(n), torch.frexp(w32)[1] - 8)
        assert abs(err.mean()) < 5 * 0.5 / n ** 0.5, err.mean()  # |err| < 1 per weight

    def make(seed):
        q = torch.nn.Parameter(torch.randn(100_000).bfloat16())  # blocks for 2 threads
        q.grad = torch.randn(100_000).bfloat16()
        return q, StochasticRoundingAdamW([q], lr=1e-3, seed=seed)

    one_step = functools.partial(_one_step, make)
    assert torch.equal(one_step(1, 0), one_step(2, 0))
    assert not torch.equal(one_step(1, 0), one_step(1, 1))


def test_the_dtype_picks_the_optimizer():
    fp32 = [torch.nn.Parameter(torch.ones(2))]
    assert type(make_optimizer(fp32, 1e-3, (0.9, 0.99), 0.0, 0)) is torch.optim.AdamW
    mixed = fp32 + [torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))]
    assert isinstance(make_optimizer(mixed, 1e-3, (0.9, 0.99), 0.0, 0), StochasticRoundingAdamW)


# ----------------------------------------------------------------------------- engine in bf16
@pytest.mark.parametrize("algo", ["sft", "grpo", "dpo", "ppo"])
def test_every_trainer_trains_in_bf16_and_resumes(tmp_path, algo):
    base = make_cfg(tmp_path, "sft")  # writes the data files
    kw = dict(algo=algo, steps=2, model=dataclasses.replace(TINY, dtype="bfloat16"),
              keep_checkpoints=2)
    if algo == "ppo":  # GRPO's prompts and rewards (a length penalty gives a random model signal)
        kw["ppo"] = PPOConfig(data=base.grpo.data, rollout=base.grpo.rollout, epochs=1)
    cfg = dataclasses.replace(base, **kw)
    trainer = trainer_for(algo)(cfg)
    start = [p.detach().clone() for p in trainer.model.parameters()]
    assert all(p.dtype == torch.bfloat16 for p in start)
    assert isinstance(trainer.opt, StochasticRoundingAdamW)
    rows = trainer.fit(plot=False)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] == r["loss"] for r in rows)  # finite, not NaN
    after = list(trainer.model.parameters())
    assert all(bool(p.isfinite().all()) for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(start, after))
    # a bf16 run resumes with its bf16 moments and its rounding generator
    resumed = trainer_for(algo)(dataclasses.replace(cfg, steps=3, resume=True))
    resumed.resume()
    assert resumed.step == 2 and isinstance(resumed.opt, StochasticRoundingAdamW)
    assert resumed.opt.gen.get_state().equal(trainer.opt.gen.get_state())
    assert all(torch.equal(a, b) for a, b in zip(after, resumed.model.parameters()))
    moments = [s["exp_avg_sq"] for p, s in resumed.opt.state.items() if p.dtype == torch.bfloat16]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)


# ----------------------------------------------------------------------------- step in backward
def _in_backward_cfg(tmp_path, algo, on, **kw):
    base = make_cfg(tmp_path / ("on" if on else "off"), "sft")  # writes the data files
    if algo == "ppo":
        kw["ppo"] = PPOConfig(data=base.grpo.data, rollout=base.grpo.rollout, epochs=2)
    optim = dataclasses.replace(base.optim, max_grad_norm=0.0, step_in_backward=on)
    return dataclasses.replace(base, algo=algo, steps=3, keep_checkpoints=0, optim=optim, **kw)


@pytest.mark.parametrize("algo", ["sft", "grpo", "dpo", "ppo"])
def test_step_in_backward_trains_the_same_weights_without_a_gradient_buffer(tmp_path, algo):
    runs = {}
    for on in (False, True):
        t = trainer_for(algo)(_in_backward_cfg(tmp_path, algo, on))
        alive = []  # gradients held right after each parameter's update (hooks run in order)
        if on:
            for p in t.params:
                p.register_post_accumulate_grad_hook(
                    lambda _: alive.append(sum(q.grad is not None for q in t.params)))
        rows = t.fit(plot=False)
        assert all(p.grad is None for p in t.params)
        runs[on] = (rows, [p.detach().clone() for p in t.params], alive)
    (rows_off, w_off, _), (rows_on, w_on, alive) = runs[False], runs[True]
    assert alive and len(alive) % len(w_on) == 0 and max(alive) == 0  # every step, every param
    for a, b in zip(w_off, w_on):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)  # AdamW is per-parameter
    for r_off, r_on in zip(rows_off, rows_on):
        assert r_on["grad_norm"] == pytest.approx(r_off["grad_norm"], rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(w_on, trainer_for(algo)(
        _in_backward_cfg(tmp_path / "fresh", algo, True)).params))  # it did train


def test_step_in_backward_skips_a_nonfinite_gradient(tmp_path, monkeypatch):
    from rlfuse.engine import sft

    real, calls = sft.nll_loss, [0]

    def nll(model, batch):
        calls[0] += 1
        loss, n = real(model, batch)
        return (loss * math.nan if calls[0] == 2 else loss), n
    monkeypatch.setattr(sft, "nll_loss", nll)
    t = trainer_for("sft")(_in_backward_cfg(tmp_path, "sft", True))
    weights, step = [], t.train_step
    t.train_step = lambda: (weights.append([p.detach().clone() for p in t.params]), step())[1]
    rows = t.fit(plot=False)
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))  # step 2 skipped
    assert rows[1]["grad_norm"] is None and rows[2]["grad_norm"] is not None
    with open(tmp_path / "on" / "run" / "alerts.jsonl") as f:
        assert "non-finite parameters' updates skipped" in f.read()


def test_step_in_backward_needs_no_clipping():
    from rlfuse.engine.config import ConfigError, OptimConfig

    with pytest.raises(ConfigError, match="'optim.step_in_backward' needs optim.max_grad_norm=0"):
        OptimConfig(step_in_backward=True)


# ----------------------------------------------------------------------------- 8-bit states
def test_int8_states_follow_fp32_adamw_and_are_8_bit():
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    x, y = torch.randn(512, 64), torch.randn(512, 128)

    def fit(states, dtype):
        torch.manual_seed(1)
        lin = torch.nn.Linear(64, 128, bias=False).to(dtype)  # 8192 weights: quantized moments
        opt = make_optimizer(list(lin.parameters()), 1e-2, (0.9, 0.99), 0.01, 0, states)
        for _ in range(150):
            ((lin(x.to(dtype)).float() - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        return lin, opt, ((lin(x.to(dtype)).float() - y) ** 2).mean().item()

    _, _, fp32 = fit("param", torch.float32)
    start = (y ** 2).mean().item()
    for dtype in (torch.float32, torch.bfloat16):
        lin, opt, loss = fit("int8", dtype)
        assert loss < start - 0.95 * (start - fp32), dtype
        moments = opt.state[lin.weight]
        for k in ("exp_avg", "exp_avg_sq"):  # one byte a weight, plus a scale per 256
            assert moments[k].codes.dtype == torch.uint8 and moments[k].codes.numel() == 8192
            assert moments[k].scale.numel() == 8192 // 256


def _torchao_step(opt, ref, g, b1=0.9, b2=0.999, wd=0.01):
    """torchao's AdamW8bit step of `ref` (fp32), run eagerly on `opt`'s (an AdamW8bit) states."""
    from torchao.optim.adam import single_param_adam

    st = opt.state[ref]
    if not st:
        st.update(step=torch.tensor(0.0), exp_avg=opt._new_buffer(ref, True),
                  exp_avg_sq=opt._new_buffer(ref, False))
    st["step"] += 1
    with torch.no_grad():
        single_param_adam(ref.detach(), g, st["step"], st["exp_avg"], st["exp_avg_sq"], None,
                          opt.param_groups[0]["lr"], b1, b2, wd, 1e-8, True, False)
    return st


def _same_moments(mine, theirs):
    """The kernel's moments are torchao's: the same scales and codes, but for a rare code one
    off where the two sides' fp32 roundings could differ at a boundary (none did in 6.6 M on
    an AVX2 EPYC); plain fp32 moments for tensors too small to quantize. Then torchao's
    continue from the kernel's."""
    for k in ("exp_avg", "exp_avg_sq"):
        a, b = mine[k], theirs[k]
        if not hasattr(b, "codes"):
            torch.testing.assert_close(a, b)
            continue
        torch.testing.assert_close(a.scale, b.scale, rtol=1e-6, atol=0)
        off = (a.codes.int() - b.codes.int()).abs()
        assert (off > 0).float().mean() < 1e-4 and off.max() <= 1, k
        b.codes.copy_(a.codes)
        b.scale.copy_(a.scale)


def _int8_kernel_or_skip():
    pytest.importorskip("torchao")
    from rlfuse._backend import cpp_ext

    if cpp_ext() is None:
        pytest.skip("the C++ extension is not built")


def _grads(shape, steps):
    """Rows of very different sizes; one 100x step."""
    for step in range(steps):
        yield torch.randn(shape) * torch.rand(shape[0], 1) ** 4 * (100.0 if step == 3 else 1.0)


def test_int8_states_kernel_takes_torchaos_step():
    """AdamW8bitCPU (fp32 CPU parameters) against torchao's own step run eagerly, one step at a
    time from the same states: the same parameters, scales and codes."""
    _int8_kernel_or_skip()
    from torchao.optim import AdamW8bit

    torch.manual_seed(0)
    for shape in [(37, 3 * 256), (4096, 3), (5, 9)]:  # blocks across rows; too small to quantize
        p = torch.nn.Parameter(torch.randn(shape) * 0.02)
        ref = torch.nn.Parameter(p.detach().clone())
        opt = make_optimizer([p], 1e-2, (0.9, 0.999), 0.01, 0, "int8")
        torchao = AdamW8bit([ref], lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)
        assert type(opt).__name__ == "AdamW8bitCPU"
        for g in _grads(shape, 6):
            p.grad = g.clone()
            opt.step()
            st = _torchao_step(torchao, ref, g)
            torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-5, atol=1e-7)
            _same_moments(opt.state[p], st)
            ref.data.copy_(p.detach())


def test_int8_states_kernel_rounds_bf16_weights_stochastically():
    """bf16 parameters: the kernel's moments are torchao's fp32 step's from the same states, and
    each weight is that step's fp32 result rounded to one of its two bf16 neighbours, up with
    probability given by the distance (unbiased); the noise follows torch's seed, not the
    thread count. Tensors too small to quantize take torchao's step, also rounded."""
    _int8_kernel_or_skip()
    from torchao.optim import AdamW8bit

    shape = (37, 3 * 256)
    torch.manual_seed(0)
    p = torch.nn.Parameter((torch.randn(shape) * 0.02).bfloat16())
    ref = torch.nn.Parameter(p.detach().float())
    opt = make_optimizer([p], 1e-2, (0.9, 0.999), 0.01, 0, "int8")
    torchao = AdamW8bit([ref], lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)
    assert type(opt).__name__ == "AdamW8bitCPU" and opt.bf16_stochastic_round
    ups, fracs = [], []
    for g in _grads(shape, 6):
        p.grad = g.bfloat16()
        opt.step()
        st = _torchao_step(torchao, ref, p.grad.float())
        bits = ref.detach().view(torch.int32)
        down = bits & -65536  # toward zero, and the neighbour away from it
        mine = p.detach().float().view(torch.int32)
        assert bool(((mine == down) | (mine == down + 65536)).all())
        ups.append((mine != down).float().flatten())
        fracs.append((bits & 65535).float().flatten() / 65536)
        _same_moments(opt.state[p], st)
        ref.data.copy_(p.detach().float())
    up, frac = torch.cat(ups), torch.cat(fracs)
    sigma = (frac * (1 - frac)).sum().sqrt() / up.numel()
    assert abs(up.mean() - frac.mean()) < 5 * sigma, (up.mean(), frac.mean(), sigma)

    def make(seed):  # the noise's seed is drawn from torch's generator at the step
        q = torch.nn.Parameter((torch.randn(shape) * 0.02).bfloat16())
        q.grad = torch.randn(shape).bfloat16()
        return q, make_optimizer([q], 1e-2, (0.9, 0.999), 0.0, 0, "int8")

    one_step = functools.partial(_one_step, make)
    assert torch.equal(one_step(1, 2), one_step(2, 2))
    assert not torch.equal(one_step(1, 2), one_step(1, 3))
    small = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    o = make_optimizer([small], 0.1, (0.9, 0.99), 0.0, 0, "int8")  # 1 -> 0.9
    small.grad = torch.ones(8, dtype=torch.bfloat16)
    o.step()
    assert type(o).__name__ == "AdamW8bitCPU" and bool((small.detach() < 1).all())


def test_code_table_gives_torchaos_nearest_code_for_every_value():
    """The table's code (one entry and one comparison) is torchao's quantize_8bit_with_qmap at
    every rounding threshold, the floats either side of it, each code's value, the specials,
    and random values; and no bucket holds two thresholds (what makes one comparison enough)."""
    pytest.importorskip("torchao")
    from torchao.optim.quant_utils import quantize_8bit_with_qmap
    from torchao.optim.subclass_8bit import get_qmap_signed, get_qmap_unsigned

    from rlfuse.engine.optim import CODE_TABLE_BITS, code_table, rounding_thresholds

    torch.manual_seed(0)
    for qmap in (torch.tensor(get_qmap_signed()), torch.tensor(get_qmap_unsigned())):
        table, t = code_table(qmap), rounding_thresholds(qmap)
        assert table.shape == (1 << CODE_TABLE_BITS, 2) and bool((t[1:] > t[:-1]).all())
        inf = torch.full_like(t, math.inf)
        x = torch.cat([t, torch.nextafter(t, -inf), torch.nextafter(t, inf), qmap,
                       torch.rand(200_000) * 2 - 1,
                       torch.rand(20_000) ** 8 * torch.sign(torch.randn(20_000)),
                       torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 3.0, -3.0,
                                     math.inf, -math.inf, math.nan])])
        row = table[(x.view(torch.int32).long() & 0xFFFFFFFF) >> (32 - CODE_TABLE_BITS)]
        mine = (row[:, 0] + (x >= row[:, 1]).float()).to(torch.uint8)
        assert torch.equal(mine, quantize_8bit_with_qmap(x, qmap))
    with pytest.raises(ValueError, match="rounding thresholds"):  # too coarse: two in a bucket
        code_table(torch.tensor(get_qmap_unsigned()), k=12)


def test_int8_states_train_and_resume(tmp_path):
    pytest.importorskip("torchao")
    base = make_cfg(tmp_path, "sft")
    optim = dataclasses.replace(base.optim, states="int8")
    model = dataclasses.replace(TINY, hidden_size=64, intermediate_size=128)  # 8192-weight MLPs
    cfg = dataclasses.replace(base, algo="grpo", steps=2, keep_checkpoints=2, optim=optim,
                              model=model)
    trainer = trainer_for("grpo")(cfg)
    rows = trainer.fit(plot=False)
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    codes = [s["exp_avg"].codes for s in trainer.opt.state.values() if hasattr(s["exp_avg"], "codes")]
    assert codes and all(c.dtype == torch.uint8 for c in codes)
    resumed = trainer_for("grpo")(dataclasses.replace(cfg, steps=3, resume=True))
    resumed.resume()
    assert resumed.step == 2
    for p, q in zip(trainer.opt.state, resumed.opt.state):  # the 8-bit moments came back
        a, b = trainer.opt.state[p]["exp_avg"], resumed.opt.state[q]["exp_avg"]
        assert torch.equal(a.dequantize() if hasattr(a, "codes") else a,
                           b.dequantize() if hasattr(b, "codes") else b)
    assert resumed.fit(plot=False)[-1]["step"] == 3


def test_int8_states_refused_where_unsupported(tmp_path, monkeypatch):
    from rlfuse.engine.config import ConfigError, OptimConfig
    from rlfuse.engine.trainer import _check_distributed

    with pytest.raises(ConfigError, match="'optim.states'"):
        OptimConfig(states="int4")
    cfg = make_cfg(tmp_path, "sft")
    with pytest.raises(ConfigError, match="'optim.states': int8 states are not supported under"):
        _check_distributed(dataclasses.replace(cfg, optim=OptimConfig(states="int8")))
    monkeypatch.setitem(__import__("sys").modules, "torchao.optim", None)  # not installed
    with pytest.raises(ConfigError, match="'optim.states': int8 needs torchao"):
        make_optimizer([torch.nn.Parameter(torch.ones(2))], 1e-3, (0.9, 0.99), 0.0, 0, "int8")


@pytest.mark.parametrize("native", [False, True])
def test_bf16_model_on_a_cpu_without_bf16_units_warns(native, monkeypatch, capsys):
    """The decision follows the CPU's flags (mocked here): a warning only where bf16 is not
    native, and never for float32."""
    from rlfuse.engine import model as engine_model

    monkeypatch.setattr(engine_model, "cpu_native_lowp", lambda dtype: native)
    for dtype, warns in (("bfloat16", not native), ("float32", False)):
        cfg = dataclasses.replace(TINY, dtype=dtype)
        model, _ = engine_model.load_policy(cfg, torch.device("cpu"))
        assert next(model.parameters()).dtype == getattr(torch, dtype)
        err = capsys.readouterr().err
        assert ("model.dtype=bfloat16 on a CPU without bfloat16 matmul units" in err) == warns
