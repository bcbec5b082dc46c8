"""One AdamW step over Qwen2.5-0.5B's parameters (494 M; tied embeddings) on this CPU, for each
optimizer `optim.states` and the weights' dtype can select (rlfuse.engine.optim.make_optimizer),
and torchao's own AdamW8bit step beside rlfuse's kernel for it.

    python -m rlfuse.benches.optim [threads] [--torchao]

Rows: fp32 weights with torch's fused AdamW (`states=param`) and with 8-bit moments
(`states=int8`: rlfuse's kernel, `AdamW8bitCPU`); bf16 weights with rlfuse's
stochastic-rounding AdamW and with 8-bit moments. `--torchao` adds torchao's compiled step on
the same states (slow: tens of seconds a step on a 2-core CPU, plus a compile per shape). Each
row builds fresh weights and random gradients, takes one untimed step (state set-up, compiles),
then reports the median of the timed ones.
"""
import sys

import torch

from rlfuse.benches.measure import summarize, time_step
from rlfuse.benches.report import machine_info, machine_line

H, I, LAYERS, VOCAB, KV = 896, 4864, 24, 151936, 128


def shapes() -> list[tuple]:
    layer = [(H, H), (H,), (KV, H), (KV,), (KV, H), (KV,), (H, H),  # q, k, v with biases; o
             (I, H), (I, H), (H, I), (H,), (H,)]                    # gate, up, down; 2 norms
    return [(VOCAB, H), (H,)] + layer * LAYERS


def main(threads: int = 2, torchao: bool = False) -> list[dict]:
    from rlfuse.engine.optim import _adamw_8bit, make_optimizer

    torch.set_num_threads(threads)
    print(machine_line(machine_info()))
    n = sum(torch.Size(s).numel() for s in shapes())
    print(f"one AdamW step over {n / 1e6:.0f} M parameters (Qwen2.5-0.5B's shapes), "
          f"{threads} threads")
    rows = [("fp32", "param", None), ("fp32", "int8", None), ("bf16", "param", None),
            ("bf16", "int8", None)]
    if torchao:
        rows += [("fp32", "int8", "torchao"), ("bf16", "int8", "torchao")]
    print(f"{'weights':>8} {'states':>7} {'optimizer':>26} {'median s':>9} {'ns/param':>9}")
    out = []
    for dtype_name, states, impl in rows:
        dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
        torch.manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(s) * 0.02).to(dtype)) for s in shapes()]
        for p in params:
            p.grad = (torch.randn(p.shape) * 1e-3).to(dtype)
        if impl == "torchao":
            opt = _adamw_8bit()(params, lr=1e-5, bf16_stochastic_round=dtype == torch.bfloat16)
        else:
            opt = make_optimizer(params, 1e-5, (0.9, 0.999), 0.0, 0, states)
        times = time_step(None, opt.step, "cpu", reps=3, max_seconds=60)
        s = summarize(times)["median_ms"] / 1e3
        name = ("torchao " if impl else "") + type(opt).__name__
        out.append({"weights": dtype_name, "states": states, "optimizer": name,
                    "median_s": s, "ns_per_param": s / n * 1e9})
        print(f"{dtype_name:>8} {states:>7} {name:>26} {s:>9.2f} {s / n * 1e9:>9.2f}")
        del opt, params
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--torchao"]
    main(*(int(a) for a in args[:1]), torchao="--torchao" in sys.argv[1:])
