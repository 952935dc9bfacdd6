"""Installing: the runtime is an extra, so `.[cpu]` and `.[gpu]` each resolve to exactly one
onnxruntime wheel (pip would otherwise keep the CPU wheel beside the GPU one), and without
either onnxprune says in one line what to install."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_without_onnxruntime_the_cli_says_what_to_install():
    code = ("import sys; sys.modules['onnxruntime'] = None; sys.argv = ['onnxprune', '--help']; "
            "from onnxprune.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "onnxprune[cpu]" in lines[0] and "onnxprune[gpu]" in lines[0]


def _index_reachable() -> bool:
    try:
        probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "onnxruntime-gpu"],
                               capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("extra, wanted, unwanted", [("gpu", "onnxruntime-gpu", "onnxruntime"),
                                                     ("cpu", "onnxruntime", "onnxruntime-gpu")])
def test_each_runtime_extra_resolves_to_one_wheel(tmp_path, extra, wanted, unwanted):
    if not _index_reachable():
        pytest.skip("the package index is unreachable")
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--report", str(report), "-e", f".[{extra}]"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert wanted in names and unwanted not in names, sorted(names)
