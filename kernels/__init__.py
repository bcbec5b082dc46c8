"""rlfuse: fused log-prob, entropy and RL-loss kernels for LLM post-training.

This folder is installed as the package `rlfuse` (pyproject.toml maps it).
"""
import sys

if __name__ != "rlfuse":
    # This folder found by path under another name: transformers (>= 5.25 depends on it) imports
    # Hugging Face's `kernels` package, and with the repository root on sys.path (`python -m`
    # from there) the first `kernels` on the path is this folder. Hand back the installed
    # `kernels` when there is one, else the one rlfuse package: a second copy of rlfuse would
    # register the custom ops again over the live ones (their schemas freed under callers).
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = None if "." in __name__ else importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module
        _spec.loader.exec_module(_module)
    else:
        import rlfuse

        sys.modules[__name__] = rlfuse
else:
    from ._backend import IMPLS, set_lowp_gemm, set_vocab_slab
    from ._chunked import LogitTransform
    from .decode import decode_linear
    from .advantages import gae, group_advantages, value_loss
    from .logprobs import linear_logprobs, linear_logprobs_reference
    from .policy import PolicyLossConfig, PolicyLossOutput, kl_estimate, policy_loss
    from .preference import PreferenceLossConfig, PreferenceLossOutput, preference_loss
    from ._vocab_parallel import vocab_shard_range

    __version__ = "0.1.0"
    __all__ = [
        "linear_logprobs", "linear_logprobs_reference", "LogitTransform", "IMPLS",
        "policy_loss", "PolicyLossConfig", "PolicyLossOutput", "kl_estimate",
        "preference_loss", "PreferenceLossConfig", "PreferenceLossOutput",
        "group_advantages", "gae", "value_loss", "set_lowp_gemm", "set_vocab_slab",
        "vocab_shard_range", "decode_linear",
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
