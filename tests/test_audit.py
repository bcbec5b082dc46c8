"""`rlfuse audit`: each planted bias is flagged, unbiased synthetic data flags nothing; the
statistics behind it (Wilson, bootstrap, AUC, logistic fit) against cases with known answers."""
import json
import math
import random

import pytest
import torch

from rlfuse.engine import stats
from rlfuse.engine.audit import AuditConfig, audit, style_features
from rlfuse.engine.cli import main
from rlfuse.engine.data import write_jsonl

WORDS = "the a model answer data result value method system question response note".split()


def text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def decorate(rng, t, fmt, syc):
    if rng.random() < fmt:
        t = f"## Answer\n- {t}\n- **key point**"
    if rng.random() < syc:
        t = "You're absolutely right! Great question. " + t
    return t


def make_pairs(n=400, seed=0, longer=0.0, fmt=(0.3, 0.3), syc=(0.2, 0.2), first=0.5):
    """Chosen and rejected from one distribution, except where a bias is planted: `longer`,
    the chance chosen gets 15 extra words; fmt / syc, the chance of markdown / flattery on
    (chosen, rejected); first, the chance chosen was shown first."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        c, r = text(rng, rng.randint(10, 40)), text(rng, rng.randint(10, 40))
        if rng.random() < longer:
            c += " " + text(rng, 15)
        rows.append({"prompt": text(rng, 8), "chosen": decorate(rng, c, fmt[0], syc[0]),
                     "rejected": decorate(rng, r, fmt[1], syc[1]),
                     "chosen_position": "first" if rng.random() < first else "second"})
    return rows


CFG = AuditConfig(pairs="unused", n_boot=300)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_data_flags_nothing(seed):
    report = audit(make_pairs(seed=seed), CFG)
    assert report["flags"] == []
    assert report["position"]["p_chosen_first"].low < 0.5 < report["position"]["p_chosen_first"].high
    assert 0.35 < report["style_auc"].estimate < 0.65


@pytest.mark.parametrize("planted, kw", [
    ("length", dict(longer=0.6)),
    ("format", dict(fmt=(0.6, 0.1))),
    ("sycophancy", dict(syc=(0.5, 0.05))),
    ("position", dict(first=0.7)),
])
def test_planted_bias_is_flagged(planted, kw):
    report = audit(make_pairs(**kw), CFG)
    assert planted in report["flags"]
    if planted != "position":  # position is not a style feature
        assert "style" in report["flags"] and report["style_auc"].low > 0.55


def test_duplicates_empty_and_identical_pairs():
    rows = make_pairs(n=100)
    rows += rows[:3] + [{"prompt": "p", "chosen": "same", "rejected": "same"},
                        {"prompt": "p", "chosen": " ", "rejected": "x"}]
    d = audit(rows, CFG)["duplicates"]
    assert (d["duplicate_rows"], d["identical_pairs"], d["empty_pairs"]) == (3, 1, 1)
    assert "duplicates" in audit(rows, CFG)["flags"]
    assert "duplicates" not in audit(rows[:100], CFG)["flags"]


def test_reward_model_section_sees_a_length_loving_scorer():
    rows = make_pairs(n=300, longer=0.3)
    report = audit(rows, CFG, scorer=lambda p, c: [float(len(x.split())) for x in c])
    rm = report["reward_model"]
    assert rm["length_correlation"].low > 0.9 and "rm_length" in report["flags"]
    # it prefers the longer side, so on length-matched pairs it is no better than the ties
    assert rm["accuracy_all"].estimate > rm["accuracy_length_matched"].estimate


def test_style_features_count_markdown_and_markers():
    f = style_features("## Title\n- one\n- two\n**bold** You're right, great question", 10)
    assert (f["headers"], f["lists"], f["bold"], f["sycophancy"]) == (10.0, 20.0, 10.0, 2.0)


def test_cli_writes_report_and_png(tmp_path, capsys):
    path = str(tmp_path / "pairs.jsonl")
    write_jsonl(path, make_pairs(n=120, longer=0.8))
    assert main(["audit", path, "--json", str(tmp_path / "r.json"), "n_boot=200"]) == 0
    out = capsys.readouterr().out
    assert "flags: " in out and "length" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert "length" in report["flags"] and report["length"]["p_chosen_longer"]["low"] > 0.55
    assert (tmp_path / "pairs.audit.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_user_errors(tmp_path, capsys):
    assert main(["audit"]) == 2
    assert "needs a pairs file" in capsys.readouterr().err
    assert main(["audit", str(tmp_path / "none.jsonl")]) == 2
    assert "no such data file" in capsys.readouterr().err
    assert main(["audit", "x.jsonl", "margin=0.7"]) == 2
    assert "'margin'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- statistics
def test_wilson_matches_the_closed_form_and_covers_zero():
    ci = stats.wilson(0, 20)
    assert ci.low == 0 and 0.1 < ci.high < 0.2  # the normal interval would be [0, 0]
    ci = stats.wilson(50, 100)
    assert math.isclose(ci.low, 0.4038, abs_tol=1e-3) and math.isclose(ci.high, 0.5962, abs_tol=1e-3)


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    g = torch.Generator().manual_seed(0)
    small, big = torch.randn(50, generator=g) + 3, torch.randn(2000, generator=g) + 3
    a, b = stats.mean_interval(small), stats.mean_interval(big)
    assert a.low < 3 < a.high and b.low < 3 < b.high
    assert b.high - b.low < (a.high - a.low) / 3


def test_auc_counts_ties_half():
    assert stats.auc(torch.tensor([1., 2., 3., 4.]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert stats.auc(torch.tensor([1., 1., 1., 1.]), torch.tensor([0, 1, 0, 1])) == 0.5
    assert stats.auc(torch.tensor([2., 1., 3.]), torch.tensor([1, 0, 0])) == 0.5
    assert stats.auc(torch.tensor([2., 1., 3.]), torch.tensor([1, 0, 0]),
                     torch.tensor([1., 3., 0.])) == 1.0  # weights: item 3 left out
    g = torch.Generator().manual_seed(0)
    s, y = torch.randn(60, generator=g).round(decimals=1), torch.rand(60, generator=g) < 0.4
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a, ya in zip(s, y) if ya
             for b, yb in zip(s, y) if not yb]
    assert math.isclose(stats.auc(s, y).item(), sum(pairs) / len(pairs))


def test_logistic_fit_recovers_coefficients_and_batches_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    y = (torch.rand(4000, generator=g, dtype=torch.float64)
         < torch.sigmoid(x @ torch.tensor([1.5, -0.5], dtype=torch.float64) + 0.3)).double()
    beta = stats.logistic_fit(x, y, l2=0.0)
    assert torch.allclose(beta, torch.tensor([1.5, -0.5, 0.3], dtype=torch.float64), atol=0.15)
    w = torch.ones(3, 4000, dtype=torch.float64)
    w[1, :2000] = 2.0
    many = stats.logistic_fit(x, y, w, l2=0.0)
    assert torch.allclose(many[0], beta) and torch.allclose(many[1], stats.logistic_fit(
        torch.cat([x, x[:2000]]), torch.cat([y, y[:2000]]), l2=0.0))


def test_paired_test_sees_a_consistent_small_gain():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(500, generator=g)
    t = stats.paired_test(a, a + 0.02 + 0.01 * torch.randn(500, generator=g))
    assert t["low"] > 0 and t["p"] < 1e-6
    t = stats.paired_test(a, a[torch.randperm(500, generator=g)])
    assert t["low"] < 0 < t["high"]


def test_cli_with_a_reward_model_folder(tmp_path, capsys):
    from rlfuse.engine.model import char_tokenizer
    from rlfuse.engine.reward_model import build_reward_model
    from test_engine_trainers import model_for

    tok = char_tokenizer()
    rm = build_reward_model(model_for(tok), tok)
    rm.save_pretrained(str(tmp_path / "rm"))
    tok.save_pretrained(str(tmp_path / "rm"))
    rows = [{"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1) + "0"}
            for a in range(40)]
    path = str(tmp_path / "pairs.jsonl")
    write_jsonl(path, rows)
    assert main(["audit", path, "--rm", str(tmp_path / "rm"), "n_boot=200"]) == 0
    report = json.loads((tmp_path / "pairs.audit.json").read_text())
    rm_part = report["reward_model"]
    assert rm_part["accuracy_all"]["n"] == 40
    assert -1 <= rm_part["length_correlation"]["estimate"] <= 1
    # lengths come from the reward model's tokenizer: characters here, so rejected is longer
    assert report["length"]["mean_tokens_rejected"] > report["length"]["mean_tokens_chosen"]
    assert "reward model" in capsys.readouterr().out
