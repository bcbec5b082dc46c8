"""rlfuse: fused log-prob, entropy and RL-loss kernels for LLM post-training.

This folder is installed as the package `rlfuse`. Run from the repository root, it is also
visible as a bare `kernels` package, which transformers imports while probing for Hugging Face's
`kernels` library: that import stays empty, so the custom ops are never registered twice.
"""
if __name__ == "rlfuse":
    from ._backend import set_lowp_gemm
    from ._chunked import LogitTransform
    from .advantages import gae, group_advantages, value_loss
    from .dpo_family import PreferenceLossConfig, PreferenceLossOutput, preference_loss
    from .logprobs import linear_logprobs, linear_logprobs_reference
    from .ppo_family import PolicyLossConfig, PolicyLossOutput, policy_loss

    __version__ = "0.1.0"
    __all__ = [
        "linear_logprobs", "linear_logprobs_reference", "LogitTransform",
        "policy_loss", "PolicyLossConfig", "PolicyLossOutput",
        "preference_loss", "PreferenceLossConfig", "PreferenceLossOutput",
        "group_advantages", "gae", "value_loss",
        "set_lowp_gemm",
    ]
