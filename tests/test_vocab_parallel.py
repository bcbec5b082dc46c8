"""Vocab-parallel ops (kernels/_vocab_parallel.py) over 2 gloo processes on CPU.

Each case runs the op twice on every rank from the same seeded inputs: once single-process on
the full weight, once with this rank's shard of the weight (and bias) and `vocab_group`; every
output, metric and the hidden gradient must equal the single-process ones on every rank, and
the shard's weight / bias gradients the matching rows of the full ones. A case with `slab` runs
the sharded op in the vocabulary-slab order (slabs of that many of the shard's rows; the
single-process run keeps the row order). The two processes are
spawned once for the module: they run every case and report each case's failure (a
traceback) or None; each test below asserts one case's report.
"""
import datetime
import importlib.util
import json
import os
import socket
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rlfuse
from rlfuse import (PolicyLossConfig, PreferenceLossConfig, linear_logprobs, policy_loss,
                    preference_loss, vocab_shard_range)
from rlfuse._backend import cpp_ext
from rlfuse.logprobs import HeadOptions

from conftest import importable

WORLD = 2
H = 16
HAS_TRITON = importlib.util.find_spec("triton") is not None
SOFT = dict(final_logit_softcapping=3.0, temperature=0.7)


def _case(name, op, impl="cpp", dtype="float32", V=123, bias=False, tf=None, chunk=5,
          ignore_index=-100, loss=None, dtensor=False, grad=True, slab=None):
    return dict(name=name, op=op, impl=impl, dtype=dtype, V=V, bias=bias, tf=tf or {},
                chunk=chunk, ignore_index=ignore_index, loss=loss or {}, dtensor=dtensor,
                grad=grad, slab=slab)


CASES = [
    # linear_logprobs: loss = sum(ga * logp + ge * entropy)
    _case("logprobs-cpp-fp32-bias", "logprobs", bias=True),
    _case("logprobs-cpp-fp32-softcap-temp-ignore7", "logprobs", tf=SOFT, ignore_index=7),
    _case("logprobs-cpp-bf16-softcap-V77", "logprobs", dtype="bfloat16", V=77,
          tf=dict(final_logit_softcapping=3.0, logit_scale=1.5), bias=True),
    _case("logprobs-reference-fp32-softcap-temp", "logprobs", impl="reference", tf=SOFT,
          bias=True),
    _case("logprobs-reference-bf16-V77", "logprobs", impl="reference", dtype="bfloat16", V=77),
    _case("logprobs-reference-fp64-softcap", "logprobs", impl="reference", dtype="float64",
          tf=SOFT, bias=True),
    _case("logprobs-cpp-fp32-dtensor-V77", "logprobs", V=77, bias=True, dtensor=True),
    _case("logprobs-reference-fp32-dtensor", "logprobs", impl="reference", dtensor=True),
    # policy_loss: fused (token-separable) and two-phase configurations
    _case("policy-cpp-fp32-grpo-kl-entropy", "policy",
          loss=dict(loss_type="grpo", beta=0.05, entropy_coef=0.01)),
    _case("policy-cpp-bf16-dapo-softcap-temp", "policy", dtype="bfloat16", tf=SOFT, bias=True,
          loss=dict(loss_type="dapo", eps_high=0.28)),
    _case("policy-cpp-fp32-gspo-sequence", "policy", V=77,
          loss=dict(loss_type="grpo", importance_level="sequence")),
    _case("policy-cpp-fp32-cispo-top-entropy", "policy", tf=SOFT,
          loss=dict(loss_type="cispo", top_entropy_quantile=0.5)),
    _case("policy-cpp-fp32-ppo-nograd", "policy", grad=False, loss=dict(loss_type="ppo")),
    _case("policy-reference-fp32-ppo-softcap", "policy", impl="reference", tf=SOFT, bias=True,
          loss=dict(loss_type="ppo", beta=0.1, kl_estimator="k2")),
    _case("policy-reference-bf16-sapo", "policy", impl="reference", dtype="bfloat16",
          loss=dict(loss_type="sapo")),
    # preference_loss: whole pairs per chunk (chunk >= 2T) and two phases (chunk < 2T)
    _case("preference-cpp-fp32-sigmoid-pairs-bias", "preference", chunk=20, bias=True,
          loss=dict(loss_type="sigmoid")),
    _case("preference-cpp-fp32-ipo-two-phase-softcap", "preference", chunk=3, tf=SOFT,
          loss=dict(loss_type="ipo")),
    _case("preference-cpp-bf16-simpo-pairs", "preference", dtype="bfloat16", chunk=10, V=77,
          loss=dict(loss_type="simpo")),
    _case("preference-cpp-fp32-orpo-sft-two-phase", "preference", chunk=4,
          loss=dict(loss_type="orpo", sft_coef=1.0)),
    _case("preference-reference-fp32-hinge-softcap", "preference", impl="reference", tf=SOFT,
          loss=dict(loss_type="hinge")),
    _case("preference-reference-bf16-sigmoid", "preference", impl="reference",
          dtype="bfloat16", bias=True, loss=dict(loss_type="sigmoid")),
    # the vocabulary-slab order within each rank's shard (61 / 62 rows: a short last slab)
    _case("logprobs-cpp-fp32-slabs-softcap-ignore7", "logprobs", tf=SOFT, ignore_index=7,
          bias=True, slab=20),
    _case("policy-cpp-bf16-dapo-slabs", "policy", dtype="bfloat16", bias=True, slab=16,
          loss=dict(loss_type="dapo", beta=0.04)),
    _case("preference-cpp-fp32-sigmoid-slabs", "preference", chunk=20, slab=25,
          loss=dict(loss_type="sigmoid")),
]
if HAS_TRITON:  # under TRITON_INTERPRET=1 in the workers; small and few (the interpreter is slow)
    CASES += [
        _case("logprobs-triton-fp32-softcap-temp", "logprobs", impl="triton", tf=SOFT,
              ignore_index=7, bias=True),
        _case("policy-triton-bf16-grpo", "policy", impl="triton", dtype="bfloat16", V=77,
              loss=dict(loss_type="grpo", beta=0.05)),
    ]


