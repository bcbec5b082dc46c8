"""The engine under torch.distributed: 2 CPU processes (gloo), one thread each.

One spawn runs every case (a process start costs more than a tiny model's steps): each trainer
under DDP and FSDP2, each with the LM head vocab-parallel under one of them, a vocab-parallel run
stopped and resumed, and the first half of a run that `torchrun ... rlfuse.engine.cli` resumes;
this process trains the same configs as the single-process baseline. SFT and DPO must train the
single process's weights, vocab-parallel GRPO and PPO the data-parallel run's; every checkpoint
must load into a single process.
"""
from __future__ import annotations

import functools
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from rlfuse.engine import trainer_for, vocab_parallel
from rlfuse.engine.checkpoint import CheckpointError
from rlfuse.engine.config import UserError, load_config
from rlfuse.engine.data import write_jsonl
from rlfuse.engine.model import load_policy

from conftest import importable

WORLD = 2
LENGTH = '[{"name": "length_penalty", "kwargs": {"max_chars": 1}}]'  # varies on a random model
ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in
        [(1, 2), (3, 4), (12, 5), (7, 7), (20, 3), (9, 1), (4, 40), (6, 2)]]


def _args(tmp, name: str, algo: str, *extra) -> list[str]:
    return [f"algo={algo}", "steps=3", "device=cpu", f"out_dir={tmp}/{name}", "progress=false",
            "max_length=24", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
            "model.num_kv_heads=1", "model.intermediate_size=64", "optim.lr=1e-3",
            "save_every_minutes=0", f"sft.data={tmp}/sft.jsonl", "sft.batch_size=4",
            f"dpo.data={tmp}/pairs.jsonl", "dpo.batch_size=4",
            f"grpo.data={tmp}/prompts.jsonl", "grpo.rollout.prompts_per_step=2",
            "grpo.rollout.samples_per_prompt=2", "grpo.rollout.max_new_tokens=4",
            "grpo.loss.beta=0.05", f"grpo.rollout.rewards={LENGTH}", f"ppo.data={tmp}/prompts.jsonl",
            "ppo.rollout.prompts_per_step=2", "ppo.rollout.samples_per_prompt=2",
            "ppo.rollout.max_new_tokens=4", "ppo.epochs=1", f"ppo.rollout.rewards={LENGTH}",
            *extra]


