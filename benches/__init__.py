"""rlfuse.benches: speed, memory and correctness benchmarks of the rlfuse ops against peers.

    cases.py      one setup per op (inputs from a shape preset, dtype and seed), FLOP / GEMM counts
    providers.py  the implementations compared, by name (rlfuse-*, naive, trl, liger, floor)
    measure.py    correctness guard, timing, peak memory in a fresh subprocess per provider
    report.py     the machine, the table, JSON / CSV / PNG
    cli.py        `rlfuse bench [op] ...`, `rlfuse bench sweep ...`, `rlfuse bench engine ...`
    engine.py     full GRPO / DPO training steps of the engine against TRL's trainers
    reference.py  how far `model.reference=int8` moves the reference on the demo's SFT model
    test_bench_ops.py  the same cases as pytest-benchmark suites
                       (`pytest benches/ --benchmark-only`)
"""
