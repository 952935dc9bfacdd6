"""onnxruntime sessions and batched execution over a sample set.

The one place that creates ``InferenceSession`` objects and feeds batches, so fixed-batch
models, execution providers and models over 2 GB are handled alike everywhere.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.errors import ModelError
from onnxprune.model import input_specs, needs_external_data

# CUDA: TF32 off (its 10-bit mantissa would put ~1e-3 relative errors into the in-graph
# statistics, calibration/ingraph.py, and into validation's comparison of two models); cuDNN's
# convolution algorithm by heuristic, not by exhaustive timing at session start: onnxprune makes
# many short-lived sessions (the planner's suffix and drift models), and the exhaustive search
# made a ResNet-20 `compress --flops 0.7` 2.8x slower on an H200 (bench/results/cuda.md).
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": [("CUDAExecutionProvider", {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}),
             "CPUExecutionProvider"],
}


# What onnxruntime raises for a graph or a feed it refuses.
ORT_ERRORS = (ort.capi.onnxruntime_pybind11_state.Fail,
              ort.capi.onnxruntime_pybind11_state.InvalidGraph,
              ort.capi.onnxruntime_pybind11_state.InvalidArgument,
              ort.capi.onnxruntime_pybind11_state.NotImplemented,
              ort.capi.onnxruntime_pybind11_state.RuntimeException)


def error_line(exc: BaseException) -> str:
    """The first line of an onnxruntime error (at most 300 characters), for a one-line message."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def feeds_text(feeds: dict[str, np.ndarray]) -> str:
    """The shape of each fed array, for a message: 'input_ids 32x600, attention_mask 32x600'."""
    return ", ".join(f"{name} {'x'.join(str(d) for d in np.shape(value))}" for name, value in feeds.items())


def free_size_hint(inputs, feeds: dict[str, np.ndarray]) -> str:
    """What to add to a hint when onnxruntime refused ``feeds`` and a 4-D float input of the model
    (``inputs``: (name, shape) pairs, a dimension not fixed as a str or None) takes any size: the
    images were fed at their own size, which the layers after a Flatten may not take; '' otherwise."""
    for name, shape in inputs:
        value = feeds.get(name)
        if value is None or len(shape) != 4 or np.asarray(value).dtype.kind != "f":
            continue
        if any(not isinstance(d, int) for d in shape[1:]):
            size = "x".join(str(d) for d in np.shape(value)[1:])
            return (f"; input {name} takes any size ({', '.join(str(d) for d in shape)}), so the samples were fed as "
                    f"they are ({size}): resize them to the size the model was trained at (--resize for images)")
    return ""


def providers_for(device: str = "cpu") -> list:
    """Execution providers for ``device`` ('cpu' or 'cuda'); CUDA must be available."""
    if device not in PROVIDERS:
        raise ModelError("device", f"unknown device {device!r}", "use 'cpu' or 'cuda'")
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ModelError("cuda", "the CUDA execution provider is not available",
                             "install onnxprune[gpu] (onnxruntime-gpu) on a machine with CUDA")
        _preload_cuda()
    return PROVIDERS[device]


_CUDA_PRELOADED = False


def _preload_cuda() -> None:
    """Load CUDA and cuDNN from the nvidia-* pip packages when they are installed (onnxruntime's
    own ``preload_dlls``), so a pip-installed CUDA works without LD_LIBRARY_PATH; once."""
    global _CUDA_PRELOADED
    if not _CUDA_PRELOADED and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:       # noqa: BLE001 - nothing to preload: the system's libraries are used
            pass
    _CUDA_PRELOADED = True


def log_severity() -> int:
    """onnxruntime's own log level for a session: fatal only (4), since every error it logs (a
    kernel that fails on a batch: an ANSI-coloured ``[E:onnxruntime:...]`` line) also raises, and
    onnxprune reports that as its one line; with ``-vv`` (the ``onnxprune`` logger at DEBUG) its
    warnings and errors show too (2). Nothing relies on them: a CUDA provider that fails to start is
    found by the providers the session reports."""
    return 2 if logging.getLogger("onnxprune").isEnabledFor(logging.DEBUG) else 4


