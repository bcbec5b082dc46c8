"""rlfuse.judge: both orders, p = 1/2 [p(A>B) + 1 - p(B>A)], flip rate, identical pairs, failures
excluded and counted; the LM verdict equals the renormalized next-token softmax; the judge as a
reward and as the style-controlled win rate's outcome."""
import math
import random

import pytest
import torch

import rlfuse
from rlfuse.engine.judge import JudgeReward, LMVerdict, PairwiseJudge
from rlfuse.engine.model import char_tokenizer, tiny_model
from rlfuse.engine.winrate import controlled_win_rate
from test_engine_trainers import TINY


def biased(bias):
    """A judge that prefers the longer response, plus `bias` logits for whatever is shown first."""
    def verdict(prompts, first, second):
        return [1 / (1 + math.exp(-(0.5 * (len(a) - len(b)) + bias))) for a, b in zip(first, second)]
    return verdict


def test_position_bias_cancels_and_shows_in_flips_and_identical_pairs():
    a, b = ["xx", "xxxxxx", "x"], ["x", "xxxxx", "xxxxxxxx"]
    fair, unfair = PairwiseJudge(biased(0.0)), PairwiseJudge(biased(2.0))
    r = fair.compare(["p"] * 3, a, b)
    assert r.flip_rate == 0 and r.failures == 0
    assert [x > 0.5 for x in r.p] == [True, True, False]
    r = unfair.compare(["p"] * 3, a, b)
    # one character of difference loses to the position bias: that pair flips with the order
    assert r.flip_rate == pytest.approx(2 / 3)
    assert r.p == pytest.approx(fair.compare(["p"] * 3, a, b).p, abs=0.2)
    same = unfair.compare(["p"] * 3, a, a)
    assert same.p == pytest.approx([0.5] * 3)  # debiased: exactly 1/2 on identical pairs
    assert same.first_order_mean == pytest.approx(1 / (1 + math.exp(-2.0)))  # the raw bias


def test_failures_are_excluded_and_counted():
    def flaky(prompts, first, second):
        return [None if a == "bad" else math.nan if b == "bad" else 0.9 for a, b in zip(first, second)]
    r = PairwiseJudge(flaky).compare(["p"] * 3, ["good", "bad", "good"], ["ok", "ok", "fine"])
    assert r.failures == 1 and math.isnan(r.p[1]) and r.mean == pytest.approx(0.5)
    assert len(r.judged) == 2
    with pytest.raises(ValueError, match="returned 1"):
        PairwiseJudge(lambda p, a, b: [0.5]).compare(["p"] * 2, ["a", "b"], ["c", "d"])


def test_lm_verdict_is_the_renormalized_next_token_softmax():
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(TINY, tok, max_positions=256).eval()
    v = LMVerdict(model, tok, template="{prompt}:{first}|{second}=", tokens=("a", "b"),
                  min_mass=0.0, batch_size=2)
    prompts, first, second = ["1+1", "2+2", "3+3"], ["2", "44", "6"], ["3", "4", "66"]
    got = v(prompts, first, second)
    ia, ib = tok.convert_tokens_to_ids(["a", "b"])
    for p, a, b, g in zip(prompts, first, second, got):
        ids = [tok.bos_token_id] + tok(f"{p}:{a}|{b}=", add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        want = torch.softmax(logits[[ia, ib]], -1)[0].item()
        assert g == pytest.approx(want, abs=1e-5)
    # a random tiny model puts ~2/50 of its mass on the two verdict tokens: every pair fails
    strict = PairwiseJudge(LMVerdict(model, tok, template="{prompt}{first}{second}",
                                     tokens=("a", "b")))
    r = strict.compare(prompts, first, second)
    assert r.failures == 3 and r.judged == []
    with pytest.raises(ValueError, match="one distinct token each"):
        LMVerdict(model, tok, tokens=("ab", "b"))


def test_judge_reward_and_rlfuse_judge_export():
    judge = rlfuse.judge.PairwiseJudge(biased(1.0))
    reward = JudgeReward(judge, baseline="reference")
    r = reward(["p", "p"], ["xxxx", "x"], reference=["xx", "xx"])
    assert r[0] > 0.5 > r[1]
    with pytest.raises(ValueError, match="'reference' column"):
        reward(["p"], ["x"], answer=["1"])
    from rlfuse import judge as module
    assert module.PairwiseJudge is PairwiseJudge


def test_controlled_win_rate_removes_a_length_preference():
    rng = random.Random(0)
    a = ["w " * rng.randint(20, 60) for _ in range(400)]  # the model is longer
    b = ["w " * rng.randint(5, 40) for _ in range(400)]
    theta = -0.4  # at equal length the model loses: sigmoid(-0.4) = 0.40
    y = []
    for x, z in zip(a, b):
        la, lb = len(x.split()), len(z.split())
        y.append(float(rng.random() < 1 / (1 + math.exp(-(theta + 4 * (la - lb) / (la + lb))))))
    out = controlled_win_rate(y, a, b, n_boot=200)
    assert out["raw"].low > 0.55  # length makes the model look better than it is
    c = out["controlled"]
    assert c.low < 1 / (1 + math.exp(-theta)) < c.high and c.high < 0.5
    assert out["coefficients"]["length"].low > 0
    # outcomes that ignore style: the controlled win rate is the raw one, gamma ~ 0
    y = [float(rng.random() < 0.5) for _ in a]
    out = controlled_win_rate(y, a, b, n_boot=200)
    L = out["coefficients"]["length"]
    assert L.low < 0 < L.high
    assert out["controlled"].estimate == pytest.approx(out["raw"].estimate, abs=0.06)
