"""`rlfuse bench engine`: wall time of full GRPO and DPO steps, generation included.

For each loss implementation (`auto` = the fused kernels, `reference` = materialized logits)
it builds the same model (the tiny demo model, or `model.path`), runs `warmup` steps, then
times `steps` steps of each trainer, split into phases (GRPO: rollout / optimize; DPO: the
whole step) and reports tokens/s and peak RSS. Results print as a table and go to
`<out>/engine_<device>.json`. The timings include everything a user waits for, so the
kernels' share shrinks as generation and the backbone grow.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import rlfuse

from .config import (DPOConfig, GRPOConfig, ModelConfig, OptimConfig, RewardSpec, TrainConfig,
                     build, parse_overrides)
from .data import write_jsonl
from .monitor import peak_memory_mb


@dataclasses.dataclass(frozen=True)
class EngineBench:
    out: str = "bench_results"
    model_path: str = ""             # local HF checkpoint; "" -> tiny model below
    hidden_size: int = 256
    num_layers: int = 4
    device: str = "auto"
    steps: int = 3
    warmup: int = 1
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 16
    dpo_batch: int = 16
    impls: str = "auto,reference"
    threads: int = 0                 # torch CPU threads; 0 keeps torch's default


def _data(tmp: str) -> tuple[str, str]:
    g = torch.Generator().manual_seed(0)
    ab = torch.randint(10, 1000, (512, 2), generator=g).tolist()
    prompts = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in ab]
    pairs = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": r["answer"][::-1] + "7"}
             for r in prompts]
    write_jsonl(os.path.join(tmp, "prompts.jsonl"), prompts)
    write_jsonl(os.path.join(tmp, "pairs.jsonl"), pairs)
    return os.path.join(tmp, "prompts.jsonl"), os.path.join(tmp, "pairs.jsonl")


def _time_steps(trainer, n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        trainer.train_step()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        m = trainer.train_step()
        out.append((time.perf_counter() - t, m))
    return out


def run(b: EngineBench) -> dict:
    from .dpo import DPOTrainer
    from .grpo import GRPOTrainer

    if b.threads:
        torch.set_num_threads(b.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts, pairs = _data(tmp)
        model = ModelConfig(path=b.model_path or None, hidden_size=b.hidden_size,
                            num_layers=b.num_layers, intermediate_size=2 * b.hidden_size)
        base = dict(steps=b.warmup + b.steps, out_dir=tmp, device=b.device, progress=False,
                    keep_checkpoints=0, model=model, optim=OptimConfig(lr=1e-5))
        for impl in b.impls.split(","):
            grpo = GRPOConfig(data=prompts, prompts_per_step=b.prompts_per_step,
                              group_size=b.group_size, max_new_tokens=b.max_new_tokens,
                              rewards=(RewardSpec("exact_answer"),),
                              loss=rlfuse.PolicyLossConfig(beta=0.04, impl=impl))
            t = GRPOTrainer(TrainConfig(algo="grpo", grpo=grpo, **base))
            res = _time_steps(t, b.steps, b.warmup)
            tok = [m["completion_length"] * b.prompts_per_step * b.group_size for _, m in res]
            rows.append({"trainer": "grpo", "impl": impl,
                         "step_s": statistics.median(s for s, _ in res),
                         "rollout_tokens_per_s": statistics.median(
                             m["rollout_tokens_per_s"] for _, m in res),
                         "train_tokens_per_s": statistics.median(
                             m["train_tokens_per_s"] for _, m in res),
                         "completion_tokens": statistics.median(tok)})
            del t
            dpo = DPOConfig(data=pairs, batch_size=b.dpo_batch,
                            loss=rlfuse.PreferenceLossConfig(impl=impl))
            t = DPOTrainer(TrainConfig(algo="dpo", dpo=dpo, **base))
            res = _time_steps(t, b.steps, b.warmup)
            rows.append({"trainer": "dpo", "impl": impl,
                         "step_s": statistics.median(s for s, _ in res),
                         "train_tokens_per_s": statistics.median(m["tokens_per_s"] for _, m in res)})
            del t
    result = {"config": dataclasses.asdict(b), "rows": rows, "peak_memory_mb": peak_memory_mb(),
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__,
                          "cuda": torch.cuda.get_device_name() if torch.cuda.is_available()
                          else None}}
    os.makedirs(b.out, exist_ok=True)
    dev = "cuda" if (b.device == "cuda" or (b.device == "auto" and torch.cuda.is_available())) \
        else "cpu"
    with open(os.path.join(b.out, f"engine_{dev}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'trainer':<8}{'impl':<11}{'step s':>9}{'rollout tok/s':>15}{'train tok/s':>13}")
    for r in rows:
        roll = f"{r['rollout_tokens_per_s']:.0f}" if "rollout_tokens_per_s" in r else "-"
        print(f"{r['trainer']:<8}{r['impl']:<11}{r['step_s']:>9.3f}{roll:>15}"
              f"{r['train_tokens_per_s']:>13.0f}")
    return result


def main(argv=None) -> int:
    """`rlfuse bench engine [key=value ...]` (keys: EngineBench fields)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("options:", ", ".join(f"{f.name}={f.default!r}"
                                    for f in dataclasses.fields(EngineBench)))
        return 0
    from .model import quiet_transformers

    quiet_transformers()
    run(build(EngineBench, parse_overrides(argv)))
    return 0
