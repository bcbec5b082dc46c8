"""Training configuration: frozen dataclasses, loaded from YAML and overridden from the CLI.

A config is a tree of dataclasses (`TrainConfig` at the root; the loss options are the op
layer's own `PolicyLossConfig` / `PreferenceLossConfig`). `load_config(path, overrides)`
reads a YAML mapping with the same nesting, applies `key.sub=value` overrides (values parsed
as YAML scalars), coerces each value to the field's type and validates it; an unknown key or a
bad value raises `ConfigError` naming the dotted key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Optional

import yaml

from rlfuse import PolicyLossConfig, PreferenceLossConfig
from rlfuse.dpo_family import LOSS_TYPES as PREFERENCE_LOSS_TYPES


class ConfigError(ValueError):
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
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    dtype: str = "float32"               # float32 | bfloat16 | float16
    gradient_checkpointing: bool = False
    lora_r: int = 0                      # > 0: LoRA policy (needs peft); reference = adapter off
    lora_alpha: int = 16
    attn_implementation: Optional[str] = None  # None: flash_attention_2 on CUDA if installed, else sdpa
    lora_merge_on_save: bool = True      # LoRA: also save the merged model (a plain model.path)

    def __post_init__(self):
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            _check(f"model.{k}", getattr(self, k) >= 1, "must be >= 1")
        _check("model.lora_r", self.lora_r >= 0, "must be >= 0")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    warmup_steps: int = 0
    schedule: str = "constant"           # constant | linear | cosine (decay to 0 at the last step)
    max_grad_norm: float = 1.0           # <= 0 disables clipping (grad_norm is still reported)

    def __post_init__(self):
        _check("optim.lr", self.lr > 0, "must be > 0")
        _check("optim.weight_decay", self.weight_decay >= 0, "must be >= 0")
        _check("optim.warmup_steps", self.warmup_steps >= 0, "must be >= 0")
        _choice("optim.schedule", self.schedule, ("constant", "linear", "cosine"))


@dataclass(frozen=True)
class SFTConfig:
    data: Optional[str] = None           # JSONL with "prompt" and "completion" fields
    batch_size: int = 32

    def __post_init__(self):
        _check("sft.batch_size", self.batch_size >= 1, "must be >= 1")


@dataclass(frozen=True)
class RewardSpec:
    name: str = "exact_answer"           # see rlfuse.engine.rewards.BUILTINS
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GRPOConfig:
    data: Optional[str] = None           # JSONL with "prompt" (+ "answer" for the verifier)
    prompts_per_step: int = 16
    group_size: int = 8
    passes: int = 2                      # optimization passes over each rollout batch
    mini_batches: int = 1                # optimizer steps per pass
    temperature: float = 1.0             # sampling; the loss uses the same temperature
    top_p: float = 1.0
    max_new_tokens: int = 32
    decoder: str = "rlfuse"              # rollouts: rlfuse (KV-cache loop, fast sampler) | hf (model.generate)
    advantage_estimator: str = "grpo"    # grpo | rloo | dr_grpo
    advantage_scale: str = "group"       # group | batch | none
    reference: bool = True               # keep a reference policy (KL term and KL monitoring)
    sft_coef: float = 0.0                # NLL on a batch of SFT demonstrations (needs sft.data)
    rewards: tuple = (RewardSpec(),)
    loss: PolicyLossConfig = PolicyLossConfig()

    def __post_init__(self):
        _check("grpo.group_size", self.group_size >= 2, "must be >= 2 (advantages compare a group)")
        for k in ("prompts_per_step", "passes", "mini_batches", "max_new_tokens"):
            _check(f"grpo.{k}", getattr(self, k) >= 1, "must be >= 1")
        _check("grpo.temperature", self.temperature > 0, "must be > 0")
        _check("grpo.top_p", 0 < self.top_p <= 1, "must be in (0, 1]")
        _choice("grpo.decoder", self.decoder, ("rlfuse", "hf"))
        _choice("grpo.advantage_estimator", self.advantage_estimator, ("grpo", "rloo", "dr_grpo"))
        _choice("grpo.advantage_scale", self.advantage_scale, ("group", "batch", "none"))
        _check("grpo.sft_coef", self.sft_coef >= 0, "must be >= 0")
        _check("grpo.mini_batches", self.prompts_per_step * self.group_size % self.mini_batches == 0,
               "must divide prompts_per_step * group_size")


@dataclass(frozen=True)
class DPOConfig:
    data: Optional[str] = None           # JSONL with "prompt", "chosen", "rejected"
    batch_size: int = 16                 # pairs per optimizer step
    epochs: int = 1
    loss: PreferenceLossConfig = PreferenceLossConfig()

    def __post_init__(self):
        _check("dpo.batch_size", self.batch_size >= 1, "must be >= 1")
        _check("dpo.epochs", self.epochs >= 1, "must be >= 1")
        _choice("dpo.loss.loss_type", self.loss.loss_type, PREFERENCE_LOSS_TYPES)
        _check("dpo.loss.beta", self.loss.beta > 0, "must be > 0")


@dataclass(frozen=True)
class RewardModelConfig:
    """A transformers sequence-classification reward model (see rlfuse.engine.reward_model)."""
    path: Optional[str] = None           # trained local checkpoint; None -> build one and train it
    pairs: Optional[str] = None          # JSONL "prompt", "chosen", "rejected" for Bradley-Terry
    steps: int = 100                     # Bradley-Terry optimizer steps on `pairs`
    batch_size: int = 32
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
    prompts_per_step: int = 32
    samples_per_prompt: int = 1
    epochs: int = 4                      # PPO epochs over each rollout batch
    mini_batches: int = 2                # optimizer steps per epoch
    temperature: float = 1.0             # sampling; the loss uses the same temperature
    top_p: float = 1.0
    max_new_tokens: int = 32
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    critic: str = "shared"               # shared: value head on the policy's hidden states |
                                         # separate: own copy of the initial backbone
    vf_coef: float = 0.1
    value_lr_scale: float = 10.0         # critic lr = value_lr_scale * optim.lr
    value_clip: Optional[float] = 0.2    # None: unclipped value loss
    eps_low: float = 0.2
    eps_high: Optional[float] = None
    dual_clip: Optional[float] = None    # dual-clip constant c > 1
    entropy_coef: float = 0.0
    kl_coef: float = 0.05                # initial coefficient of the KL to the reference
    kl_in: str = "reward"                # reward: -kl_coef * KL per token | loss: beta = kl_coef
    kl_estimator: str = "k1"             # k1 | k2 | k3
    kl_target: Optional[float] = None    # adaptive controller target (sequence KL); None: fixed
    kl_horizon: int = 10000
    missing_eos_penalty: Optional[float] = None  # subtracted from the score without an EOS
    reward: str = "verifier"             # verifier (`rewards`) | model (`reward_model`) | both
    rewards: tuple = (RewardSpec(),)
    reward_model: RewardModelConfig = RewardModelConfig()

    def __post_init__(self):
        for k in ("prompts_per_step", "samples_per_prompt", "epochs", "mini_batches",
                  "max_new_tokens", "kl_horizon"):
            _check(f"ppo.{k}", getattr(self, k) >= 1, "must be >= 1")
        _check("ppo.temperature", self.temperature > 0, "must be > 0")
        _check("ppo.top_p", 0 < self.top_p <= 1, "must be in (0, 1]")
        _check("ppo.gamma", 0 <= self.gamma <= 1, "must be in [0, 1]")
        _check("ppo.lam", 0 <= self.lam <= 1, "must be in [0, 1]")
        _check("ppo.vf_coef", self.vf_coef >= 0, "must be >= 0")
        _check("ppo.value_lr_scale", self.value_lr_scale > 0, "must be > 0")
        _check("ppo.value_clip", self.value_clip is None or self.value_clip > 0, "must be > 0")
        _check("ppo.kl_coef", self.kl_coef >= 0, "must be >= 0")
        _check("ppo.kl_target", self.kl_target is None or self.kl_target > 0, "must be > 0")
        _choice("ppo.kl_in", self.kl_in, ("reward", "loss"))
        _choice("ppo.kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        _choice("ppo.reward", self.reward, ("verifier", "model", "both"))
        _choice("ppo.critic", self.critic, ("shared", "separate"))
        _check("ppo.mini_batches",
               self.prompts_per_step * self.samples_per_prompt % self.mini_batches == 0,
               "must divide prompts_per_step * samples_per_prompt")
        PolicyLossConfig(loss_type="ppo", eps_low=self.eps_low, eps_high=self.eps_high,
                         dual_clip=self.dual_clip, entropy_coef=self.entropy_coef)


@dataclass(frozen=True)
class TrainConfig:
    algo: str = "sft"                    # sft | grpo | dpo | ppo
    steps: int = 100                     # optimizer steps (GRPO: rollout steps); DPO: 0 -> epochs
    seed: int = 0
    out_dir: str = "runs/train"
    device: str = "auto"                 # auto | cpu | cuda
    max_length: int = 512                # prompt + completion tokens, longer sequences are cut
    log_every: int = 1
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

    def __post_init__(self):
        _choice("algo", self.algo, ("sft", "grpo", "dpo", "ppo"))
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


# ----------------------------------------------------------------------------- building
def build(cls, data: dict, prefix: str = ""):
    """Dataclass `cls` from a nested mapping: unknown keys and bad types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, "
                          f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys here: {names}")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # the op layer's own config checks
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r}: {err}") from None


