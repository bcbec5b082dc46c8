"""The `rlfuse` command.

    rlfuse demo [--quick] [key=value ...]                 SFT -> GRPO -> DPO -> eval, tiny model
    rlfuse train {sft,grpo,dpo,ppo} [--config f.yaml] [key=value | --key value ...] [--resume]
    rlfuse bench engine [key=value ...]                   full GRPO / DPO step timings
    rlfuse bench ...                                      op benchmarks (rlfuse.benches.cli)
"""
from __future__ import annotations

import sys

from .checkpoint import CheckpointError
from .config import ConfigError
from .trainer import NonFiniteError


def train(argv: list[str]) -> int:
    from . import trainer_for
    from .config import load_config, to_dict

    if not argv or argv[0] not in ("sft", "grpo", "dpo", "ppo"):
        print("usage: rlfuse train {sft,grpo,dpo,ppo} [--config file.yaml] [key=value ...] "
              "[--resume]", file=sys.stderr)
        return 2
    algo, rest, path = argv[0], [], None
    it = iter(argv[1:])
    for a in it:
        if a == "--config":
            path = next(it, None)
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a == "--resume":
            rest.append("resume=true")
        else:
            rest.append(a)
    cfg = load_config(path, rest, defaults={"algo": algo, "out_dir": f"runs/{algo}"})
    import os
    import shlex
    import signal

    import yaml

    trainer = trainer_for(algo)(cfg)  # first: it refuses an out_dir that holds another run
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    trainer.fit()
    if trainer.interrupted:
        again = " ".join(shlex.quote(a) for a in _without_resume(argv))
        print(f"rlfuse: interrupted by {signal.Signals(trainer.interrupted).name} at step "
              f"{trainer.step}, saved {trainer.last_checkpoint}; resume with: rlfuse train "
              f"{again} resume=true", file=sys.stderr)
        return 128 + trainer.interrupted
    print(f"rlfuse: {algo} finished at step {trainer.step}; logs in {cfg.out_dir}, last "
          f"checkpoint {trainer.last_checkpoint or '(none: keep_checkpoints=0)'}")
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
        if cmd == "demo":
            from .demo import main as demo_main

            return demo_main(rest)
        if cmd == "train":
            return train(rest)
        if cmd == "bench" and rest[:1] == ["engine"]:
            from .bench import main as engine_bench_main

            return engine_bench_main(rest[1:])
        if cmd == "bench":
            from rlfuse.benches.cli import main as bench_main

            return bench_main(rest)
    except ConfigError as err:
        print(f"rlfuse: config error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteError) as err:
        print(f"rlfuse: error: {err}", file=sys.stderr)
        return 1
    print(__doc__, file=sys.stderr)
    return 0 if cmd in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
