"""Data: JSONL records, and packing prompt + completion token ids into a training batch.

Every trainer trains on the same layout: each row is prompt tokens then completion tokens,
right-padded, positions starting at 0. `targets` [B, T-1] are the next tokens with the
prompt and the padding set to `IGNORE`, so hidden[:, :-1] scores targets = input_ids[:, 1:].
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .config import ALGORITHMS, UserError

IGNORE = -100


@dataclass
class Batch:
    input_ids: Tensor        # [B, T] int64, right-padded
    attention_mask: Tensor   # [B, T] int64
    targets: Tensor          # [B, T-1] int64, IGNORE on prompt and padding
    rollout_logp: Optional[Tensor] = None  # [B, T-1] fp32: the sampler's log-probs of targets

    @property
    def mask(self) -> Tensor:  # [B, T-1] bool, completion tokens
        return self.targets != IGNORE

    @property
    def first_target(self) -> int:
        """The first column with a scored token in any row. The columns before it are prompt in
        every row, so the LM head can skip them (see model.scored_hidden)."""
        cols = self.mask.any(0).nonzero()
        return int(cols[0]) if cols.numel() else 0

    def to(self, device) -> "Batch":
        return self._map(lambda t: t.to(device))

    def __getitem__(self, idx) -> "Batch":
        return self._map(lambda t: t[idx])

    def _map(self, fn) -> "Batch":
        return Batch(*(None if t is None else fn(t)
                       for t in (getattr(self, f.name) for f in dataclasses.fields(self))))


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
         max_length: Optional[int] = None) -> Batch:
    """Batch from token-id lists; sequences longer than max_length lose their tail."""
    seqs, n_prompt = [], []
    for p, c in zip(prompts, completions):
        s = (list(p) + list(c))[:max_length]
        seqs.append(s)
        n_prompt.append(min(len(p), len(s)))
    t = max(2, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        att[i, :len(s)] = 1
    labels = ids.masked_fill(att == 0, IGNORE)  # [B, T]
    pos = torch.arange(t)
    labels[pos[None, :] < torch.tensor(n_prompt)[:, None]] = IGNORE
    return Batch(ids, att, labels[:, 1:].contiguous())


def encode(tokenizer, texts: list[str], add_eos: bool = False) -> list[list[int]]:
    """Token ids without special tokens (a BOS is added to prompts if the tokenizer has one)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if add_eos:
        return [x + [tokenizer.eos_token_id] for x in ids]
    bos = tokenizer.bos_token_id
    return [([bos] if bos is not None else []) + x for x in ids]


def sft_batch(tokenizer, prompts: list[str], completions: list[str], max_length: int) -> Batch:
    return pack(encode(tokenizer, prompts), encode(tokenizer, completions, add_eos=True),
                tokenizer.pad_token_id, max_length)


def read_jsonl(path: str, required: tuple[str, ...], key: str = "") -> list[dict]:
    """Records of a JSONL file; each must be an object with the `required` string fields. A
    missing file or a bad line raises UserError naming the file and line (and config `key`)."""
    via = f" (config key {key})" if key else ""
    rows = []
    try:
        f = open(path)
    except FileNotFoundError:
        raise UserError(f"no such data file: {path}{via}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{n}: not valid JSON ({err}){via}") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object with fields {list(required)}, "
                                f"got {type(row).__name__}{via}")
            missing = [k for k in required if not isinstance(row.get(k), str)]
            if missing:
                raise UserError(f"{path}:{n}: missing string field(s) {missing}{via}")
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no records{via}")
    return rows


def check_data(cfg) -> None:
    """Read every data file `cfg.algo` trains on (see config.ALGORITHMS) before any model
    loads: the first is required, the others are checked when set."""
    for i, (key, fields) in enumerate(ALGORITHMS[cfg.algo].data):
        path = cfg
        for part in key.split("."):
            path = getattr(path, part)
        if path is None and i == 0:
            raise UserError(f"{cfg.algo} needs data: set {key} to a JSONL file with the string "
                            f"fields {list(fields)}")
        if path is not None:
            read_jsonl(path, fields, key)


def check_prompt_lengths(prompt_ids: list[list[int]], max_length: int, path: str) -> None:
    """Every prompt must leave a completion token within max_length (else its rows have no
    token to score): UserError naming the records (counted from 1) otherwise."""
    long = [i + 1 for i, p in enumerate(prompt_ids) if len(p) >= max_length]
    if long:
        more = f" and {len(long) - 8} more" if len(long) > 8 else ""
        raise UserError(f"{path}: the prompts of records {long[:8]}{more} are at least "
                        f"max_length={max_length} tokens long (the longest "
                        f"{max(len(prompt_ids[i - 1]) for i in long)}), leaving no completion "
                        "token to score: raise max_length or shorten them")


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


class Sampler:
    """Shuffled index batches from its own generator, whose state a checkpoint saves."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.gen).tolist()
            out.append(self.order.pop())
        return out

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "order": torch.tensor(self.order, dtype=torch.long)}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.order = state["order"].tolist()
