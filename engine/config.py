"""Training configuration: frozen dataclasses, read from YAML and the command line.

A config is a tree of dataclasses (`TrainConfig` at the root; the loss options are the op
layer's own `PolicyLossConfig` / `PreferenceLossConfig`). `parse(cls, argv, prog)` reads
`[--config f.yaml] [key=value | --key value ...]` with jsonargparse (YAML nested like the
dataclasses, dotted keys for nested sections, `--help` listing every key with its type, default
and the comment on its field's line) and builds the dataclasses, whose __post_init__ validate
the values; an unknown key or a bad value raises `ConfigError` naming the dotted key (and the
file and line) and what is allowed. `ALGORITHMS` is the one list of trainers.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
import typing
from argparse import ArgumentError, RawDescriptionHelpFormatter
from dataclasses import dataclass, field
from typing import Optional

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, Namespace

from rlfuse import PolicyLossConfig, PreferenceLossConfig
from rlfuse.advantages import ESTIMATORS as ADVANTAGE_ESTIMATORS, SCALES as ADVANTAGE_SCALES

from .rewards import BUILTINS as REWARDS


class UserError(ValueError):
    """A mistake in the user's input (config, data, paths): the CLI prints the message alone, as
    one line, and exits 2; anything else is a bug and keeps its traceback."""


class ConfigError(UserError):
    """A config key or value that cannot be used; the message names the dotted key."""


# ----------------------------------------------------------------------------- validation
def _check(key: str, ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} {msg}")


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"config key {key!r} must be one of {list(allowed)}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    path: Optional[str] = None           # local HF checkpoint; None -> tiny model from the fields below
    hidden_size: int = 128             # the tiny model's width (used when path is None)
    num_layers: int = 4                # the tiny model's decoder layers
    num_heads: int = 4                 # the tiny model's attention heads
    num_kv_heads: int = 2              # the tiny model's key/value heads (GQA)
    intermediate_size: int = 256       # the tiny model's MLP width
    dtype: str = "float32"               # float32 | bfloat16 | float16
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory
    lora_r: int = 0                      # > 0: LoRA policy (needs peft); reference = adapter off
    lora_alpha: int = 16                # LoRA scale numerator (scale = lora_alpha / lora_r)
    attn_implementation: Optional[str] = None  # None: flash_attention_2 on CUDA if installed, else sdpa
    lora_merge_on_save: bool = True      # LoRA: also save the merged model (a plain model.path)
    reference: str = "copy"              # GRPO / PPO's frozen reference: copy (the model's dtype)
                                         # | int8 (its linear layers int8 with a scale per output
                                         # row; embeddings and LM head kept): less memory, a
                                         # slightly different reference (README: Engine)

    def __post_init__(self):
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            _check(f"model.{k}", getattr(self, k) >= 1, "must be >= 1")
        _check("model.lora_r", self.lora_r >= 0, "must be >= 0")
        _choice("model.reference", self.reference, ("copy", "int8"))
        _check("model.reference", self.reference == "copy" or self.lora_r == 0,
               "must be copy with model.lora_r > 0 (the reference is then the LoRA base, which "
               "costs no memory)")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4                     # AdamW learning rate
    weight_decay: float = 0.0            # AdamW decoupled weight decay
    beta1: float = 0.9                   # AdamW first-moment decay
    beta2: float = 0.99                  # AdamW second-moment decay
    warmup_steps: int = 0                # linear warmup from lr / (warmup_steps + 1)
    schedule: str = "constant"           # constant | linear | cosine (decay to 0 at the last step)
    max_grad_norm: float = 1.0           # <= 0 disables clipping (grad_norm is still reported)
    step_in_backward: bool = False       # update each parameter as soon as backward has its
                                         # gradient, then free it: no model-sized gradient buffer
                                         # (needs max_grad_norm=0, one process)
    states: str = "param"                # AdamW moments: param (the parameter's dtype) | int8
                                         # (torchao's block-wise 8-bit AdamW: 2 bytes a
                                         # parameter instead of 8 in fp32 or 4 in bf16)

    def __post_init__(self):
        _check("optim.lr", self.lr > 0, "must be > 0")
        _choice("optim.states", self.states, ("param", "int8"))
        _check("optim.step_in_backward", not (self.step_in_backward and self.max_grad_norm > 0),
               "needs optim.max_grad_norm=0: each parameter is updated before the others' "
               "gradients exist, so there is no global norm to clip by")
        _check("optim.weight_decay", self.weight_decay >= 0, "must be >= 0")
        _check("optim.warmup_steps", self.warmup_steps >= 0, "must be >= 0")
        _choice("optim.schedule", self.schedule, ("constant", "linear", "cosine"))


@dataclass(frozen=True)
class SFTConfig:
    data: Optional[str] = None           # JSONL with "prompt" and "completion" fields
    batch_size: int = 32                 # demonstrations per optimizer step

    def __post_init__(self):
        _check("sft.batch_size", self.batch_size >= 1, "must be >= 1")


@dataclass(frozen=True)
class RewardSpec:
    name: str = "exact_answer"           # see rlfuse.engine.rewards.BUILTINS
    weight: float = 1.0                  # the term's factor in the summed reward
    kwargs: dict = field(default_factory=dict)  # keyword arguments of the reward function

    def __post_init__(self):
        if self.name not in REWARDS:
            raise ValueError(f"unknown reward {self.name!r}; built-ins: {sorted(REWARDS)}")


@dataclass(frozen=True)
class RolloutConfig:
    """One RL step's rollouts, shared by GRPO and PPO (rlfuse.engine.rollout.rollout_and_score):
    `prompts_per_step` prompts x `samples_per_prompt` completions, scored by `rewards`. The
    trainers validate it (`check`), so an error names their section."""
    prompts_per_step: int = 16           # prompts sampled per RL step
    samples_per_prompt: int = 8          # GRPO: the group size
    temperature: float = 1.0             # sampling; the loss uses the same temperature
    top_p: float = 1.0                   # nucleus sampling mass; 1: the full distribution
    max_new_tokens: int = 32             # completion tokens per sample, at most
    decoder: str = "rlfuse"              # rlfuse (KV-cache loop, fast sampler) | hf (generate)
    weights: str = "policy"              # policy | int8: sample from an int8 weight-only copy of
                                         # the policy, rebuilt each step (CPU, one process, needs
                                         # <trainer>.loss.rollout_correction; README: Engine)
    rewards: tuple[RewardSpec, ...] = (RewardSpec(),)  # weighted reward terms, summed

    def check(self, section: str, min_samples: int, loss: PolicyLossConfig) -> None:
        _check(f"{section}.samples_per_prompt", self.samples_per_prompt >= min_samples,
               f"must be >= {min_samples}")
        for k in ("prompts_per_step", "max_new_tokens"):
            _check(f"{section}.{k}", getattr(self, k) >= 1, "must be >= 1")
        _check(f"{section}.temperature", self.temperature > 0, "must be > 0")
        _check(f"{section}.top_p", 0 < self.top_p <= 1, "must be in (0, 1]")
        _choice(f"{section}.decoder", self.decoder, ("rlfuse", "hf"))
        _choice(f"{section}.weights", self.weights, ("policy", "int8"))
        correction = f"{section.split('.')[0]}.loss.rollout_correction"
        _check(correction, self.weights == "policy" or loss.rollout_correction is not None,
               f"must be tis or mis with {section}.weights=int8: the loss weighs each token by "
               f"the policy's probability over the int8 sampler's")
        _check(f"{section}.decoder", self.decoder == "rlfuse" or loss.rollout_correction is None,
               f"must be rlfuse with {correction} set (it records the sampler's log-probs)")

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


@dataclass(frozen=True)
class GRPOConfig:
    data: Optional[str] = None           # JSONL with "prompt" (+ "answer" for the verifier)
    rollout: RolloutConfig = RolloutConfig()
    passes: int = 2                      # optimization passes over each rollout batch
    mini_batches: int = 1                # optimizer steps per pass
    advantage_estimator: str = "grpo"    # grpo | rloo | dr_grpo
    advantage_scale: str = "group"       # group | batch | none
    reference: bool = True               # keep a reference policy (KL term and KL monitoring)
    sft_coef: float = 0.0                # NLL on a batch of SFT demonstrations (needs sft.data)
    loss: PolicyLossConfig = PolicyLossConfig()  # temperature, logit transform: from the trainer

    def __post_init__(self):
        self.rollout.check("grpo.rollout", min_samples=2, loss=self.loss)  # groups of >= 2
        for k in ("passes", "mini_batches"):
            _check(f"grpo.{k}", getattr(self, k) >= 1, "must be >= 1")
        _choice("grpo.advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        _choice("grpo.advantage_scale", self.advantage_scale, ADVANTAGE_SCALES)
        _check("grpo.sft_coef", self.sft_coef >= 0, "must be >= 0")
        _check("grpo.reference", self.reference or self.loss.beta == 0,
               "must be true when grpo.loss.beta > 0 (the KL term needs the reference policy)")
        _check("grpo.mini_batches", self.rollout.completions_per_step % self.mini_batches == 0,
               "must divide rollout.prompts_per_step * rollout.samples_per_prompt")


@dataclass(frozen=True)
class DPOConfig:
    data: Optional[str] = None           # JSONL with "prompt", "chosen", "rejected"
    batch_size: int = 16                 # pairs per optimizer step
    epochs: int = 1                      # passes over the pairs (when steps is 0)
    loss: PreferenceLossConfig = PreferenceLossConfig()

    def __post_init__(self):
        _check("dpo.batch_size", self.batch_size >= 1, "must be >= 1")
        _check("dpo.epochs", self.epochs >= 1, "must be >= 1")


@dataclass(frozen=True)
class RewardModelConfig:
    """A transformers sequence-classification reward model (see rlfuse.engine.reward_model)."""
    path: Optional[str] = None           # trained local checkpoint; None -> build one and train it
    pairs: Optional[str] = None          # JSONL "prompt", "chosen", "rejected" for Bradley-Terry
    steps: int = 100                     # Bradley-Terry optimizer steps on `pairs`
    batch_size: int = 32                 # pairs per Bradley-Terry step
    lr: float = 3e-4                     # at 1e-3 the demo RM's loss stayed at ~log 2
    init_from_policy: bool = True        # a built RM starts from the policy's backbone weights

    def __post_init__(self):
        for k in ("steps", "batch_size"):
            _check(f"ppo.reward_model.{k}", getattr(self, k) >= 1, "must be >= 1")
        _check("ppo.reward_model.lr", self.lr > 0, "must be > 0")


@dataclass(frozen=True)
class PPOConfig:
    """Classic RLHF PPO (rlfuse.engine.ppo); the policy loss is PolicyLossConfig(loss_type="ppo")."""
    data: Optional[str] = None           # JSONL with "prompt" (+ "answer" for the verifier)
    rollout: RolloutConfig = RolloutConfig(prompts_per_step=32, samples_per_prompt=1)
    epochs: int = 4                      # PPO epochs over each rollout batch
    mini_batches: int = 2                # optimizer steps per epoch
    gamma: float = 1.0                   # GAE discount
    lam: float = 0.95                    # GAE lambda
    whiten_advantages: bool = True       # advantages to zero mean, unit std over the batch
    critic: str = "shared"               # shared: value head on the policy's hidden states |
                                         # separate: own copy of the initial backbone
    vf_coef: float = 0.1                 # value-loss weight in the summed loss
    value_lr_scale: float = 10.0         # critic lr = value_lr_scale * optim.lr
    value_clip: Optional[float] = 0.2    # None: unclipped value loss
    # clipping, dual clip, entropy bonus; loss.kl_estimator also estimates the KL in the reward;
    # temperature and logit transform are set by the trainer, beta by kl_in/kl_coef
    loss: PolicyLossConfig = PolicyLossConfig(loss_type="ppo", kl_estimator="k1")
    kl_coef: float = 0.05                # initial coefficient of the KL to the reference
    kl_in: str = "reward"                # reward: -kl_coef * KL per token | loss: beta = kl_coef
    kl_target: Optional[float] = None    # adaptive controller target (sequence KL); None: fixed
    kl_horizon: int = 10000              # adaptive KL controller horizon (steps x batch)
    missing_eos_penalty: Optional[float] = None  # subtracted from the score without an EOS
    reward: str = "verifier"             # verifier (rollout.rewards) | model (reward_model) | both
    reward_model: RewardModelConfig = RewardModelConfig()

    def __post_init__(self):
        self.rollout.check("ppo.rollout", min_samples=1, loss=self.loss)
        for k in ("epochs", "mini_batches", "kl_horizon"):
            _check(f"ppo.{k}", getattr(self, k) >= 1, "must be >= 1")
        _check("ppo.gamma", 0 <= self.gamma <= 1, "must be in [0, 1]")
        _check("ppo.lam", 0 <= self.lam <= 1, "must be in [0, 1]")
        _check("ppo.vf_coef", self.vf_coef >= 0, "must be >= 0")
        _check("ppo.value_lr_scale", self.value_lr_scale > 0, "must be > 0")
        _check("ppo.value_clip", self.value_clip is None or self.value_clip > 0, "must be > 0")
        _choice("ppo.loss.loss_type", self.loss.loss_type, ("ppo",))
        _check("ppo.loss.beta", self.loss.beta == 0,
               "must be 0: the KL coefficient is ppo.kl_coef (ppo.kl_in=loss puts it in the loss)")
        _check("ppo.kl_coef", self.kl_coef >= 0, "must be >= 0")
        _check("ppo.kl_target", self.kl_target is None or self.kl_target > 0, "must be > 0")
        _choice("ppo.kl_in", self.kl_in, ("reward", "loss"))
        _choice("ppo.reward", self.reward, ("verifier", "model", "both"))
        _choice("ppo.critic", self.critic, ("shared", "separate"))
        _check("ppo.mini_batches", self.rollout.completions_per_step % self.mini_batches == 0,
               "must divide rollout.prompts_per_step * rollout.samples_per_prompt")


@dataclass(frozen=True)
class GuardConfig:
    """The over-optimization detector (rlfuse.engine.overopt): held-out evaluations every
    `every` steps of the proxy reward, a gold signal and the policy's drift."""
    every: int = 0                       # steps between evaluations (and one before the first); 0: off
    data: Optional[str] = None           # held-out JSONL: "prompt" (+ "answer", + the baseline column)
    max_prompts: int = 64                # the first N prompts of data
    seeds: tuple[int, ...] = (0, 1)      # fixed sampling seeds; gold's spread is across them
    temperature: float = 1.0             # sampling temperature of the evaluations
    max_new_tokens: int = 0              # 0: the trainer's rollout.max_new_tokens
    gold: tuple[RewardSpec, ...] = (RewardSpec(),)  # the gold verifier(s), weighted and summed
    judge: Optional[str] = None          # local causal LM folder: gold = its win rate vs baseline
    baseline: str = "reference"          # the data column the judge compares completions with
    patience: int = 2                    # evaluations in a row the alert's condition must hold
    stop_at_peak: bool = False           # on the alert: restore the best-gold policy and stop

    def __post_init__(self):
        _check("guard.every", self.every >= 0, "must be >= 0")
        _check("guard.data", not self.every or bool(self.data),
               "must name a held-out JSONL file when guard.every > 0")
        for k in ("max_prompts", "patience"):
            _check(f"guard.{k}", getattr(self, k) >= 1, "must be >= 1")
        _check("guard.seeds", len(self.seeds) >= 1, "must hold at least one seed")
        _check("guard.temperature", self.temperature > 0, "must be > 0")
        _check("guard.max_new_tokens", self.max_new_tokens >= 0, "must be >= 0")


