"""Property-based tests (hypothesis) of every op against an fp64 reference.

Each case draws shapes (odd vocabularies 31 / 123 / 507, tiny ones), dtype (fp32 / bf16), the
logit transform, masks, ignore_index, chunk size, the impl, the driver's pass order (rows, or
vocabulary slabs of 1 / 7 / 64 / 1000 rows) and the kind of rows (normal, peaked: one logit ~30
above the rest, flat, or a +1e3 logit offset), then holds values and gradients to
the project's rule: error of the impl <= 2 x error of PyTorch in the same dtype + atol x scale.
The LM-head ops are checked on the impls that run here (reference, cpp); the Triton epilogues
are held to the same inputs in tests/test_triton.py, under the interpreter. Advantage estimators
are plain PyTorch: they are checked against independent fp64 loops (1e-5 + 1e-4 x scale).

The default profile runs a few hundred derandomized cases (seconds); `make fuzz`
(RLFUSE_FUZZ=1) runs more than 10,000 random ones and prints the worst error of each op and
quantity, as a share of what the rule allows, at the end of the run.
"""
import contextlib
import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import rlfuse  # noqa: E402
from rlfuse import (LogitTransform, _backend, PolicyLossConfig, PreferenceLossConfig,  # noqa: E402
                    gae, group_advantages, policy, policy_loss, preference, preference_loss)
from rlfuse.logprobs import linear_logprobs_reference  # noqa: E402

from conftest import CHUNKED_IMPLS  # noqa: E402

FUZZ = os.environ.get("RLFUSE_FUZZ") == "1"
for name, derandomize in (("default", True), ("fuzz", False)):
    settings.register_profile(name, deadline=None, derandomize=derandomize, database=None,
                              suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.filter_too_much])
settings.load_profile("fuzz" if FUZZ else "default")


def examples(default: int, fuzz: int):
    return settings(max_examples=fuzz if FUZZ else default)


IMPLS = ["reference"] + CHUNKED_IMPLS
DTYPES = [torch.float32, torch.bfloat16]
ATOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}
ROWS = ["normal", "peaked", "flat", "offset"]
SLABS = [None, 1, 7, 64, 1000]  # the driver's pass order: None rows, else rows per slab

# (op, quantity) -> (share of the allowed error, error, allowed, case): the worst seen.
WORST: dict = {}


def report() -> str:
    lines = [f"{'op[impl]':<26}{'quantity':<10}{'worst err':>11}{'allowed':>11}{'share':>8}  case"]
    for (op, q), (share, err, allowed, case) in sorted(WORST.items()):
        lines.append(f"{op:<26}{q:<10}{err:>11.2e}{allowed:>11.2e}{share:>8.3f}  {case}")
    return "\n".join(lines)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads only add spin-up cost
    yield
    torch.set_num_threads(n)


@contextlib.contextmanager
def _pass_order(slab):
    before = _backend.vocab_slab_mode()
    _backend.set_vocab_slab("off" if slab is None else slab)
    try:
        yield
    finally:
        _backend.set_vocab_slab(before)


def _allowed(naive, want, atol, rounding, scale=0.0):
    """The rule's allowance: 2 x PyTorch's error in the dtype + atol x max(1, |want|, scale),
    plus the logits' rounding (`_head_allowances`), times the natural scale for a gradient."""
    want = want.double()
    budget = (naive.double() - want).abs().max().item()
    # PyTorch's own computation in this dtype overflowed: no budget to hold the impl to
    assume(math.isfinite(budget))
    return (2 * budget + atol * max(1.0, want.abs().max().item(), scale)
            + rounding * (scale or 1.0))


def _check(op, case, names, got, naive, truth, atol, rounding, scale=None, carried=None):
    """err(impl) <= _allowed(...) + carried, per quantity: `scale` is a gradient's natural
    magnitude (`_head_allowances`), `carried` the allowance a loss inherits from the per-token
    values it is computed from; both optional per-quantity dicts."""
    scale, carried = scale or {}, carried or {}
    for name, g, n, want in zip(names, got, naive, truth):
        err = (g.double() - want.double()).abs().max().item()
        allowed = _allowed(n, want, atol, rounding, scale.get(name, 0.0)) + carried.get(name, 0.0)
        key = (op, name)
        share = err / allowed
        if key not in WORST or share > WORST[key][0]:
            WORST[key] = (share, err, allowed, case)
        assert err <= allowed, (op, name, err, allowed, case)


