"""The benchmark CLI at the tiny preset: reports written, the guard, the memory subprocess."""
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch

from rlfuse._backend import cpp_ext
from rlfuse.benches import cases, cli, measure, providers, report
from rlfuse.benches.providers import Provider, naive_logprobs

FAST = ["--shape", "tiny", "--reps", "1", "--warmup", "1", "--no-memory", "--quiet"]


def _report(tmp_path, stem):
    return json.loads((tmp_path / f"{stem}.json").read_text())


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo")
def test_machine_names_the_cpu_generation_and_its_vector_isa():
    m = report.machine_info()
    assert m["cpu_id"].startswith("family ") and " MHz" in m["cpu_id"]
    isa = m["cpu_isa"].split()
    assert set(isa) <= set(report.ISA_FLAGS)
    cap = torch.backends.cpu.get_cpu_capability()  # what torch's own kernels dispatch to
    assert "avx2" in isa or cap not in ("AVX2", "AVX512")
    assert "avx512f" in isa or cap != "AVX512"
    assert f"[{m['cpu_isa']}]" in report.machine_line(m)


def test_bench_writes_table_json_csv_png(tmp_path, capsys):
    rc = cli.main(["linear_logprobs", "--mode", "full", "--providers",
                   "rlfuse,naive,liger,floor", "--out", str(tmp_path)] + FAST)
    assert rc == 0
    out = capsys.readouterr().out
    assert "median ms" in out and "x floor" in out and "naive" in out
    stem = "linear_logprobs_tiny_fp32_full_cpu"
    rep = _report(tmp_path, stem)
    assert rep["machine"]["torch"] == torch.__version__
    assert rep["machine"]["cores"] >= 1 and rep["machine"]["cpu"] and "git_commit" in rep["machine"]
    s = cases.get_shape("tiny")
    assert rep["flops"] == pytest.approx(4 * 2 * s.n * s.h * s.v)  # 4 GEMMs: with recompute
    rows = {r["provider"]: r for r in rep["results"]}
    for name in ("naive", "floor"):
        assert rows[name]["status"] == "ok" and rows[name]["median_ms"] > 0
        assert rows[name]["gflops"] > 0
    assert rows["floor"]["x_floor"] == pytest.approx(1.0)
    assert rows["naive"]["check_err"] < 1e-4
    assert rows["liger"]["status"] == "n/a" and rows["liger"]["reason"]
    with open(tmp_path / f"{stem}.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["provider"] for r in table] == [r["provider"] for r in rep["results"]]
    assert table[0]["torch"] == torch.__version__ and table[0]["cpu"]
    assert (tmp_path / f"{stem}.png").stat().st_size > 0
    # a preset name with a dot keeps its whole name in the file names
    paths = report.write(rep, tmp_path / "q" / "linear_logprobs_qwen-0.5b_fp32_full_cpu")
    assert [p.name for p in paths] == ["linear_logprobs_qwen-0.5b_fp32_full_cpu.json",
                                       "linear_logprobs_qwen-0.5b_fp32_full_cpu.csv"]


@pytest.mark.parametrize("op,mode", [("policy_loss", "full"), ("preference_loss", "backward"),
                                     ("group_advantages", "forward")])
def test_bench_other_ops(tmp_path, op, mode):
    why = cases.op_unavailable(cases.get_op(op))
    if why:
        pytest.skip(why)
    rc = cli.main([op, "--mode", mode, "--providers", "rlfuse,naive", "--no-plot",
                   "--out", str(tmp_path)] + FAST)
    assert rc == 0
    rows = _report(tmp_path, f"{op}_tiny_fp32_{mode}_cpu")["results"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["check_err"] <= 1e-4 for r in rows)


def _wrong_gradient(c):
    logp, ent = naive_logprobs(c.hidden, c.weight, c.targets)
    return logp + 0.5 * (logp - logp.detach()), ent  # right values, gradient x 1.5


def _wrong_value(c):
    logp, ent = naive_logprobs(c.hidden, c.weight, c.targets)
    return logp, ent * 1.01


def _raises(c):
    raise RuntimeError("boom")


def test_guard_reports_and_does_not_time_a_wrong_provider(tmp_path, monkeypatch):
    table = providers.PROVIDERS["linear_logprobs"]
    monkeypatch.setitem(table, "wrong-grad", Provider("wrong-grad", _wrong_gradient))
    monkeypatch.setitem(table, "wrong-value", Provider("wrong-value", _wrong_value))
    monkeypatch.setitem(table, "raises", Provider("raises", _raises))
    rc = cli.main(["linear_logprobs", "--providers", "naive,wrong-grad,wrong-value,raises",
                   "--no-plot", "--out", str(tmp_path)] + FAST)
    assert rc == 1
    rows = {r["provider"]: r for r in
            _report(tmp_path, "linear_logprobs_tiny_fp32_full_cpu")["results"]}
    assert rows["naive"]["status"] == "ok"
    for name, what in (("wrong-grad", ("dhidden", "dweight")), ("wrong-value", ("entropy",))):
        assert rows[name]["status"] == "MISMATCH"
        assert rows[name]["median_ms"] is None and rows[name]["extra_mb"] is None
        assert any(w in rows[name]["reason"] for w in what)
    assert rows["raises"]["status"] == "failed" and "boom" in rows["raises"]["reason"]


def test_guard_catches_a_wrong_loss_in_bf16():
    case = cases.check_case(cases.build_case("linear_logprobs", cases.get_shape("tiny"),
                                             torch.bfloat16))
    ref = providers.get_provider("linear_logprobs", "rlfuse-reference")
    ok = measure.check(case, providers.get_provider("linear_logprobs", "naive"), ref)
    bad = measure.check(case, Provider("wrong-grad", _wrong_gradient), ref)
    assert ok.ok and not bad.ok


def test_memory_subprocess_returns_a_number():
    s = cases.get_shape("tiny")
    spec = measure.MemSpec("linear_logprobs", "naive", asdict(s), "fp32", "full")
    mem = measure.measure_memory(spec, timeout=120)
    assert mem["grad_bytes"] == 4 * (s.n * s.h + s.v * s.h)
    # naive holds the fp32 [N, V] logits (and more) on top of the gradients
    assert isinstance(mem["extra_bytes"], int)
    assert mem["extra_bytes"] >= mem["grad_bytes"] + 4 * s.n * s.v


def test_sweep_writes_points_and_plot(tmp_path):
    rc = cli.main(["sweep", "linear_logprobs", "--ns", "128,256", "--providers", "rlfuse,naive",
                   "--out", str(tmp_path)] + FAST)
    assert rc == 0
    rep = _report(tmp_path, "sweep_linear_logprobs_tiny_fp32_full_cpu")
    assert [(p["n"], p["status"]) for p in rep["points"]][:2] == [(128, "ok"), (128, "ok")]
    assert len(rep["points"]) == 4 and all(p["median_ms"] > 0 for p in rep["points"])
    assert (tmp_path / "sweep_linear_logprobs_tiny_fp32_full_cpu.png").stat().st_size > 0


def test_cli_errors_name_the_argument(capsys):
    with pytest.raises(SystemExit, match="unknown provider 'nope'"):
        cli.main(["linear_logprobs", "--providers", "naive,nope"] + FAST)
    with pytest.raises(SystemExit, match="modes forward"):
        cli.main(["group_advantages", "--mode", "full"] + FAST)
    assert cli.main(["--list"]) == 0
    assert "rlfuse-cpp" in capsys.readouterr().out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_bench_subprocesses_die_with_their_parent():
    """A killed bench leaves no worker behind: its subprocesses get SIGTERM when it dies."""
    code = ("import subprocess, sys, time\n"
            "from rlfuse.benches.measure import die_with_parent\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
            "                     preexec_fn=die_with_parent)\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())

    def alive(pid):  # a zombie waiting for its reaper counts as gone
        try:
            with open(f"/proc/{pid}/status") as f:
                return "\tZ" not in next(line for line in f if line.startswith("State:"))
        except FileNotFoundError:
            return False
    assert alive(child)
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(child)


@pytest.mark.skipif(cpp_ext() is None, reason="C++ extension not built")
def test_decode_bench_times_every_path(capsys):
    from rlfuse.benches import decode

    rows = decode.main(threads=1, shapes=((24, 32),), rows=(1, 9), read_bytes=1 << 20,
                       cache_bytes=1 << 12, max_seconds=0.1)
    assert [(r["out"], r["in"], r["rows"]) for r in rows] == [(24, 32, 1), (24, 32, 9)]
    cols = ("fp32 torch", "fp32 rlfuse", "bf16 torch", "bf16 rlfuse", "int8 torch",
            "int8 dequant", "int8 rlfuse")
    assert all(r[c] > 0 for r in rows for c in cols)
    assert "read bandwidth" in capsys.readouterr().out


@pytest.mark.skipif(cpp_ext() is None, reason="C++ extension not built")
def test_epilogue_bench_times_both_kernels(capsys):
    from rlfuse.benches import epilogue

    rows = epilogue.main(threads=1, rows=3, vocab=37)
    assert [r["transform"] for r in rows] == ["plain", "temp 0.7"]
    assert all(r[k] > 0 for r in rows for k in ("stats", "partials"))
    assert "logits_stats ms" in capsys.readouterr().out
