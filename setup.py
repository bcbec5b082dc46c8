"""Builds the C++ CPU extension `rlfuse._C` (the package itself is declared in pyproject.toml).

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

    # -ffp-contract=off: the epilogues' transformed logit k * z is one rounded product in every
    # kernel (a fused multiply-subtract in one and not another would make the statistics and
    # the gradient disagree by k * z's rounding); explicit fmadd calls stay fused.
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]
    if os.environ.get("RLFUSE_NATIVE", "1") == "1":
        cxx_flags.append("-march=native")  # built where it runs: use the machine's AVX2/AVX-512
    ext_modules = [
        CppExtension(
            "rlfuse._C",
            ["bindings/module.cpp", "csrc/cpu/adamw.cpp", "csrc/cpu/decode.cpp",
             "csrc/cpu/epilogue.cpp", "csrc/cpu/gemm.cpp"],
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]

    class OptionalBuildExtension(BuildExtension):
        """A failed compile (no compiler, say) leaves the reference paths: warn, don't fail.
        An extension left by an earlier build is removed, so that a failed rebuild can't leave
        binaries of older sources loaded under the new Python (the import then warns)."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any build failure
                for path in filter(os.path.exists, self._built_paths()):
                    os.remove(path)
                    print(f"rlfuse: removed {path}, built from older sources", file=sys.stderr)
                print(f"rlfuse: building the C++ extension failed ({err}); installing without "
                      "it, the ops will run on their reference paths", file=sys.stderr)
                self.extensions = []

        def _built_paths(self):
            """Where an earlier build put each extension: the build folder and, for an
            editable install, the package's source folder."""
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                name = self.get_ext_fullname(ext.name)
                package = build_py.get_package_dir(name.rpartition(".")[0])
                yield self.get_ext_fullpath(ext.name)
                yield os.path.join(package, os.path.basename(self.get_ext_filename(name)))

    cmdclass = {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}
except ImportError:
    print("rlfuse: torch is not installed; building without the C++ extension", file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
