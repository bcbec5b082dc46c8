"""The optimizer, chosen from the parameters' dtype: fp32 weights get torch's fused AdamW; bf16
weights get AdamW with stochastic rounding (pure bf16: no fp32 master copy).

The bf16 recipe, and why. A bf16 weight has 8 mantissa bits: near 0.02 its spacing is 1.2e-4,
so an update of lr 1e-5 rounded to nearest is lost every step, and a bf16 second moment (which
moves by 1 - beta2 = 0.1% a step, below its half-spacing of 0.2%) stops moving. The usual cure
keeps fp32 master weights and moments beside the bf16 copy: 2 + 4 + 8 bytes a parameter plus the
bf16 gradient, as much as training in fp32, which defeats the point on limited memory. Here the
weights, gradients and both moments stay bf16 (8 bytes a parameter, half of fp32), and every
write back rounds stochastically: up or down with probability given by the distance, so each
rounding is unbiased and small updates add up in expectation (Zamirai et al. 2020, "Revisiting
BFloat16 Training", show such pure-bf16 training matching fp32; Kahan summation would cost 2
more bytes a parameter). Each update is computed in fp32 a block at a time: on CPU in one pass
of rlfuse's kernel (csrc/cpu/adamw.cpp; the torch ops below took 40 ns a parameter on a 2-core
Zen 1 EPYC, the kernel 2.5), elsewhere a slab of torch ops at a time, so the transient
memory is a few slabs whatever the tensor size. The rounding noise comes from one seeded
generator whose state travels in `state_dict()`, so a resumed run continues bit for bit.
fp16 weights (no headroom to round this way) and fp32 ones keep torch's AdamW.

`optim.states=int8` trades time for memory: torchao's AdamW8bit keeps each moment in 1 byte a
parameter (block-wise quantized, the scheme of Dettmers et al. 2022), so AdamW's state costs 2
bytes a parameter instead of 8 (fp32) or 4 (bf16). Its compiled step searches the 256 codes in
8 table lookups per value, 26 s a step for 0.5B parameters on a 2-core CPU against 0.5 s for
torch's fused AdamW; for fp32 and bf16 CPU parameters, `AdamW8bitCPU` runs the same arithmetic
on the same states in rlfuse's kernel (csrc/cpu/adamw.cpp) instead.
"""
import functools
import math
import warnings

import torch

from rlfuse._backend import cpp_ext

from .config import ConfigError

SLAB = 1 << 22  # elements updated at once: 4 fp32 temporaries of 16 MB


