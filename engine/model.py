"""Models for the engine: load or build a causal LM, and feed the fused ops.

The trainers never compute full logits: `hidden_states` runs the backbone (decoder stack and
final norm) and `head` returns the LM head (`LMHead`: weight, bias and the model's logit
transform, `logit_scale`, `final_logit_softcapping`) for `rlfuse.linear_logprobs` / the fused
losses.
The reference policy is a frozen copy (optionally with int8 linear layers), or the base of a
LoRA policy with the adapter off. `int8_copy` builds both int8 models: that reference, and the
int8 sampler of `rollout.weights=int8`. Under `decoding`, the rollout loop's model runs its linear
layers through rlfuse's decode kernel on few rows.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import logging
import os
import string
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from rlfuse._backend import cpu_native_lowp
from rlfuse.decode import DEQUANT_ROWS, decode_linear

from . import distributed, vocab_parallel
from .config import ConfigError, ModelConfig, UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHARS = string.digits + "+-*=() " + string.ascii_lowercase + ".,:?"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def char_tokenizer(chars: str = CHARS, vocab_size: int = 0):
    """A character-level PreTrainedTokenizerFast built in code (one token per character).

    `vocab_size` > the character count pads the vocabulary with never-encoded `<xN>` tokens,
    for benchmarks at a real model's vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = list(SPECIALS) + list(dict.fromkeys(chars))
    tokens += [f"<x{i}>" for i in range(vocab_size - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", padding_side="left")


def tiny_model(cfg: ModelConfig, tokenizer, max_positions: int = 512, tie: bool = False):
    """A small Qwen2-style causal LM (RoPE, GQA, RMSNorm, SwiGLU) in `cfg.dtype`, from a config,
    no downloads; `tie`: the LM head is the input embedding."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    return Qwen2ForCausalLM(config).to(DTYPES[cfg.dtype])


def attn_implementation(cfg: ModelConfig, device: torch.device) -> str:
    if cfg.attn_implementation:
        return cfg.attn_implementation
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def check_local_path(path: str) -> bool:
    """Whether `path` names a local folder rather than a Hub id; one that looks local (starts
    with `.`, `~` or `/`, has two separators, or its first part exists here) but is not a model
    folder raises UserError."""
    full = os.path.expanduser(path)
    parts = path.replace(os.sep, "/").split("/")
    if not (path.startswith((".", "~", "/")) or len(parts) > 2 or os.path.exists(full)
            or (len(parts) == 2 and os.path.isdir(parts[0]))):
        return False
    if not os.path.isdir(full):
        raise UserError(f"no such folder: {path} (config key model.path)")
    if not (os.path.isfile(os.path.join(full, "config.json"))
            or os.path.isfile(os.path.join(full, "adapter", "adapter_config.json"))):
        raise UserError(f"{path} has no config.json (nor a LoRA adapter/), so it is not a "
                        "transformers model folder (config key model.path)")
    return True


def load_policy(cfg: ModelConfig, device: torch.device, tokenizer=None):
    """(model, tokenizer): a local checkpoint (`cfg.path`) or the tiny model; LoRA if asked."""
    from transformers import AutoTokenizer

    if cfg.path:
        local = check_local_path(cfg.path)  # local folders never go to the Hub
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(cfg.path, padding_side="left",
                                                               local_files_only=local)
        model = _from_pretrained(cfg, device, local)
    else:
        if distributed.is_main():
            print("rlfuse: WARNING: model.path is not set, so this trains a randomly initialized "
                  "tiny model; set model.path to a local checkpoint folder", file=sys.stderr,
                  flush=True)
        tokenizer = tokenizer or char_tokenizer()
        model = tiny_model(cfg, tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation needs the prompts flush right
    model.to(device)
    dtype = DTYPES[cfg.dtype]
    if device.type == "cpu" and dtype != torch.float32 and not cpu_native_lowp(dtype) \
            and distributed.is_main():
        print(f"rlfuse: WARNING: model.dtype={cfg.dtype} on a CPU without {cfg.dtype} matmul "
              "units (AMX or AVX512-BF16 for bfloat16, AMX-FP16 for float16): torch's GEMMs "
              "in that dtype can run several times slower than float32 here (README, Engine, "
              "bf16)", file=sys.stderr, flush=True)
    if cfg.gradient_checkpointing:
        # transformers 5 renamed it (gradient_checkpointing_enable warns); non-reentrant by default
        model.activation_checkpointing_enable()
        model.config.use_cache = False
    if cfg.lora_r > 0:
        model = _add_lora(model, cfg)
    return model, tokenizer


def _from_pretrained(cfg: ModelConfig, device: torch.device, local: bool):
    """A saved model, or a LoRA checkpoint's base with its adapter merged (a checkpoint saved with
    model.lora_merge_on_save=false holds only the adapter, in `adapter/`)."""
    from transformers import AutoModelForCausalLM

    kw = dict(dtype=DTYPES[cfg.dtype], attn_implementation=attn_implementation(cfg, device),
              local_files_only=local)
    adapter = os.path.join(cfg.path, "adapter")
    if os.path.exists(os.path.join(cfg.path, "config.json")) or not os.path.isdir(adapter):
        return AutoModelForCausalLM.from_pretrained(cfg.path, **kw)
    from peft import PeftConfig, PeftModel

    base = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    if not base:
        raise UserError(f"model.path {cfg.path} holds only a LoRA adapter of a model built in "
                         "code (no base path); save it with model.lora_merge_on_save=true")
    kw["local_files_only"] = check_local_path(base)
    with _peft_quiet():
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **kw),
                                         adapter).merge_and_unload()


def _add_lora(model, cfg: ModelConfig):
    if importlib.util.find_spec("peft") is None:
        raise RuntimeError("model.lora_r > 0 needs peft: pip install peft")
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    with _peft_quiet():
        return get_peft_model(model, lora)


@contextlib.contextmanager
def _peft_quiet():
    with warnings.catch_warnings():  # peft reads transformers 5's deprecated property
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                FutureWarning)
        yield


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


# ----------------------------------------------------------------------------- fused-op inputs
def hidden_states(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Last hidden states after the final norm, [B, T, H]: the backbone only, no LM head."""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def scored_hidden(model, batch) -> tuple[Tensor, int]:
    """Hidden states [B, T-1-c, H] that score batch.targets[:, c:], and c = batch.first_target.
    The backbone runs on whole sequences; the c leading columns, prompt in every row, are left
    out of the LM head's GEMMs (half of them for DPO pairs whose prompts are as long as their
    completions)."""
    c = batch.first_target
    return hidden_states(model, batch.input_ids, batch.attention_mask)[:, c:-1], c


@dataclass(frozen=True, eq=False)
class LMHead:
    """The LM head as the fused ops take it: weight [V, H], bias [V] or None, and the model's
    logit transform (transformers' config names); under distributed.vocab_parallel, `vocab` is
    this rank's shard and weight / bias hold its rows only (rlfuse.engine.vocab_parallel). In an
    int8 rollout copy (`int8_copy`), `linear` is the head's `Int8Linear` (with its bias), and weight
    and bias are None."""
    weight: Optional[Tensor]
    bias: Optional[Tensor] = None
    logit_scale: float = 1.0
    final_logit_softcapping: Optional[float] = None
    vocab: Optional[vocab_parallel.VocabShard] = None
    linear: Optional["Int8Linear"] = None

    @property
    def vocab_group(self):
        """The fused ops' vocab_group= argument: None for a whole head."""
        return None if self.vocab is None else self.vocab.group

    def loss_config(self, cfg, section: str, temperature: Optional[float] = None):
        """`cfg` (a fused-loss config, at config key `section`) with this head's logit transform,
        and with `temperature` when the trainer fixes it: the sampling temperature of
        `<trainer>.rollout.temperature`, so the loss scores the distribution that sampled. A
        value the user set there that would be overwritten raises ConfigError naming the key."""
        fixed = {"logit_scale": (self.logit_scale, "the model config's logit_scale"),
                 "final_logit_softcapping": (self.final_logit_softcapping,
                                             "the model config's final_logit_softcapping")}
        if temperature is not None:
            fixed["temperature"] = (temperature, f"{section.split('.')[0]}.rollout.temperature")
        defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        for k, (value, source) in fixed.items():
            if getattr(cfg, k) not in (defaults[k], value):
                raise ConfigError(f"config key {section + '.' + k!r} is {getattr(cfg, k)!r}, but "
                                  f"the trainer sets it to {value!r} from {source}: leave "
                                  f"{section + '.' + k!r} unset")
        return dataclasses.replace(cfg, **{k: v for k, (v, _) in fixed.items()})


def head(model) -> LMHead:
    """The policy's LM head: weight, bias and the logit transform of its config."""
    lm_head = model.get_output_embeddings()
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    int8 = isinstance(lm_head, Int8Linear)
    return LMHead(None if int8 else lm_head.weight,
                  None if int8 else getattr(lm_head, "bias", None),
                  float(getattr(c, "logit_scale", None) or 1.0),
                  getattr(c, "final_logit_softcapping", None),
                  getattr(lm_head, "rlfuse_vocab", None), lm_head if int8 else None)


def head_logprobs(hid: Tensor, batch, h: LMHead, temperature: float = 1.0) -> Tensor:
    """Per-token log-probs [B, T-1] fp32 of batch.targets from hidden states hid [B, T-1, H]
    (0 on ignored positions); the columns before batch.first_target skip the LM head. A vocab
    shard `h` scores every rank's rows and keeps this rank's (vocab_parallel.whole_batch)."""
    import rlfuse

    c = batch.first_target
    out = torch.zeros(batch.targets.shape, dtype=torch.float32, device=hid.device)
    x, targets, mine = vocab_parallel.whole_batch(h, hid[:, c:], batch.targets[:, c:])
    logp = rlfuse.linear_logprobs(
        x, h.weight, targets, bias=h.bias, temperature=temperature, logit_scale=h.logit_scale,
        final_logit_softcapping=h.final_logit_softcapping, vocab_group=h.vocab_group)
    out[:, c:] = logp[mine, :out.shape[1] - c]
    return out


def hidden_chunks(model, batch, chunk_rows: int = 64):
    """(rows, hidden [b, T-1, H]) for each chunk of `chunk_rows` rows of batch: the no-grad
    passes over a whole rollout batch hold one chunk's activations at a time."""
    for s in range(0, batch.input_ids.shape[0], chunk_rows):
        b = batch[s:s + chunk_rows]
        yield b, hidden_states(model, b.input_ids, b.attention_mask)[:, :-1]


@torch.no_grad()
def sequence_logprobs(model, batch, temperature: float = 1.0) -> Tensor:
    """Per-token log-probs [B, T-1] fp32 of batch.targets (0 on ignored positions), no grad."""
    h = head(model)
    return torch.cat([head_logprobs(hid, b, h, temperature)
                      for b, hid in hidden_chunks(model, batch)])


class Reference:
    """The frozen reference policy: the LoRA base (adapter disabled) or a frozen copy, with its
    linear layers int8 for `mode="int8"` (`int8_copy`)."""

    def __init__(self, policy, mode: str = "copy"):
        self.policy = policy
        self.copy = None
        if not is_lora(policy):
            self.copy = (copy.deepcopy(policy) if mode == "copy" else int8_copy(policy))
            self.copy.eval().requires_grad_(False)

    def context(self):
        return self.policy.disable_adapter() if self.copy is None else contextlib.nullcontext()

    def logprobs(self, batch, temperature: float = 1.0) -> Tensor:
        with self.context():
            return sequence_logprobs(self.copy or self.policy, batch, temperature)


def _linears(model, lm_head: bool) -> dict:
    """{module name: module} of model's linear layers (a peft LoRA layer whole), the LM head
    only with `lm_head`."""
    out, skip = {}, model.get_output_embeddings()
    for name, m in model.named_modules():
        if any(name.startswith(k + ".") for k in out) or (m is skip and not lm_head):
            continue  # inside a LoRA layer taken whole
        if isinstance(m, torch.nn.Linear) or _is_lora_layer(m):
            out[name] = m
    return out


def _is_lora_layer(m) -> bool:
    return isinstance(getattr(m, "base_layer", None), torch.nn.Linear) and \
        hasattr(m, "get_delta_weight")


def _weight_and_bias(m) -> tuple[Tensor, Optional[Tensor]]:
    """A linear layer's weight and bias; a LoRA layer's with its active adapters merged."""
    if not _is_lora_layer(m):
        return m.weight, m.bias
    return (m.base_layer.weight + sum(m.get_delta_weight(a) for a in m.active_adapters
                                      if a in m.lora_A), m.base_layer.bias)


@torch.no_grad()
def int8_copy(model, rollout: bool = False):
    """`model` with its linear layers as `Int8Linear`, built without a second full-precision copy.
    rollout=False: the frozen reference; the LM head and every other weight are copied as they are.
    rollout=True: one RL step's sampler; the LM head is int8 too, LoRA adapters are merged (one
    layer at a time), and the other weights (embeddings, norms) are `model`'s own tensors. Drop it
    after the rollout."""
    linears = _linears(model, lm_head=rollout)
    if rollout:  # share every tensor; the quantized layers replace their modules below
        memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    else:  # a placeholder for each weight that is quantized (a tied head is not: lm_head=False)
        memo = {id(m.weight): torch.nn.Parameter(torch.empty(0)) for m in linears.values()}
    out = copy.deepcopy(model, memo).eval()
    for name, m in linears.items():
        out.set_submodule(name, Int8Linear(*_weight_and_bias(m)))
    return out


class DecodeLinear(torch.nn.Linear):
    """An `nn.Linear` whose calls run `rlfuse.decode_linear`: the decode kernel on few rows
    without autograd, torch's linear otherwise; `decoding` makes a model's linear layers these
    for a while."""

    def forward(self, x: Tensor) -> Tensor:
        return decode_linear(x, self.weight, self.bias)


@contextlib.contextmanager
def decoding(model):
    """Within the block, every `nn.Linear` of `model` is a `DecodeLinear` (the same module and
    tensors, its class swapped), and back after."""
    swap = [m for m in model.modules() if type(m) is torch.nn.Linear]
    for m in swap:
        m.__class__ = DecodeLinear
    try:
        yield model
    finally:
        for m in swap:
            m.__class__ = torch.nn.Linear


class Int8Linear(torch.nn.Module):
    """A frozen `nn.Linear` held as int8 weights with one fp32 scale per output row (symmetric,
    rounded to nearest): 1 byte a weight instead of 4 (fp32) or 2 (bf16). A call runs
    `rlfuse.decode_linear`: on at most rlfuse.decode.INT8_MAX_ROWS rows (the sampler's decode
    steps) the decode kernel, int8 to fp32 in registers; on more (a prompt's prefill, the
    reference's forward) the weight dequantized into the input's dtype, DEQUANT_ROWS output rows
    at a time; it is quantized in slabs of as many rows."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None):
        super().__init__()
        n, k = weight.shape
        q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
        scale = torch.empty(n, 1, dtype=torch.float32, device=weight.device)
        tiny = torch.finfo(torch.float32).tiny
        for w, qs, ss in zip(weight.detach().split(DEQUANT_ROWS), q.split(DEQUANT_ROWS),
                             scale.split(DEQUANT_ROWS)):  # fp32 transients of a slab
            w = w.float()
            ss.copy_(w.abs().amax(1, keepdim=True).clamp_min(tiny) / 127)
            qs.copy_(torch.round(w / ss))
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return decode_linear(x, self.qweight, self.bias, self.scale)


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    # transformers imports torchao when it is installed; torchao then logs a warning per CUDA
    # library a CPU build of torch cannot load, and torch one per enum it registers
    for name in ("transformers", "torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # a bar per checkpoint save ("Writing model shards")
