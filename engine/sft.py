"""Supervised fine-tuning on (prompt, completion) pairs.

Loss: mean NLL of the completion tokens (the prompt is `ignore_index`), from the fused
log-probs `rlfuse.linear_logprobs(hidden[:, :-1], W, input_ids[:, 1:])`: the [tokens, vocab]
logits are never held, only a chunk of them at a time. Under torchrun each rank trains its share
of the batch, and the mean is over the whole batch's tokens.
"""
from __future__ import annotations

import time

import rlfuse

from . import distributed, vocab_parallel
from .data import IGNORE, Batch, Sampler, read_jsonl, sft_batch
from .model import head, scored_hidden
from .trainer import Trainer


def nll_loss(model, batch):
    """Mean NLL over completion tokens (under torchrun: this rank's share of the mean over every
    rank's tokens; with a vocab-parallel head, that mean itself, over the gathered batch), and
    the number of tokens it averages."""
    h = head(model)
    hid, c = scored_hidden(model, batch)  # [B, T-1-c, H]
    hid, targets, _ = vocab_parallel.whole_batch(h, hid, batch.targets[:, c:])
    logp = rlfuse.linear_logprobs(hid, h.weight, targets, bias=h.bias,
                                  logit_scale=h.logit_scale,
                                  final_logit_softcapping=h.final_logit_softcapping,
                                  vocab_group=h.vocab_group)
    n = int((targets != IGNORE).sum())  # the gathered batch's: token_share(n) is then 1
    return -logp.sum() / max(n, 1) * distributed.token_share(n), n


class Demonstrations:
    """(prompt, completion) records drawn in shuffled batches of `batch_size` (SFT, and GRPO's
    sft_coef NLL; under torchrun each rank gets its share); a checkpoint keeps `sampler`'s
    state."""

    def __init__(self, records: list[dict], tokenizer, batch_size: int, max_length: int,
                 seed: int):
        distributed.check_share("sft.batch_size", batch_size)
        self.records, self.tok, self.max_length = records, tokenizer, max_length
        self.sampler = Sampler(len(records), batch_size, seed)

    def next(self, device) -> Batch:
        rows = [self.records[i] for i in distributed.share(self.sampler.next())]
        return sft_batch(self.tok, [r["prompt"] for r in rows], [r["completion"] for r in rows],
                         self.max_length).to(device)


class SFTTrainer(Trainer):
    name = "sft"

    def __init__(self, cfg, model=None, tokenizer=None, records=None):
        super().__init__(cfg, model, tokenizer)
        if records is None:
            if not cfg.sft.data:
                raise ValueError("SFT needs data: set sft.data to a JSONL file with "
                                 "'prompt' and 'completion' fields")
            records = read_jsonl(cfg.sft.data, ("prompt", "completion"))
        self.data = Demonstrations(records, self.tok, cfg.sft.batch_size, cfg.max_length,
                                   cfg.seed)
        self.prepare()

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        batch = self.data.next(self.device)
        loss, n_tokens = self.forward(nll_loss, self.model, batch)
        loss.backward()
        grad_norm = self.optimizer_step()
        dt = time.perf_counter() - t0
        return {"loss": loss.item(), "grad_norm": grad_norm,
                "tokens_per_s": batch.attention_mask.sum().item() / dt}

    def state_dict(self) -> dict:
        return {"sampler": self.data.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.data.sampler.load_state_dict(state["sampler"])