def make_session(model: onnx.ModelProto, *, device: str = "cpu", threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession for an in-memory model (via a temporary file when it is over 2 GB)."""
    options = ort.SessionOptions()
    options.log_severity_level = log_severity()
    if threads:
        options.intra_op_num_threads = threads
    providers = providers_for(device)
    try:
        if not needs_external_data(model):
            session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                file = Path(tmp) / "model.onnx"
                onnx.save(model, str(file), save_as_external_data=True, location="model.onnx.data")
                session = ort.InferenceSession(str(file), options, providers=providers)
    except (ort.capi.onnxruntime_pybind11_state.Fail,
            ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.InvalidArgument,
            ort.capi.onnxruntime_pybind11_state.NotImplemented) as exc:
        first = error_line(exc)
        graph = f" (graph {model.graph.name!r})" if model.graph.name else ""
        raise ModelError("onnxruntime", f"cannot load the model{graph}: {first}",
                         "check that this onnxruntime supports the model's opset and ops (`onnxprune inspect`)"
                         ) from None
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        # onnxruntime falls back to the CPU, with a log line only, when CUDA or cuDNN fails to load
        raise ModelError("cuda", "the CUDA execution provider failed to start (CUDA or cuDNN libraries missing?)",
                         "check `python -c \"import onnxruntime as ort; ort.preload_dlls()\"` and the versions "
                         "onnxruntime-gpu needs")
    return session


def batch_size_for(model: onnx.ModelProto, requested: int) -> int:
    """The batch size to feed: the model's own when its batch dimension is fixed."""
    fixed = {spec.fixed_batch for spec in input_specs(model)} - {None}
    if len(fixed) == 1:
        return fixed.pop()
    return requested


def run_batches(
    session: ort.InferenceSession,
    samples,
    outputs: Sequence[str] | None = None,
    *,
    batch_size: int = 32,
    fixed_batch: int | None = None,
) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """Run ``session`` over ``samples`` (a SampleSet) and yield ``(indices, outputs)`` per batch.

    With ``fixed_batch`` every batch is padded to that size by repeating its last sample
    and the padding rows are cut from the outputs, so a fixed-batch model sees only full
    batches while callers see exactly one row per sample.
    """
    size = fixed_batch or batch_size
    for indices, feeds in samples.batches(size):
        n = len(indices)
        if fixed_batch and n < fixed_batch:
            feeds = fill_batch(feeds, fixed_batch)
        result = session.run(list(outputs) if outputs is not None else None, feeds)
        if fixed_batch and n < fixed_batch:
            result = [r[:n] for r in result]
        yield indices, result


def fill_batch(feeds: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """``feeds`` with their last sample repeated up to ``size`` rows: a fixed-batch model runs
    full batches only (the caller cuts the copies' outputs off)."""
    n = len(next(iter(feeds.values())))
    if n >= size:
        return feeds
    return {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)]) for k, v in feeds.items()}


def run_arrays(session: ort.InferenceSession, feeds: dict[str, np.ndarray], *, batch_size: int,
               fixed_batch: int | None = None) -> list[np.ndarray]:
    """Every output of ``session`` on in-memory ``feeds`` (arrays of N samples), ``batch_size``
    samples a run; with ``fixed_batch`` that many a run, the last filled up (``fill_batch``) and
    the copies cut off. One array per output, N rows each."""
    n = len(next(iter(feeds.values())))
    size = fixed_batch or batch_size
    parts = []
    for start in range(0, n, size):
        chunk = {k: v[start:start + size] for k, v in feeds.items()}
        parts.append(session.run(None, fill_batch(chunk, fixed_batch) if fixed_batch else chunk))
    return [np.concatenate([part[i] for part in parts])[:n] for i in range(len(parts[0]))]
