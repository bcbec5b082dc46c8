"""The implementations a benchmark compares, by name, for each op.

    rlfuse-cpp / rlfuse-reference / rlfuse-triton   rlfuse with that `impl` (where it runs)
    naive    plain PyTorch on materialized fp32 [N, V] logits, the way most trainers write it
    trl      TRL's fused LM head `trl.kernels.ChunkedLogProbFunction` (>= 1.16) for log-probs and
             entropy, the loss math in torch (4 GEMMs for a loss: forward + recomputing backward)
    liger    liger-kernel's chunked losses (LigerFusedLinearGRPOLoss / DPOLoss); torch.compile on
             CUDA only (on CPU it would add minutes of compilation to a short run)
    floor    the GEMMs alone, in buffers allocated up front: `cases.OPS[op].floor_gemms[mode]` of
             them, in the input dtype on CUDA and on a CPU with native bf16 / fp16 matmul, else
             in fp32 (there a CPU bf16 GEMM is far slower, and rlfuse upcasts)
A provider's `run(case)` returns what the op's objective reads (log-probs and entropy, or the loss).
`register_provider` adds one (a user's implementation, or a deliberately wrong one in the tests).
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rlfuse._backend import LOWP, cpu_native_lowp

from .cases import OPS, Case

RLFUSE_IMPLS = ("cpp", "reference", "triton")
TRL_VOCAB_CHUNK = 32768  # TRL's default vocabulary tile for its fused LM head
LIGER_NO_LOGPROBS = ("liger-kernel has no public linear log-prob + entropy op (its fused linear "
                     "cross-entropy is Triton-only and returns no entropy)")


@dataclass(frozen=True)
class Provider:
    name: str
    run: Optional[Callable[[Case], object]] = None   # one op call -> what the objective reads
    why_not: Callable[[torch.device], Optional[str]] = lambda device: None  # None: runs here
    note: str = ""
    est_bytes: Optional[Callable[[Case], int]] = None  # rough peak extra memory (skip if too big)

    def unavailable(self, device: torch.device) -> Optional[str]:
        return self.why_not(torch.device(device))


# ----------------------------------------------------------------------------- availability
def _rlfuse_why_not(impl: str):
    def why_not(device: torch.device) -> Optional[str]:
        if impl == "cpp":
            from rlfuse._backend import cpp_ext

            if device.type != "cpu":
                return "rlfuse-cpp runs on CPU tensors"
            if cpp_ext() is None:
                return "the C++ extension rlfuse._C is not built"
        if impl == "triton":
            if device.type != "cuda":
                return ("Triton kernels run on CUDA (on CPU only under TRITON_INTERPRET=1, "
                        "for tests)")
            try:
                importlib.import_module("rlfuse._triton")
            except Exception as err:  # noqa: BLE001 - report why, do not crash the run
                return f"rlfuse._triton does not import: {err}"
        return None
    return why_not


def _trl_why_not(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("trl") is None:
        return "trl is not installed (pip install trl==1.16.0)"
    if importlib.util.find_spec("trl.kernels") is None:
        return "this trl has no trl.kernels.ChunkedLogProbFunction (needs trl >= 1.16)"
    return None


def _liger_why_not(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    return None


def _never(reason: str):
    return lambda device: reason


# ----------------------------------------------------------------------------- shared math
def naive_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, entropy_grad: bool = True):
    """log p(target) and entropy from the materialized fp32 logits [..., V]."""
    logits = hidden.float() @ weight.float().t()  # [..., V] fp32
    logz = logits.log_softmax(-1)  # [..., V]
    logp = logz.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        ent = -(logz.exp() * logz).sum(-1)  # a metric only, for the losses
    return logp, ent


def trl_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor):
    from trl.kernels import ChunkedLogProbFunction

    h = weight.shape[1]
    logp, ent, *_ = ChunkedLogProbFunction.apply(
        hidden.reshape(-1, h), weight, None, targets.reshape(-1), 1.0, TRL_VOCAB_CHUNK, None, 1.0,
        ("entropy",))
    return logp.view(targets.shape), ent.view(targets.shape)


def grpo_dapo_loss(case: Case, logp: Tensor) -> Tensor:
    """TRL's GRPO loss, loss_type="dapo", token-level ratio, k3 KL, on [B, T] log-probs."""
    c = case.config
    adv = case.advantages[:, None]  # [B, 1]
    ratio = torch.exp(logp - case.old_logp)  # [B, T]
    clipped = ratio.clamp(1 - c["eps_low"], 1 + c["eps_high"])
    per_token = -torch.min(ratio * adv, clipped * adv)
    d = case.ref_logp - logp
    per_token = per_token + c["beta"] * (torch.exp(d) - d - 1)
    m = case.mask.float()
    return (per_token * m).sum() / m.sum().clamp(min=1)