def _row_sensitivity(x, w, b, t, tf, ignore_index, dx):
    """(a, e) [N] each: dL/dlogp_n and dL/dentropy_n, from the fp64 reference gradient dx [N, H].

    A row's hidden state reaches every loss only through its log-prob and entropy, so
    dx_n = a_n dlogp_n/dx_n + e_n dentropy_n/dx_n exactly; a least-squares solve per row finds
    (a_n, e_n) (the minimum-norm pair where the two directions coincide)."""
    xs = x.detach().requires_grad_()
    lp, ent = linear_logprobs_reference(xs, w, t, b, tf, ignore_index)
    gl, = torch.autograd.grad(lp.sum(), xs, retain_graph=True)
    ge, = torch.autograd.grad(ent.sum(), xs)
    basis = torch.stack([gl, ge], -1)  # [N, H, 2]
    ae = torch.linalg.lstsq(basis, dx[..., None], driver="gelsd").solution[..., 0]  # [N, 2]
    return ae[:, 0], ae[:, 1]


def _head_allowances(x, w, b, t, tf, ignore_index, a, e):
    """(rounding, scale) of a head op's case, from its fp64 logits z.

    rounding: the error every impl inherits from its fp32 logits, whose GEMM (and bias and
    temperature) round z to ~eps |z| before any softmax; it matters on offset rows, where
    |z| ~ 1e3 / T. scale: the natural magnitudes of dx, dw and db, their sums with every term
    taken absolute, from dL/dz_nv = s [a_n (onehot - p_nv) + e_n dentropy_n/dz_nv] with
    s <= logit_scale/temperature: rounding errs relative to the terms, not to their sum, which can
    cancel to ~0 (V = 1: the exact gradient is 0, while p = 1 is one ulp off in fp32)."""
    z = tf.apply(x @ w.T + (b if b is not None else 0))  # [N, V]
    logz = z.log_softmax(-1)
    p = logz.exp()
    valid = t != ignore_index
    onehot = torch.nn.functional.one_hot(torch.where(valid, t, 0), w.shape[0]) * valid[:, None]
    ent = -(p * logz).sum(-1, keepdim=True)
    g = (a.abs()[:, None] * (onehot + p) + e.abs()[:, None] * p * (logz.abs() + ent))
    g = g * (tf.logit_scale / tf.temperature)  # [N, V]
    rounding = 2 * torch.finfo(torch.float32).eps * z.abs().max().item()
    return rounding, {"dx": (g @ w.abs()).max().item(), "dw": (g.T @ x.abs()).max().item(),
                      "db": g.sum(0).max().item()}


def _loss_allowances(x, w, b, t, tf, ignore_index, dx):
    """(a, e, rounding, scale) of a loss case: the per-row sensitivities from the fp64 gradient
    dx (`_row_sensitivity`), and `_head_allowances` with them."""
    head = (*_f64(x.reshape(-1, x.shape[-1]), w, b), t.reshape(-1), tf, ignore_index)
    a, e = _row_sensitivity(*head, dx.reshape(-1, x.shape[-1]))
    return (a, e, *_head_allowances(*head, a, e))


def _transforms():
    return st.builds(dict, logit_scale=st.sampled_from([1.0, 0.5, 2.0]),
                     final_logit_softcapping=st.sampled_from([None, 3.0, 30.0]),
                     temperature=st.sampled_from([1.0, 0.7, 1.6]))


def _head(gen, lead, h, v, dtype, rows, bias):
    """hidden [*lead, H], weight [V, H], bias [V] (or None) and the peak token of each row."""
    x = torch.randn(*lead, h, generator=gen, dtype=torch.float64)
    w = torch.randn(v, h, generator=gen, dtype=torch.float64) * (2 / h**0.5)
    if rows == "flat":
        w = w * 0.01
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias or rows == "offset" else None
    if rows == "offset":
        b = b + 1e3
    peak = torch.randint(0, v, lead, generator=gen)
    if rows == "peaked":  # z[peak] += 30
        wk = w[peak]  # [*lead, H]
        x = x + 30 * wk / (wk * wk).sum(-1, keepdim=True)
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), peak


def _f64(*tensors):
    return [None if a is None else a.double() for a in tensors]


def _grads(out, leaves, coefs):
    total = sum((o.double() * c).sum() for o, c in zip(out, coefs))
    return list(torch.autograd.grad(total, leaves))


