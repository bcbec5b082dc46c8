"""Correctness guard, timing and peak memory of one provider on one case.

Guard: the provider and the op's reference run on `cases.check_case` (a few rows at the same H, V
and dtype); every output and gradient must satisfy ||got - ref|| <= rtol * max(||ref||, atol)
(rtol 1e-4 in fp32, 2e-2 in bf16, 1e-2 in fp16). A provider that fails is reported, not timed.
Time: the median of `reps` calls after `warmup` calls, perf_counter on CPU; on CUDA each call sits
between two CUDA events (wired, documented, not measured on this CPU-only machine). In mode
"backward" the forward runs untimed before each timed backward.
Memory: each provider runs once in a fresh subprocess (`python -m rlfuse.benches.measure SPEC`)
that rebuilds the same case, then reports the peak over the inputs: on CPU the peak resident set
(VmHWM, reset with /proc/self/clear_refs once the inputs exist) minus the resident set before the
call, with glibc's mmap threshold pinned so freed buffers leave the resident set; on CUDA
torch.cuda.max_memory_allocated minus the allocation before the call. Gradients held at the end
count: that is what a training step must hold.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .cases import OPS, Case, Shape, build_case, check_case, get_dtype
from .providers import Provider, floor_step, get_provider

# (rtol, atol): peers that run bf16 GEMMs (TRL, Liger) land near 5e-3 in bf16, 1e-3 in fp16.
TOLERANCE = {torch.float32: (1e-4, 1e-2), torch.bfloat16: (2e-2, 1e-2), torch.float16: (1e-2, 1e-2)}
MEM_TAG = "RLFUSE_MEM "


# ----------------------------------------------------------------------------- one step
def make_step(case: Case, provider: Provider, mode: str):
    """(pre, step): `pre` (untimed, may be None) readies one call, `step` is what is measured."""
    spec = OPS[case.op]
    if mode not in spec.modes:
        raise ValueError(f"{case.op} has modes {spec.modes}, got {mode!r}")
    if provider.run is None:
        return None, floor_step(case, mode)
    run = provider.run
    if mode == "forward":
        grad = bool(case.params) and not spec.no_grad_forward

        def forward():
            with torch.set_grad_enabled(grad):
                run(case)
        return case.zero_grad, forward
    if mode == "full":
        return case.zero_grad, lambda: spec.objective(case, run(case)).backward()
    pending = []

    def pre():
        case.zero_grad()
        pending.append(spec.objective(case, run(case)))
    return pre, lambda: pending.pop().backward()


# ----------------------------------------------------------------------------- the guard
@dataclass
class CheckResult:
    ok: bool
    max_err: float        # worst relative error over outputs and gradients
    detail: str           # the worst entry, or the error raised
    raised: bool = False  # the provider raised instead of returning


def _outputs(case: Case, provider: Provider) -> dict[str, torch.Tensor]:
    spec = OPS[case.op]
    case.zero_grad()
    with torch.enable_grad():
        out = provider.run(case)
        vals = out if isinstance(out, (tuple, list)) else (out,)
        res = {k: v.detach().double() for k, v in zip(spec.outputs, vals)}
        if case.params and spec.objective is not None:
            spec.objective(case, out).backward()
    res.update({k: g.double() for k, g in case.grads().items()})
    case.zero_grad()
    return res


def check(case: Case, provider: Provider, reference: Provider,
          expected: Optional[dict] = None) -> CheckResult:
    """Compare `provider` with `reference` on `case` (`expected`: the reference run, reused)."""
    try:
        ref = expected if expected is not None else _outputs(case, reference)
        got = _outputs(case, provider)
    except Exception as err:  # noqa: BLE001 - a provider that raises is reported, not fatal
        return CheckResult(False, float("inf"), f"{type(err).__name__}: {err}", raised=True)
    rtol, atol = TOLERANCE[case.dtype]
    worst, detail = 0.0, "ok"
    for name, r in ref.items():
        if name not in got:
            return CheckResult(False, float("inf"), f"no {name}")
        g = got[name]
        if g.shape != r.shape:
            return CheckResult(False, float("inf"), f"{name} shape {tuple(g.shape)} != "
                                                    f"{tuple(r.shape)}")
        err = float((g - r).norm() / max(float(r.norm()), atol))
        if not err <= worst:  # NaN counts as worst
            worst, detail = err, f"{name} rel err {err:.2e}"
    ok = worst <= rtol
    return CheckResult(ok, worst, detail if ok else f"{detail} > tol {rtol:.0e}")


def reference_outputs(case: Case) -> dict[str, torch.Tensor]:
    return _outputs(case, get_provider(case.op, OPS[case.op].reference))


# ----------------------------------------------------------------------------- time
def time_step(pre, step, device: torch.device, reps: int = 10, warmup: int = 1,
              max_seconds: float = 60.0) -> list[float]:
    """Seconds per call; `reps` shrinks so the timed calls take about `max_seconds` at most."""
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    first = None
    for _ in range(max(1, warmup)):  # the first call pays one-time costs (compilation, pools)
        if pre:
            pre()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        first = time.perf_counter() - t0
    reps = max(1, min(reps, int(max_seconds / max(first, 1e-9))))
    times = []
    for _ in range(reps):
        if pre:
            pre()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sync()
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> dict:
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "reps": len(times)}


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory for one more provider run (MemAvailable on CPU, free device memory on CUDA)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def too_big(case: Case, provider: Provider, fraction: float = 0.8) -> Optional[str]:
    """Why `provider` must be skipped at this shape (its estimate would not fit), or None."""
    if provider.est_bytes is None:
        return None
    need, free = provider.est_bytes(case), available_bytes(case.device)
    if free is not None and need > fraction * free:
        return f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return None


# ----------------------------------------------------------------------------- memory
@dataclass
class MemSpec:
    op: str
    provider: str
    shape: dict
    dtype: str
    mode: str
    seed: int = 0
    device: str = "cpu"


def die_with_parent() -> None:
    """A bench subprocess's preexec_fn: on Linux the child gets SIGTERM when its parent dies, so
    stopping a bench (Ctrl-C, kill) does not leave a worker computing on. No-op elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def measure_memory(spec: MemSpec, timeout: float = 1800.0) -> dict:
    """Run `spec` in a fresh interpreter; returns extra_bytes (peak over the inputs),
    retained_bytes (still held after the call: the gradients), grad_bytes, input_bytes."""
    env = dict(os.environ)
    # A fixed threshold also turns off glibc's dynamic one: every buffer >= 64 KiB is its own
    # mapping, returned to the OS when freed, so the resident set follows the live tensors.
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "rlfuse.benches.measure", json.dumps(asdict(spec))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=die_with_parent)
    for line in proc.stdout.splitlines():
        if line.startswith(MEM_TAG):
            return json.loads(line[len(MEM_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"memory subprocess exited {proc.returncode}: {' | '.join(tail)}")


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def _child(spec: MemSpec) -> dict:
    device = torch.device(spec.device)
    cuda = device.type == "cuda"
    case = build_case(spec.op, Shape(**spec.shape), get_dtype(spec.dtype), spec.seed, device)
    provider = get_provider(spec.op, spec.provider)
    # One call on a slice first: lazy imports, thread pools and BLAS buffers are one-time costs
    # of the process, not memory the op needs.
    warm = check_case(case)
    pre, step = make_step(warm, provider, spec.mode)
    if pre:
        pre()
    step()
    del warm, pre, step
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        exact = True
    else:
        base = _proc_status("VmRSS")
        exact = _reset_peak_rss()
    pre, step = make_step(case, provider, spec.mode)
    if pre:
        pre()
    step()
    if cuda:
        torch.cuda.synchronize()
        peak, now = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    else:
        gc.collect()
        peak, now = _proc_status("VmHWM"), _proc_status("VmRSS")
    return {"extra_bytes": max(0, peak - base), "retained_bytes": max(0, now - base),
            "grad_bytes": case.grad_bytes(), "input_bytes": case.input_bytes(), "exact": exact}


if __name__ == "__main__":
    result = _child(MemSpec(**json.loads(sys.argv[1])))
    print(MEM_TAG + json.dumps(result), flush=True)