# ----------------------------------------------------------------------------- one case
def _inputs(c):
    """Seeded inputs, identical on every rank."""
    g = torch.Generator().manual_seed(sum(map(ord, c["name"])))
    dt = getattr(torch, c["dtype"])
    rows, steps = (4, 5) if c["op"] == "preference" else (2, 7)
    v, ig = c["V"], c["ignore_index"]
    scale = 0.6 if c["tf"].get("final_logit_softcapping") else 0.3  # softcap: logits reach it
    x = {
        "hidden": torch.randn(rows, steps, H, generator=g).to(dt),
        "weight": (torch.randn(v, H, generator=g) * scale).to(dt),
        "bias": (torch.randn(v, generator=g) * 0.5).to(dt) if c["bias"] else None,
    }
    t = torch.randint(0, v, (rows, steps), generator=g)
    t[0, 1] = ig  # an ignored position in every case
    if ig >= 0:
        t[1, 2] = ig  # ignore_index a real id (on rank 0's shard): ignored, not "absent"
        t[1, 3] = v - 1  # on the last shard
    if c["op"] == "logprobs":
        # the logit summary: ids 3 and V-1 (on two ranks) tie at the max of positions (0, 4)
        # and (0, 5), exactly (small powers of two); top-1 targets at (1, 4:7)
        w, bias = x["weight"], x["bias"]
        w[3] = w[-1] = 0
        w[3, :4] = w[-1, :4] = torch.tensor([1.0, 2.0, 0.5, 1.0])
        if bias is not None:
            bias[-1] = bias[3]
        x["hidden"][0, 4:6] = 0
        x["hidden"][0, 4:6, :4] = 4.0
        t[0, 4], t[0, 5] = v - 1, 3
        t[1, 4:7] = (x["hidden"][1, 4:7] @ w.T).argmax(-1)
    x["targets"] = t
    mask = (torch.rand(rows, steps, generator=g) > 0.25).long()
    mask[:, -1] = 1  # every row keeps a valid token
    x["mask"] = mask
    x["ga"], x["ge"] = torch.randn(2, rows, steps, generator=g)
    x["adv"] = torch.randn(rows, generator=g)
    x["noise"] = torch.randn(3, rows, steps, generator=g) * 0.2
    x["ref_seq"] = torch.randn(rows, generator=g) * 3 - 15
    return x


