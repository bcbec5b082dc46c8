"""The embedded demo: SFT -> GRPO -> DPO -> evaluation on multi-digit addition, on a CPU.

No downloads: a character tokenizer and a tiny Qwen2-style model are built in code. Task:
"a+b=" -> "c" with `digits`-digit operands; a held-out prompt set never seen in training.
  1. SFT     on demonstrations, stopped once a training probe's accuracy reaches
             sft_target, so RL has headroom and every seed starts about the same
  2. GRPO    G samples per prompt, exact-answer verifier (+ format check), group advantages
  3. DPO     pairs from the GRPO model's own samples: a correct vs an incorrect completion of
             the same training prompt, reference = the GRPO model
  4. eval    after every stage: fixed sampling (temperature, top_p, budget) over the held-out
             prompts and several seeds -> accuracy mean and spread
  PPO        only when selected (`stages=ppo`, `stages=ppo,grpo,dpo`): classic RLHF PPO right
             after SFT, value head + GAE + KL in the reward; `ppo_reward=model` scores with a
             reward model trained on pairs mined from the SFT model (Bradley-Terry)
  extras     `at_n=N`: best@N and maj@N per stage; `regression_set=f.jsonl`: a frozen prompt set
             decoded greedily after every stage and diffed with the stage before
Writes <out>/<stage>/metrics.jsonl + plots/*.png, <out>/results.json, <out>/accuracy.png.
Run: `rlfuse demo` (or `python -m rlfuse.engine.demo`), `--quick` for a smoke-sized run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .config import (GRPOConfig, DPOConfig, ModelConfig, OptimConfig, RewardSpec, RolloutConfig,
                     SFTConfig, TrainConfig, _check, parse)
from .data import write_jsonl
from .dpo import DPOTrainer
from .evaluate import EvalConfig, RegressionSet, accuracy, at_n, compare
from .grpo import GRPOTrainer
from .model import char_tokenizer, quiet_transformers, tiny_model
from .rollout import generate
from .sft import SFTTrainer

import rlfuse


@dataclass(frozen=True)
class DemoConfig:
    out_dir: str = "runs/demo"
    seed: int = 0
    digits: int = 2                  # operand digits
    n_heldout: int = 1024
    hidden_size: int = 96
    num_layers: int = 3
    sft_steps: int = 1500            # at most; SFT stops earlier at sft_target
    sft_batch: int = 256
    sft_lr: float = 3e-3
    sft_target: float = 0.2          # stop SFT once temperature-1 accuracy on sft_probe training
                                     # prompts reaches this (checked every sft_check_every steps),
                                     # so every seed starts RL from the same accuracy; 0: off
    sft_probe: int = 256
    sft_check_every: int = 10
    grpo_steps: int = 80
    grpo_prompts: int = 64
    grpo_group: int = 8
    grpo_lr: float = 2e-4
    dpo_pairs: int = 1024
    dpo_samples: int = 8             # samples per prompt when mining pairs
    dpo_steps: int = 240
    dpo_batch: int = 64
    dpo_lr: float = 3e-4
    dpo_beta: float = 0.1
    dpo_sft_coef: float = 1.0        # NLL on chosen (RPO): keeps DPO from lowering both sides
    grpo_beta: float = 0.02          # KL to the SFT model
    eval_seeds: int = 5
    eval_temperature: float = 1.0
    dpo_gold_chosen: bool = False    # no correct sample: the reference answer is chosen
    stages: str = "grpo,dpo"         # RL stages after SFT, run in this order: ppo, grpo, dpo
    # PPO: the critic barely predicts success on this task (explained variance ~0.05; a linear
    # probe on the SFT model's hidden states reaches ~0.03), so its baseline is about the batch
    # mean: large batches and a low lr keep Adam from random-walking on the gradient noise
    ppo_steps: int = 60
    ppo_prompts: int = 256
    ppo_samples: int = 2             # completions per prompt
    ppo_lr: float = 5e-5
    ppo_reward: str = "verifier"     # verifier | model (an RM trained on pairs mined from SFT)
    ppo_guard_every: int = 5         # ppo_reward=model: over-optimization checks every N steps,
                                     # stopping at the best held-out accuracy; 0: off
    # the reward model: 1024 pairs x 150 steps left it at chance (0.52 pair accuracy); pairs
    # from every training prompt and 2000 steps reach ~0.8 (train) / ~0.72 (held-out prompts)
    rm_pairs: int = 8192
    rm_steps: int = 2000
    threads: int = 1                 # torch CPU threads (1 is fastest for this size under load)
    dtype: str = "float32"           # float32 | bfloat16 (bf16 weights, stochastic-rounding AdamW)
    optim_states: str = "param"      # optim.states: param | int8 (8-bit AdamW moments)
    reference: str = "copy"          # model.reference of GRPO / PPO: copy | int8
    rollout_weights: str = "policy"  # rollout.weights of GRPO / PPO: policy | int8 (with the
                                     # loss's rollout_correction=tis)
    at_n: int = 0                    # > 0: best@n and maj@n after every stage (first eval seed)
    regression_set: Optional[str] = None  # frozen JSONL prompts (+ answers): greedy outputs
                                     # after every stage, diffed with the stage before
    progress: bool = True

    def __post_init__(self):
        _check("sft_check_every", self.sft_check_every >= 1, "must be >= 1")
        _check("sft_probe", self.sft_probe >= 1, "must be >= 1")


QUICK = dict(n_heldout=32, hidden_size=32, num_layers=1, sft_steps=6, sft_batch=16,
             grpo_steps=2, grpo_prompts=4, grpo_group=4, dpo_pairs=16, dpo_samples=4,
             dpo_steps=2, dpo_batch=8, eval_seeds=2, dpo_gold_chosen=True,
             ppo_steps=2, ppo_prompts=4, rm_pairs=16, rm_steps=2, ppo_guard_every=1)


# ----------------------------------------------------------------------------- task
def addition_task(digits: int, n_heldout: int, seed: int):
    """(train, heldout) lists of {"prompt", "answer"}: all a+b pairs, split at random."""
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits
    rng = random.Random(seed)
    if (hi - lo) ** 2 <= 200_000:
        pairs = [(a, b) for a in range(lo, hi) for b in range(lo, hi)]
        rng.shuffle(pairs)
    else:  # too many to list: sample distinct pairs
        seen = set()
        while len(seen) < 100_000:
            seen.add((rng.randrange(lo, hi), rng.randrange(lo, hi)))
        pairs = sorted(seen)
        rng.shuffle(pairs)
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs]
    return rows[n_heldout:], rows[:n_heldout]


def mine_pairs(model, tok, prompts: list[dict], n_pairs: int, samples: int,
               temperature: float, max_new_tokens: int, gold_chosen: bool = False) -> list[dict]:
    """Preference pairs from the model's own samples: (correct, incorrect) per prompt.

    gold_chosen: when no sample is correct, the reference answer is the chosen side (used by
    the smoke-sized run, whose model is too small to be right).
    """
    pairs = []
    for s in range(0, len(prompts), 128):
        rows = prompts[s:s + 128]
        roll = generate(model, tok, [r["prompt"] for r in rows], n=samples,
                        temperature=temperature, max_new_tokens=max_new_tokens)
        for i, r in enumerate(rows):
            texts = roll.texts[i * samples:(i + 1) * samples]
            good = [t for t in texts if t.strip() == r["answer"]]
            bad = [t for t in texts if t.strip() != r["answer"]]
            if gold_chosen and not good:
                good = [r["answer"]]
            if good and bad:
                pairs.append({"prompt": r["prompt"], "chosen": good[0], "rejected": bad[0]})
        if len(pairs) >= n_pairs:
            break
    return pairs[:n_pairs]


def ppo_stage(d: DemoConfig, out: str, model, tok, train: list[dict], budget: int) -> None:
    """Classic RLHF PPO from the SFT model (value head, KL in the reward, GAE); the score is the
    exact-answer verifier, or a reward model trained here on pairs mined from the SFT model
    (PPO then raises the model's score while held-out accuracy falls: over-optimization of an
    imperfect reward model). The guard watches it with the verifier as gold, on 128 training
    prompts (the policy never sees the verifier there, and the held-out set stays untouched by
    the choice of the best-gold policy), and restores that policy on its alert."""
    from .config import GuardConfig, PPOConfig, RewardModelConfig
    from .ppo import PPOTrainer

    rm = RewardModelConfig()
    if d.ppo_reward == "model":
        pairs = mine_pairs(model, tok, train, d.rm_pairs, d.dpo_samples, temperature=1.0,
                           max_new_tokens=budget, gold_chosen=True)
        write_jsonl(os.path.join(out, "rm_pairs.jsonl"), pairs)
        print(f"[ppo] {len(pairs)} preference pairs for the reward model", flush=True)
        rm = RewardModelConfig(pairs=os.path.join(out, "rm_pairs.jsonl"), steps=d.rm_steps,
                               batch_size=64)
    roll = RolloutConfig(prompts_per_step=d.ppo_prompts, samples_per_prompt=d.ppo_samples,
                         max_new_tokens=budget, rewards=(RewardSpec("exact_answer", 1.0),),
                         weights=d.rollout_weights)
    loss = dataclasses.replace(PPOConfig.loss, rollout_correction=correction(d))
    ppo = PPOConfig(data=os.path.join(out, "prompts.jsonl"), rollout=roll, epochs=2,
                    mini_batches=2, kl_coef=0.05, reward=d.ppo_reward, reward_model=rm, loss=loss)
    guard = GuardConfig()
    if d.ppo_reward == "model" and d.ppo_guard_every:
        write_jsonl(os.path.join(out, "guard_prompts.jsonl"), train[-128:])
        guard = GuardConfig(every=d.ppo_guard_every, data=os.path.join(out, "guard_prompts.jsonl"),
                            max_prompts=128, seeds=(0, 1), stop_at_peak=True)
    fit(PPOTrainer(stage_config(d, out, "ppo", d.ppo_steps, d.ppo_lr, ppo=ppo, guard=guard),
                   model, tok), "ppo")


class TargetSFT(SFTTrainer):
    """SFT that stops once its temperature-1 accuracy on a probe of training prompts reaches
    `target`. How many steps a tiny model needs to leave its first loss plateau (the digits'
    marginals) swings with the seed, from ~150 to 600+; a fixed step count then starts RL
    anywhere from 0.1 to 0.8. Stopping on the probe starts every seed at about the target."""

    def __init__(self, cfg, model, tok, probe: list[dict], target: float, every: int, ev):
        super().__init__(cfg, model, tok)
        self.probe, self.target, self.every, self.ev = probe, target, every, ev
        self.probe_accuracy, self.reached = None, False

    def finished(self) -> bool:
        if self.target <= 0 or self.step == 0 or self.step % self.every:
            return False
        self.probe_accuracy = accuracy(self.model, self.tok, [r["prompt"] for r in self.probe],
                                       [r["answer"] for r in self.probe], self.ev)["mean"]
        self.reached = self.probe_accuracy >= self.target
        return self.reached


def sft_trainer(d: DemoConfig, out: str, tok, train: list[dict]) -> TargetSFT:
    """The demo's SFT stage on a fresh tiny model: demonstrations written to out/sft.jsonl, its
    probe the last `sft_probe` training prompts, sampled as the evaluation samples (one seed)."""
    data = os.path.join(out, "sft.jsonl")
    write_jsonl(data, [{"prompt": r["prompt"], "completion": r["answer"]} for r in train])
    cfg = stage_config(d, out, "sft", d.sft_steps, d.sft_lr,
                       sft=SFTConfig(data=data, batch_size=d.sft_batch))
    probe_eval = EvalConfig(temperature=d.eval_temperature, max_new_tokens=d.digits + 3, seeds=(7,))
    return TargetSFT(cfg, tiny_model(cfg.model, tok, max_positions=64), tok,
                     train[-d.sft_probe:], d.sft_target, d.sft_check_every, probe_eval)


# ----------------------------------------------------------------------------- pipeline
class Interrupted(Exception):
    """A stage's trainer stopped on SIGINT / SIGTERM: the demo ends there, later stages unrun."""

    def __init__(self, stage: str, signum: int):
        super().__init__(stage, signum)
        self.stage, self.signum = stage, signum


