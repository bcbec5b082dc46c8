"""rlfuse: fused log-prob, entropy and RL-loss kernels for LLM post-training."""
from ._chunked import LogitTransform
from .logprobs import linear_logprobs, linear_logprobs_reference
from .dpo_family import PreferenceLossConfig, PreferenceLossOutput, preference_loss
from .advantages import gae, group_advantages, value_loss

__all__ = ["linear_logprobs", "linear_logprobs_reference", "LogitTransform"]
__all__ += ["preference_loss", "PreferenceLossConfig", "PreferenceLossOutput",
            "group_advantages", "gae", "value_loss"]
from .ppo_family import PolicyLossConfig, PolicyLossOutput, policy_loss
__all__ += ["policy_loss", "PolicyLossConfig", "PolicyLossOutput"]
__version__ = "0.1.0"