# ----------------------------------------------------------------------------- linear_logprobs
@examples(120, 4000)
@given(n=st.integers(1, 40), h=st.sampled_from([8, 24]), v=st.sampled_from([1, 2, 31, 123, 507]),
       dtype=st.sampled_from(DTYPES), tf=_transforms(), rows=st.sampled_from(ROWS),
       bias=st.booleans(), ignore_index=st.sampled_from([-100, -1, 0]),
       ignore_frac=st.sampled_from([0.0, 0.3, 1.0]), chunk=st.none() | st.integers(1, 48),
       impl=st.sampled_from(IMPLS), slab=st.sampled_from(SLABS), seed=st.integers(0, 2**31 - 1))
def test_linear_logprobs(n, h, v, dtype, tf, rows, bias, ignore_index, ignore_frac, chunk, impl,
                         slab, seed):
    gen = torch.Generator().manual_seed(seed)
    x, w, b, peak = _head(gen, (n,), h, v, dtype, rows, bias)
    t = torch.where(torch.rand(n, generator=gen) < 0.5, peak,
                    torch.randint(0, v, (n,), generator=gen))
    t[torch.rand(n, generator=gen) < ignore_frac] = ignore_index
    coefs = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(2)]
    transform = LogitTransform(**tf)

    def run(fn, cast):
        leaves = [cast(a).detach().requires_grad_() for a in (x, w, b) if a is not None]
        out = fn(leaves[0], leaves[1], leaves[2] if b is not None else None)
        return [*out, *_grads(out, leaves, coefs)]

    def naive(x_, w_, b_):  # PyTorch in the inputs' dtype
        logz = transform.apply(x_ @ w_.T + (b_ if b_ is not None else 0)).log_softmax(-1)
        valid = t != ignore_index
        lp = logz.gather(-1, torch.where(valid, t, 0)[:, None])[:, 0]
        return lp * valid, -(logz.exp() * logz).sum(-1) * valid

    truth = run(lambda x_, w_, b_: linear_logprobs_reference(x_, w_, t, b_, transform,
                                                             ignore_index), lambda a: a.double())
    budget = run(naive, lambda a: a)
    with _pass_order(slab):
        got = run(lambda x_, w_, b_: rlfuse.linear_logprobs(
            x_, w_, t, bias=b_, return_entropy=True, chunk_size=chunk, impl=impl,
            ignore_index=ignore_index, **tf), lambda a: a)
    case = dict(n=n, v=v, dtype=str(dtype)[6:], rows=rows, impl=impl, slab=slab, seed=seed, **tf)
    valid = t != ignore_index
    rounding, scale = _head_allowances(*_f64(x, w, b), t, transform, ignore_index,
                                       coefs[0] * valid, coefs[1] * valid)
    _check(f"linear_logprobs[{impl}]", case, ["logp", "entropy", "dx", "dw", "db"], got, budget, truth,
           ATOL[dtype], rounding, scale=scale)


# ----------------------------------------------------------------------------- policy_loss
@st.composite
def _policy_cfg(draw, impl, t):
    loss_type = draw(st.sampled_from(policy.LOSS_TYPES))
    extra = {}
    if loss_type in policy.CLIPPED:
        extra = draw(st.sampled_from([{}, {"delta": 1.5}, {"dual_clip": 3.0}]))
    beta = draw(st.sampled_from([0.0, 0.04]))
    return PolicyLossConfig(
        loss_type=loss_type, importance_level=draw(st.sampled_from(policy.IMPORTANCE_LEVELS)),
        eps_high=draw(st.sampled_from([None, 0.28])), beta=beta,
        kl_estimator=draw(st.sampled_from(policy.KL_ESTIMATORS)),
        entropy_coef=draw(st.sampled_from([0.0, 0.01])),
        top_entropy_quantile=draw(st.sampled_from([1.0, 1.0, 0.5])),
        rollout_correction=draw(st.sampled_from(policy.ROLLOUT_CORRECTIONS)),
        max_completion_length=t + 2, chunk_size=draw(st.none() | st.integers(1, 40)), impl=impl,
        ignore_index=draw(st.sampled_from([-100, -1])), **extra, **draw(_transforms()))


