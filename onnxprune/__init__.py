"""onnxprune: domain-adaptive compression of ONNX models without retraining."""

__version__ = "0.1.0"
