"""rlfuse.engine: a compact trainer (SFT, GRPO, DPO) for transformers causal LMs on the fused ops."""
from .config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config", "trainer_for"]


def trainer_for(algo: str):
    """The trainer class for 'sft' | 'grpo' | 'dpo' | 'ppo' (imported lazily)."""
    if algo == "sft":
        from .sft import SFTTrainer
        return SFTTrainer
    if algo == "grpo":
        from .grpo import GRPOTrainer
        return GRPOTrainer
    if algo == "dpo":
        from .dpo import DPOTrainer
        return DPOTrainer
    if algo == "ppo":
        from .ppo import PPOTrainer
        return PPOTrainer
    raise ValueError(f"algo must be one of ['sft', 'grpo', 'dpo', 'ppo'], got {algo!r}")
