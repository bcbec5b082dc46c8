"""`rlfuse bench`: time, memory and correctness of an op's providers at a shape preset.

    rlfuse bench [op] --shape small --dtype fp32 --mode full --providers rlfuse-cpp,naive,trl,floor
    rlfuse bench sweep [op] --shape qwen-0.5b --ns 512,1024,4096,16384 --providers rlfuse,naive
    rlfuse bench --list                       ops, modes and which providers run here
    rlfuse bench engine [key=value ...]       full GRPO / DPO training steps (benches/engine.py)
Per provider: the correctness guard on a small slice
(a provider that disagrees is reported, not timed), the median time, GFLOP/s (the GEMM FLOPs the op
must do), the ratio to the floor (those GEMMs alone) and the peak memory over the inputs, measured
in a fresh subprocess. Results go to the terminal and to <out>/<op>_<shape>_<dtype>_<mode>_<device>
.json / .csv / .png with the machine, torch version and git commit. The sweep runs the same per
token count N at fixed H and V. `--device cuda` times with CUDA events and reads
torch.cuda.max_memory_allocated (wired, not measured on the CPU-only machine it was written on).
Exit status 1 when a provider disagrees with the reference or fails.
"""
from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from . import measure, report
from .cases import DTYPES, MODES, OPS, PRESETS, build_case, check_case, get_dtype, get_op, \
    get_shape, op_unavailable
from .providers import PROVIDERS, expand, get_provider

MB = 2**20


# ----------------------------------------------------------------------------- one provider
def _row(name: str, status: str = "ok", reason: str = "", note: str = "") -> dict:
    return {"provider": name, "status": status, "reason": reason, "note": note, "median_ms": None,
            "min_ms": None, "reps": None, "gflops": None, "x_floor": None, "extra_mb": None,
            "retained_mb": None, "grads_mb": None, "extra_over_grads_mb": None, "check_err": None}


def guard(case, names: list[str], progress=None) -> dict[str, measure.CheckResult]:
    """The correctness guard for every runnable provider in `names`, on a slice of `case`."""
    small = check_case(case)
    expected = measure.reference_outputs(small)
    ref = get_provider(case.op, OPS[case.op].reference)
    out = {}
    for name in names:
        p = get_provider(case.op, name)
        if p.run is not None and p.unavailable(case.device) is None:
            if progress is not None:
                progress.set_postfix_str(f"check {name}")
            out[name] = measure.check(small, p, ref, expected)
    return out


def measure_provider(case, name: str, mode: str, args, checked: dict, dtype_name: str) -> dict:
    p = get_provider(case.op, name)
    row = _row(name, note=p.note)
    why = p.unavailable(case.device) or measure.too_big(case, p)
    if why:
        row.update(status="n/a" if p.unavailable(case.device) else "skipped", reason=why)
        return row
    res = checked.get(name)
    if res is not None:
        row["check_err"] = res.max_err
        if res.raised:
            row.update(status="failed", reason=f"raised on the guard slice: {res.detail}")
            return row
        if not res.ok:
            row.update(status="MISMATCH", reason=f"disagrees with {OPS[case.op].reference}: "
                                                 f"{res.detail}")
            return row
    if args.time:
        try:
            pre, step = measure.make_step(case, p, mode)
            row.update(measure.summarize(measure.time_step(
                pre, step, case.device, args.reps, args.warmup, args.max_seconds)))
        except Exception as err:  # noqa: BLE001 - one failing provider must not stop the run
            row.update(status="failed", reason=f"{type(err).__name__}: {err}")
            return row
        finally:
            case.zero_grad()
            gc.collect()
        flops = OPS[case.op].flops(case.shape, mode)
        if flops:
            row["gflops"] = flops / (row["median_ms"] / 1e3) / 1e9
    if args.memory:
        spec = measure.MemSpec(case.op, name, asdict(case.shape), dtype_name, mode, args.seed,
                               str(case.device))
        try:
            mem = measure.measure_memory(spec, args.mem_timeout)
            row.update(extra_mb=mem["extra_bytes"] / MB, retained_mb=mem["retained_bytes"] / MB,
                       grads_mb=mem["grad_bytes"] / MB if mode != "forward" else 0.0)
            row["extra_over_grads_mb"] = row["extra_mb"] - row["grads_mb"]
        except Exception as err:  # noqa: BLE001 - e.g. the subprocess ran out of memory
            row["reason"] = f"memory not measured: {err}"
    return row


def _floor_ratios(rows: list[dict]) -> None:
    floor = next((r["median_ms"] for r in rows if r["provider"] == "floor" and r["median_ms"]),
                 None)
    for r in rows:
        if floor and r["median_ms"]:
            r["x_floor"] = r["median_ms"] / floor


