"""Build of dsd2 with its C++ CPU extension dsd2._C (torch cpp_extension + ninja).

Build with `pip install --no-build-isolation .` so the extension compiles against the torch
already installed (a build-isolated torch would be a second multi-GB download).
"""

import os
import sys

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - only when torch is absent at build time
    sys.exit("dsd2 builds its C++ extension against torch: install torch first, then "
             "`pip install --no-build-isolation .`")

openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
extra_compile = ["-O3", *openmp]
if os.environ.get("DSD2_NATIVE", "0") == "1":
    extra_compile.append("-march=native")

setup(
    packages=[
        "dsd2", "dsd2.data", "dsd2.models", "dsd2.pruning", "dsd2.ops", "dsd2.training",
        "dsd2.analysis", "dsd2.report", "dsd2.kernels",
    ],
    package_dir={"dsd2.kernels": "kernels"},
    ext_modules=[
        CppExtension(
            "dsd2._C",
            ["csrc/cpu_ops.cpp"],
            extra_compile_args=extra_compile,
            extra_link_args=openmp,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
