"""One setup per op, shared by the correctness guard, the timing run and the memory subprocesses.

A case is rebuilt from (op, shape preset, dtype, seed, device) alone, so every process sees the same
inputs. The ops and what one call does:
    linear_logprobs  logp, entropy = op(hidden [N, H], weight [V, H], targets [N]); the scalar that
                     backward differentiates is sum(g_logp * logp + g_entropy * entropy) with fixed
                     random upstream gradients.
    policy_loss      GRPO, loss_type "dapo" (token-level normalizer), eps 0.2 / 0.28 (clip-higher),
                     beta 0.04 with the k3 KL, on [B, T] rows with ragged completion masks.
    preference_loss  sigmoid DPO, beta 0.1, chosen rows then rejected rows, prompt tokens masked,
                     reference sequence log-probs precomputed (from perturbed hidden states).
    group_advantages GRPO group-normalized advantages of N binary rewards, groups of 8.
FLOPs: one LM-head GEMM is 2·N·H·V. `FLOOR_GEMMS` says how many GEMMs an op must do per mode;
GFLOP/s in the reports counts those FLOPs whatever a provider actually executes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    name: str
    n: int    # token rows N = batch * seq
    h: int    # hidden size H
    v: int    # vocabulary V
    seq: int  # tokens per sequence T

    def __post_init__(self):
        if min(self.n, self.h, self.v, self.seq) < 1 or self.n % self.seq:
            raise ValueError(f"shape {self.name}: need positive sizes and seq | n, got {self}")

    @property
    def batch(self) -> int:
        return self.n // self.seq

    def with_n(self, n: int) -> "Shape":
        """The same H, V (and T where it divides n) at another token count, for sweeps."""
        seq = math.gcd(n, self.seq)
        return Shape(f"{self.name}@N{n}", n, self.h, self.v, seq)

    def check_slice(self) -> "Shape":
        """A few rows at the same H and V: the correctness guard runs here before timing."""
        seq = min(self.seq, 64)
        return Shape(f"{self.name}-check", min(self.n, 4 * seq), self.h, self.v, seq)


PRESETS = {
    "tiny": Shape("tiny", 256, 64, 1000, 64),
    "small": Shape("small", 1024, 512, 32000, 256),
    "qwen-0.5b": Shape("qwen-0.5b", 2048, 896, 151936, 1024),
    "llama-8b": Shape("llama-8b", 8192, 4096, 128256, 2048),
    "gpu-8k": Shape("gpu-8k", 8192, 4096, 131072, 2048),  # benches/gpu_check.sh
}


def get_shape(name: str) -> Shape:
    if name not in PRESETS:
        raise ValueError(f"unknown shape {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def get_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class Case:
    """The inputs of one op call. `params` name the tensors that require grad."""

    op: str
    shape: Shape
    dtype: torch.dtype
    device: torch.device
    t: dict[str, Tensor]
    params: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)

    def __getattr__(self, name):
        try:
            return self.__dict__["t"][name]
        except KeyError:
            raise AttributeError(name) from None

    def zero_grad(self) -> None:
        for p in self.params:
            self.t[p].grad = None

    def grads(self) -> dict[str, Tensor]:
        return {f"d{p}": self.t[p].grad for p in self.params if self.t[p].grad is not None}

    def input_bytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.t.values())

    def grad_bytes(self) -> int:
        """Size of the gradient outputs a training step must hold (one per param)."""
        return sum(self.t[p].numel() * self.t[p].element_size() for p in self.params)


# ----------------------------------------------------------------------------- input helpers
def _gen(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _randn(shape, dtype, g, device, scale=1.0) -> Tensor:
    x = torch.randn(shape, dtype=dtype, generator=g, device=device)  # no fp32 temporary
    return x.mul_(scale) if scale != 1.0 else x


def _head(shape: Shape, dtype, g, device, weight: Optional[Tensor]):
    # Logits of std ~2, as a trained LM head gives; a shared weight saves a V x H copy.
    if weight is None:
        weight = _randn((shape.v, shape.h), dtype, g, device, 2.0 / math.sqrt(shape.h))
    return weight.detach().requires_grad_(True)


@torch.no_grad()
def logprobs_nograd(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """log p(target) in fp32, chunked torch (setup only: old / reference log-probs)."""
    h, v = weight.shape[1], weight.shape[0]
    x, t = hidden.reshape(-1, h), targets.reshape(-1)
    w = weight.float()
    out = torch.empty(t.shape[0], dtype=torch.float32, device=hidden.device)
    rows = max(1, (64 << 20) // (4 * v))
    for s in range(0, t.shape[0], rows):
        z = x[s:s + rows].float() @ w.t()  # [c, V]
        out[s:s + rows] = z.gather(1, t[s:s + rows, None]).squeeze(1) - z.logsumexp(1)
    return out.view(targets.shape)


def _completion_mask(b: int, tt: int, g, device, prompt: bool) -> Tensor:
    """[b, tt] bool: ragged completions (length in [T/2, T]), after a prompt when `prompt`."""
    pos = torch.arange(tt, device=device)
    end = torch.randint(tt // 2, tt + 1, (b, 1), generator=g, device=device)
    mask = pos < end
    if prompt:
        start = torch.randint(tt // 8, tt // 4 + 1, (b, 1), generator=g, device=device)
        mask &= pos >= start
    return mask


# ----------------------------------------------------------------------------- setups
def build_linear_logprobs(shape, dtype, seed, device, weight=None) -> Case:
    g = _gen(seed, device)
    n = shape.n
    t = {"hidden": _randn((n, shape.h), dtype, g, device).requires_grad_(True)}
    t["weight"] = _head(shape, dtype, g, device, weight)
    t["targets"] = torch.randint(0, shape.v, (n,), generator=g, device=device)
    t["grad_logp"] = torch.randn(n, generator=g, device=device) / n  # [N] fp32 upstream grads
    t["grad_entropy"] = torch.randn(n, generator=g, device=device) / n
    return Case("linear_logprobs", shape, dtype, device, t, ("hidden", "weight"))


POLICY_CONFIG = dict(loss_type="dapo", eps_low=0.2, eps_high=0.28, beta=0.04, kl_estimator="k3")


def build_policy_loss(shape, dtype, seed, device, weight=None) -> Case:
    g = _gen(seed, device)
    b, tt = shape.batch, shape.seq
    t = {"hidden": _randn((b, tt, shape.h), dtype, g, device).requires_grad_(True)}
    t["weight"] = _head(shape, dtype, g, device, weight)
    t["targets"] = torch.randint(0, shape.v, (b, tt), generator=g, device=device)
    t["mask"] = _completion_mask(b, tt, g, device, prompt=False)  # [B, T] bool
    t["advantages"] = torch.randn(b, generator=g, device=device)  # [B] fp32
    logp = logprobs_nograd(t["hidden"], t["weight"], t["targets"])  # [B, T] fp32
    # Ratios near 1 with a few percent clipped on each side, as a few steps off-policy.
    t["old_logp"] = logp + 0.1 * torch.randn(logp.shape, generator=g, device=device)
    t["ref_logp"] = logp + 0.2 * torch.randn(logp.shape, generator=g, device=device)
    return Case("policy_loss", shape, dtype, device, t, ("hidden", "weight"), dict(POLICY_CONFIG))


PREFERENCE_CONFIG = dict(loss_type="sigmoid", beta=0.1)


def build_preference_loss(shape, dtype, seed, device, weight=None) -> Case:
    g = _gen(seed, device)
    b, tt = shape.batch, shape.seq
    if b % 2:
        raise ValueError(f"preference_loss needs an even number of sequences, {shape} has {b}")
    t = {"hidden": _randn((b, tt, shape.h), dtype, g, device).requires_grad_(True)}
    t["weight"] = _head(shape, dtype, g, device, weight)
    t["targets"] = torch.randint(0, shape.v, (b, tt), generator=g, device=device)
    t["mask"] = _completion_mask(b, tt, g, device, prompt=True)  # [2P, T] bool
    # The reference model: the same head on perturbed hidden states (peers that recompute the
    # reference log-probs themselves read ref_hidden).
    noise = _randn((b, tt, shape.h), dtype, g, device, 0.3)
    t["ref_hidden"] = noise.add_(t["hidden"].detach())
    ref = logprobs_nograd(t["ref_hidden"], t["weight"], t["targets"])  # [2P, T]
    t["ref_logp"] = (ref * t["mask"]).sum(-1)  # [2P] sequence sums
    return Case("preference_loss", shape, dtype, device, t, ("hidden", "weight"),
                dict(PREFERENCE_CONFIG))


GROUP_SIZE = 8


def build_group_advantages(shape, dtype, seed, device, weight=None) -> Case:
    g = _gen(seed, device)
    n = shape.n - shape.n % GROUP_SIZE or GROUP_SIZE
    # Verifiable rewards: 0/1 per completion, some groups all-equal (no signal).
    rewards = (torch.rand(n, generator=g, device=device) < 0.5).float()
    return Case("group_advantages", shape, dtype, device, {"rewards": rewards}, (),
                {"group_size": GROUP_SIZE})


# ----------------------------------------------------------------------------- op specs
@dataclass(frozen=True)
class OpSpec:
    name: str
    build: Callable[..., Case]
    api: tuple[str, ...]                  # names `rlfuse` must export for the op to run
    outputs: tuple[str, ...] = ("loss",)  # names of what a provider's run returns
    modes: tuple[str, ...] = MODES
    floor_gemms: Optional[dict] = None    # mode -> GEMMs the op must do at the least
    no_grad_forward: bool = False         # "forward" under no_grad (else with grad, as in training)
    objective: Optional[Callable[[Case, object], Tensor]] = None  # the scalar backward reads
    reference: str = "rlfuse-reference"   # the provider the guard compares against

    def flops(self, shape: Shape, mode: str) -> Optional[float]:
        if not self.floor_gemms:
            return None
        return 2.0 * shape.n * shape.h * shape.v * self.floor_gemms[mode]


def _logprobs_objective(case: Case, out) -> Tensor:
    logp, ent = out
    return (logp.reshape(-1) * case.grad_logp).sum() + (ent.reshape(-1) * case.grad_entropy).sum()


def _loss_objective(case: Case, out) -> Tensor:
    return out


OPS = {
    "linear_logprobs": OpSpec(
        "linear_logprobs", build_linear_logprobs, ("linear_logprobs",), ("logp", "entropy"),
        floor_gemms={"forward": 1, "backward": 3, "full": 4},  # backward recomputes the logits
        no_grad_forward=True, objective=_logprobs_objective),
    "policy_loss": OpSpec(
        "policy_loss", build_policy_loss, ("policy_loss", "PolicyLossConfig"),
        floor_gemms={"forward": 1, "backward": 2, "full": 3}, objective=_loss_objective),
    "preference_loss": OpSpec(
        "preference_loss", build_preference_loss, ("preference_loss", "PreferenceLossConfig"),
        floor_gemms={"forward": 1, "backward": 2, "full": 3}, objective=_loss_objective),
    "group_advantages": OpSpec(
        "group_advantages", build_group_advantages, ("group_advantages",), ("advantages",),
        modes=("forward",),
        reference="rlfuse"),
}


def get_op(name: str) -> OpSpec:
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; ops: {', '.join(OPS)}")
    return OPS[name]


def op_unavailable(op: OpSpec) -> Optional[str]:
    """Why the op cannot run yet (its rlfuse module does not import), or None."""
    try:
        import rlfuse
    except Exception as err:  # noqa: BLE001 - any import failure disables the op, with its reason
        return f"rlfuse does not import: {err}"
    missing = [a for a in op.api if not hasattr(rlfuse, a)]
    return f"rlfuse does not export {', '.join(missing)} yet" if missing else None


def build_case(op: str, shape: Shape, dtype: torch.dtype, seed: int = 0,
               device: str | torch.device = "cpu", weight: Optional[Tensor] = None) -> Case:
    return get_op(op).build(shape, dtype, seed, torch.device(device), weight)


def check_case(case: Case, seed: int = 0) -> Case:
    """The guard's small slice of `case`: same H, V and dtype, sharing its LM-head weight."""
    weight = case.t.get("weight")
    return get_op(case.op).build(case.shape.check_slice(), case.dtype, seed + 1, case.device,
                                 None if weight is None else weight.detach())


__all__ = ["MODES", "DTYPES", "PRESETS", "Shape", "Case", "OpSpec", "OPS", "get_op", "get_shape",
           "get_dtype", "build_case", "check_case", "op_unavailable"]