@dataclass(frozen=True)
class DistributedConfig:
    """How the ranks of a torchrun job split the work (see rlfuse.engine.distributed); a single
    process ignores it. Batch sizes stay global: each rank trains its share of every batch."""
    strategy: str = "ddp"                # ddp: full replicas | fsdp: FSDP2, sharded parameters
    vocab_parallel: bool = False         # shard the LM head's vocabulary rows over the ranks

    def __post_init__(self):
        _choice("distributed.strategy", self.strategy, ("ddp", "fsdp"))


@dataclass(frozen=True)
class TrainConfig:
    algo: str = "sft"                    # sft | grpo | dpo | ppo
    steps: int = 100                     # optimizer steps (GRPO: rollout steps); DPO: 0 -> epochs
    seed: int = 0                        # torch / python / sampler seed
    out_dir: str = "runs/train"          # metrics, plots, checkpoints; `rlfuse train`: runs/<algo>
    device: str = "auto"                 # auto | cpu | cuda
    max_length: int = 512                # prompt + completion tokens, longer sequences are cut
    log_every: int = 1                   # steps between metrics rows
    save_every: int = 0                  # steps; 0: only at the end (and on SIGINT/SIGTERM)
    save_every_minutes: float = 10.0     # also save this long after the last save; 0: off
    keep_checkpoints: int = 2            # 0: no final checkpoint (still saves on SIGINT/SIGTERM)
    resume: bool = False                 # continue from the newest readable checkpoint
    overwrite: bool = False              # replace a previous run's checkpoints and logs in out_dir
    nonfinite: str = "skip"              # NaN/inf loss or grad norm: skip the update | stop the run
    max_nonfinite_skips: int = 5         # nonfinite=skip: stop after this many such steps in a row
    progress: bool = True                # tqdm bar on a terminal
    print_every: int = 10                # no terminal/progress=false: a line every N steps
    alerts: dict = field(default_factory=dict)  # threshold overrides, see monitor.ALERT_DEFAULTS
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    sft: SFTConfig = SFTConfig()
    grpo: GRPOConfig = GRPOConfig()
    dpo: DPOConfig = DPOConfig()
    ppo: PPOConfig = PPOConfig()
    guard: GuardConfig = GuardConfig()
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self):
        _choice("algo", self.algo, ALGORITHMS)
        _check("steps", self.steps >= 0, "must be >= 0")
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _check("max_length", self.max_length >= 2, "must be >= 2")
        _check("log_every", self.log_every >= 1, "must be >= 1")
        _check("save_every", self.save_every >= 0, "must be >= 0")
        _check("keep_checkpoints", self.keep_checkpoints >= 0, "must be >= 0")
        _check("save_every_minutes", self.save_every_minutes >= 0, "must be >= 0")
        _choice("nonfinite", self.nonfinite, ("skip", "stop"))
        _check("max_nonfinite_skips", self.max_nonfinite_skips >= 1, "must be >= 1")
        _check("print_every", self.print_every >= 0, "must be >= 0")
        _check("overwrite", not (self.overwrite and self.resume),
               "and resume cannot both be true (resume keeps the old run, overwrite replaces it)")