def _forward(c, x, hidden, weight, bias, group):
    """(scalar to differentiate, {name: output}) of the case's op."""
    tf = c["tf"]
    if c["op"] == "logprobs":
        summary = c["impl"] != "reference"  # the chunked impls' (the reference refuses it)
        logp, ent, *summ = linear_logprobs(hidden, weight, x["targets"], bias=bias,
                                           ignore_index=c["ignore_index"], return_entropy=True,
                                           chunk_size=c["chunk"], impl=c["impl"],
                                           vocab_group=group, return_logit_summary=summary,
                                           **tf)
        out = {"logp": logp, "entropy": ent}
        if summary:
            assert summ[1].view(-1).any()
            out.update(mean_logit=summ[0], is_top1=summ[1].double())
        return (logp * x["ga"]).sum() + (ent * x["ge"]).sum(), out
    if c["op"] == "policy":
        cfg = PolicyLossConfig(**c["loss"], **tf, ignore_index=c["ignore_index"],
                               chunk_size=c["chunk"], impl=c["impl"])
        with torch.no_grad():  # old / ref log-probs near the policy's: ratios around 1
            base = linear_logprobs(hidden, weight, x["targets"], bias=bias, impl=c["impl"],
                                   ignore_index=c["ignore_index"], vocab_group=group, **tf)
        old, ref = base + x["noise"][0], base + x["noise"][1]
        loss, out = policy_loss(hidden, weight, x["targets"], x["mask"], x["adv"],
                                old_logp=old, ref_logp=ref, bias=bias,
                                num_items_in_batch=11, config=cfg, vocab_group=group)
        return loss, {"loss": loss, "logp": out.logp, "entropy": out.entropy, "kl": out.kl,
                      **out.metrics}
    cfg = PreferenceLossConfig(**c["loss"], **tf, ignore_index=c["ignore_index"],
                               chunk_size=c["chunk"], impl=c["impl"])
    ref = None if cfg.loss_type in ("simpo", "orpo") else x["ref_seq"]
    loss, out = preference_loss(hidden, weight, x["targets"], x["mask"], ref_logp=ref,
                                bias=bias, config=cfg, vocab_group=group)
    return loss, {"loss": loss, "chosen_logp": out.chosen_logp,
                  "rejected_logp": out.rejected_logp, **out.metrics}


def _run(c, x, weight, bias, group):
    hidden = x["hidden"].clone().requires_grad_(c["grad"])
    weight.requires_grad_(c["grad"])
    if bias is not None:
        bias.requires_grad_(c["grad"])
    with torch.set_grad_enabled(c["grad"]):
        loss, out = _forward(c, x, hidden, weight, bias, group)
    if c["grad"]:
        loss.backward()
        out.update(dX=hidden.grad, dW=weight.grad, db=None if bias is None else bias.grad)
    return out


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _close(name, got, want):
    """Summation order differs (two shards, dX summed over the ranks): fp32 round-off, plus
    one rounding step of the output dtype for bf16 gradients."""
    rtol = torch.finfo(want.dtype).eps if want.dtype == torch.bfloat16 else 0.0
    got, want = _local(got).double(), want.double()
    assert got.shape == want.shape, (name, got.shape, want.shape)
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs() - rtol * want.abs()
    assert err.max().item() <= 2e-5 * scale, (name, err.max().item(), scale)


