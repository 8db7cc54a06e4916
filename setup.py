"""Build of dsd2 with its C++ CPU extension dsd2._C (torch cpp_extension + ninja).

Build with `pip install --no-build-isolation .` so the extension compiles against the torch
already installed (a build-isolated torch would be a second multi-GB download).
"""

import sys
from pathlib import Path

from setuptools import find_packages, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - only when torch is absent at build time
    sys.exit("dsd2 builds its C++ extension against torch: install torch first, then "
             "`pip install --no-build-isolation .`")

openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
# No -march: csrc/isa_*.cpp compile their kernels for each instruction-set level themselves and the level is
# chosen at run time. -ffp-contract=off: a fused multiply-add only where the kernels ask for one, so results do
# not depend on the level; -fno-trapping-math lets GCC turn the kernels' selects into blends below AVX-512.
extra_compile = ["-O3", "-ffp-contract=off", "-fno-trapping-math", *openmp]

setup(
    # every package under dsd2/ (a new one needs no edit here), and the Triton kernels from kernels/
    packages=sorted({*find_packages(include=["dsd2", "dsd2.*"]), "dsd2.kernels"}),
    package_dir={"dsd2.kernels": "kernels"},
    ext_modules=[
        CppExtension(
            "dsd2._C",
            sorted(str(p) for p in Path("csrc").glob("*.cpp")),
            extra_compile_args=extra_compile,
            extra_link_args=openmp,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