# ----------------------------------------------------------------------------- algorithms
@dataclass(frozen=True)
class Algorithm:
    """One trainer: `rlfuse train <name>`, `TrainConfig.algo` and `trainer_for(name)` read it."""
    trainer: str                         # "module.Class" inside rlfuse.engine, imported on use
    section: str                         # the TrainConfig section that holds its options
    summary: str                         # one line for `rlfuse train --help`
    data: tuple = ()                     # (config key of a JSONL file, its required string
                                         # fields), checked before the model loads; first required


_PAIRS = ("prompt", "chosen", "rejected")
ALGORITHMS = {
    "sft": Algorithm("sft.SFTTrainer", "sft", "supervised fine-tuning on prompt/completion pairs",
                     (("sft.data", ("prompt", "completion")),)),
    "grpo": Algorithm("grpo.GRPOTrainer", "grpo",
                      "GRPO and its variants: sampled groups, verifier rewards, group advantages",
                      (("grpo.data", ("prompt",)), ("sft.data", ("prompt", "completion")))),
    "dpo": Algorithm("dpo.DPOTrainer", "dpo", "DPO and its variants on offline preference pairs",
                     (("dpo.data", _PAIRS),)),
    "ppo": Algorithm("ppo.PPOTrainer", "ppo",
                     "classic RLHF PPO: value head, GAE, KL to the reference",
                     (("ppo.data", ("prompt",)), ("ppo.reward_model.pairs", _PAIRS))),
}


