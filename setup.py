"""Builds rlfuse and its C++ CPU extension `rlfuse._C`.

Install with `pip install --no-build-isolation -e .` after `pip install torch==2.13.0`, so the
extension compiles against the torch that is already installed. Without a working compiler the
package still installs and runs on its reference paths (it warns once at import).
"""
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if os.environ.get("RLFUSE_NATIVE", "1") == "1":
        cxx_flags.append("-march=native")  # built where it runs: use the machine's AVX2/AVX-512
    ext_modules = [
        CppExtension(
            "rlfuse._C",
            ["bindings/module.cpp", "csrc/cpu/epilogue.cpp",
             "csrc/cpu/gemm.cpp"],
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]

    class OptionalBuildExtension(BuildExtension):
        """A failed compile (no compiler, say) leaves the reference paths: warn, don't fail."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any build failure
                print(f"rlfuse: building the C++ extension failed ({err}); installing without "
                      "it, the ops will run on their reference paths", file=sys.stderr)
                self.extensions = []

    cmdclass = {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}
except ImportError:
    print("rlfuse: torch is not installed; building without the C++ extension", file=sys.stderr)

setup(
    name="rlfuse",
    version="0.1.0",
    description="Fused log-prob, entropy and RL-loss kernels for LLM post-training, and a compact engine",
    python_requires=">=3.10",
    packages=["rlfuse", "rlfuse.engine", "rlfuse.benches"],
    package_dir={"rlfuse": "kernels", "rlfuse.engine": "engine", "rlfuse.benches": "benches"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # torch is pinned by the Makefile (a CPU build); an open-ended torch requirement here would
    # let pip pull a multi-GB CUDA build.
    install_requires=["transformers>=4.56", "safetensors", "pyyaml", "tqdm", "matplotlib"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "triton", "peft"],
        "gpu": ["triton", "flash-attn"],
        "lora": ["peft"],
        "peers": ["trl==1.16.0", "liger-kernel"],
    },
    entry_points={"console_scripts": ["rlfuse=rlfuse.engine.cli:main"]},
)
