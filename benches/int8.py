"""The int8 sampler's layers on this CPU: `Int8Linear` with torch's int8 kernel (decode=True)
and dequantizing, against the fp32 `linear`, at decode-sized and prefill-sized row counts, for
Qwen2.5-0.5B's MLP shapes; and the memory read bandwidth that bounds a decode step.

    python -m rlfuse.benches.int8 [threads]

The crossover it shows is where `INT8_MM_MAX_ROWS` (engine/model.py) comes from.
"""
import sys
import time

import torch

from rlfuse.benches.measure import summarize, time_step
from rlfuse.benches.report import machine_info, machine_line
from rlfuse.engine.model import Int8Linear

SHAPES = ((4864, 896), (896, 4864))  # (out, in): gate / up, and down
ROWS = (1, 8, 32, 64, 256)


def read_gb_per_s(n_bytes: int = 1 << 30, reps: int = 5) -> float:
    """The best of `reps` sums over an fp32 tensor of `n_bytes`."""
    x = torch.ones(n_bytes // 4)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best / 1e9


def main(threads: int = 2, shapes=SHAPES, rows=ROWS, read_bytes: int = 1 << 30) -> list[dict]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    print(machine_line(machine_info()))
    print(f"read bandwidth: {read_gb_per_s(read_bytes):.1f} GB/s (torch.sum over "
          f"{read_bytes / 2**30:g} GiB, {threads} threads)")
    print(f"{'out x in':>12} {'rows':>5} {'fp32 ms':>9} {'int8 kernel ms':>15} "
          f"{'dequantize ms':>14} {'dequantize / kernel':>20}")
    rows_out = []
    for n, k in shapes:
        w = torch.randn(n, k)
        q = Int8Linear(w, decode=True)

        def kernel(x):  # Int8Linear's decode path, at any row count
            return torch._weight_int8pack_mm(x.bfloat16(), q.qweight, q.scale_bf16).float()

        def dequantize(x):  # its other path
            return torch.nn.functional.linear(x, q.qweight * q.scale)

        for m in rows:
            x = torch.randn(m, k)
            ms = {name: summarize(time_step(None, lambda f=f: f(x), "cpu", reps=20,
                                            max_seconds=5))["median_ms"]
                  for name, f in (("fp32", lambda x: torch.nn.functional.linear(x, w)),
                                  ("kernel", kernel), ("dequantize", dequantize))}
            rows_out.append({"out": n, "in": k, "rows": m, **ms})
            print(f"{n:>6} x {k:<5} {m:>5} {ms['fp32']:>9.3f} {ms['kernel']:>15.3f} "
                  f"{ms['dequantize']:>14.3f} {ms['dequantize'] / ms['kernel']:>20.2f}")
    return rows_out


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