def round_stochastic_(dst: torch.Tensor, src: torch.Tensor, gen: torch.Generator) -> None:
    """dst (bf16) <- src (fp32, clobbered), rounded up or down at random, unbiased: a random
    16-bit integer added to the fp32 bit pattern carries into the kept bits with probability
    equal to the dropped fraction; truncating then leaves a bf16-exact fp32 value."""
    noise = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device,
                          generator=gen)
    dst.copy_(src.view(torch.int32).add_(noise).bitwise_and_(-65536).view(torch.float32))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) parameter, state or gradient; else `t`."""
    return t.to_local() if hasattr(t, "to_local") else t


def _fused_bf16(views: list) -> bool:
    """Whether rlfuse's CPU kernel takes this bf16 weight's step (csrc/cpu/adamw.cpp)."""
    return cpp_ext() is not None and all(
        x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.is_contiguous()
        for x in views)


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) for bf16 parameters, with the moments in
    the parameter's dtype and every bf16 write rounded stochastically (module docstring)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
                 eps: float = 1e-8, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps))
        self.gen = torch.Generator(device=self.param_groups[0]["params"][0].device)
        self.gen.manual_seed(seed)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), wd, eps = group["lr"], group["betas"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                step_size, bc2_sqrt = lr / (1 - b1 ** t), (1 - b2 ** t) ** 0.5
                views = [_local(x).view(-1)
                         for x in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                if _fused_bf16(views):
                    seed = int(torch.randint(-2 ** 63, 2 ** 63 - 1, (), generator=self.gen))
                    cpp_ext().adamw_bf16_step_(*views, lr, b1, b2, wd, eps, step_size, bc2_sqrt,
                                               seed)
                    continue
                for s in range(0, views[0].numel(), SLAB):
                    w, g, m, v = (x[s:s + SLAB] for x in views)
                    w32, g32, m32, v32 = (x.float() for x in (w, g, m, v))  # fp32 copies
                    m32.lerp_(g32, 1 - b1)
                    v32.mul_(b2).addcmul_(g32, g32, value=1 - b2)
                    w32.mul_(1 - lr * wd).addcdiv_(m32, (v32.sqrt() / bc2_sqrt).add_(eps),
                                                   value=-step_size)
                    for dst, src in ((w, w32), (m, m32), (v, v32)):
                        if dst.dtype == torch.bfloat16:
                            round_stochastic_(dst, src, self.gen)
                        else:
                            dst.copy_(src)

    def state_dict(self):
        return {**super().state_dict(), "rounding_rng": self.gen.get_state()}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.gen.set_state(state_dict.pop("rounding_rng"))
        super().load_state_dict(state_dict)


def make_optimizer(params: list, lr: float, betas: tuple, weight_decay: float, seed: int,
                   states: str = "param"):
    """`states="param"`: StochasticRoundingAdamW when any parameter is bf16, else torch's AdamW
    (fused on CPU and CUDA: one vectorized kernel per tensor, ~6x faster than the default
    per-tensor loop on CPU). `states="int8"`: torchao's AdamW8bit, whose moments are 8-bit codes
    in blocks of 256 with one scale each (tensors under 4096 elements, or not a multiple of 256,
    keep plain moments), and whose bf16 writes round stochastically. `params`: tensors, or
    param-group dicts."""
    flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    bf16 = any(p.dtype == torch.bfloat16 for p in flat)
    if states == "int8":
        fused = cpp_ext() is not None and all(
            type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type == "cpu"
            and p.dtype in (torch.float32, torch.bfloat16) for p in flat)
        base = _adamw_8bit()  # imported on every call: a ConfigError where torchao is missing
        cls = _adamw_8bit_cpu() if fused else base
        return cls(params, lr=lr, betas=betas, weight_decay=weight_decay,
                   bf16_stochastic_round=bf16)
    if bf16:
        return StochasticRoundingAdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                                       seed=seed)
    fused = all(p.device.type in ("cpu", "cuda") for p in flat)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


def _adamw_8bit():
    """torchao's AdamW8bit, imported with the engine's logging quieted (on a CPU build of torch,
    torchao logs a warning for each CUDA library it cannot load)."""
    from .model import quiet_transformers

    quiet_transformers()
    # torch.compile of its step warns that the state subclass lacks a cache hash (harmless)
    warnings.filterwarnings("ignore", message="OptimState8bit does not implement")
    try:
        from torchao.optim import AdamW8bit
    except ImportError as e:
        raise ConfigError(f"config key 'optim.states': int8 needs torchao ({e}); "
                          f"pip install 'rlfuse[lowmem]'") from None
    return AdamW8bit


CODE_TABLE_BITS = 16  # a 512 KB table: the fewest bits that leave one threshold a bucket


def _order(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in the order of the fp32 values x (-0.0 and 0.0 alike)."""
    b = x.view(torch.int32).long()
    return torch.where(b >= 0, b, -(b & 0x7FFFFFFF))


def _unorder(k: torch.Tensor) -> torch.Tensor:
    return _bits_to_float(torch.where(k >= 0, k, -k + (1 << 31)))


def rounding_thresholds(qmap: torch.Tensor) -> torch.Tensor:
    """[255] fp32: t[c] is the smallest fp32 x that torchao's quantize_8bit_with_qmap rounds up
    from code c to c + 1 (x - q[c] >= (q[c + 1] - q[c]) * 0.5 in fp32), so the code of x is
    the number of thresholds <= x. Found by bisection over the fp32 values in [q[c], q[c+1]]."""
    q = qmap.float()
    lo, half = q[:-1], (q[1:] - q[:-1]) * 0.5
    a, b = _order(lo), _order(q[1:])  # the predicate holds at q[c + 1]
    while bool((active := a < b).any()):
        mid = torch.div(a + b, 2, rounding_mode="floor")
        up = (_unorder(mid) - lo) >= half
        a, b = torch.where(active & ~up, mid + 1, a), torch.where(active & up, mid, b)
    return _unorder(a)


