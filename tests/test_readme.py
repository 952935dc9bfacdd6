"""The README's opening commands work, and CI installs exactly as the README says."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_install_run_and_test_commands():
    first, second = code_blocks()[:2]
    assert "pip install" in first and "onnxprune compress" in first
    assert "pytest" in second


def test_ci_installs_and_tests_as_the_readme_says():
    ci = (ROOT / ".ci" / "run").read_text()
    install = re.search(r"pip install (-e \S+)", code_blocks()[0]).group(1)
    assert f"pip install -q {install}" in ci
    for pin in re.findall(r"pip install (\w+==\S+)", code_blocks()[0]):  # e.g. the CPU torch build, installed first
        assert f"pip install -q {pin}" in ci
        assert ci.index(f"pip install -q {pin}") < ci.index(f"pip install -q {install}")
    test = re.search(r"(python -m pytest\S*( -\S+)*)", code_blocks()[1]).group(1)
    assert test in ci


def test_ci_installs_the_extras_the_readme_documents():
    ci = (ROOT / ".ci" / "run").read_text()
    extras = re.findall(r'pip install -e "\.\[(dask)\]"', README)
    assert extras == ["dask"]
    for extra in extras:
        assert f'pip install -q -e ".[{extra}]"' in ci, extra


def test_first_command_compresses_the_bundled_sample(monkeypatch, tmp_path):
    """The README's command as written, run from a copy of the files it names, so the test
    writes only under tmp_path (never out/ in the working tree)."""
    command = code_blocks()[0].strip().split("&&")[-1].strip()
    args = shlex.split(command)
    assert args[0] == "onnxprune"
    for arg in args:
        if (ROOT / arg).is_file():
            (tmp_path / arg).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / arg).symlink_to(ROOT / arg)
    monkeypatch.chdir(tmp_path)
    in_tree = ROOT / args[args.index("-o") + 1]
    before = in_tree.stat().st_mtime_ns if in_tree.exists() else None
    result = CliRunner().invoke(main, args[1:] + ["--no-latency"])
    assert result.exit_code == 0, result.output
    out = tmp_path / args[args.index("-o") + 1]
    assert out.is_file()
    assert (in_tree.stat().st_mtime_ns if in_tree.exists() else None) == before  # the working tree untouched
    report = json.loads(out.with_name(out.stem + ".report.json").read_text())
    validation = report["validation"]
    assert report["plan"]["goal"] == {"max_drop": 1.0}           # the default: within 1 point
    assert validation["macs_candidate"] < 0.8 * validation["macs_reference"]
    assert validation["accuracy_candidate"] >= validation["accuracy_reference"] - 0.01


@pytest.mark.slow
def test_the_python_api_example_runs_as_written(monkeypatch, tmp_path):
    """The README's Python API block, with model.onnx the bundled LeNet, target.npz the first 600 bundled
    USPS digits and heldout.npz the next 300, but for its distillation example (16 epochs per candidate, two
    minutes here; fewer epochs miss its --max-drop, ValidationFailed, as they should)."""
    import numpy as np

    block = re.search(r"## Python API\n\n```python\n(.*?)```", README, flags=re.S).group(1)
    block, dropped = re.subn(r"\n# smallest model within 1 point after distillation.*?\n\n", "\n", block, flags=re.S)
    assert dropped == 1
    digits = np.load(ROOT / "models/usps_test.npz")
    np.savez(tmp_path / "target.npz", x=digits["x"][:600], y=digits["y"][:600])
    np.savez(tmp_path / "heldout.npz", x=digits["x"][600:900], y=digits["y"][600:900])
    (tmp_path / "model.onnx").symlink_to(ROOT / "models/lenet_caffe_mnist.onnx")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md (Python API)", "exec"), namespace)
    assert namespace["result"].output == Path("small.onnx") and Path("small.onnx").is_file()
    assert isinstance(namespace["info"], dict) and Path("stats.npz").is_file()
    json.dumps(namespace["planned"].report)


def test_every_relative_link_and_anchor_resolves():
    """Links to files (bench/results/*.md, plots) exist and #anchors name a heading, as GitHub slugs it
    (the link text of a heading, lower case, punctuation dropped, spaces as dashes)."""
    text = re.sub(r"```.*?```", "", README, flags=re.S)
    slugs = {re.sub(r"[^\w\- ]", "", re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", h).strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)
    assert len(targets) > 50
    broken = [t for t in targets if not t.startswith("http")
              and (t[1:] not in slugs if t.startswith("#") else not (ROOT / t.split("#")[0]).exists())]
    assert not broken, broken
