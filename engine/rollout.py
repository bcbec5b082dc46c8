"""Rollouts: sample completions with a KV cache, stop at EOS, score them; and the minibatch loop
GRPO and PPO share.

`rollout_and_score` is one RL step's first half for both trainers: `prompts_per_step` prompts x
`samples_per_prompt` completions (grouped contiguously), the rewards of the weighted reward
functions, and the packed training batch. `minibatch_steps` is the second half's loop: passes x
shuffled minibatches, one optimizer step each, metrics averaged with NaN skipped.

Prompts are left-padded; each completion is cut after its first EOS (kept in the ids, so
training teaches the model to stop) and decoded without special tokens.

Two decoders, the same distribution:
  "rlfuse"  (default) the model's own decoder stack and its HF KV cache, with the LM head and
            the sampler run here. On CPU the linear layers and the head run rlfuse's decode
            kernel at few rows (model.decoding, rlfuse.decode: each weight read once for
            the batch's rows, where BLAS GEMMs at 8 rows fall well short of the memory
            bandwidth). A token is drawn by inverse CDF from one uniform per row
            (torch.multinomial draws an exponential variate per vocabulary entry: over 10x
            slower at 32k). A prompt's prefill runs once for its n samples, which then
            share a copy of its KV cache.
  "hf"      `model.generate` (any model `generate` supports).
`weights="int8"` (RolloutConfig) samples from this step's int8 weight-only copy of the policy
(model.int8_copy: the decode kernel on int8 weights, about 1 byte a weight, dropped after the
rollout); the sampler's log-probs go into the batch, and the loss's rollout_correction
(tis / mis) weighs each token by the policy's probability over the sampler's.
With a vocab-parallel LM head (distributed.vocab_parallel) the "rlfuse" decoder gathers each
step's full-vocabulary logits of this rank's rows from every shard and steps in lockstep with
the other ranks (rlfuse.engine.vocab_parallel); "hf" is refused there.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from rlfuse.decode import decode_linear, decode_rows

from . import distributed, vocab_parallel
from .data import Batch, encode, pack
from .model import decoding, int8_copy

DECODERS = ("rlfuse", "hf")
NUCLEUS_CANDIDATES = 1024  # top_p < 1 sorts only these, unless their mass is below top_p


@dataclass
class Rollout:
    prompt_ids: list[list[int]]       # per completion (prompts repeated n times)
    completion_ids: list[list[int]]   # ends with EOS unless cut by max_new_tokens
    texts: list[str]
    logprobs: Optional[list[list[float]]] = None  # the sampler's, per completion token

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.completion_ids]


def sample_tokens(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0,
                  greedy: bool = False) -> Tensor:
    """One token per row of `logits` [B, V]: argmax, or a draw from softmax(logits / T)
    restricted to the top-p nucleus (at least one token), by inverse CDF."""
    if greedy:
        return logits.argmax(-1)
    p = torch.softmax(logits.float() / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        p_all = p
        p, order = p.topk(min(NUCLEUS_CANDIDATES, p.shape[-1]), dim=-1)  # sorted, descending
        if p.shape[-1] < p_all.shape[-1] and bool((p.sum(-1) < top_p).any()):
            p, order = p_all.sort(dim=-1, descending=True)
        p = p.masked_fill(p.cumsum(-1) - p > top_p, 0.0)  # keep while the mass before < top_p
    cdf = p.cumsum(-1)
    u = torch.rand(p.shape[0], 1, device=p.device) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True).clamp_max(p.shape[-1] - 1)
    return (tok if order is None else order.gather(-1, tok)).squeeze(-1)


def head_logits(x: Tensor, h) -> Tensor:
    """fp32 logits [B, V] of last hidden states x [B, H] under the LM head `h`
    (`rlfuse.engine.model.LMHead`), with bias, logit_scale and final_logit_softcapping applied."""
    if h.linear is not None:  # an int8 rollout copy's head
        logits = h.linear(x).float()
    else:
        logits = decode_linear(x.float(), h.weight, out_dtype=torch.float32)
    if h.bias is not None:
        logits += h.bias.float()
    if h.logit_scale != 1.0:
        logits *= h.logit_scale
    cap = h.final_logit_softcapping
    return cap * torch.tanh(logits / cap) if cap else logits


@torch.no_grad()
def _decode(model, inp: Tensor, att: Tensor, *, max_new_tokens: int, temperature: float,
            top_p: float, greedy: bool, eos: int, pad: int, n: int = 1, logprobs: bool = False
            ) -> tuple[Tensor, Optional[Tensor]]:
    """New tokens [B, <= max_new_tokens] for the B = n x len(inp) samples of the prompts `inp`
    (each prompt's n rows contiguous; pad after a row's EOS; stops when all rows have one), and
    with `logprobs` their fp32 log-probs under softmax(logits / temperature) [B, same]. The
    prompts' prefill runs once per prompt, and its KV cache is copied to the prompt's n rows."""
    from transformers import DynamicCache

    from .model import head

    h = head(model)
    if h.weight is not None and not decode_rows(inp.shape[0], h.weight):
        h = dataclasses.replace(h, weight=h.weight.float())  # a copy only for bf16/fp16 weights
    decoder = model.get_decoder()
    # newer transformers name the argument `cache`, older releases `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters \
        else "past_key_values"
    cache = {cache_arg: DynamicCache(config=model.config)}
    pos = (att.cumsum(-1) - 1).clamp_min(0)
    ids, out, lps = inp, [], []
    rows = inp.shape[0] * n
    done = torch.zeros(rows, dtype=torch.bool, device=inp.device)
    counts = None if h.vocab is None else vocab_parallel.row_counts(rows)
    for _ in range(max_new_tokens):
        x = decoder(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True,
                    **cache).last_hidden_state[:, -1]
        if x.shape[0] < rows:  # after the prefill: each prompt's state to its n samples
            expand = torch.arange(inp.shape[0], device=inp.device).repeat_interleave(n)
            cache[cache_arg].reorder_cache(expand)
            x, att, pos = x[expand], att[expand], pos[expand]
        if h.vocab is None:
            logits = head_logits(x, h)
        else:  # every rank's shard of this rank's rows (vocab_parallel.own_logits)
            xs = distributed.gather_rows(x)[0]
            logits = vocab_parallel.own_logits(head_logits(xs, h), counts, h.vocab)
        if bool(done.all()):  # only while another rank's rows run: draw nothing
            tok = torch.full_like(done, pad, dtype=torch.long)
        else:
            tok = sample_tokens(logits, temperature, top_p, greedy).masked_fill(done, pad)
        out.append(tok)
        if logprobs:  # the drawn token's logit less the logsumexp: no [B, V] log-softmax
            z = logits / temperature
            lps.append(z.gather(1, tok[:, None])[:, 0] - z.logsumexp(-1))
        done |= tok == eos
        finished = bool(done.all())
        if h.vocab is not None:  # the ranks step together until all of them are done
            finished = not distributed.any_rank(not finished)[0]
        if finished:
            break
        ids, pos = tok[:, None], pos[:, -1:] + 1
        att = torch.cat([att, torch.ones_like(att[:, :1])], dim=1)
    return torch.stack(out, dim=1), torch.stack(lps, dim=1) if logprobs else None


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, n: int = 1, temperature: float = 1.0,
             top_p: float = 1.0, max_new_tokens: int = 32, greedy: bool = False,
             batch_size: int = 512, decoder: str = "rlfuse", logprobs: bool = False) -> Rollout:
    """n completions per prompt, grouped contiguously: [p0, p0, ..., p1, p1, ...]; `logprobs`
    records each sampled token's log-prob under softmax(logits / temperature) (the full
    distribution, as the losses score it, also when top_p < 1), with decoder "rlfuse" only.
    At most `batch_size` rows decode together (whole groups: at least one prompt's n)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder: expected one of {DECODERS}, got {decoder!r}")
    if logprobs and decoder != "rlfuse":
        raise ValueError("logprobs=True needs decoder='rlfuse'")
    encoded = encode(tokenizer, prompts)
    ids = [x for x in encoded for _ in range(n)]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    comps, lps = [], []
    per_chunk = max(1, batch_size // n)  # prompts, each with its n samples
    for s in range(0, len(encoded), per_chunk):
        chunk = encoded[s:s + per_chunk]
        t = max(len(x) for x in chunk)
        inp = torch.tensor([[pad] * (t - len(x)) + x for x in chunk], device=device)
        att = torch.tensor([[0] * (t - len(x)) + [1] * len(x) for x in chunk], device=device)
        if decoder == "rlfuse":
            with decoding(model):
                new, lp = _decode(model, inp, att, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, greedy=greedy,
                                  eos=eos, pad=pad, n=n, logprobs=logprobs)
            if logprobs:
                lps += lp.tolist()
        else:
            sample = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            inp, att = inp.repeat_interleave(n, 0), att.repeat_interleave(n, 0)
            new = model.generate(input_ids=inp, attention_mask=att, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=pad, use_cache=True,
                                 **({"do_sample": False} if greedy else sample))[:, t:]
        for row in new.tolist():
            comps.append(row[:row.index(eos) + 1] if eos in row else row)
    model.train(was_training)
    texts = tokenizer.batch_decode(comps, skip_special_tokens=True)
    return Rollout(ids, comps, texts,
                   [lp[:len(c)] for lp, c in zip(lps, comps)] if logprobs else None)


# ----------------------------------------------------------------------------- GRPO and PPO
@dataclass
class ScoredRollout:
    rollout: Rollout
    rewards: Tensor   # [B] fp32 on the CPU, one per completion
    batch: Batch      # prompt + completion rows, on the model's device
    seconds: float    # sampling time
    truncated: float  # fraction of completions cut by max_new_tokens before an EOS

    def metrics(self) -> dict:
        lengths = self.rollout.lengths
        return {"completion_length": sum(lengths) / len(lengths),
                "truncated_fraction": self.truncated,
                "rollout_tokens_per_s": sum(lengths) / self.seconds}


def rollout_and_score(model, tokenizer, rows: list[dict], cfg, reward_fn, max_length: int,
                      logprobs: bool = False) -> ScoredRollout:
    """`cfg.samples_per_prompt` completions of each row's "prompt" under `cfg` (a RolloutConfig),
    scored by `reward_fn(prompts, completions, **columns)`: the rows' other columns (such as
    "answer") repeated per completion. cfg.weights "int8" samples from this step's int8 copy of
    the policy (model.int8_copy, dropped after); `logprobs` puts the sampler's log-probs into the
    batch (Batch.rollout_logp, for the losses' rollout_correction)."""
    n = cfg.samples_per_prompt
    t0 = time.perf_counter()
    sampler = int8_copy(model, rollout=True) if cfg.weights == "int8" else model
    roll = generate(sampler, tokenizer, [r["prompt"] for r in rows], n=n,
                    temperature=cfg.temperature, top_p=cfg.top_p,
                    max_new_tokens=cfg.max_new_tokens, decoder=cfg.decoder, logprobs=logprobs)
    del sampler
    seconds = time.perf_counter() - t0
    prompts = [r["prompt"] for r in rows for _ in range(n)]
    columns = {k: [r[k] for r in rows for _ in range(n)] for k in rows[0] if k != "prompt"}
    rewards = torch.tensor(reward_fn(prompts, roll.texts, **columns), dtype=torch.float32)
    batch = pack(roll.prompt_ids, roll.completion_ids, tokenizer.pad_token_id, max_length)
    if logprobs:  # each row's scored positions are its completion's first tokens, in order
        lp = torch.zeros(batch.targets.shape)
        kept = batch.mask.sum(1).tolist()
        lp[batch.mask] = torch.tensor([x for row, k in zip(roll.logprobs, kept) for x in row[:k]])
        batch = dataclasses.replace(batch, rollout_logp=lp)
    eos = tokenizer.eos_token_id
    cut = sum(len(c) >= cfg.max_new_tokens and c[-1] != eos for c in roll.completion_ids)
    return ScoredRollout(roll, rewards, batch.to(next(model.parameters()).device), seconds,
                         cut / len(roll.completion_ids))


def mean_metrics(rows: list[dict]) -> dict:
    """Per-key mean over minibatches, skipping NaN (the explained variance of constant returns);
    NaN when every row is NaN."""
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows if not math.isnan(r[k])]
        out[k] = sum(vals) / len(vals) if vals else math.nan
    return out


def minibatch_steps(trainer, n_rows: int, passes: int, mini_batches: int, step) -> dict:
    """`passes` x `mini_batches` optimizer steps of `trainer`: each pass shuffles the n_rows rows
    into minibatches, and `step(idx)` returns (loss, metrics) of the rows `idx`. Returns the mean
    metrics, the mean and largest grad_norm, and the largest importance ratio of any step."""
    stats = []
    for _ in range(passes):
        for idx in torch.randperm(n_rows, device=trainer.device).chunk(mini_batches):
            loss, metrics = step(idx)
            loss.backward()
            metrics["grad_norm"] = trainer.optimizer_step()
            stats.append(metrics)
    out = {**mean_metrics(stats), "grad_norm_max": max(s["grad_norm"] for s in stats)}
    if "ratio_max" in stats[0]:
        out["ratio_max"] = max(s["ratio_max"] for s in stats)
    return out