def code_table(qmap: torch.Tensor, k: int = CODE_TABLE_BITS) -> torch.Tensor:
    """[2^k, 2] fp32 for a sorted 8-bit map `qmap` [256]: for the fp32 values whose bits start
    with the k bits i, (the code of the smallest of them, the one rounding threshold among the
    rest or NaN). The code of such a value x is then row[0] + (x >= row[1]): exactly torchao's
    nearest code, for every fp32 x (csrc/cpu/adamw.cpp). ValueError where a bucket holds two
    thresholds (none does in torchao's two maps at k = 16)."""
    t = rounding_thresholds(qmap)
    top, low = torch.arange(1 << k, dtype=torch.int64), (1 << (32 - k)) - 1
    neg = top >= 1 << (k - 1)  # sign-magnitude: a negative bucket's smallest has its low bits set
    smallest = _bits_to_float((top << (32 - k)) | torch.where(neg, low, 0))
    largest = _bits_to_float((top << (32 - k)) | torch.where(neg, 0, low))
    nan = smallest.isnan()  # NaN buckets (and -inf) take code 0, as in torchao
    below = torch.where(nan, 0, torch.searchsorted(t, smallest, right=True))
    inside = torch.where(nan, 0, torch.searchsorted(t, largest.nan_to_num(nan=math.inf),
                                                    right=True) - below)
    if int(inside.max()) > 1:
        raise ValueError(f"code_table: a bucket of {32 - k} low bits holds "
                         f"{int(inside.max())} rounding thresholds; use more than k={k} bits")
    thr = torch.where(inside == 1, t[below.clamp_max(254)], math.nan)
    return torch.stack([below.float(), thr], dim=1)


def _bits_to_float(b: torch.Tensor) -> torch.Tensor:
    """fp32 values of the bit patterns b (int64 in [0, 2^32))."""
    return torch.where(b >= 1 << 31, b - (1 << 32), b).to(torch.int32).view(torch.float32)


@functools.cache
def _adamw_8bit_cpu():
    """`AdamW8bitCPU`: torchao's AdamW8bit (built lazily: torchao is an optional dependency)."""
    base = _adamw_8bit()
    from torchao.optim.adam import single_param_adam
    from torchao.optim.subclass_8bit import OptimState8bit

    class AdamW8bitCPU(base):
        """torchao's AdamW8bit, its states and checkpoints unchanged, for fp32 and bf16 CPU
        parameters: a parameter whose moments are 8-bit steps in rlfuse's kernel
        (`_C.adamw8bit_step_`, torchao's arithmetic, each code from `code_table`; bf16 weights
        rounded stochastically, the noise seeded from torch's generator as torchao's is); the
        others (under 4096 elements, or not a multiple of the block) in torchao's step, run
        eagerly."""

        @torch.no_grad()
        def step(self, closure=None):
            assert closure is None, "AdamW8bitCPU.step: no closure"
            tables = self.__dict__.setdefault("_code_tables", {})  # by signedness
            for group in self.param_groups:
                (b1, b2), lr = group["betas"], group["lr"]
                if group["amsgrad"]:
                    raise NotImplementedError("AdamW8bitCPU: amsgrad (use torchao's AdamW8bit)")
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = self._new_buffer(p, True)
                        state["exp_avg_sq"] = self._new_buffer(p, False)
                    state["step"] += 1
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                    rounds = self.bf16_stochastic_round and p.dtype == torch.bfloat16
                    if not (isinstance(m, OptimState8bit) and p.is_contiguous()
                            and (rounds or p.dtype == torch.float32)):
                        single_param_adam(p.detach(), p.grad, state["step"], m, v, None,
                                          lr, b1, b2, group["weight_decay"], group["eps"],
                                          True, rounds)
                        continue
                    moments = []
                    for x in (m, v):
                        if x.signed not in tables:
                            tables[x.signed] = code_table(x.qmap)
                        moments += [x.codes.view(-1), x.scale, x.qmap, tables[x.signed]]
                    bc1, bc2 = (float(1 - b ** state["step"]) for b in (b1, b2))
                    seed = int(torch.randint(-2 ** 63, 2 ** 63 - 1, ())) if rounds else 0
                    cpp_ext().adamw8bit_step_(
                        p.detach().view(-1), p.grad.to(p.dtype).contiguous().view(-1), *moments,
                        float(lr), b1, b2, group["weight_decay"], group["eps"], bc1, bc2, seed)

    return AdamW8bitCPU