# ----------------------------------------------------------------------------- building
def build(cls, data: dict, prefix: str = ""):
    """Dataclass `cls` from a nested mapping whose keys and value types `parse` has checked;
    a value its __post_init__ refuses raises ConfigError naming the section."""
    section = prefix.rstrip(".") or "<root>"
    if not isinstance(data, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        sub, many = _section_type(hints[k])
        if sub is not None and many:
            v = tuple(x if isinstance(x, sub) else build(sub, x, f"{prefix}{k}[{i}].")
                      for i, x in enumerate(v))
        elif sub is not None and not isinstance(v, sub):
            v = build(sub, v, f"{prefix}{k}.")
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # the op layer's own config checks
        raise ConfigError(f"config section {section!r}: {err}") from None


def _section_type(tp) -> tuple[Optional[type], bool]:
    """(the dataclass a field holds, whether it holds a tuple of them), or (None, False)."""
    if dataclasses.is_dataclass(tp):
        return tp, False
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]):
        return args[0], True
    return None, False


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- command line
# jsonargparse does the parsing: types, nesting, `--config` files, dotted `--a.b value` keys and
# the help. Around it: today's `key=value` form, and messages that name the key and the file.
# Values are read leniently, by the same rule on the command line and in YAML: a value counts as
# what it reads as, so `1e-6` is a float and '8' an int, while 8.5 for an int or `maybe` for a
# bool is refused.
def parse(cls, argv: list[str], prog: str, description: str = "",
          defaults: Optional[dict] = None):
    """`cls` from `[--config f.yaml] [key=value | --key value | --key=value ...]` (dotted keys
    for nested sections; a bare `--flag` sets a bool key to true). Later values override
    earlier ones; `defaults` ({dotted key: value}) come first. With -h / --help it prints every
    key with its type, default and meaning and returns None."""
    parser = arg_parser(cls, prog, description)
    parser.set_defaults(defaults or {})
    args = _as_options(cls, argv)
    if "-h" in args or "--help" in args:
        print(parser.format_help())
        return None
    _check_args(cls, args)
    try:
        ns = parser.parse_args(args)
    except ArgumentError as err:
        raise ConfigError(_plain_message(str(err))) from None
    return build(cls, _plain(ns, exclude=("config", "print_config")))


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                defaults: Optional[dict] = None, prog: str = "rlfuse train") -> TrainConfig:
    """TrainConfig from defaults <- YAML file <- command-line overrides."""
    return parse(TrainConfig, (["--config", path] if path else []) + list(overrides or []),
                 prog, defaults=defaults)


