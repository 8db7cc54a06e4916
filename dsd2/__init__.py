"""dsd2: sparse double descent, distillation from sparse teachers and ReLU-state entropy, made fast."""

__version__ = "0.1.0"