def dpo_sigmoid_loss(case: Case, logp: Tensor) -> Tensor:
    """Sigmoid DPO on sequence sums: -logsigmoid(beta * (log-ratio chosen - log-ratio rejected))."""
    seq = (logp * case.mask).sum(-1) - case.ref_logp  # [2P]
    p = seq.shape[0] // 2
    return -F.logsigmoid(case.config["beta"] * (seq[:p] - seq[p:])).mean()


# ----------------------------------------------------------------------------- per op
def _rlfuse_logprobs(impl, summary=False):
    def run(c: Case):
        import rlfuse

        return rlfuse.linear_logprobs(c.hidden, c.weight, c.targets, return_entropy=True,
                                      impl=impl, return_logit_summary=summary)[:2]
    return run


def _rlfuse_policy(impl):
    def run(c: Case):
        import rlfuse

        cfg = rlfuse.PolicyLossConfig(**c.config, impl=impl)
        loss, _ = rlfuse.policy_loss(c.hidden, c.weight, c.targets, c.mask, c.advantages,
                                     old_logp=c.old_logp, ref_logp=c.ref_logp, config=cfg)
        return loss
    return run


def _rlfuse_preference(impl):
    def run(c: Case):
        import rlfuse

        cfg = rlfuse.PreferenceLossConfig(**c.config, impl=impl)
        loss, _ = rlfuse.preference_loss(c.hidden, c.weight, c.targets, c.mask,
                                         ref_logp=c.ref_logp, config=cfg)
        return loss
    return run


def _liger_policy(c: Case):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    cfg = c.config
    fn = LigerFusedLinearGRPOLoss(
        beta=cfg["beta"], compiled=c.device.type == "cuda", use_ref_model=True, chunk_size=1,
        epsilon_low=cfg["eps_low"], epsilon_high=cfg["eps_high"], loss_type=cfg["loss_type"])
    loss, _ = fn(c.hidden, c.weight, c.targets, c.mask.float(), c.advantages,
                 ref_per_token_logps=c.ref_logp, old_per_token_logps=c.old_logp)
    return loss


def _liger_preference(c: Case):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    fn = LigerFusedLinearDPOLoss(beta=c.config["beta"], compiled=c.device.type == "cuda",
                                 use_ref_model=True, chunk_size=1, loss_type="sigmoid")
    targets = c.targets.masked_fill(~c.mask, -100)
    loss, *_ = fn(c.weight, c.hidden, targets, ref_input=c.ref_hidden,
                  ref_weight=c.weight.detach())
    return loss


def _naive_group_advantages(c: Case) -> Tensor:
    r = c.rewards.view(-1, c.config["group_size"])  # [P, G]
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
    return adv.view(-1)


def _rlfuse_group_advantages(c: Case) -> Tensor:
    import rlfuse

    return rlfuse.group_advantages(c.rewards, c.config["group_size"])[0]


def _logits_bytes(factor: int):
    return lambda c: factor * c.shape.n * c.shape.v * 4 + c.grad_bytes()


def _trl_bytes(c: Case) -> int:
    tile = min(c.shape.n, 4096) * min(c.shape.v, TRL_VOCAB_CHUNK) * 4
    return 6 * tile + 2 * c.grad_bytes()


def _rlfuse_providers(make_run) -> dict[str, Provider]:
    # The reference materializes the logits: give it the naive memory estimate.
    return {f"rlfuse-{i}": Provider(f"rlfuse-{i}", make_run(i), _rlfuse_why_not(i),
                                    est_bytes=_logits_bytes(4) if i == "reference" else None)
            for i in RLFUSE_IMPLS}


def _loss_providers(rlfuse_run, loss_math, liger_run, liger_note) -> dict[str, Provider]:
    out = _rlfuse_providers(rlfuse_run)
    out["naive"] = Provider(
        "naive", lambda c: loss_math(c, naive_logprobs(c.hidden, c.weight, c.targets, False)[0]),
        est_bytes=_logits_bytes(4))
    out["trl"] = Provider(
        "trl", lambda c: loss_math(c, trl_logprobs(c.hidden, c.weight, c.targets)[0]),
        _trl_why_not, "fused LM head (entropy too), loss math in torch", _trl_bytes)
    out["liger"] = Provider("liger", liger_run, _liger_why_not, liger_note)
    out["floor"] = Provider("floor", note="GEMMs alone", est_bytes=_logits_bytes(1))
    return out