def _cases(tmp) -> list[tuple[str, list[str]]]:
    """(name, config arguments) run under 2 processes, in order."""
    out = [(f"{algo}-{s}", _args(tmp, f"{algo}-{s}", algo, f"distributed.strategy={s}"))
           for algo in ("sft", "dpo", "grpo", "ppo") for s in ("ddp", "fsdp")]
    out.append(("ppo-fsdp-critic", _args(tmp, "ppo-fsdp-critic", "ppo", "ppo.critic=separate",
                                         "ppo.loss.loss_type=ppo", "distributed.strategy=fsdp",
                                         "ppo.kl_in=loss")))
    vp = "distributed.vocab_parallel=true"  # the tiny model's V = 51: shards of 25 and 26 rows
    out += [(f"{algo}-vp-{s}", _args(tmp, f"{algo}-vp-{s}", algo, f"distributed.strategy={s}", vp))
            for algo, s in (("sft", "ddp"), ("dpo", "fsdp"), ("grpo", "ddp"), ("ppo", "fsdp"))]
    # 2 steps, then resumed to 3 in the same spawn
    out += [(f"vp-resume-{n}", _args(tmp, "vp-resume", "sft", "distributed.strategy=fsdp", vp,
                                     f"steps={n}", *(["resume=true"] if n == 3 else [])))
            for n in (2, 3)]
    out.append(("vp-tied", _args(tmp, "vp-tied", "sft", vp)))  # _worker ties its embeddings
    out += [("odd-batch", _args(tmp, "odd-batch", "sft", "sft.batch_size=3")),  # refusals
            ("vp-lora", _args(tmp, "vp-lora", "sft", vp, "model.lora_r=4")),
            ("vp-hf", _args(tmp, "vp-hf", "grpo", vp, "grpo.rollout.decoder=hf")),
            ("ppo-long-prompt", _args(tmp, "ppo-long-prompt", "ppo", "max_length=4"))]
    # 2 steps, resumed to 3 under torchrun by test_torchrun_resumes_a_run
    out.append(("resume", _args(tmp, "resume", "sft", "distributed.strategy=fsdp", "steps=2")))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    for name, args in _cases(tmp):
        try:
            cfg = load_config(None, args)
            model = tok = None
            if name == "vp-tied":  # a tied tiny model: input embedding = LM head
                model, tok = load_policy(cfg.model, torch.device("cpu"))
                model.config.tie_word_embeddings = True
                model.lm_head.weight = model.get_input_embeddings().weight
                start = model.lm_head.weight.detach().clone()
            t = trainer_for(cfg.algo)(cfg, model=model, tokenizer=tok)
        except UserError as err:
            torch.save({"error": str(err)}, os.path.join(tmp, f"{name}.rank{rank}.pt"))
            continue
        rows = t.fit(plot=False)
        # DDP replicas must agree; FSDP2 holds each rank's shard (and each its LM-head rows)
        total = sum(float(p.detach().double().sum()) for p in t.params
                    if not hasattr(p, "full_tensor"))
        out = {"rows": rows, "checksum": total, "checkpoint": t.last_checkpoint}
        if t.vocab is not None:
            out.update(head_rows=tuple(t.model.lm_head.weight.shape),
                       head=vocab_parallel.full_head(t.model)["lm_head.weight"],
                       head_exp_avg=next(iter(t.head_opt.state.values()))["exp_avg"].clone())
        if name == "vp-tied":
            out.update(start=start, embedding=t.model.get_input_embeddings().weight.detach())
        torch.save(out, os.path.join(tmp, f"{name}.rank{rank}.pt"))
    torch.distributed.barrier()  # as test_vocab_parallel's workers
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case under 2 processes; {name: [rank 0's result, rank 1's]}."""
    tmp = str(tmp_path_factory.mktemp("dist"))
    write_jsonl(f"{tmp}/sft.jsonl", [{"prompt": r["prompt"], "completion": r["answer"]}
                                     for r in ROWS])
    write_jsonl(f"{tmp}/prompts.jsonl", ROWS)
    write_jsonl(f"{tmp}/pairs.jsonl", [{"prompt": r["prompt"], "chosen": r["answer"],
                                        "rejected": r["answer"][::-1] + "1"} for r in ROWS])
    mp.spawn(importable(_worker), args=(_free_port(), tmp), nprocs=WORLD)
    return tmp, {name: [torch.load(os.path.join(tmp, f"{name}.rank{r}.pt"), weights_only=False)
                        for r in range(WORLD)] for name, _ in _cases(tmp)}


@functools.cache
def _single(tmp, algo):
    """The same config trained in this process (3 steps): its weights."""
    cfg = load_config(None, _args(tmp, f"{algo}-single", algo))
    t = trainer_for(algo)(cfg)
    t.fit(plot=False)
    return {k: v.detach() for k, v in t.model.state_dict().items()}


def _weights(checkpoint_dir):
    return load_file(os.path.join(checkpoint_dir, "model.safetensors"))


def _assert_same_weights(got: dict, want: dict, msg: str) -> None:
    assert set(got) == set(want), msg
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=f"{msg} {k}")


@pytest.mark.parametrize("algo", ["sft", "dpo"])
def test_two_processes_train_the_single_process_weights(runs, algo):
    tmp, res = runs
    want = _single(tmp, algo)
    vp = {"sft": "sft-vp-ddp", "dpo": "dpo-vp-fsdp"}[algo]
    for name in (f"{algo}-ddp", f"{algo}-fsdp", vp):
        _assert_same_weights(_weights(res[name][0]["checkpoint"]), want, name)
        losses = torch.tensor([r["loss"] for r in res[name][0]["rows"]])
        assert len(losses) == 3 and bool(losses.isfinite().all())


@pytest.mark.parametrize("name", ["sft-vp-ddp", "dpo-vp-fsdp", "grpo-vp-ddp", "ppo-vp-fsdp"])
def test_vocab_parallel_ranks_hold_their_rows_and_checkpoint_the_whole_head(runs, name):
    from transformers import AutoModelForCausalLM

    _, res = runs
    main, other = res[name]
    assert (main["head_rows"], other["head_rows"]) == ((25, 32), (26, 32))
    torch.testing.assert_close(main["head"], other["head"], rtol=0, atol=0)
    model = AutoModelForCausalLM.from_pretrained(main["checkpoint"])
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(model.lm_head.weight.detach(), main["head"], rtol=0, atol=0)
    # the head's AdamW state, gathered to every row, and each rank's rows of it
    state = torch.load(os.path.join(main["checkpoint"], "trainer.pt"), weights_only=True)
    exp_avg = next(iter(state["vocab_head"]["state"].values()))["exp_avg"]
    assert exp_avg.shape == (51, 32)
    torch.testing.assert_close(exp_avg, torch.cat([main["head_exp_avg"], other["head_exp_avg"]]),
                               rtol=0, atol=0)
    assert all(r["loss"] is not None and r["grad_norm"] is not None for r in main["rows"])


@pytest.mark.parametrize("algo,strategy", [("grpo", "ddp"), ("ppo", "fsdp")])
def test_vocab_parallel_rl_samples_and_trains_as_data_parallel(runs, algo, strategy):
    """Each rank draws its completions as it does with a whole head, so the vocab-parallel run
    trains the data-parallel run's weights."""
    _, res = runs
    vp, dp = res[f"{algo}-vp-{strategy}"][0], res[f"{algo}-{strategy}"][0]
    for a, b in zip(vp["rows"], dp["rows"]):
        assert a["completion_length"] == b["completion_length"]
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
        assert math.isfinite(a["loss"]) and a["grad_norm"] > 0
        assert a["tokens"] == b["tokens"]  # the reduced token count is not counted twice
    _assert_same_weights(_weights(vp["checkpoint"]), _weights(dp["checkpoint"]), algo)


