"""Evaluation: item-level standard errors and the paired test beside the seed spread, best@n
(unbiased pass@k) and maj@n, and the frozen regression set diffed between stages."""
import itertools
import json
import math

import pytest
import torch

from rlfuse.engine.data import write_jsonl
from rlfuse.engine.evaluate import (EvalConfig, RegressionSet, accuracy, at_n, compare, majority,
                                    pass_at_k)
from rlfuse.engine.model import char_tokenizer
from test_engine_trainers import ROWS, model_for


@pytest.mark.parametrize("n, c, k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 6), (4, 4, 2)])
def test_pass_at_k_is_the_exact_subset_probability(n, c, k):
    draws = list(itertools.combinations(range(n), k))  # sample i < c is correct
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(i < c for i in d) for d in draws) / len(draws))


def test_majority_vote():
    assert majority(["12", "13", " 12", "x"]) == "12"
    assert majority(["7", "8"]) == "7"  # a tie: the first to reach the top count
    assert majority(["", "  "]) is None


def test_compare_is_a_paired_test():
    before = {"per_item": [0.0, 0.2, 0.4, 0.6] * 50, "std": 0.01}
    after = {"per_item": [x + 0.1 for x in before["per_item"]], "std": 0.01}
    t = compare(before, after)
    assert t["diff"] == pytest.approx(0.1) and t["significant"] and t["beats_spread"]
    noisy = {"per_item": [0.6, 0.4, 0.2, 0.0] * 50, "std": 0.2}
    t = compare(before, noisy)
    assert not t["significant"] and not t["beats_spread"] and t["low"] < 0 < t["high"]


def test_accuracy_and_at_n_on_a_tiny_model():
    tok = char_tokenizer()
    model = model_for(tok)
    prompts, answers = [r["prompt"] for r in ROWS], [r["answer"] for r in ROWS]
    cfg = EvalConfig(max_new_tokens=3, seeds=(0, 1))
    state = torch.get_rng_state()
    r = accuracy(model, tok, prompts, answers, cfg, verifier=lambda p, c, answer: [
        float(len(x) % 2) for x in c])  # a verifier a random model passes half the time
    assert torch.equal(state, torch.get_rng_state())
    assert len(r["per_item"]) == len(prompts) and 0 < r["mean"] < 1
    assert r["mean"] == pytest.approx(sum(r["per_item"]) / len(prompts))
    assert r["se"] == pytest.approx(torch.tensor(r["per_item"]).std().item() / math.sqrt(8))
    out = at_n(model, tok, prompts, answers, 4, cfg, verifier=lambda p, c, answer: [
        float(len(x) % 2) for x in c])
    assert out["best@1"] <= out["best@4"] <= 1 and set(out) >= {"maj@4", "best@4_std"}
    assert out["maj@4"] <= out["best@4"]  # the majority is one of the samples


def test_regression_set_diffs_the_stages(tmp_path):
    tok = char_tokenizer()
    path = str(tmp_path / "frozen.jsonl")
    write_jsonl(path, ROWS[:4])
    reg = RegressionSet(path, tok, str(tmp_path / "regression"), max_new_tokens=3)
    first = reg.check("sft", model_for(tok, 0))
    assert first["n"] == 4 and "changed" not in first and "accuracy" in first
    again = reg.check("same", model_for(tok, 0))
    assert again["changed"] == 0 and again["newly_right"] == again["newly_wrong"] == []
    other = reg.check("grpo", model_for(tok, 1))
    assert other["changed"] > 0  # greedy outputs of another random model differ
    rows = [json.loads(x) for x in open(tmp_path / "regression" / "grpo.jsonl")]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in ROWS[:4]]