def fit(trainer, stage: str) -> None:
    trainer.fit()
    if trainer.interrupted:
        raise Interrupted(stage, trainer.interrupted)


def correction(d: DemoConfig):
    """The RL losses' rollout_correction: tis when the rollouts come from an int8 copy."""
    return "tis" if d.rollout_weights == "int8" else None


def stage_config(d: DemoConfig, out: str, algo: str, steps: int, lr: float, **sections):
    model = ModelConfig(hidden_size=d.hidden_size, num_layers=d.num_layers, num_heads=4,
                        num_kv_heads=2, intermediate_size=2 * d.hidden_size, dtype=d.dtype,
                        reference=d.reference)
    return TrainConfig(algo=algo, steps=steps, seed=d.seed, out_dir=os.path.join(out, algo),
                       device="cpu", max_length=4 * d.digits + 8, keep_checkpoints=0,
                       save_every_minutes=0, overwrite=True,  # a re-run replaces the stages
                       progress=d.progress, model=model,
                       optim=OptimConfig(lr=lr, warmup_steps=min(10, steps // 5),
                                         states=d.optim_states,
                                         schedule="cosine" if algo == "sft" and not d.sft_target
                                         else "constant"),
                       **sections)


def run(d: DemoConfig) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(d.threads)
    try:
        return _run(d)
    finally:
        torch.set_num_threads(threads)


def _run(d: DemoConfig) -> dict:
    t_start = time.time()
    quiet_transformers()
    torch.manual_seed(d.seed)
    out = d.out_dir
    os.makedirs(out, exist_ok=True)
    train, heldout = addition_task(d.digits, d.n_heldout, d.seed)
    write_jsonl(os.path.join(out, "prompts.jsonl"), train)
    tok = char_tokenizer()
    budget = d.digits + 3
    ev = EvalConfig(temperature=d.eval_temperature, max_new_tokens=budget,
                    seeds=tuple(range(1000, 1000 + d.eval_seeds)))
    hp, ha = [r["prompt"] for r in heldout], [r["answer"] for r in heldout]
    results, timings, regressions = {}, {}, {}
    reg = (RegressionSet(d.regression_set, tok, os.path.join(out, "regression"), budget)
           if d.regression_set else None)

    def evaluate(stage, model):
        results[stage] = accuracy(model, tok, hp, ha, ev)
        r = results[stage]
        print(f"[{stage}] held-out accuracy {r['mean']:.3f} +- {r['std']:.3f} "
              f"(seeds: {', '.join(f'{x:.3f}' for x in r['per_seed'])})", flush=True)
        if d.at_n:
            r.update(at_n(model, tok, hp, ha, d.at_n, dataclasses.replace(ev, seeds=ev.seeds[:1])))
            print(f"[{stage}] best@1 {r['best@1']:.3f}, best@{d.at_n} {r[f'best@{d.at_n}']:.3f}, "
                  f"maj@{d.at_n} {r[f'maj@{d.at_n}']:.3f}", flush=True)
        if reg is not None:
            diff = regressions[stage] = reg.check(stage, model)
            if "changed" in diff:
                print(f"[{stage}] regression set: {diff['changed']}/{diff['n']} outputs changed"
                      + (f", {len(diff['newly_right'])} newly right, {len(diff['newly_wrong'])} "
                         "newly wrong" if "newly_right" in diff else ""), flush=True)

    sft = sft_trainer(d, out, tok, train)
    model = sft.model
    print(f"rlfuse demo: {d.digits}-digit addition, {len(train)} train / {len(heldout)} held-out "
          f"prompts, model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params",
          flush=True)
    evaluate("base", model)

    t = time.time()
    fit(sft, "sft")
    timings["sft"] = time.time() - t
    if sft.probe_accuracy is not None:
        print(f"[sft] {'reached' if sft.reached else 'did not reach'} the target accuracy "
              f"{d.sft_target} on {len(sft.probe)} training prompts: {sft.probe_accuracy:.3f} at "
              f"step {sft.step}", flush=True)
    evaluate("sft", model)
    stages, pairs = d.stages.split(","), []
    unknown = set(stages) - {"sft", "ppo", "grpo", "dpo", ""}
    if unknown:
        raise ValueError(f"stages: unknown {sorted(unknown)}; choose from ppo, grpo, dpo")

    if "ppo" in stages:
        t = time.time()
        ppo_stage(d, out, model, tok, train, budget)
        timings["ppo"] = time.time() - t
        evaluate("ppo", model)

    t = time.time()
    roll = RolloutConfig(prompts_per_step=d.grpo_prompts, samples_per_prompt=d.grpo_group,
                         temperature=1.0, max_new_tokens=budget,
                         rewards=(RewardSpec("exact_answer", 1.0),
                                  RewardSpec("regex_format", 0.1, {"pattern": r"\d+"})),
                         weights=d.rollout_weights)
    grpo = GRPOConfig(data=os.path.join(out, "prompts.jsonl"), rollout=roll, passes=2,
                      reference=True,
                      loss=rlfuse.PolicyLossConfig(loss_type="grpo", beta=d.grpo_beta,
                                                   eps_high=0.28, rollout_correction=correction(d)))
    if "grpo" in stages:
        fit(GRPOTrainer(stage_config(d, out, "grpo", d.grpo_steps, d.grpo_lr, grpo=grpo), model,
                        tok), "grpo")
        timings["grpo"] = time.time() - t
        evaluate("grpo", model)

    if "dpo" in stages:
        t = time.time()
        pairs = mine_pairs(model, tok, train[: 4 * d.dpo_pairs], d.dpo_pairs, d.dpo_samples,
                           temperature=1.0, max_new_tokens=budget,
                           gold_chosen=d.dpo_gold_chosen)
        write_jsonl(os.path.join(out, "pairs.jsonl"), pairs)
        print(f"[dpo] {len(pairs)} preference pairs from the model's own samples", flush=True)
        dpo = DPOConfig(data=os.path.join(out, "pairs.jsonl"), batch_size=d.dpo_batch,
                        loss=rlfuse.PreferenceLossConfig(loss_type="sigmoid", beta=d.dpo_beta,
                                                     sft_coef=d.dpo_sft_coef))
        if pairs:
            fit(DPOTrainer(stage_config(d, out, "dpo", d.dpo_steps, d.dpo_lr, dpo=dpo), model,
                           tok), "dpo")
        timings["dpo"] = time.time() - t
        evaluate("dpo", model)

    summary = {"config": dataclasses.asdict(d), "eval": dataclasses.asdict(ev),
               "accuracy": results, "stage_seconds": timings,
               "total_seconds": time.time() - t_start, "n_pairs": len(pairs),
               "regression": regressions}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot_accuracy(results, os.path.join(out, "accuracy.png"))
    print_table(summary)
    return summary


def print_table(summary: dict) -> None:
    """Per stage: accuracy mean +- std over seeds, the item-level standard error, min..max, and
    the gain over the stage before with its paired test over prompts (95% interval, p-value);
    '> spread' is 'yes' when the gain exceeds the larger of the two stages' seed std and the
    paired interval excludes 0."""
    acc, secs = summary["accuracy"], summary["stage_seconds"]
    print(f"\n{'stage':<7} {'accuracy':>15} {'se':>6} {'min..max':>13} {'gain':>7} "
          f"{'paired 95% CI':>17} {'p':>7} {'> spread':>9} {'time':>6}")
    prev = None
    for stage, r in acc.items():
        gain = ci = p = beats = ""
        if prev is not None:
            t = compare(prev, r)
            gain, p = f"{t['diff']:+.3f}", f"{t['p']:.2g}"
            ci = f"[{t['low']:+.3f}, {t['high']:+.3f}]"
            beats = "yes" if t["beats_spread"] and t["significant"] else "no"
        sec = f"{secs[stage]:.0f}s" if stage in secs else ""
        print(f"{stage:<7} {r['mean']:.3f} +- {r['std']:.3f} {r['se']:>6.3f} "
              f"{r['min']:.3f}..{r['max']:.3f} {gain:>7} {ci:>17} {p:>7} {beats:>9} {sec:>6}")
        prev = r
    print(f"total {summary['total_seconds']:.0f}s; results in {summary['config']['out_dir']}")


def plot_accuracy(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(results)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(stages, [results[s]["mean"] for s in stages],
           yerr=[results[s]["std"] for s in stages], capsize=4, color="#4c72b0")
    for i, s in enumerate(stages):
        ax.scatter([i] * len(results[s]["per_seed"]), results[s]["per_seed"], color="k", s=8)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("accuracy per stage (seeds as dots)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    """`rlfuse demo [--quick] [key=value | --key value ...]` (keys: DemoConfig fields)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in argv
    defaults = {**QUICK, "out_dir": "runs/demo-quick"} if quick else {}
    d = parse(DemoConfig, [a for a in argv if a != "--quick"], "rlfuse demo",
              __doc__ + "\n--quick: a smoke-sized run (seconds), into runs/demo-quick", defaults)
    if d is None:  # --help
        return 0
    try:
        run(d)
    except Interrupted as e:
        print(f"rlfuse demo: interrupted by {signal.Signals(e.signum).name} in its {e.stage} "
              f"stage; the later stages did not run. The demo keeps no checkpoints: run it "
              f"again to start over", file=sys.stderr)
        return 128 + e.signum
    return 0


if __name__ == "__main__":  # through the CLI, so a bad key is a one-line error, not a traceback
    from rlfuse.engine.cli import main as cli_main

    sys.exit(cli_main(["demo", *sys.argv[1:]]))
