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


def test_prefill_runs_once_per_prompt_and_whole_groups_decode_together(tok):
    m = _model("qwen2", tok)
    shapes = []
    hook = m.get_decoder().register_forward_hook(
        lambda mod, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True)
    torch.manual_seed(0)
    roll = generate(m, tok, PROMPTS, n=4, max_new_tokens=6)
    longest = max(len(p) for p in roll.prompt_ids)
    assert shapes[0] == (3, longest) and set(shapes[1:]) == {(12, 1)}
    assert len({tuple(c) for c in roll.completion_ids[:4]}) > 1  # one prompt, independent draws
    shapes.clear()  # batch_size 5 at n 2: two prompts (4 rows), then one (2 rows)
    greedy = generate(m, tok, PROMPTS, n=2, max_new_tokens=6, greedy=True, batch_size=5)
    hook.remove()
    assert [s[0] for s in shapes if s[1] > 1] == [2, 1]
    assert {s[0] for s in shapes if s[1] == 1} == {4, 2}
    assert greedy.completion_ids == generate(m, tok, PROMPTS, n=2, max_new_tokens=6,
                                             greedy=True).completion_ids


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


# ----------------------------------------------------------------------------- int8 sampler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64, 65])
def test_int8_linear_matches_its_dequantized_weight(dtype, rows):
    from rlfuse.decode import INT8_MAX_ROWS, decode_rows
    from rlfuse.engine.model import Int8Linear

    torch.manual_seed(rows)
    w, b = torch.randn(37, 24).to(dtype), torch.randn(37).to(dtype)  # odd out, in % 32 != 0
    m = Int8Linear(w, b)
    x = torch.randn(rows, 24).to(dtype)
    deq = m.qweight.double() * m.scale.double()
    want = x.double() @ deq.t() + b.double()
    with torch.no_grad():  # <= INT8_MAX_ROWS rows: the decode kernel; more: dequantized
        got = m(x)
    assert got.dtype == dtype and got.shape == (rows, 37)
    scale = want.abs().max()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: the output's own rounding
    assert (got.double() - want).abs().max() < tol * scale
    assert (rows <= INT8_MAX_ROWS) == decode_rows(rows, m.qweight, x)
    # quantization itself: each weight within half a step of its row's scale
    assert ((deq - w.double()).abs() <= m.scale.double() / 2 + 1e-6).all()


def test_int8_linear_dequantizes_a_slab_at_a_time():
    from rlfuse.decode import DEQUANT_ROWS
    from rlfuse.engine import model

    w, b = torch.randn(DEQUANT_ROWS + 5, 16), torch.randn(DEQUANT_ROWS + 5)
    m = model.Int8Linear(w, b)
    x = torch.randn(3, 70, 16)  # 210 rows: the dequantizing path
    want = x.double() @ (m.qweight.double() * m.scale.double()).t() + b.double()
    assert torch.allclose(m(x).double(), want, atol=1e-4)
    assert (m.qweight.double() * m.scale.double() - w.double()).abs().max() <= m.scale.max() / 2


def test_decoding_swaps_the_linear_layers_for_the_block_only(tok):
    from rlfuse.engine.model import DecodeLinear, decoding

    m = _model("qwen2", tok)
    linears = [x for x in m.modules() if type(x) is torch.nn.Linear]
    params = dict(m.named_parameters())
    ids = torch.randint(4, len(tok), (3, 9))
    with torch.no_grad():
        full, step = m(input_ids=ids).logits, m(input_ids=ids[:, :1]).logits
        with decoding(m) as d:
            assert d is m and all(type(x) is DecodeLinear for x in linears)
            # 27 rows: torch; the first position of 3 rows: the decode kernel
            assert torch.allclose(m(input_ids=ids).logits, full, atol=1e-5)
            assert torch.allclose(m(input_ids=ids[:, :1]).logits, step, atol=1e-5)
        with pytest.raises(KeyError), decoding(m):
            raise KeyError("restored after an error too")
    assert all(type(x) is torch.nn.Linear for x in linears)
    assert all(p is params[k] for k, p in m.named_parameters())


def test_int8_rollout_copy_shares_weights_and_quantizes_the_head(tok):
    from rlfuse.engine.model import Int8Linear, int8_copy

    m = _model("qwen2", tok)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        q = int8_copy(m, rollout=True)
    linears = [n for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)]
    assert all(isinstance(q.get_submodule(n), Int8Linear) for n in linears)
    assert isinstance(q.get_output_embeddings(), Int8Linear) and head(q).weight is None
    assert q.get_input_embeddings().weight is m.get_input_embeddings().weight  # shared
    assert all(p.requires_grad for p in m.parameters())
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    # its logits stay close to the policy's
    ids = torch.randint(4, len(tok), (2, 9))
    with torch.no_grad():
        a = m(input_ids=ids).logits.log_softmax(-1)
        b = q(input_ids=ids).logits.log_softmax(-1)
    assert 0 < (a - b).abs().max() < 0.1


@pytest.mark.parametrize("weights", ["policy", "int8"])
def test_rollout_logprobs_are_the_samplers_own(tok, weights):
    from rlfuse.engine.data import pack
    from rlfuse.engine.model import int8_copy, sequence_logprobs

    m = _model("qwen2", tok)
    with torch.no_grad():
        sampler = int8_copy(m, rollout=True) if weights == "int8" else m
    torch.manual_seed(1)
    roll = generate(sampler, tok, PROMPTS, n=3, temperature=0.7, max_new_tokens=10,
                    logprobs=True)
    assert [len(x) for x in roll.logprobs] == roll.lengths
    batch = pack(roll.prompt_ids, roll.completion_ids, tok.pad_token_id)
    lp = sequence_logprobs(m, batch, 0.7)[batch.mask]
    mine = torch.tensor([x for row in roll.logprobs for x in row])
    assert (mine <= 0).all()
    if weights == "policy":  # the decoder's head pass vs the fused op: the same numbers
        assert torch.allclose(mine, lp, atol=1e-4)
    else:  # the int8 sampler's own distribution, a little off the policy's
        assert 0 < (mine - lp).abs().max() < 0.1
    with pytest.raises(ValueError, match="logprobs=True needs decoder='rlfuse'"):
        generate(m, tok, PROMPTS, logprobs=True, decoder="hf")


def test_rollout_logprobs_land_on_their_targets_when_max_length_cuts(tok):
    from rlfuse.engine.config import RolloutConfig
    from rlfuse.engine.rollout import rollout_and_score

    m = _model("qwen2", tok)
    rows = [{"prompt": p} for p in PROMPTS]
    cfg = RolloutConfig(prompts_per_step=3, samples_per_prompt=2, max_new_tokens=8)
    torch.manual_seed(0)
    s = rollout_and_score(m, tok, rows, cfg, lambda p, c: [0.0] * len(c), max_length=9,
                          logprobs=True)
    b, roll = s.batch, s.rollout
    kept = b.mask.sum(1).tolist()
    assert min(kept) < max(roll.lengths)  # max_length cut some completions
    for i, (lp, k) in enumerate(zip(roll.logprobs, kept)):
        assert torch.equal(b.rollout_logp[i][b.mask[i]], torch.tensor(lp[:k]))
    assert (b.rollout_logp[~b.mask] == 0).all()
