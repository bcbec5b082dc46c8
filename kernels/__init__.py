"""rlfuse: fused log-prob, entropy and RL-loss kernels for LLM post-training."""
from ._chunked import LogitTransform
from .logprobs import linear_logprobs, linear_logprobs_reference

__all__ = ["linear_logprobs", "linear_logprobs_reference", "LogitTransform"]
__version__ = "0.1.0"
