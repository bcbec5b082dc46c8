"""`rlfuse bench engine`: full GRPO and DPO training steps, generation included, side by side
with TRL's GRPOTrainer / DPOTrainer on the same model, data and batch.

The default is the reference configuration of the engine's performance target: a random-init
Qwen2 (hidden 256, 4 layers, 4 heads, intermediate 1024, vocab 32000, fp32; `dtype=bfloat16`
loads the weights in bf16 in every system); GRPO with one
prompt x 8 completions of up to 64 tokens per step, beta 0.04, loss dapo, one optimizer step
per rollout; DPO (sigmoid, beta 0.1) with 8 pairs of 40-token sequences per step.

Each (system, trainer) runs in a fresh subprocess, so its peak RSS is its own. Systems:
  rlfuse            the engine with the fused kernels (impl=auto)
  rlfuse-reference  the engine with materialized logits (impl=reference): the kernels' share
  trl               TRL's trainers (skipped with a note when trl is not installed)
  trl+rlfuse        the same TRL run with `rlfuse.integrations.trl`'s drop-in trainers
A step is timed from its start to the end of its optimizer step; `warmup` steps are dropped and
the median of `steps` is reported. Tokens: GRPO counts generated completion tokens, DPO every
prompt + completion token of the chosen and rejected sequences. rlfuse's DPO computes its
reference log-probs once for the whole dataset (TRL recomputes them each step by default);
that pass is timed and its per-step share is added to rlfuse's DPO step time.
Results print as a table and go to `<out>/engine_<device>.json`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from rlfuse.engine.config import ConfigError, parse

from .measure import die_with_parent

SYSTEMS = ("rlfuse", "rlfuse-reference", "trl", "trl+rlfuse")
TRL_SYSTEMS = ("trl", "trl+rlfuse")


@dataclasses.dataclass(frozen=True)
class EngineBench:
    out: str = "bench_results"
    systems: str = "rlfuse,trl,trl+rlfuse"
    trainers: str = "grpo,dpo"
    model_path: str = ""             # local HF checkpoint; "" -> the random-init Qwen2 below
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0            # 0: num_heads (no GQA)
    intermediate_size: int = 1024
    vocab_size: int = 32000
    steps: int = 5
    warmup: int = 2
    group_size: int = 8              # GRPO completions per step (of one prompt)
    max_new_tokens: int = 64
    beta: float = 0.04               # GRPO KL coefficient (a reference model is kept)
    dpo_pairs: int = 8               # pairs per DPO step
    dpo_tokens: int = 40             # tokens of each chosen / rejected sequence, prompt included
    lora_r: int = 0                  # > 0: LoRA policies (peft, all linear layers, alpha 16) in
                                     # both systems; the reference is then the base model
    device: str = "cpu"
    dtype: str = "float32"           # float32 | bfloat16: the weights' dtype in every system (TRL's
                                     # AdamW on bf16 weights, rlfuse's stochastic-rounding AdamW)
    threads: int = 0                 # torch CPU threads in each run; 0 keeps torch's default
    gradient_checkpointing: bool = False  # in every system
    step_in_backward: bool = False   # rlfuse systems: optim.step_in_backward=true (no gradient
                                     # buffer; no clipping in rlfuse then, TRL keeps its own)
    optim_states: str = "param"      # rlfuse systems: optim.states (int8: torchao's 8-bit AdamW)
    reference: str = "copy"          # rlfuse systems: model.reference (int8: int8 linear layers)
    rollout_weights: str = "policy"  # rlfuse GRPO: grpo.rollout.weights (int8: an int8 sampler,
                                     # with grpo.loss.rollout_correction=tis)
    tie_embeddings: bool = False     # the random model's LM head is its input embedding

    def __post_init__(self):
        for name in self.systems.split(","):
            if name not in SYSTEMS:
                raise ConfigError(f"systems: unknown {name!r}; choose from {', '.join(SYSTEMS)}")
        for name in self.trainers.split(","):
            if name not in ("grpo", "dpo"):
                raise ConfigError(f"trainers: unknown {name!r}; choose from grpo, dpo")
        if self.steps < 1 or self.warmup < 0:
            raise ConfigError("steps must be >= 1 and warmup >= 0")
        if self.dpo_tokens < 8:
            raise ConfigError("dpo_tokens must be >= 8")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype: got {self.dtype!r}; choose from float32, bfloat16")


# ----------------------------------------------------------------------------- setup
def _write_model(b: EngineBench, path: str) -> None:
    from rlfuse.engine.config import ModelConfig
    from rlfuse.engine.model import char_tokenizer, tiny_model

    tok = char_tokenizer(vocab_size=b.vocab_size)
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=b.hidden_size, num_layers=b.num_layers, num_heads=b.num_heads,
                      num_kv_heads=b.num_kv_heads or b.num_heads,
                      intermediate_size=b.intermediate_size)
    tiny_model(cfg, tok, max_positions=512, tie=b.tie_embeddings).save_pretrained(path)
    tok.save_pretrained(path)


def _write_data(b: EngineBench, tmp: str) -> dict:
    """GRPO prompts ("a+b=" with the answer) and DPO pairs of exactly `dpo_tokens` characters."""
    from rlfuse.engine.data import write_jsonl

    rng = random.Random(0)
    n = b.warmup + b.steps
    prompts = []
    for _ in range(n):
        a, c = rng.randrange(10, 1000), rng.randrange(10, 1000)
        prompts.append({"prompt": f"{a}+{c}=", "answer": str(a + c)})
    # sequence = BOS + prompt + completion + EOS = dpo_tokens tokens
    p_len = (b.dpo_tokens - 2) // 2
    c_len = b.dpo_tokens - 2 - p_len
    word = lambda k: "".join(rng.choice("abcdefghij ") for _ in range(k))  # noqa: E731
    pairs = [{"prompt": word(p_len), "chosen": word(c_len), "rejected": word(c_len)}
             for _ in range(n * b.dpo_pairs)]
    paths = {k: os.path.join(tmp, f"{k}.jsonl") for k in ("prompts", "pairs")}
    write_jsonl(paths["prompts"], prompts)
    write_jsonl(paths["pairs"], pairs)
    return paths


# ----------------------------------------------------------------------------- workers
def _rlfuse(b: EngineBench, trainer: str, model_dir: str, data: dict, impl: str) -> dict:
    import rlfuse

    from rlfuse.engine.config import (DPOConfig, GRPOConfig, ModelConfig, OptimConfig, RewardSpec,
                                      RolloutConfig, TrainConfig)
    from rlfuse.engine.dpo import DPOTrainer
    from rlfuse.engine.grpo import GRPOTrainer

    common = dict(steps=b.warmup + b.steps, out_dir=os.path.dirname(data["prompts"]),
                  device=b.device, progress=False, keep_checkpoints=0, save_every_minutes=0,
                  overwrite=True,
                  model=ModelConfig(path=model_dir, lora_r=b.lora_r, dtype=b.dtype,
                                    gradient_checkpointing=b.gradient_checkpointing,
                                    reference=b.reference),
                  optim=OptimConfig(lr=1e-6, max_grad_norm=0.0 if b.step_in_backward else 1.0,
                                    step_in_backward=b.step_in_backward,
                                    states=b.optim_states))
    if trainer == "grpo":
        roll = RolloutConfig(prompts_per_step=1, samples_per_prompt=b.group_size,
                             max_new_tokens=b.max_new_tokens, rewards=(RewardSpec("exact_answer"),),
                             weights=b.rollout_weights)
        tis = "tis" if b.rollout_weights == "int8" else None
        cfg = GRPOConfig(data=data["prompts"], rollout=roll, passes=1,
                         loss=rlfuse.PolicyLossConfig(loss_type="dapo", beta=b.beta, impl=impl,
                                                      rollout_correction=tis))
        t = GRPOTrainer(TrainConfig(algo="grpo", grpo=cfg, **common))
    else:
        cfg = DPOConfig(data=data["pairs"], batch_size=b.dpo_pairs,
                        loss=rlfuse.PreferenceLossConfig(beta=0.1, impl=impl))
        t = DPOTrainer(TrainConfig(algo="dpo", dpo=cfg, **common))
    t0 = time.perf_counter()
    extra = 0.0
    if trainer == "dpo":  # the one reference pass over the dataset, shared out per step
        t.ref = t.reference_logprobs()
        extra = (time.perf_counter() - t0) / (b.warmup + b.steps)
    times, tokens, rollout = [], [], []
    for _ in range(b.warmup + b.steps):
        t0 = time.perf_counter()
        m = t.train_step()
        times.append(time.perf_counter() - t0 + extra)
        tokens.append(m["completion_length"] * b.group_size if trainer == "grpo"
                      else 2 * b.dpo_pairs * b.dpo_tokens)
        if trainer == "grpo":  # the sampling share of the step
            rollout.append(tokens[-1] / m["rollout_tokens_per_s"])
    return {"step_s": times[b.warmup:], "tokens": tokens[b.warmup:], "ref_pass_s": extra,
            "rollout_s": rollout[b.warmup:],
            "weights_dtype": str(next(t.model.parameters()).dtype)}


def _trl(b: EngineBench, trainer: str, model_dir: str, data: dict, drop_in: bool) -> dict:
    """TRL's trainer, or with `drop_in` rlfuse's subclass of it: the only difference."""
    import datasets
    import transformers
    import trl
    from transformers import AutoTokenizer

    trainers = trl
    if drop_in:
        from rlfuse.integrations import trl as trainers

    from rlfuse.engine.data import read_jsonl
    from rlfuse.engine.rewards import exact_answer

    class Timer(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.lengths, self.t0 = [], [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    tok = AutoTokenizer.from_pretrained(model_dir)
    common = dict(output_dir=os.path.join(os.path.dirname(data["prompts"]), "trl"),
                  max_steps=b.warmup + b.steps, learning_rate=1e-6, logging_steps=1,
                  report_to="none", save_strategy="no", disable_tqdm=True,
                  use_cpu=b.device == "cpu", bf16=False, model_init_kwargs={"dtype": b.dtype},
                  gradient_checkpointing=b.gradient_checkpointing)
    if b.lora_r:
        from peft import LoraConfig

        peft = {"peft_config": LoraConfig(r=b.lora_r, lora_alpha=16, target_modules="all-linear",
                                          task_type="CAUSAL_LM")}
    else:
        peft = {}
    timer = Timer()
    if trainer == "grpo":
        def reward(prompts, completions, answer, **kw):
            return exact_answer(prompts, completions, answer=answer)

        args = trl.GRPOConfig(num_generations=b.group_size, max_completion_length=b.max_new_tokens,
                              beta=b.beta, loss_type="dapo",
                              per_device_train_batch_size=b.group_size, **common)
        ds = datasets.Dataset.from_list(read_jsonl(data["prompts"], ("prompt",)))
        t = trainers.GRPOTrainer(model=model_dir, reward_funcs=reward, args=args,
                                 train_dataset=ds, processing_class=tok, callbacks=[timer],
                                 **peft)
    else:
        args = trl.DPOConfig(beta=0.1, per_device_train_batch_size=b.dpo_pairs, **common)
        ds = datasets.Dataset.from_list(read_jsonl(data["pairs"], ("prompt", "chosen", "rejected")))
        t = trainers.DPOTrainer(model=model_dir, args=args, train_dataset=ds,
                                processing_class=tok, callbacks=[timer], **peft)
    t.train()
    n = b.warmup + b.steps
    tokens = ([x * b.group_size for x in timer.lengths] if trainer == "grpo"
              else [2 * b.dpo_pairs * b.dpo_tokens] * n)
    return {"step_s": timer.times[b.warmup:], "tokens": tokens[b.warmup:n],
            "weights_dtype": str(next(t.model.parameters()).dtype)}


def _worker(spec: dict) -> dict:
    b = EngineBench(**spec["bench"])
    if b.threads:
        torch.set_num_threads(b.threads)
    from rlfuse.engine.model import quiet_transformers

    quiet_transformers()
    if spec["system"] in TRL_SYSTEMS:
        res = _trl(b, spec["trainer"], spec["model_dir"], spec["data"],
                   drop_in=spec["system"] == "trl+rlfuse")
    else:
        impl = "reference" if spec["system"] == "rlfuse-reference" else "auto"
        res = _rlfuse(b, spec["trainer"], spec["model_dir"], spec["data"], impl)
    from rlfuse.engine.monitor import peak_memory_mb

    return {**res, "peak_rss_mb": peak_memory_mb()}


# ----------------------------------------------------------------------------- driver
def _run_one(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "rlfuse.benches.engine", "--worker",
                           json.dumps(spec)], capture_output=True, text=True,
                          preexec_fn=die_with_parent)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {spec['system']}/{spec['trainer']} failed:\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(b: EngineBench) -> dict:
    systems = b.systems.split(",")
    if importlib.util.find_spec("trl") is None and set(systems) & set(TRL_SYSTEMS):
        print("rlfuse bench engine: trl is not installed, skipping trl and trl+rlfuse "
              "(pip install trl)")
        systems = [s for s in systems if s not in TRL_SYSTEMS]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = b.model_path
        if not model_dir:
            model_dir = os.path.join(tmp, "model")
            _write_model(b, model_dir)
        data = _write_data(b, tmp)
        for trainer in b.trainers.split(","):
            for system in systems:
                spec = {"bench": dataclasses.asdict(b), "system": system, "trainer": trainer,
                        "model_dir": model_dir, "data": data}
                r = _run_one(spec)
                step = statistics.median(r["step_s"])
                tok = statistics.median(r["tokens"])
                rows.append({"trainer": trainer, "system": system, "step_s": step,
                             "tokens_per_step": tok, "tokens_per_s": tok / step,
                             "peak_rss_mb": r["peak_rss_mb"], "step_s_all": r["step_s"],
                             "weights_dtype": r["weights_dtype"],
                             **({"ref_pass_s_per_step": r["ref_pass_s"]} if "ref_pass_s" in r
                                else {}),
                             **({"rollout_s": statistics.median(r["rollout_s"])}
                                if r.get("rollout_s") else {})})
    for r in rows:  # ratios to TRL on the same trainer
        peer = next((p for p in rows if p["trainer"] == r["trainer"] and p["system"] == "trl"),
                    None)
        if peer:
            r["speedup_vs_trl"] = r["tokens_per_s"] / peer["tokens_per_s"]
            r["rss_vs_trl"] = r["peak_rss_mb"] / peer["peak_rss_mb"]
    from .report import machine_info

    if b.threads:
        torch.set_num_threads(b.threads)  # so the record shows the workers' thread count
    result = {"config": dataclasses.asdict(b), "rows": rows, "machine": machine_info(b.device)}
    os.makedirs(b.out, exist_ok=True)
    dev = "cuda" if b.device == "cuda" else "cpu"
    with open(os.path.join(b.out, f"engine_{dev}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'trainer':<8}{'system':<18}{'step s':>8}{'tokens/s':>10}{'peak RSS MB':>13}"
          f"{'x TRL tok/s':>13}{'x TRL RSS':>11}")
    for r in rows:
        vs = (f"{r['speedup_vs_trl']:>13.2f}{r['rss_vs_trl']:>11.2f}" if "speedup_vs_trl" in r
              else f"{'-':>13}{'-':>11}")
        print(f"{r['trainer']:<8}{r['system']:<18}{r['step_s']:>8.3f}{r['tokens_per_s']:>10.0f}"
              f"{r['peak_rss_mb']:>13.0f}{vs}")
    return result


def main(argv=None) -> int:
    """`rlfuse bench engine [key=value ...]` (keys: EngineBench fields)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        print(json.dumps(_worker(json.loads(argv[1]))))
        return 0
    b = parse(EngineBench, argv, "rlfuse bench engine", __doc__)
    if b is not None:  # None: --help
        run(b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