def test_vocab_parallel_unties_tied_embeddings(runs):
    """A tied model trains its input embedding and its sharded LM head apart, and saves both."""
    from transformers import AutoModelForCausalLM

    _, res = runs
    main, other = res["vp-tied"]
    assert (main["head_rows"], other["head_rows"]) == ((25, 32), (26, 32))
    torch.testing.assert_close(main["embedding"], other["embedding"], rtol=0, atol=0)  # DDP
    model = AutoModelForCausalLM.from_pretrained(main["checkpoint"])
    assert not model.config.tie_word_embeddings
    emb, head = model.get_input_embeddings().weight, model.lm_head.weight
    assert emb.data_ptr() != head.data_ptr()
    torch.testing.assert_close(head.detach(), main["head"], rtol=0, atol=0)
    torch.testing.assert_close(emb.detach(), main["embedding"], rtol=0, atol=0)
    for trained in (emb, head):  # both moved from the one matrix they started as, differently
        assert not torch.equal(trained.detach(), main["start"])
    assert not torch.equal(emb, head)


def test_vocab_parallel_resumes_its_shards_and_their_optimizer_state(runs):
    """2 steps, stopped, resumed to 3 under 2 processes: the single process's 3-step weights
    (Adam's moments of the head rows must come back for that)."""
    tmp, res = runs
    main = res["vp-resume-3"][0]
    assert main["checkpoint"].endswith("step-000003")
    with open(f"{tmp}/vp-resume/metrics.jsonl") as f:
        assert [json.loads(x)["step"] for x in f] == [1, 2, 3]
    _assert_same_weights(_weights(main["checkpoint"]), _single(tmp, "sft"), "resumed")


@pytest.mark.parametrize("name", ["grpo-ddp", "grpo-fsdp", "ppo-ddp", "ppo-fsdp",
                                  "ppo-fsdp-critic"])
def test_rl_trainers_run_and_their_checkpoints_load_in_one_process(runs, name):
    from transformers import AutoModelForCausalLM

    tmp, res = runs
    main, other = res[name]
    assert [r["step"] for r in main["rows"]] == [1, 2, 3] and other["rows"] == []  # rank 0 logs
    for key in ("loss", "grad_norm", "reward_mean", "completion_length"):
        assert all(r[key] is not None for r in main["rows"]), key
    if name.endswith("ddp"):  # the replicas stayed equal
        assert main["checksum"] == pytest.approx(other["checksum"], rel=1e-6)
    model = AutoModelForCausalLM.from_pretrained(main["checkpoint"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = torch.load(os.path.join(main["checkpoint"], "trainer.pt"), weights_only=True)
    assert len(state["rng"]) == WORLD  # one RNG state per rank
    if name.startswith("ppo"):
        assert state["extra"]["value_head"]["proj.weight"].shape == (1, 32)
    if name == "ppo-fsdp-critic":
        assert "layers.0.mlp.up_proj.weight" in state["extra"]["critic"]


def test_torchrun_resumes_a_run(runs):
    """`torchrun ... rlfuse.engine.cli train` continues the spawned FSDP2 run's 2 steps to 3: the
    single process's 3-step weights; rank 0 alone prints and writes; the checkpoint of 2 processes
    resumes only under 2."""
    tmp, _ = runs
    args = _args(tmp, "resume", "sft", "distributed.strategy=fsdp", "resume=true")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc-per-node={WORLD}", "-m", "rlfuse.engine.cli", "train", "sft",
                          *args], capture_output=True, text=True, timeout=600, cwd=tmp,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("rlfuse: sft finished at step 3") == 1, out.stdout
    assert out.stderr.count("rlfuse: resumed sft at step 2") == 1
    with open(f"{tmp}/resume/metrics.jsonl") as f:
        assert [json.loads(x)["step"] for x in f] == [1, 2, 3]
    got = _weights(f"{tmp}/resume/checkpoints/step-000003")
    want = _single(tmp, "sft")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    cfg = load_config(None, args[:-1] + ["steps=4", "resume=true"])
    with pytest.raises(CheckpointError, match="written by 2 process"):
        trainer_for("sft")(cfg).fit(plot=False)


def test_what_two_processes_cannot_do_is_refused(runs):
    _, res = runs
    assert res["odd-batch"][0]["error"].startswith(
        "config key 'sft.batch_size' is 3, which 2 processes cannot share evenly")
    assert res["vp-lora"][1]["error"].startswith(
        "config keys 'distributed.vocab_parallel' and 'model.lora_r'")
    assert res["vp-hf"][0]["error"].startswith(
        "config keys 'distributed.vocab_parallel' and 'grpo.rollout.decoder'")
    assert "at least max_length=4 tokens long" in res["ppo-long-prompt"][1]["error"]
