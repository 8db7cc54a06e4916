"""`dsd2.kernels` in a source checkout: the Triton kernels live in the top-level `kernels/` directory.

An install ships `kernels/` itself as this package (setup.py's `package_dir`), so this file exists only in the
source tree, where it points the package's search path at `kernels/` and runs that package's own `__init__`:
`import dsd2.kernels.masked_sgd` then loads kernels/masked_sgd.py, and the checkout imports what an install would.
"""

from pathlib import Path

_KERNELS = Path(__file__).resolve().parents[2] / "kernels"
if not (_KERNELS / "__init__.py").is_file():
    raise ImportError(f"dsd2.kernels: {_KERNELS / '__init__.py'} is missing; this source tree keeps the Triton "
                      "kernels in the top-level kernels/ directory")
__path__ = [str(_KERNELS)]
__file__ = str(_KERNELS / "__init__.py")
exec(compile(Path(__file__).read_text(), __file__, "exec"))