def arg_parser(cls, prog: str, description: str = "") -> ArgumentParser:
    """The jsonargparse parser of dataclass `cls`; each key's help is its field's comment."""
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False,
                            formatter_class=_HelpFormatter,
                            usage=f"{prog} [--config f.yaml] [key=value | --key value ...]")
    parser.add_argument("--config", action=ActionConfigFile,
                        help="YAML file with the keys below, nested by section; the arguments "
                             "after it override it")
    parser.add_class_arguments(cls)
    for key, group in parser.groups.items():  # titled by section, not by class
        group.title = f"{key}." if key != cls.__name__ else "keys"
    meanings = {key: meaning for key, _, meaning in _walk(cls) if meaning}
    for action in parser._actions:
        if action.dest in meanings:
            action.help = meanings[action.dest]
    return parser


class _HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help (type and default after each key) under a description kept as written."""


@functools.cache  # a class's source does not change while it runs
def field_help(cls) -> dict[str, str]:
    """{field: its meaning} for a dataclass and its dataclass bases: the comment that ends the
    field's line, joined with the comment lines aligned under it."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_trailing_comments(klass))
    return out


def _trailing_comments(klass) -> dict[str, str]:
    try:
        src = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # no source (built at run time)
        return {}
    comments = {}  # line -> (column, text, alone on its line)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip(),
                                      tok.line.lstrip().startswith("#"))
    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        line = next((n for n in range(node.lineno, node.end_lineno + 1)
                     if n in comments and not comments[n][2]), None)
        if line is None:
            continue
        col, text, _ = comments[line]
        parts = [text]
        while (line := line + 1) in comments and comments[line][2] and comments[line][0] == col:
            parts.append(comments[line][1])
        out[node.target.id] = " ".join(parts)
    return out


