"""onnxprune: domain-adaptive compression of ONNX models without retraining."""

__version__ = "0.1.0"

try:  # the runtime is an extra (the CPU or the GPU wheel, never both)
    import onnxruntime  # noqa: F401
except ImportError:
    MISSING_RUNTIME = ("onnxprune needs onnxruntime: pip install 'onnxprune[cpu]', or 'onnxprune[gpu]' for CUDA "
                       "(from a checkout: pip install -e '.[cpu]')")
else:
    MISSING_RUNTIME = None
    from onnxprune.api import (CompressResult, calibrate, compress, inspect, merge_stats, sensitivity,  # noqa: E402
                               sweep, validate)
    from onnxprune.errors import OnnxPruneError, ValidationFailed  # noqa: E402
    from onnxprune.pipeline import Recipe  # noqa: E402

__all__ = ["__version__", "calibrate", "compress", "inspect", "merge_stats", "sensitivity", "sweep", "validate", "Recipe",
           "CompressResult", "OnnxPruneError", "ValidationFailed"]


def __getattr__(name):
    if MISSING_RUNTIME and name in __all__:
        raise ImportError(MISSING_RUNTIME)
    raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")
