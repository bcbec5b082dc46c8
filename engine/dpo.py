"""DPO (and every `rlfuse.preference_loss` type) on offline preference pairs.

Data: JSONL with "prompt", "chosen", "rejected". The reference policy is the policy as it
starts: its sequence log-prob sums for all pairs are computed once, before the first step
(no reference model stays in memory), and kept in the checkpoint. Reference-free types
(simpo, orpo) skip that pass. Each step packs B pairs as [chosen rows; rejected rows] and
calls `rlfuse.preference_loss` on the backbone's hidden states and the LM head. Under torchrun
each rank trains its share of the B pairs (the loss is a mean over pairs, and the wrappers
average the gradients), and the reference pass is shared out over the ranks and gathered.
"""
from __future__ import annotations

import math
import time

import torch

import rlfuse
from rlfuse.preference import REFERENCE_FREE

from . import distributed, vocab_parallel
from .data import IGNORE, Sampler, check_prompt_lengths, encode, pack, read_jsonl
from .model import head, scored_hidden, sequence_logprobs
from .trainer import Trainer


def pair_loss(model, batch, ref, loss_cfg):
    """(loss, output, reference sums) of preference_loss on the pairs in batch ([chosen rows;
    rejected rows]); with a vocab-parallel head, on every rank's pairs (and their reference)."""
    h = head(model)
    hid, c = scored_hidden(model, batch)
    hid, targets, ref, _ = vocab_parallel.whole_batch(h, hid, batch.targets[:, c:], ref)
    if h.vocab is not None:  # [c_0; r_0; c_1; r_1; ...] -> [c_0; c_1; ...; r_0; r_1; ...]
        order = vocab_parallel.chosen_first(targets.shape[0]).to(targets.device)
        hid, targets = hid[order], targets[order]
        ref = None if ref is None else ref[order]
    loss, out = rlfuse.preference_loss(hid, h.weight, targets, targets != IGNORE, ref_logp=ref,
                                       bias=h.bias, config=loss_cfg, vocab_group=h.vocab_group)
    return loss, out, ref


class DPOTrainer(Trainer):
    name = "dpo"

    def __init__(self, cfg, model=None, tokenizer=None):
        if not cfg.dpo.data:
            raise ValueError("DPO needs pairs: set dpo.data to a JSONL file with 'prompt', "
                             "'chosen' and 'rejected' fields")
        self.pairs = read_jsonl(cfg.dpo.data, ("prompt", "chosen", "rejected"))
        super().__init__(cfg, model, tokenizer)
        check_prompt_lengths(encode(self.tok, [r["prompt"] for r in self.pairs]), cfg.max_length,
                             cfg.dpo.data)
        distributed.check_share("dpo.batch_size", cfg.dpo.batch_size)
        self.sampler = Sampler(len(self.pairs), cfg.dpo.batch_size, cfg.seed)
        self.loss_cfg = head(self.model).loss_config(cfg.dpo.loss, "dpo.loss")
        self.ref = None  # [n, 2] reference sums (chosen, rejected), computed at the first step
        self.prepare()

    @property
    def total_steps(self) -> int:
        d = self.cfg.dpo
        return self.cfg.steps or d.epochs * math.ceil(len(self.pairs) / d.batch_size)

    def batch(self, idx):
        """Chosen rows then rejected rows: [2B, T]."""
        rows = [self.pairs[i] for i in idx]
        prompts = encode(self.tok, [r["prompt"] for r in rows])
        comps = encode(self.tok, [r["chosen"] for r in rows] + [r["rejected"] for r in rows],
                       add_eos=True)
        return pack(prompts + prompts, comps, self.tok.pad_token_id,
                    self.cfg.max_length).to(self.device)

    def reference_logprobs(self, chunk: int = 64) -> torch.Tensor:
        """[n, 2] sequence log-prob sums of every pair; each rank computes its share, ceil(n / w)
        pairs (the last ranks' padded with the last pair), so that every rank runs as many
        forwards: a vocab-parallel head's run together."""
        n, w, r = len(self.pairs), distributed.world(), distributed.rank()
        per = -(-n // w)
        mine = list(range(min(n, r * per), min(n, (r + 1) * per)))
        mine += [n - 1] * (per - len(mine))
        out = []
        with self.wrapped.inference():
            for s in range(0, len(mine), chunk):
                seq = self.forward(sequence_logprobs, self.model,
                                   self.batch(mine[s:s + chunk])).sum(-1)  # [2b]
                out.append(torch.stack(seq.chunk(2), dim=1))  # [b, 2]
        local = torch.cat(out) if out else torch.zeros(0, 2, device=self.device)
        return distributed.gather_rows(local)[0][:n]  # the full shares come first

    def train_step(self) -> dict:
        uses_ref = self.loss_cfg.loss_type not in REFERENCE_FREE
        if self.ref is None and uses_ref:
            self.ref = self.reference_logprobs()
        t0 = time.perf_counter()
        idx = distributed.share(self.sampler.next())
        batch = self.batch(idx)
        ref = self.ref[idx].T.reshape(-1) if uses_ref else None  # [2B]: chosen; rejected
        loss, out, ref = self.forward(pair_loss, self.model, batch, ref, self.loss_cfg)
        loss.backward()
        grad_norm = self.optimizer_step()
        dt = time.perf_counter() - t0
        # DPO samples nothing from the policy, so it has no KL estimate; the mean sequence
        # log-ratio to the reference on the pairs is its drift on the data
        drift = {} if ref is None else {"logratio_seq": (torch.cat(
            [out.chosen_logp, out.rejected_logp]) - ref.to(out.chosen_logp)).mean().item()}
        return {"loss": loss.item(), "grad_norm": grad_norm,
                **{k: v.item() for k, v in out.metrics.items()}, **drift,
                "tokens_per_s": batch.attention_mask.sum().item() / dt}

    def state_dict(self) -> dict:
        state = {"sampler": self.sampler.state_dict()}
        if self.ref is not None:
            state["ref"] = self.ref
        return state

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.ref = state.get("ref")