# ----------------------------------------------------------------------------- bench
def _mode_note(spec, mode: str) -> str:
    gemms = (spec.floor_gemms or {}).get(mode)
    floor = f"floor = {gemms} GEMM{'s' if gemms > 1 else ''}" if gemms else "no floor"
    if mode == "forward":
        how = ("no-grad forward" if spec.no_grad_forward or not spec.objective else
               "forward with grad enabled (fused losses write their gradients here)")
    elif mode == "backward":
        how = "backward alone (the forward runs untimed before each call)"
    else:
        how = "forward + backward"
    return f"{how}; {floor}"


def run_bench(args) -> dict:
    spec = get_op(args.op)
    if args.mode not in spec.modes:
        raise SystemExit(f"rlfuse bench: {args.op} supports modes {', '.join(spec.modes)}, "
                         f"not {args.mode!r}")
    shape, dtype, device = get_shape(args.shape), get_dtype(args.dtype), torch.device(args.device)
    names = expand(args.op, args.providers, device)
    rep = {"op": args.op, "shape": asdict(shape), "dtype": args.dtype, "mode": args.mode,
           "device": str(device), "machine": report.machine_info(device),
           "settings": {"reps": args.reps, "warmup": args.warmup, "seed": args.seed,
                        "max_seconds": args.max_seconds},
           "flops": spec.flops(shape, args.mode),
           "floor_gemms": (spec.floor_gemms or {}).get(args.mode),
           "mode_note": _mode_note(spec, args.mode), "input_mb": 0.0, "results": []}
    why = op_unavailable(spec)
    if why:
        rep["results"] = [_row(n, "n/a", why) for n in names]
        return rep
    case = build_case(args.op, shape, dtype, args.seed, device)
    rep["input_mb"] = case.input_bytes() / MB
    bar = tqdm(names, desc=f"{args.op} {args.shape}", unit="provider", disable=args.quiet)
    checked = guard(case, names, bar) if args.check else {}
    for name in bar:
        bar.set_postfix_str(name)
        rep["results"].append(measure_provider(case, name, args.mode, args, checked, args.dtype))
    _floor_ratios(rep["results"])
    return rep


# ----------------------------------------------------------------------------- sweep
def run_sweep(args) -> dict:
    spec = get_op(args.op)
    if args.mode not in spec.modes:
        raise SystemExit(f"rlfuse bench sweep: {args.op} supports modes {', '.join(spec.modes)}")
    base, dtype, device = get_shape(args.shape), get_dtype(args.dtype), torch.device(args.device)
    names = expand(args.op, args.providers, device)
    ns = [int(n) for n in args.ns.split(",") if n.strip()]
    rep = {"op": args.op, "shape": asdict(base), "dtype": args.dtype, "mode": args.mode,
           "device": str(device), "machine": report.machine_info(device), "ns": ns,
           "settings": {"reps": args.reps, "warmup": args.warmup, "seed": args.seed},
           "points": []}
    why = op_unavailable(spec)
    if why:
        rep["points"] = [{"n": n, **_row(p, "n/a", why)} for n in ns for p in names]
        return rep
    checked = {}
    if args.check:  # once, at the base shape's slice (same H, V)
        checked = guard(build_case(args.op, base.check_slice(), dtype, args.seed, device), names)
    bar = tqdm(total=len(ns) * len(names), desc=f"sweep {args.op}", disable=args.quiet)
    for n in ns:
        try:
            case = build_case(args.op, base.with_n(n), dtype, args.seed, device)
        except Exception as err:  # noqa: BLE001 - e.g. an N the op's batch layout cannot take
            rep["points"] += [{"n": n, **_row(p, "failed", f"setup: {err}")} for p in names]
            bar.update(len(names))
            continue
        for name in names:
            bar.set_postfix_str(f"N {n} {name}")
            row = measure_provider(case, name, args.mode, args, checked, args.dtype)
            rep["points"].append({"n": n, **row})
            bar.update()
        del case
        gc.collect()
    bar.close()
    return rep


def sweep_table(rep: dict) -> str:
    names = list(dict.fromkeys(p["provider"] for p in rep["points"]))
    cols = (("extra_mb", "MB"), ("extra_over_grads_mb", "-grads MB"), ("median_ms", "ms"))
    cells = [["N"] + [f"{n} {unit}" for _, unit in cols for n in names]]
    for n in rep["ns"]:
        pts = {p["provider"]: p for p in rep["points"] if p["n"] == n}
        cells.append([str(n)] + [report._fmt(key, pts[k][key]) for key, _ in cols for k in names])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cell, widths)) for cell in cells]
    notes = {f"  N {p['n']} {p['provider']}: {p['reason']}" for p in rep["points"] if p["reason"]}
    return "\n".join(lines + (["notes:"] + sorted(notes) if notes else []))


