"""The `rlfuse` command.

    rlfuse train {sft,grpo,dpo,ppo} [--config f.yaml] [key=value | --key value ...] [--resume]
    rlfuse demo [--quick] [key=value ...]     SFT -> GRPO -> DPO -> eval, tiny model, no downloads
    rlfuse audit pairs.jsonl [--json r.json] [--rm PATH] [key=value ...]
                                              length, format, sycophancy, position, duplicate
                                              and style biases of preference pairs
    rlfuse bench engine [key=value ...]       full GRPO / DPO training steps, rlfuse vs TRL
    rlfuse bench [op] [--shape ...] ...       op benchmarks (time, memory, correctness)

Under torchrun (`torchrun --nproc-per-node N -m rlfuse.engine.cli train ...`) every rank runs
the trainer (see rlfuse.engine.distributed); rank 0 alone writes and prints.

`rlfuse <command> --help` lists every key with its type, default and meaning. Keys nest with dots
(`grpo.loss.beta=0.04`); `--config f.yaml` holds the same keys nested by section, and the
arguments after it override it. A user error (an unknown key, a bad value, a missing or
malformed file) prints one line and exits with status 2.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import textwrap

from . import distributed
from .checkpoint import CheckpointError
from .config import ALGORITHMS, TrainConfig, UserError, parse, to_dict
from .trainer import NonFiniteError


def train_usage() -> str:
    algos = "\n".join(f"  {name:<6}{a.summary} (keys under {a.section}.)"
                      for name, a in ALGORITHMS.items())
    return (f"usage: rlfuse train {{{','.join(ALGORITHMS)}}} [--config file.yaml] "
            f"[key=value | --key value ...] [--resume]\n\n{algos}\n\n"
            "`rlfuse train <algo> --help` lists every key.")


def train(argv: list[str]) -> int:
    from . import trainer_for
    from .data import check_data

    if not argv or argv[0] not in ALGORITHMS:
        print(train_usage(), file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    algo = argv[0]
    desc = textwrap.fill(f"Train with {algo}: {ALGORITHMS[algo].summary}. Its own keys are "
                         f"under {ALGORITHMS[algo].section}.; `--resume` continues from the "
                         "newest readable checkpoint in out_dir.", 79)
    cfg = parse(TrainConfig, argv[1:], f"rlfuse train {algo}", desc,
                defaults={"algo": algo, "out_dir": f"runs/{algo}"})
    if cfg is None:  # --help
        return 0
    if cfg.algo != algo:
        raise UserError(f"config key 'algo' is {cfg.algo!r}, but the command trains {algo!r}")
    check_data(cfg)  # before the model loads

    import yaml

    trainer = trainer_for(algo)(cfg)  # first: it refuses an out_dir that holds another run
    if distributed.is_main():
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    try:
        trainer.fit()
        distributed.barrier()  # every rank is done before the group is torn down
    finally:
        main_rank = distributed.is_main()
        distributed.close()
    if not main_rank:
        return 128 + trainer.interrupted if trainer.interrupted else 0
    if trainer.interrupted:
        again = " ".join(shlex.quote(a) for a in _without_resume(argv))
        print(f"rlfuse: interrupted by {signal.Signals(trainer.interrupted).name} at step "
              f"{trainer.step}, saved {trainer.last_checkpoint}; resume with: rlfuse train "
              f"{again} resume=true", file=sys.stderr)
        return 128 + trainer.interrupted
    print(f"rlfuse: {algo} finished at step {trainer.step}; logs in {cfg.out_dir}, last "
          f"checkpoint {trainer.last_checkpoint or '(none: keep_checkpoints=0)'}")
    return 0


def audit(argv: list[str]) -> int:
    from . import audit as audit_mod

    if argv and not argv[0].startswith("-") and "=" not in argv[0]:  # the pairs file
        argv = [f"pairs={argv[0]}"] + argv[1:]
    cfg = parse(audit_mod.AuditConfig, argv, "rlfuse audit pairs.jsonl", audit_mod.__doc__)
    if cfg is not None:  # None: --help
        audit_mod.run(cfg)
    return 0


def _without_resume(argv: list[str]) -> list[str]:
    """argv less its resume / overwrite settings (the resume command adds resume=true)."""
    out, it = [], iter(argv)
    for a in it:
        key = a.lstrip("-").split("=", 1)[0].replace("-", "_")
        if key in ("resume", "overwrite"):
            if a == "--overwrite":  # `--key value`; `--resume` is a flag
                next(it, None)
            continue
        out.append(a)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd, rest = (argv[0], argv[1:]) if argv else ("", [])
    try:
        if cmd == "train":
            return train(rest)
        if cmd == "audit":
            return audit(rest)
        if cmd == "demo":
            from .demo import main as demo_main

            return demo_main(rest)
        if cmd == "bench":
            from rlfuse.benches.cli import main as bench_main

            return bench_main(rest)
    except UserError as err:
        print(f"rlfuse: error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteError) as err:  # the run's state, not its input
        print(f"rlfuse: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `rlfuse ... --help | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    helped = cmd in ("-h", "--help")
    print(__doc__, file=sys.stdout if helped else sys.stderr)
    return 0 if helped else 2


if __name__ == "__main__":
    sys.exit(main())