def _walk(cls, prefix: str = ""):
    """(dotted key, type, meaning or None) of every key of `cls`, each section followed by its
    keys."""
    hints, helps = typing.get_type_hints(cls), field_help(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name, hints[f.name], helps.get(f.name)
        sub, many = _section_type(hints[f.name])
        if sub is not None and not many:
            yield from _walk(sub, f"{prefix}{f.name}.")


def _as_options(cls, argv: list[str]) -> list[str]:
    """Today's forms in jsonargparse's: `key=value` -> `--key=value`, a bare `--flag` of a bool
    key -> `--flag=true`, and `-` in key names -> `_`."""
    bools = {key for key, tp, _ in _walk(cls) if tp is bool}
    out: list[str] = []
    for i, arg in enumerate(argv):
        if out and out[-1].startswith("--") and "=" not in out[-1]:  # the previous option's value
            out.append(arg)
            continue
        if not arg.startswith("-") and "=" in arg:
            arg = "--" + arg
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            nxt = argv[i + 1] if i + 1 < len(argv) else "--"
            if not eq and key in bools and (nxt.startswith("-") or "=" in nxt):
                eq, value = "=", "true"
            arg = f"--{key}{eq}{value}"
        out.append(arg)
    return out


def _check_args(cls, args: list[str]) -> None:
    """Messages jsonargparse would word less clearly: a missing or malformed config file
    (file:line), a key that does not exist (with the valid keys), a bare word."""
    known = {key for key, _, _ in _walk(cls)}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if key == "config":
                path = value if eq else (args[i + 1] if i + 1 < len(args) else "")
                _check_keys(cls, read_yaml(path), source=path)
            elif key not in known and key != "print_config":
                raise _unknown(cls, key)
        elif not (i and args[i - 1].startswith("--") and "=" not in args[i - 1]):
            raise ConfigError(f"argument {arg!r} must look like key=value or --key value")


def _unknown(cls, key: str) -> ConfigError:
    """The error for dotted `key` that is not a key of `cls`: names it and the valid keys at
    the level where it leaves the tree."""
    node = cls
    for part in key.split("."):
        if part not in typing.get_type_hints(node):
            break
        sub, many = _section_type(typing.get_type_hints(node)[part])
        if sub is None or many:
            return ConfigError(f"config key {key!r}: {part!r} is a value, not a section")
        node = sub
    return _unknown_here(key, node)


def _unknown_here(key: str, section, where: str = "") -> ConfigError:
    names = [f.name for f in dataclasses.fields(section)]
    return ConfigError(f"{where}unknown config key {key!r}; valid keys here: {names}")


def read_yaml(path: str) -> dict:
    """The mapping in a YAML file; a missing file or a syntax error raises ConfigError."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"no such config file: {path}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: YAML syntax error: "
                          f"{getattr(err, 'problem', None) or err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the YAML file must hold a mapping at the top level")
    return data


def _check_keys(cls, data, prefix: str = "", source: str = "") -> None:
    """Unknown keys and non-mapping sections of a nested mapping raise ConfigError."""
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}config section {prefix.rstrip('.')!r} must be a mapping, "
                          f"got {data!r}")
    hints = typing.get_type_hints(cls)
    for k, v in data.items():
        if k not in hints:
            raise _unknown_here(prefix + str(k), cls, where)
        sub, many = _section_type(hints[k])
        if sub is not None and many and isinstance(v, (list, tuple)):
            for j, item in enumerate(v):
                _check_keys(sub, item, f"{prefix}{k}[{j}].", source)
        elif sub is not None and not many:
            _check_keys(sub, v, f"{prefix}{k}.", source)


def _plain(value, exclude=()):
    """A jsonargparse Namespace as nested dicts and lists (dataclass instances kept)."""
    if isinstance(value, Namespace):
        return {k: _plain(v) for k, v in vars(value).items() if k not in exclude}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _plain_message(msg: str) -> str:
    """jsonargparse's 'Parser key "a.b":\\n  Expected a <class 'int'>. Got value: x' on one
    line, as 'config key 'a.b': expected a int, got value: x'."""
    msg = re.sub(r"<class '(\w+)'>", r"\1", " ".join(msg.split()))
    m = re.match(r'Parser key "([^"]+)": (.*)', msg)
    if m:
        rest = m.group(2)
        return f"config key {m.group(1)!r}: {rest[:1].lower()}{rest[1:]}"
    return msg