# ----------------------------------------------------------------------------- CLI
class _Help(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its type and default, as in `rlfuse train --help`."""

    def _get_help_string(self, action):
        if not action.option_strings or action.nargs == 0 or action.default is argparse.SUPPRESS:
            return action.help
        tp = getattr(action.type, "__name__", "str")
        return f"{action.help or ''} (type: {tp}, default: {action.default})"


def _common(ap: argparse.ArgumentParser, default_providers: str) -> None:
    ap.add_argument("op", nargs="?", default="linear_logprobs", choices=list(OPS))
    sizes = "; ".join(f"{k}: N {v.n} H {v.h} V {v.v} T {v.seq}" for k, v in PRESETS.items())
    ap.add_argument("--shape", default="small", choices=list(PRESETS),
                    help=f"preset (llama-8b is for GPUs). {sizes}")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="input dtype")
    ap.add_argument("--mode", default="full", choices=MODES,
                    help="what is timed: forward, backward alone, or both")
    ap.add_argument("--providers", default=default_providers,
                    help="comma list of provider names, or 'all'; 'rlfuse' = impl auto here")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--reps", type=int, default=10, help="timed calls (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    ap.add_argument("--max-seconds", type=float, default=60.0,
                    help="cap on timed seconds per provider (fewer reps when slow)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    ap.add_argument("--out", default="bench_results", help="output folder")
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="skip the memory subprocesses")
    ap.add_argument("--no-time", dest="time", action="store_false", help="memory only")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the correctness guard")
    ap.add_argument("--no-plot", dest="plot", action="store_false", help="no PNG")
    ap.add_argument("--mem-timeout", type=float, default=1800.0,
                    help="seconds before a memory subprocess is stopped")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")


def _list(device: str) -> str:
    lines = []
    for name, spec in OPS.items():
        why = op_unavailable(spec)
        lines.append(f"{name}  modes: {', '.join(spec.modes)}" + (f"  [n/a: {why}]" if why else ""))
        for pname, p in PROVIDERS[name].items():
            reason = p.unavailable(torch.device(device))
            lines.append(f"    {pname:<17} {'n/a: ' + reason if reason else 'runs'}")
    return "\n".join(lines)


def _validate(args) -> None:
    if args.reps < 1 or args.warmup < 0:
        raise SystemExit("rlfuse bench: --reps must be >= 1 and --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("rlfuse bench: --device cuda but torch sees no CUDA device")
    try:
        expand(args.op, args.providers, torch.device(args.device))
    except ValueError as err:
        raise SystemExit(f"rlfuse bench: {err}") from None


def main(argv: Optional[list[str]] = None) -> int:
    from rlfuse.engine.model import quiet_transformers

    quiet_transformers()  # the peers import transformers, which imports torchao, which warns
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["engine"]:
        from .engine import main as engine_main

        return engine_main(argv[1:])
    if argv[:1] == ["sweep"]:
        ap = argparse.ArgumentParser(prog="rlfuse bench sweep", description="Peak memory and "
                                     "time against tokens N at the preset's H and V.",
                                     formatter_class=_Help)
        _common(ap, "rlfuse,naive,liger")
        ap.add_argument("--ns", default="512,1024,2048,4096,8192,16384",
                        help="comma list of token counts")
        args = ap.parse_args(argv[1:])
        _validate(args)
        rep = run_sweep(args)
        text, rows_key, plot = sweep_table(rep), "points", report.sweep_plot
        stem = f"sweep_{args.op}_{args.shape}_{args.dtype}_{args.mode}_{rep['device']}"
        title = (f"sweep {args.op} {args.mode}  H {rep['shape']['h']}  V {rep['shape']['v']}  "
                 f"{args.dtype}\n{report.machine_line(rep['machine'])}")
    else:
        ap = argparse.ArgumentParser(prog="rlfuse bench", description=__doc__,
                                     formatter_class=_Help)
        _common(ap, "all")
        ap.add_argument("--list", action="store_true", help="list ops and providers, then exit")
        args = ap.parse_args(argv)
        if args.list:
            print(_list(args.device))
            return 0
        _validate(args)
        rep = run_bench(args)
        text, rows_key, plot = report.table(rep["results"]), "results", report.bar_plot
        stem = f"{args.op}_{args.shape}_{args.dtype}_{args.mode}_{rep['device']}"
        title = report.header(rep)
    paths = report.write(rep, Path(args.out) / stem.replace(":", ""), rows_key,
                         plot if args.plot else None)
    print(f"{title}\n{text}\nwrote {', '.join(str(p) for p in paths)}")
    rows = rep[rows_key]
    return 1 if any(r["status"] in ("MISMATCH", "failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