def _coerce(tp, value, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build(tp, value or {}, key + ".")
    if tp is tuple or origin is tuple:  # only `rewards` is a tuple: of RewardSpec
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return tuple(v if isinstance(v, RewardSpec) else build(RewardSpec, v, f"{key}[{i}].")
                     for i, v in enumerate(value))
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, str):  # YAML reads '3e-4' as a string
        try:
            value = tp(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ConfigError(f"config key {key!r} must be {tp.__name__}, got {value!r}")


def parse_overrides(args: list[str]) -> dict:
    """['a.b=1', '--c', 'x', '--d=2'] -> {'a': {'b': 1}, 'c': 'x', 'd': 2} (YAML scalars)."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            arg = arg[2:]
            if "=" not in arg:
                if i + 1 >= len(args):
                    raise ConfigError(f"option --{arg} needs a value")
                arg, i = f"{arg}={args[i + 1]}", i + 1
        if "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like key=value or --key value")
        key, raw = arg.split("=", 1)
        node = out
        *parents, leaf = key.replace("-", "_").split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw) if raw else ""
        i += 1
    return out


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                defaults: Optional[dict] = None) -> TrainConfig:
    """TrainConfig from defaults <- YAML file <- command-line overrides."""
    data = dict(defaults or {})
    if path:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the YAML file must hold a mapping at the top level")
        data = merge(data, loaded)
    data = merge(data, parse_overrides(overrides or []))
    return build(TrainConfig, data)
