"""The machine a run was measured on, and a run's table, JSON, CSV and PNG."""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MB = 2**20


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def _cpuinfo() -> dict:
    """The first processor's /proc/cpuinfo fields ({} where there is none)."""
    out = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, val = line.partition(":")
                out[key.strip()] = val.strip()
    except OSError:
        pass
    return out


def _cpu() -> dict:
    """The CPU's model name, and (where /proc/cpuinfo has them) its family / model / stepping,
    clock, and which of ISA_FLAGS it has: "AMD EPYC" alone names several generations."""
    info = _cpuinfo()
    out = {"cpu": info.get("model name") or platform.processor() or platform.machine()}
    if "cpu family" in info:
        out["cpu_id"] = (f"family {info['cpu family']} model {info.get('model', '?')} "
                         f"stepping {info.get('stepping', '?')}, {info.get('cpu MHz', '?')} MHz")
    if "flags" in info:
        flags = set(info["flags"].split())
        out["cpu_isa"] = " ".join(f for f in ISA_FLAGS if f in flags)
    return out


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def _git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        return (commit + "+dirty") if commit and git("status", "--porcelain", "-uno") else commit
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: str | torch.device = "cpu") -> dict:
    info = {
        **_cpu(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "mem_gb": _mem_total_gb(), "gpu": None, "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "git_commit": _git_commit(), "transformers": _version("transformers"),
        "trl": _version("trl"),
        "liger_kernel": _version("liger-kernel"),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_line(m: dict) -> str:
    isa = f" [{m['cpu_isa']}]" if m.get("cpu_isa") else ""
    where = m["gpu"] or (f"{m['cpu']}{isa}, {m['cores']} cores "
                         f"({m['torch_threads']} torch threads)")
    return f"{where}; torch {m['torch']}; commit {m['git_commit'] or '?'}"


# ----------------------------------------------------------------------------- the table
COLUMNS = ("provider", "status", "median_ms", "gflops", "x_floor", "extra_mb",
           "extra_over_grads_mb", "check_err")
HEADERS = ("provider", "status", "median ms", "GFLOP/s", "x floor", "extra MB", "- grads MB",
           "check err")


def _fmt(key: str, val) -> str:
    if val is None or val == "":
        return "-"
    if key == "check_err":
        return f"{val:.1e}"
    if key == "x_floor":
        return f"{val:.2f}x"
    if isinstance(val, float):
        return f"{val:.1f}" if abs(val) < 1e5 else f"{val:.3g}"
    return str(val)


def table(rows: list[dict]) -> str:
    cells = [HEADERS] + [tuple(_fmt(k, r.get(k)) for k in COLUMNS) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(cell, widths))) for cell in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r['provider']}: {r['reason']}" for r in rows if r.get("reason")]
    return "\n".join(lines + (["notes:"] + notes if notes else []))


def header(report: dict) -> str:
    s = report["shape"]
    return (f"{report['op']}  shape {s['name']} (N {s['n']}, H {s['h']}, V {s['v']}, T {s['seq']})"
            f"  {report['dtype']}  mode {report['mode']}  device {report['device']}  "
            f"inputs {report['input_mb']:.1f} MB\n{report['mode_note']}\n"
            f"{machine_line(report['machine'])}")


# ----------------------------------------------------------------------------- files
def write(report: dict, stem: Path, rows_key: str = "results", plot=None) -> list[Path]:
    """stem.json (everything), stem.csv (one row per result, with the machine), stem.png."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.parent / f"{stem.name}.{ext}" for ext in ("json", "csv")]  # "qwen-0.5b" has a dot
    paths[0].write_text(json.dumps(report, indent=2, default=str) + "\n")
    m = report["machine"]
    fixed = {k: report[k] for k in ("op", "dtype", "mode", "device") if k in report}
    fixed.update(shape=report["shape"]["name"], h=report["shape"]["h"], v=report["shape"]["v"],
                 cpu=m["cpu"], cpu_isa=m.get("cpu_isa"), cores=m["cores"], gpu=m["gpu"],
                 torch=m["torch"], git_commit=m["git_commit"])
    rows = [{**fixed, **r} for r in report[rows_key]]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    if plot is not None:
        paths.append(stem.parent / f"{stem.name}.png")
        plot(report, paths[-1])
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_plot(report: dict, path: Path) -> None:
    """Median time and peak extra memory per provider (the floor hatched)."""
    plt = _pyplot()
    rows = [r for r in report["results"] if r.get("median_ms") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [r["provider"] for r in rows]
    for ax, key, label in ((axes[0], "median_ms", "median time (ms)"),
                           (axes[1], "extra_mb", "peak memory over inputs (MB)")):
        vals = [r.get(key) or 0.0 for r in rows]
        bars = ax.bar(names, vals, color=["0.75" if n == "floor" else "C0" for n in names])
        for b, n in zip(bars, names):
            if n == "floor":
                b.set_hatch("//")
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom",
                        fontsize=8)
    s = report["shape"]
    fig.suptitle(f"{report['op']} {report['mode']}, {s['name']} (N {s['n']}, H {s['h']}, "
                 f"V {s['v']}) {report['dtype']}\n{machine_line(report['machine'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_plot(report: dict, path: Path) -> None:
    """Working memory (peak over inputs, less the gradients) and median time against N."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by = {}
    for r in report["points"]:
        by.setdefault(r["provider"], []).append(r)
    # The gradient outputs (same for every provider) are left out: what remains is the op's
    # working memory, flat in N for a chunked op, linear for materialized logits.
    for ax, key, label in ((axes[0], "extra_over_grads_mb", "peak over inputs and grads (MB)"),
                           (axes[1], "median_ms", "median time (ms)")):
        for name, pts in by.items():
            pts = [p for p in pts if p.get(key) is not None]
            if pts:
                ax.plot([p["n"] for p in pts], [p[key] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        if key == "median_ms":
            ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    s = report["shape"]
    fig.suptitle(f"{report['op']} {report['mode']} vs tokens, H {s['h']}, V {s['v']}, "
                 f"{report['dtype']}\n{machine_line(report['machine'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
