"""The ``onnxprune`` command's entry point. Loading the command line (onnx, onnxruntime, numpy,
scipy: seconds on a cold start) happens here, where a Ctrl-C meanwhile exits as one during the
command does: ``interrupted`` on stderr, exit code 130, no traceback."""

import sys

#: exit code after Ctrl-C (128 + SIGINT, as shells report it), here and in onnxprune.cli
INTERRUPTED_EXIT_CODE = 130


def main() -> None:
    try:
        from onnxprune.cli import main as command_line
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    command_line()
