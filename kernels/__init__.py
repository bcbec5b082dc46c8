"""rlfuse: fused log-prob, entropy and RL-loss kernels for LLM post-training.

This folder is installed as the package `rlfuse` (pyproject.toml maps it); run the tests and
the CLI through their entry points (`pytest`, `rlfuse`) so that it is never also importable as a
bare `kernels`, the name transformers probes for Hugging Face's kernels library.
"""
from ._backend import IMPLS, set_lowp_gemm
from ._chunked import LogitTransform
from .advantages import gae, group_advantages, value_loss
from .logprobs import linear_logprobs, linear_logprobs_reference
from .policy import PolicyLossConfig, PolicyLossOutput, kl_estimate, policy_loss
from .preference import PreferenceLossConfig, PreferenceLossOutput, preference_loss

__version__ = "0.1.0"
__all__ = [
    "linear_logprobs", "linear_logprobs_reference", "LogitTransform", "IMPLS",
    "policy_loss", "PolicyLossConfig", "PolicyLossOutput", "kl_estimate",
    "preference_loss", "PreferenceLossConfig", "PreferenceLossOutput",
    "group_advantages", "gae", "value_loss", "set_lowp_gemm",
]


def __getattr__(name):
    """`rlfuse.judge` (and `from rlfuse import judge`): the pairwise judge, which lives in the
    engine because it runs transformers models; imported on first use, so the op layer itself
    never imports the engine (PEP 562)."""
    if name == "judge":
        import importlib

        module = importlib.import_module("rlfuse.engine.judge")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
