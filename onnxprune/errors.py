"""One exception hierarchy for user-facing errors.

Messages read ``<thing> | <problem>. Hint: <what to do>``. The CLI turns an
``OnnxPruneError`` into a one-line message and its ``exit_code``; any other exception is
a bug and keeps its traceback.
"""

from __future__ import annotations


class OnnxPruneError(Exception):
    """Base of every error a user can cause (bad model, bad data, bad option)."""

    exit_code = 1

    def __init__(self, thing: str, problem: str, hint: str | None = None):
        self.thing = thing
        self.problem = problem
        self.hint = hint
        message = f"{thing} | {problem}" if thing else problem
        if hint:
            message += f". Hint: {hint}"
        super().__init__(message)


class ModelError(OnnxPruneError):
    """The model file is missing, corrupt, unsupported or not valid ONNX."""


class DataError(OnnxPruneError):
    """Sample data is missing, empty, malformed, NaN, or does not match the model."""


class CalibrationError(OnnxPruneError):
    """Statistics could not be gathered, or saved statistics do not fit the model."""


class NumericalError(OnnxPruneError):
    """A solve is too ill-conditioned to give finite weights."""


class RecipeError(OnnxPruneError):
    """A recipe or option is invalid."""


class OutputError(OnnxPruneError):
    """An output path is unusable or would overwrite an input; checked before any work."""


class ValidationFailed(OnnxPruneError):
    """The compressed model missed the requested accuracy or agreement."""

    exit_code = 3