PROVIDERS: dict[str, dict[str, Provider]] = {
    "linear_logprobs": {
        **_rlfuse_providers(_rlfuse_logprobs),
        "naive": Provider("naive", lambda c: naive_logprobs(c.hidden, c.weight, c.targets),
                          est_bytes=_logits_bytes(4)),
        "trl": Provider("trl", lambda c: trl_logprobs(c.hidden, c.weight, c.targets),
                        _trl_why_not, est_bytes=_trl_bytes),
        "rlfuse+summary": Provider(
            "rlfuse+summary", _rlfuse_logprobs("auto", summary=True),
            note="impl auto, also the mean logit and is-top-1 (TRL's DPO / SFT metrics)"),
        "liger": Provider("liger", why_not=_never(LIGER_NO_LOGPROBS)),
        "floor": Provider("floor", note="GEMMs alone", est_bytes=_logits_bytes(1)),
    },
    "policy_loss": _loss_providers(
        _rlfuse_policy, grpo_dapo_loss, _liger_policy,
        "LigerFusedLinearGRPOLoss, one sequence per chunk, no entropy"),
    "preference_loss": _loss_providers(
        _rlfuse_preference, dpo_sigmoid_loss, _liger_preference,
        "LigerFusedLinearDPOLoss, one pair per chunk; recomputes the reference log-probs "
        "from ref_hidden (+1 no-grad GEMM)"),
    "group_advantages": {
        "rlfuse": Provider("rlfuse", _rlfuse_group_advantages, note="one PyTorch implementation"),
        "naive": Provider("naive", _naive_group_advantages, note="TRL's formula in torch"),
    },
}


def register_provider(op: str, provider: Provider) -> None:
    """Add (or replace) a provider of `op`, e.g. your own implementation to compare."""
    if op not in PROVIDERS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(PROVIDERS)}")
    PROVIDERS[op][provider.name] = provider


def get_provider(op: str, name: str) -> Provider:
    if name not in PROVIDERS[op]:
        raise ValueError(f"unknown provider {name!r} for {op}; providers: "
                         f"{', '.join(PROVIDERS[op])}")
    return PROVIDERS[op][name]


def expand(op: str, names: Optional[str], device: torch.device) -> list[str]:
    """Provider names from a comma list; "all" (or None) = every provider of the op,
    "rlfuse" = the implementation impl="auto" picks on this device."""
    if not names or names == "all":
        return list(PROVIDERS[op])
    out = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name == "rlfuse" and name not in PROVIDERS[op]:
            from rlfuse._backend import resolve

            name = f"rlfuse-{resolve('auto', torch.device(device))}"
        get_provider(op, name)  # raises on an unknown name
        if name not in out:
            out.append(name)
    return out


# ----------------------------------------------------------------------------- the floor
def floor_step(case: Case, mode: str):
    """`floor_gemms[mode]` LM-head GEMMs into buffers allocated here (the [N, V] one included),
    in the input dtype, except bf16 / fp16 on a CPU whose matmul units lack it
    (`cpu_native_lowp`: the hardware's say, not rlfuse's RLFUSE_LOWP_GEMM mode), where torch's
    GEMM in that dtype is slower than the fp32 one, so fp32 is the floor there."""
    k = OPS[case.op].floor_gemms[mode]
    upcast = case.device.type == "cpu" and case.dtype in LOWP and not cpu_native_lowp(case.dtype)
    dt = torch.float32 if upcast else case.dtype
    h = case.shape.h
    x = case.hidden.detach().reshape(-1, h).to(dt)  # [N, H]
    w = case.weight.detach().to(dt)  # [V, H]
    z = x.new_empty(x.shape[0], w.shape[0])  # [N, V]
    dx, dw = torch.empty_like(x), torch.empty_like(w)

    def fwd():
        torch.mm(x, w.t(), out=z)

    def grad_x():
        torch.mm(z, w, out=dx)

    def grad_w():
        torch.mm(z.t(), x, out=dw)

    gemms = {1: [fwd], 2: [grad_x, grad_w], 3: [fwd, grad_x, grad_w],
             4: [fwd, fwd, grad_x, grad_w]}[k]

    def step():
        for g in gemms:
            g()
    return step
