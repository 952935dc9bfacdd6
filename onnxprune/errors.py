"""One exception hierarchy for user-facing errors, and one class for our own bugs.

Messages read ``<thing> | <problem>. Hint: <what to do>``. The CLI turns an
``OnnxPruneError`` into a one-line message and its ``exit_code`` (1; 2 for a
``UsageError``; 3). Any other exception
is a bug: ``InternalError`` names the stage it happened in (e.g. a pass whose output fails
the ONNX checker); the CLI prints one line naming the stage, writes the full traceback to
a log file and exits with ``INTERNAL_EXIT_CODE`` (4).
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


class UsageError(RecipeError):
    """A flag that does not apply (to the method, the model or the data) or contradicts another:
    the command line's usage error, exit code 2; the message names the flag."""

    exit_code = 2

    def __init__(self, problem: str, hint: str | None = None):
        super().__init__("", problem, hint)


class OutputError(OnnxPruneError):
    """An output path is unusable or would overwrite an input; checked before any work."""


class ValidationFailed(OnnxPruneError):
    """The compressed model missed the requested accuracy or agreement."""

    exit_code = 3


#: Exit code of the command line for an internal error (a bug in onnxprune, not the input).
INTERNAL_EXIT_CODE = 4


class InternalError(Exception):
    """A bug in onnxprune, not a problem with the user's input: ``stage`` says where
    (``pass low-rank-split``, ``calibration``...). Not an ``OnnxPruneError`` on purpose."""

    exit_code = INTERNAL_EXIT_CODE

    def __init__(self, stage: str, problem: str):
        self.stage = stage
        self.problem = problem
        super().__init__(f"internal error in {stage}: {problem}")
