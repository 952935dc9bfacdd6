"""onnxprune: domain-adaptive compression of ONNX models without retraining.

The public API (``compress``, ``validate``, ...) loads on first use: ``import onnxprune`` itself
imports neither onnx nor onnxruntime (seconds), so the command line can catch a Ctrl-C while
they load (``onnxprune.launch``)."""

import importlib
import importlib.util

__version__ = "0.1.0"

# the runtime is an extra (the CPU or the GPU wheel, never both)
MISSING_RUNTIME = None if importlib.util.find_spec("onnxruntime") else (
    "onnxprune needs onnxruntime: pip install 'onnxprune[cpu]', or 'onnxprune[gpu]' for CUDA "
    "(from a checkout: pip install -e '.[cpu]')")

#: public name -> the module that defines it
_EXPORTS = {**dict.fromkeys(["CompressResult", "calibrate", "compress", "inspect", "merge_stats", "sensitivity",
                             "sweep", "validate"], "onnxprune.api"),
            "OnnxPruneError": "onnxprune.errors", "ValidationFailed": "onnxprune.errors",
            "Recipe": "onnxprune.pipeline"}

__all__ = ["__version__", "calibrate", "compress", "inspect", "merge_stats", "sensitivity", "sweep", "validate", "Recipe",
           "CompressResult", "OnnxPruneError", "ValidationFailed"]


def __getattr__(name):
    if name in _EXPORTS:
        if MISSING_RUNTIME:
            raise ImportError(MISSING_RUNTIME)
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:    # a submodule not imported yet: onnxprune.api
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
