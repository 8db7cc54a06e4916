"""dsd2: sparse double descent, distillation from sparse teachers and ReLU-state entropy, made fast."""

__version__ = "0.2.0"


def __getattr__(name: str):
    """`dsd2.prune`, the Python API (dsd2/api.py), and `dsd2.load_compressed` (dsd2/export.py), imported on first
    use so that `import dsd2` stays light."""
    if name == "prune":
        from dsd2.api import prune

        return prune
    if name == "load_compressed":
        from dsd2.export import load_compressed

        return load_compressed
    raise AttributeError(f"module 'dsd2' has no attribute '{name}'")
