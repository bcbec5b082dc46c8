"""The engine under torch.distributed: 2 CPU processes (gloo), one thread each.

One spawn runs every case (a process start costs more than a tiny model's steps): each trainer
under DDP and FSDP2, a resume, and a torchrun-free run of the same configs in this process as
the single-process baseline. SFT and DPO must train the single process's weights; every
checkpoint must load into a single process.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from rlfuse.engine import trainer_for
from rlfuse.engine.config import ConfigError, load_config
from rlfuse.engine.data import write_jsonl

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
    for s in ("ddp", "fsdp"):  # 2 steps, then resumed to 3: the 3-step run's weights
        first = _args(tmp, f"resume-{s}", "sft", f"distributed.strategy={s}", "steps=2")
        out += [(f"resume-{s}-a", first), (f"resume-{s}", first + ["steps=3", "resume=true"])]
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
        cfg = load_config(None, args)
        t = trainer_for(cfg.algo)(cfg)
        rows = t.fit(plot=False)
        # DDP replicas must agree; FSDP2 holds each rank's shard
        total = sum(float(p.detach().double().sum()) for p in t.params
                    if not hasattr(p, "full_tensor"))
        torch.save({"rows": rows, "checksum": total, "checkpoint": t.last_checkpoint},
                   os.path.join(tmp, f"{name}.rank{rank}.pt"))
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
    mp.spawn(_worker, args=(_free_port(), tmp), nprocs=WORLD)
    return tmp, {name: [torch.load(os.path.join(tmp, f"{name}.rank{r}.pt"), weights_only=False)
                        for r in range(WORLD)] for name, _ in _cases(tmp)}


def _single(tmp, name, algo, *extra):
    """The same config trained in this process: (trainer, weights)."""
    cfg = load_config(None, _args(tmp, name, algo, *extra))
    t = trainer_for(algo)(cfg)
    t.fit(plot=False)
    return t, {k: v.detach() for k, v in t.model.state_dict().items()}


def _weights(checkpoint_dir):
    return load_file(os.path.join(checkpoint_dir, "model.safetensors"))


@pytest.mark.parametrize("algo", ["sft", "dpo"])
def test_two_processes_train_the_single_process_weights(runs, algo):
    tmp, res = runs
    _, want = _single(tmp, f"{algo}-single", algo)
    for s in ("ddp", "fsdp"):
        got = _weights(res[f"{algo}-{s}"][0]["checkpoint"])
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=f"{s} {k}")
        losses = [[r["loss"] for r in res[f"{algo}-{s}"][0]["rows"]]]
        assert len(losses[0]) == 3 and all(map(torch.isfinite, torch.tensor(losses)))


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


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_under_two_processes(runs, strategy):
    """2 steps, resumed to 3 under 2 processes: the single process's 3-step weights."""
    tmp, res = runs
    _, want = _single(tmp, f"resume-single-{strategy}", "sft")
    main = res[f"resume-{strategy}"][0]
    assert [r["step"] for r in main["rows"]] == [1, 2, 3]
    got = _weights(main["checkpoint"])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_two_process_checkpoint_resumes_only_under_two(runs):
    tmp, res = runs
    cfg = load_config(None, _args(tmp, "resume-ddp", "sft", "distributed.strategy=ddp",
                                  "steps=4", "resume=true"))
    with pytest.raises(Exception, match="written by 2 process"):
        trainer_for("sft")(cfg).fit(plot=False)


def test_global_batch_sizes_must_split_over_the_ranks(tmp_path, monkeypatch):
    from rlfuse.engine import distributed

    monkeypatch.setattr(distributed, "world", lambda: 3)
    with pytest.raises(ConfigError, match="'sft.batch_size' is 4, which 3 processes"):
        distributed.check_share("sft.batch_size", 4)
