"""Decode-sized linear layers on this CPU: rlfuse's decode kernel (`rlfuse.decode_linear`)
against torch, for fp32, bf16 and int8 weights, at Qwen2.5-0.5B's layer shapes; and the memory
read bandwidth that bounds a decode step.

    python -m rlfuse.benches.decode [threads]

Each timed call reads a different copy of the weight (enough copies to exceed a 64 MiB cache),
so a weight comes from memory, as in a decode step over 24 layers. torch's rows: `linear` in
the weight's dtype; for int8, its weight-only kernel `torch._weight_int8pack_mm` (on the
activations rounded to bf16, with bf16 scales) and dequantizing (`Int8Linear`'s path for many
rows, `rlfuse.decode.torch_linear`). The crossovers it shows are
where `rlfuse.decode.FLOAT_MAX_ROWS` and `INT8_MAX_ROWS` come from.
"""
import math
import sys
import time

import torch

from rlfuse._backend import cpp_ext
from rlfuse.benches.measure import summarize, time_step
from rlfuse.benches.report import machine_info, machine_line
from rlfuse.decode import torch_linear

# (out, in): q / o, k / v, gate / up, down, the LM head
SHAPES = ((896, 896), (128, 896), (4864, 896), (896, 4864), (151936, 896))
ROWS = (1, 8, 16, 32, 64)
CACHE_BYTES = 64 << 20


def read_gb_per_s(n_bytes: int = 1 << 30, reps: int = 5) -> float:
    """The best of `reps` sums over an fp32 tensor of `n_bytes`."""
    x = torch.ones(n_bytes // 4)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best / 1e9


def _rotating(make, n_bytes: int, cache_bytes: int):
    """A function returning the next of enough weights from `make()` to exceed the cache."""
    copies = [make() for _ in range(max(1, math.ceil(cache_bytes / n_bytes)))]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]
    return nxt


def main(threads: int = 2, shapes=SHAPES, rows=ROWS, read_bytes: int = 1 << 30,
         cache_bytes: int = CACHE_BYTES, max_seconds: float = 3.0) -> list[dict]:
    ext = cpp_ext()
    if ext is None:
        raise SystemExit("rlfuse.benches.decode: the C++ extension rlfuse._C is not built")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    print(machine_line(machine_info()))
    print(f"read bandwidth: {read_gb_per_s(read_bytes):.1f} GB/s (torch.sum over "
          f"{read_bytes / 2**30:g} GiB, {threads} threads)")
    cols = ("fp32 torch", "fp32 rlfuse", "bf16 torch", "bf16 rlfuse", "int8 torch",
            "int8 dequant", "int8 rlfuse")
    print(f"median ms per call; {'out x in':>13} {'rows':>4} " + " ".join(f"{c:>12}" for c in cols))
    out = []
    for n, k in shapes:
        base = torch.randn(n, k)
        scale = base.abs().amax(1) / 127
        q8 = torch.round(base / scale[:, None]).to(torch.int8)
        w32 = _rotating(lambda: base.clone(), 4 * n * k, cache_bytes)
        w16 = _rotating(lambda: base.bfloat16(), 2 * n * k, cache_bytes)
        wq = _rotating(lambda: q8.clone(), n * k, cache_bytes)
        sb = scale.bfloat16()
        linear = torch.nn.functional.linear
        for m in rows:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            fns = {
                "fp32 torch": lambda: linear(x, w32()),
                "fp32 rlfuse": lambda: ext.decode_linear(x, w32(), None, None),
                "bf16 torch": lambda: linear(xb, w16()),
                "bf16 rlfuse": lambda: ext.decode_linear(x, w16(), None, None),
                "int8 torch": lambda: torch._weight_int8pack_mm(xb, wq(), sb),
                "int8 dequant": lambda: torch_linear(x, wq(), None, scale),
                "int8 rlfuse": lambda: ext.decode_linear(x, wq(), scale, None),
            }
            ms = {c: summarize(time_step(None, f, "cpu", reps=20, max_seconds=max_seconds)
                               )["median_ms"] for c, f in fns.items()}
            out.append({"out": n, "in": k, "rows": m, **ms})
            print(f"{'':>18}{n:>6} x {k:<5} {m:>4} " + " ".join(f"{ms[c]:>12.3f}" for c in cols))
    return out


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
