"""Recovery training (optional extra ``pip install -e ".[train]"``): ONNX <-> PyTorch round trip,
distillation of a compressed student from its original teacher, and Co-Prune.

Nothing here is imported by the rest of onnxprune; ``require_torch`` turns a missing torch into
one clear error naming the extra.
"""

from __future__ import annotations

from onnxprune.errors import OnnxPruneError


class MissingExtra(OnnxPruneError):
    """An optional dependency is not installed."""


def require_torch():
    """Import torch or raise MissingExtra naming the extra to install."""
    try:
        import torch
    except ImportError:
        raise MissingExtra("torch", "recovery training needs PyTorch, which is not installed",
                           'pip install -e ".[train]" (on CPU-only machines first: pip install torch==2.13.0)') from None
    return torch
