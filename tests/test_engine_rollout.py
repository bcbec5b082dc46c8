"""Rollouts: the rlfuse decoder against model.generate, the sampler against its distribution."""
import math

import pytest
import torch

from rlfuse.engine.config import ModelConfig
from rlfuse.engine.model import char_tokenizer, head, hidden_states, tiny_model
from rlfuse.engine.rollout import generate, head_logits, sample_tokens

PROMPTS = ["12+3=", "4+567=", "9="]  # different lengths: left padding and position ids


@pytest.fixture
def tok():
    return char_tokenizer()


def _model(arch: str, tok):
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    small = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, **ids)
    if arch == "qwen2":
        return tiny_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                      intermediate_size=48), tok, max_positions=64)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**small))
    # Gemma2: logit softcapping, and a sliding window shorter than the sequences
    return Gemma2ForCausalLM(Gemma2Config(**small, head_dim=16, final_logit_softcapping=2.0,
                                          sliding_window=4))


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2"])
def test_greedy_decode_equals_model_generate(tok, arch):
    m = _model(arch, tok)
    ours = generate(m, tok, PROMPTS, n=2, max_new_tokens=12, greedy=True)
    hf = generate(m, tok, PROMPTS, n=2, max_new_tokens=12, greedy=True, decoder="hf")
    assert ours.completion_ids == hf.completion_ids
    assert max(ours.lengths) == 12 and len({tuple(c) for c in ours.completion_ids}) > 1
    assert ours.texts == hf.texts
    assert ours.prompt_ids == hf.prompt_ids


def test_head_logits_apply_the_model_transforms(tok):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    m = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0,
        pad_token_id=tok.pad_token_id)).eval()
    ids = torch.randint(4, len(tok), (2, 7))
    att = torch.ones_like(ids)
    with torch.no_grad():
        ours = head_logits(hidden_states(m, ids, att)[:, -1], head(m))
        want = m(input_ids=ids, attention_mask=att).logits[:, -1]
    assert want.abs().max() <= 2.0  # the softcap is active
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.6)])
def test_sample_tokens_follows_the_tempered_nucleus(temperature, top_p):
    torch.manual_seed(1)
    logits = torch.tensor([2.0, 0.5, -1.0, 1.5, 0.0, -3.0, 1.0])
    n = 40000
    draws = sample_tokens(logits.expand(n, -1), temperature, top_p)
    p = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sp, order = p.sort(descending=True)
        keep = order[(sp.cumsum(0) - sp) < top_p]
        p = torch.zeros_like(p).index_fill_(0, keep, 1.0) * p
        p /= p.sum()
    freq = torch.bincount(draws, minlength=logits.numel()).double() / n
    sigma = (p.double() * (1 - p.double()) / n).sqrt()
    assert torch.all((freq - p.double()).abs() <= 5 * sigma + 1e-12), (freq, p)
    assert torch.all(freq[p == 0] == 0)


def test_nucleus_from_candidates_equals_full_sort(monkeypatch):
    import rlfuse.engine.rollout as rollout

    torch.manual_seed(2)
    logits = torch.randn(64, 3000) * 4  # peaked rows: the 0.9 nucleus fits in 16 candidates
    rows = [logits, torch.randn(64, 3000) * 0.1]  # flat rows: it does not, full sort
    for x in rows:
        monkeypatch.setattr(rollout, "NUCLEUS_CANDIDATES", 16)
        torch.manual_seed(3)
        few = sample_tokens(x, 0.8, 0.9)
        monkeypatch.setattr(rollout, "NUCLEUS_CANDIDATES", x.shape[-1])
        torch.manual_seed(3)
        full = sample_tokens(x, 0.8, 0.9)
        assert torch.equal(few, full)


def test_sample_tokens_greedy_and_edge_cases():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, -math.inf, 4.9]])
    assert sample_tokens(logits, greedy=True).tolist() == [1, 0]
    # an impossible token is never drawn; a one-token nucleus always gives the argmax
    torch.manual_seed(0)
    draws = sample_tokens(logits[1:].expand(5000, -1))
    assert (draws != 1).all()
    assert (sample_tokens(logits.repeat(500, 1), top_p=1e-6) == torch.tensor([1, 0]).repeat(500)).all()


def test_unknown_decoder_is_an_error(tok):
    m = tiny_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                               intermediate_size=16), tok)
    with pytest.raises(ValueError, match="decoder"):
        generate(m, tok, ["1="], decoder="vllm")