def _check_case(c, rank, group):
    x = _inputs(c)
    w, b = x["weight"], x["bias"]
    rlfuse.set_vocab_slab("off")
    full = _run(c, x, w.clone(), None if b is None else b.clone(), None)
    if c["dtensor"]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (WORLD,))
        rows = torch.arange(c["V"]).chunk(WORLD)[rank]  # DTensor's own (torch.chunk) split
        s, e = rows[0].item(), rows[-1].item() + 1
        ws = distribute_tensor(w.clone(), mesh, [Shard(0)])
        bs = None if b is None else distribute_tensor(b.clone(), mesh, [Shard(0)])
        sharded = _run(c, x, ws, bs, None)
    else:
        s, e = vocab_shard_range(c["V"], rank, WORLD)
        rlfuse.set_vocab_slab(c.get("slab") or "off")
        try:
            sharded = _run(c, x, w[s:e].clone(), None if b is None else b[s:e].clone(), group)
        finally:
            rlfuse.set_vocab_slab("auto")
    assert sharded.keys() == full.keys()
    for k, want in full.items():
        if want is None:
            assert sharded[k] is None, k
            continue
        if k in ("dW", "db"):
            want = want[s:e]
        _close(k, sharded[k], want)


def _check_errors(rank, group):
    x = _inputs(CASES[0])
    s, e = vocab_shard_range(123, rank, WORLD)
    t = x["targets"].clone()
    t[0, 0] = 123  # a global id past V, though inside no shard
    with pytest.raises(ValueError, match=r"targets must be in \[0, 123\)"):
        linear_logprobs(x["hidden"], x["weight"][s:e], t, vocab_group=group)
    with pytest.raises(ValueError, match="return_logit_summary with vocab_group runs on the "):
        linear_logprobs(x["hidden"], x["weight"][s:e], x["targets"], vocab_group=group,
                        impl="reference", return_logit_summary=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    wr = distribute_tensor(x["weight"], init_device_mesh("cpu", (WORLD,)), [Replicate()])
    with pytest.raises(ValueError, match=r"weight: a DTensor weight must be placed \(Shard\(0\),\)"):
        linear_logprobs(x["hidden"], wr, x["targets"])
    with pytest.raises(TypeError, match="vocab_group must be a torch.distributed ProcessGroup"):
        linear_logprobs(x["hidden"], x["weight"][s:e], x["targets"], vocab_group="world")
    one_row = x["weight"][:1] if rank == 0 else x["weight"][1:0]  # rank 1 holds no row
    with pytest.raises(ValueError, match="at least one vocabulary row"):
        linear_logprobs(x["hidden"], one_row, x["targets"], vocab_group=group)


def _check_opcheck(rank, group):
    """The driver's custom op, sharded, passes torch.library.opcheck's schema, fake and
    autograd-registration checks (the AOT one costs seconds and sees nothing the unsharded op's
    does not); every rank runs the same calls."""
    from rlfuse import _chunked
    from rlfuse._vocab_parallel import shard

    x = _inputs(CASES[0])
    s, e = vocab_shard_range(123, rank, WORLD)
    w, b, vocab = shard(x["weight"][s:e].clone(), x["bias"][s:e].clone(), group)
    spec = _chunked._spec_string("logprobs", HeadOptions(chunk_size=5, impl="cpp"), "cpp",
                                 (True, True, True), vocab.spec)
    args = (x["hidden"].reshape(-1, H).requires_grad_(), w.requires_grad_(),
            b.requires_grad_(), x["targets"].reshape(-1), [], spec)
    torch.library.opcheck(torch.ops.rlfuse.chunked_loss.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


CHECKS = {"errors": _check_errors, "opcheck": _check_opcheck}


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    sub = dist.new_group(list(range(WORLD)))  # a group other than WORLD, for half the cases
    report, times = {}, {}
    for i, c in enumerate(CASES + [dict(name=n, impl="cpp") for n in CHECKS]):
        t0 = time.perf_counter()
        try:
            if c["impl"] == "cpp" and cpp_ext() is None:
                report[c["name"]] = "skip: no C++ extension"
                continue
            group = sub if i % 2 else dist.group.WORLD
            if c["name"] in CHECKS:
                CHECKS[c["name"]](rank, group)
            else:
                _check_case(c, rank, group)
            report[c["name"]] = None
        except Exception:  # noqa: BLE001 - reported to the test
            report[c["name"]] = f"rank {rank}: {traceback.format_exc()}"
        times[c["name"]] = time.perf_counter() - t0
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"report": report, "times": times}, f)
    dist.barrier()  # no rank tears the group down while another still talks to it (a gloo
    dist.destroy_process_group()  # abort, "terminate called without an active exception")


