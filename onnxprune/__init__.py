"""onnxprune: domain-adaptive compression of ONNX models without retraining."""

__version__ = "0.1.0"

from onnxprune.api import calibrate, compress, inspect, merge_stats, validate  # noqa: E402

__all__ = ["__version__", "calibrate", "compress", "inspect", "merge_stats", "validate"]