def _far_from_kinks(cfg, lp, old, valid, ent):
    """The loss is continuous but its gradient jumps where the ratio crosses a clip bound (and
    the top-entropy mask where two entropies swap): fp32 and fp64 may then legitimately land on
    different sides. Such cases are skipped (`assume`), not held to the rule."""
    d = torch.where(valid, lp - old, 0)
    if cfg.importance_level == "sequence":
        d = (d.sum(-1) / valid.sum(-1).clamp(min=1))[:, None].expand_as(d)
    r = torch.exp(d)[valid]
    bounds = [1 - cfg.eps_low, 1 + cfg.eps_high_effective, cfg.delta, cfg.dual_clip]
    far = all(bool(((r - c).abs() > 1e-3 * c).all()) for c in bounds if c is not None)
    if cfg.top_entropy_quantile < 1.0:
        e = ent[valid].sort().values
        far = far and bool((e.diff() > 1e-4).all())
    return far


@examples(100, 3500)
@given(b=st.integers(1, 4), t=st.integers(1, 8), v=st.sampled_from([31, 123, 507]),
       dtype=st.sampled_from(DTYPES), rows=st.sampled_from(ROWS), adv_2d=st.booleans(),
       bias=st.booleans(), data=st.data(), impl=st.sampled_from(IMPLS),
       slab=st.sampled_from(SLABS), seed=st.integers(0, 2**31 - 1))
def test_policy_loss(b, t, v, dtype, rows, adv_2d, bias, data, impl, slab, seed):
    cfg = data.draw(_policy_cfg(impl, t))
    gen = torch.Generator().manual_seed(seed)
    h = 16
    x, w, bb, peak = _head(gen, (b, t), h, v, dtype, rows, bias)
    tg = torch.where(torch.rand(b, t, generator=gen) < 0.5, peak,
                     torch.randint(0, v, (b, t), generator=gen))
    tg[torch.rand(b, t, generator=gen) < 0.15] = cfg.ignore_index
    mask = (torch.rand(b, t, generator=gen) < 0.8).float()
    adv = torch.randn(*((b, t) if adv_2d else (b,)), generator=gen)
    ref_cfg = PolicyLossConfig(**{**cfg.__dict__, "impl": "reference"})
    with torch.no_grad():
        lp64, ent64 = linear_logprobs_reference(x.double(), w.double(), tg,
                                                None if bb is None else bb.double(),
                                                cfg.transform(), cfg.ignore_index)
    noise = lambda s: s * torch.randn(b, t, generator=gen)  # noqa: E731
    old = (lp64 + noise(0.3)).float()
    side = dict(old_logp=old, ref_logp=(lp64 + noise(0.3)).float())
    if cfg.rollout_correction is not None:
        side["rollout_logp"] = old + noise(0.5)
    valid = (mask != 0) & (tg != cfg.ignore_index)
    assume(_far_from_kinks(cfg, lp64, old.double(), valid, ent64))

    def run(c, cast):
        leaves = [cast(a).detach().requires_grad_() for a in (x, w, bb) if a is not None]
        loss, out = policy_loss(leaves[0], leaves[1], tg, mask, adv, bias=bb if bb is None
                                else leaves[2], config=c, **side)
        return [loss, out.logp, out.entropy, *torch.autograd.grad(loss, leaves)]

    truth = run(ref_cfg, lambda a: a.double())
    budget = run(ref_cfg, lambda a: a)
    with _pass_order(slab):
        got = run(cfg, lambda a: a)
    case = dict(b=b, t=t, v=v, dtype=str(dtype)[6:], rows=rows, slab=slab, seed=seed,
                cfg={k: val for k, val in cfg.__dict__.items()
                     if val != PolicyLossConfig.__dataclass_fields__[k].default})
    a, e, rounding, scale = _loss_allowances(x, w, bb, tg, cfg.transform(), cfg.ignore_index,
                                             truth[3])
    # The scalar loss is a function of the per-token log-probs and entropies, each held to its
    # allowance: the loss may carry those allowances through |dL/dlogp| and |dL/dentropy| (one
    # sample of PyTorch's own scalar error can be small by luck: its token errors cancel). CISPO's
    # value also moves through its stop-gradient ratio weight: by |a| (1 + |logp|) per unit of
    # log-prob, where its gradient moves by |a|.
    atol = 4e-3 if dtype == torch.bfloat16 else 2e-5
    if cfg.loss_type == "cispo":
        a = a * (1 + truth[1].double().abs().reshape(-1))
    carried = {"loss": a.abs().sum().item() * _allowed(budget[1], truth[1], atol, rounding)
               + e.abs().sum().item() * _allowed(budget[2], truth[2], atol, rounding)}
    _check(f"policy_loss[{impl}]", case, ["loss", "logp", "entropy", "dx", "dw", "db"], got, budget,
           truth, atol, rounding, scale=scale, carried=carried)


