"""rlfuse.engine: SFT, GRPO, DPO and PPO trainers for transformers causal LMs on the fused ops."""
import importlib

from .config import ALGORITHMS, ConfigError, TrainConfig, UserError, load_config

__all__ = ["ALGORITHMS", "ConfigError", "TrainConfig", "UserError", "load_config", "trainer_for"]


def trainer_for(algo: str):
    """The trainer class of `algo`, a key of ALGORITHMS (imported on use)."""
    if algo not in ALGORITHMS:
        raise ConfigError(f"algo must be one of {list(ALGORITHMS)}, got {algo!r}")
    module, name = ALGORITHMS[algo].trainer.rsplit(".", 1)
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
