"""The C++ epilogues alone on this CPU: `logits_stats` and `logits_partials` over one chunk of
fp32 logits (no GEMM), plain and with a temperature.

    python -m rlfuse.benches.epilogue [threads] [rows] [vocab]

The README's cost of the s - 1 sum-exp (Tests, peaked rows) comes from this command.
"""
import sys

import torch

from rlfuse._backend import cpp_ext
from rlfuse.benches.measure import summarize, time_step
from rlfuse.benches.report import machine_info, machine_line


def main(threads: int = 2, rows: int = 256, vocab: int = 151936) -> list[dict]:
    ext = cpp_ext()
    if ext is None:
        raise SystemExit("rlfuse.benches.epilogue: the C++ extension rlfuse._C is not built")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    z = torch.randn(rows, vocab) * 2
    t = torch.randint(0, vocab, (rows,))
    print(machine_line(machine_info()))
    print(f"fp32 logits [{rows}, {vocab}], {threads} threads")
    print(f"{'transform':>10} {'logits_stats ms':>16} {'logits_partials ms':>19}")
    out = []
    for name, inv_temp in (("plain", 1.0), ("temp 0.7", 1 / 0.7)):
        args = (1.0, 0.0, inv_temp)
        ms = {kernel: summarize(time_step(None, fn, "cpu", reps=20, max_seconds=5))["median_ms"]
              for kernel, fn in (("stats", lambda: ext.logits_stats(z, t, *args, -100)),
                                 ("partials", lambda: ext.logits_partials(z, t, *args, 0)))}
        out.append({"transform": name, **ms})
        print(f"{name:>10} {ms['stats']:>16.2f} {ms['partials']:>19.2f}")
    return out


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