# ----------------------------------------------------------------------------- preference_loss
@st.composite
def _preference_cfg(draw, impl):
    loss_type = draw(st.sampled_from(preference.LOSS_TYPES))
    ls = 0.0
    if loss_type in preference.SMOOTHED:
        ls = draw(st.sampled_from([0.05, 0.1] if loss_type == "exo_pair" else [0.0, 0.1]))
    return PreferenceLossConfig(
        loss_type=loss_type, beta=draw(st.sampled_from([0.1, 0.5])), label_smoothing=ls,
        sft_coef=draw(st.sampled_from([0.0, 0.3])), chunk_size=draw(st.none() | st.integers(1, 40)),
        impl=impl, ignore_index=draw(st.sampled_from([-100, -1])), **draw(_transforms()))


@examples(80, 3000)
@given(b=st.integers(1, 3), t=st.integers(1, 8), v=st.sampled_from([31, 123, 507]),
       dtype=st.sampled_from(DTYPES), rows=st.sampled_from(ROWS), bias=st.booleans(),
       with_ref=st.booleans(), data=st.data(), impl=st.sampled_from(IMPLS),
       slab=st.sampled_from(SLABS), seed=st.integers(0, 2**31 - 1))
def test_preference_loss(b, t, v, dtype, rows, bias, with_ref, data, impl, slab, seed):
    cfg = data.draw(_preference_cfg(impl))
    gen = torch.Generator().manual_seed(seed)
    x, w, bb, peak = _head(gen, (2 * b, t), 16, v, dtype, rows, bias)
    tg = torch.where(torch.rand(2 * b, t, generator=gen) < 0.5, peak,
                     torch.randint(0, v, (2 * b, t), generator=gen))
    tg[torch.rand(2 * b, t, generator=gen) < 0.15] = cfg.ignore_index
    mask = torch.rand(2 * b, t, generator=gen) < 0.8
    mask[:, 0] = True
    tg[:, 0] = peak[:, 0]  # every sequence keeps a valid token
    ref = None
    if with_ref and cfg.loss_type not in preference.REFERENCE_FREE:
        with torch.no_grad():
            lp = linear_logprobs_reference(x.double(), w.double(), tg,
                                           None if bb is None else bb.double(),
                                           cfg.transform(), cfg.ignore_index)[0]
        seq = (lp * (mask & (tg != cfg.ignore_index))).sum(-1)
        ref = (seq + 2 * torch.randn(2 * b, generator=gen, dtype=torch.float64)).float()
    ref_cfg = PreferenceLossConfig(**{**cfg.__dict__, "impl": "reference"})

    def run(c, cast):
        leaves = [cast(a).detach().requires_grad_() for a in (x, w, bb) if a is not None]
        loss, out = preference_loss(leaves[0], leaves[1], tg, mask, ref_logp=ref,
                                    bias=None if bb is None else leaves[2], config=c)
        seqs = torch.cat([out.chosen_logp, out.rejected_logp])
        return [loss, seqs, *torch.autograd.grad(loss, leaves)]

    truth = run(ref_cfg, lambda a: a.double())
    # orpo's log(1 - p) is -inf where a chosen sequence is certain (a peaked row, T = 1)
    assume(all(bool(x.isfinite().all()) for x in truth))
    if cfg.loss_type == "hinge":  # the gradient jumps at z = 1
        seq = truth[1] - (0 if ref is None else ref.double())
        assume(bool(((cfg.beta * (seq[:b] - seq[b:]) - 1).abs() > 1e-3).all()))
    budget = run(ref_cfg, lambda a: a)
    with _pass_order(slab):
        got = run(cfg, lambda a: a)
    case = dict(b=b, t=t, v=v, dtype=str(dtype)[6:], rows=rows, slab=slab, seed=seed,
                cfg={k: val for k, val in cfg.__dict__.items()
                     if val != PreferenceLossConfig.__dataclass_fields__[k].default})
    a, _, rounding, scale = _loss_allowances(x, w, bb, tg, cfg.transform(), cfg.ignore_index,
                                             truth[2])
    # as for policy_loss: the loss carries the sequence log-probs' allowance through |dL/dseq|
    # (a token's a_n is its sequence's dL/dseq)
    atol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    carried = {"loss": a.view(2 * b, t).abs().amax(-1).sum().item()
               * _allowed(budget[1], truth[1], atol, rounding)}
    _check(f"preference_loss[{impl}]", case, ["loss", "seq_logp", "dx", "dw", "db"], got, budget, truth,
           atol, rounding, scale=scale, carried=carried)