# ----------------------------------------------------------------------------- the tests
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reports():
    env = dict(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the children's env, read when
    if any(c["impl"] == "triton" for c in CASES):            # torch and triton first load
        env["TRITON_INTERPRET"] = "1"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            ctx = mp.start_processes(importable(_worker), args=(_free_port(), out_dir), nprocs=WORLD,
                                     join=False, start_method="spawn")
            deadline = time.monotonic() + 300
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    pytest.fail("the 2-process vocab-parallel run did not finish in 300 s")
            runs = []
            for r in range(WORLD):
                with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                    runs.append(json.load(f))
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return {name: [run["report"][name] for run in runs] for name in runs[0]["report"]}


@pytest.mark.parametrize("name", [c["name"] for c in CASES] + list(CHECKS))
def test_matches_single_process(reports, name):
    got = reports[name]
    if any(r and r.startswith("skip:") for r in got):
        pytest.skip(got[0])
    failures = [r for r in got if r is not None]
    assert not failures, "\n".join(failures)


def test_vocab_shard_range():
    for v, w in ((123, 2), (77, 3), (8, 8), (10, 4)):
        ranges = [vocab_shard_range(v, r, w) for r in range(w)]
        assert ranges[0][0] == 0 and ranges[-1][1] == v
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in order
        sizes = [e - s for s, e in ranges]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
        assert ranges == [(r * v // w, (r + 1) * v // w) for r in range(w)]
    with pytest.raises(ValueError, match="vocab_size = 3 must be >= world_size = 4"):
        vocab_shard_range(3, 0, 4)
    with pytest.raises(ValueError, match="rank must be in"):
        vocab_shard_range(10, 2, 2)


def test_vocab_group_needs_initialized_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    x = torch.randn(3, H)
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        rlfuse.linear_logprobs(x, torch.randn(5, H), torch.zeros(3, dtype=torch.long),
                               vocab_group=object())


@pytest.mark.skipif(cpp_ext() is None, reason="C++ extension not built")
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_cpp_slice_kernels_match_the_full_row(softcap):
    """In one process: a slice's partials are its own max / sums (the sum-exp less its max's
    1) / target logit (0 where the target is elsewhere), and the slice's gradient, given the
    full row's lse and entropy, is
    the matching columns of the full row's gradient: no one-hot term for an absent target,
    zeros for ignore_index."""
    ext = cpp_ext()
    c, v, s, e, ig = 9, 37, 11, 30, -100
    z = torch.randn(c, v) * 2
    t = torch.randint(0, v, (c,))
    t[0], t[1], t[2] = ig, s, e - 1  # ignored, the slice's first and last columns
    args = (1.3, softcap, 1 / 0.8)
    zt = rlfuse.LogitTransform(1.3, softcap or None, 0.8).apply(z)  # [C, V] transformed
    part = ext.logits_partials(z[:, s:e].contiguous(), t, *args, s)  # [4, C]
    sl = zt[:, s:e]
    m = sl.amax(-1)
    inside = (t >= s) & (t < e)
    want = torch.stack([m, torch.exp(sl - m[:, None]).sum(-1) - 1,
                        (torch.exp(sl - m[:, None]) * (sl - m[:, None])).sum(-1),
                        torch.where(inside, zt.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)])
    torch.testing.assert_close(part, want, rtol=1e-5, atol=1e-5)
    lse, _, ent = ext.logits_stats(z, t, *args, ig)
    a, g = torch.randn(2, c)
    full = z.clone()
    ext.logits_grad_(full, t, lse, ent, a, g, *args, ig)
    part_grad = z[:, s:e].contiguous()
    ext.logits_grad_(part_grad, t, lse, ent, a, g, *args, ig, s, v)
    torch.testing.assert_close(part_grad, full[:, s:e], rtol=0, atol=1e-6)
    assert not part_grad[0].any()  # ignore_index: zeros
    with pytest.raises(RuntimeError, match=r"must lie in \[0, vocab_size = 37\)"):
        ext.logits_grad_(z[:, s:e].contiguous(), t, lse, ent, a, g, *args, ig, 20, v)