# ----------------------------------------------------------------------------- advantages
def _group_naive(r: list, g: int, scale: str, estimator: str, eps: float) -> list:
    """fp64 Python loops over each group (NaN = unscored = reward 0)."""
    r = [0.0 if math.isnan(x) else x for x in r]

    def std(xs):
        if len(xs) < 2:
            return 0.0
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    out = []
    for s in range(0, len(r), g):
        grp = r[s:s + g]
        for i, x in enumerate(grp):
            if g == 1:
                base = x
            elif estimator == "rloo":
                base = (sum(grp) - x) / (g - 1)
            else:
                base = sum(grp) / g
            a = x - base
            if estimator != "dr_grpo" and scale != "none":
                d = (std(grp) if scale == "group" else std(r)) + eps
                a = a / d if d else math.nan  # eps = 0 on a zero-std group
            out.append(a)
    return out


@examples(40, 1000)
@given(groups=st.integers(1, 5), g=st.integers(1, 6), scale=st.sampled_from(["group", "batch",
                                                                            "none"]),
       estimator=st.sampled_from(["grpo", "rloo", "dr_grpo"]), eps=st.sampled_from([0.0, 1e-4]),
       nan_frac=st.sampled_from([0.0, 0.3]), ties=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_group_advantages(groups, g, scale, estimator, eps, nan_frac, ties, seed):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(groups * g, generator=gen)
    if ties:  # 0/1 rewards: zero-std groups are common
        r = (r > 0).float()
    r[torch.rand(groups * g, generator=gen) < nan_frac] = math.nan
    want = torch.tensor(_group_naive(r.double().tolist(), g, scale, estimator, eps),
                        dtype=torch.float64)
    assume(bool(want.isfinite().all()))
    adv, _ = group_advantages(r, g, scale=scale, estimator=estimator, eps=eps)
    _record_and_assert("group_advantages", "adv", adv, want,
                       dict(groups=groups, g=g, scale=scale, estimator=estimator, seed=seed))


def _gae_naive(r, v, m, gamma, lam):
    adv = [[0.0] * len(row) for row in r]
    for i in range(len(r)):
        next_v = next_a = 0.0
        for j in reversed(range(len(r[i]))):
            if not m[i][j]:
                continue
            next_a = r[i][j] + gamma * next_v - v[i][j] + gamma * lam * next_a
            next_v = v[i][j]
            adv[i][j] = next_a
    return adv


@examples(40, 1000)
@given(b=st.integers(1, 4), t=st.integers(1, 10), gamma=st.sampled_from([1.0, 0.99, 0.5]),
       lam=st.sampled_from([1.0, 0.95, 0.0]), seed=st.integers(0, 2**31 - 1))
def test_gae(b, t, gamma, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    r, v = torch.randn(b, t, generator=gen), torch.randn(b, t, generator=gen)
    m = torch.rand(b, t, generator=gen) < 0.7
    m[:, 0] = True
    r[~m] = math.nan  # masked positions are never read
    adv, ret = gae(r, v, m, gamma=gamma, lam=lam)
    want = torch.tensor(_gae_naive(r.double().tolist(), v.double().tolist(), m.tolist(), gamma,
                                   lam), dtype=torch.float64)
    case = dict(b=b, t=t, gamma=gamma, lam=lam, seed=seed)
    _record_and_assert("gae", "adv", adv, want, case)
    _record_and_assert("gae", "returns", ret, (want + v.double()) * m, case)


def _record_and_assert(op, name, got, want, case):
    """fp32 PyTorch against fp64 loops: within 1e-5 + 1e-4 x scale."""
    err = (got.double() - want).abs().max().item()
    allowed = 1e-5 + 1e-4 * want.abs().max().item()
    if (op, name) not in WORST or err / allowed > WORST[(op, name)][0]:
        WORST[(op, name)] = (err / allowed, err, allowed, case)
    assert err <= allowed, (op, name, err, allowed, case)
