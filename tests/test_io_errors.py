"""Input and output failures that are the user's or the system's, not bugs: a write that fails
(full disk, unwritable folder), a closed stdout pipe, a broken statistics file, two outputs
that are one file, a model whose external data is missing. Each is one line and its exit code,
with nothing half-written."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from onnxprune import outputs
from onnxprune.errors import OutputError
from tests.test_cli import DATA, MODEL, ROOT, assert_user_error, cli

FAST = ["--calib-size", "50", "--no-latency", "-q"]


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------ failed writes: all or nothing


def _full_disk(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_full_disk_keeps_earlier_outputs_and_adds_nothing(monkeypatch, tmp_path):
    """The model is written, the report (the second file) finds the disk full: exit 1, one line,
    and the files of an earlier run at those paths stay exactly as they were."""
    out = tmp_path / "small.onnx"
    for name in ("small.onnx", "small.report.json", "small.recipe.json"):
        (tmp_path / name).write_text(f"earlier {name}")
    before = _contents(tmp_path)
    monkeypatch.setattr(outputs, "write_text_atomic", lambda path, text: _full_disk(path))
    result = cli("compress", MODEL, "--target-data", DATA, "-o", out, "--rank", "4", *FAST)
    assert_user_error(result, f"cannot write {tmp_path / 'small.report.json'}: no space left on device")
    assert _contents(tmp_path) == before        # no temporary folder or file left either


def test_write_all_writes_nothing_when_one_file_fails(tmp_path):
    (tmp_path / "b.txt").write_text("earlier")
    with pytest.raises(OutputError, match="cannot write .*c.txt: No space left on device"):
        outputs.write_all([(tmp_path / "a.txt", outputs.text("new a")), (tmp_path / "sub" / "b.txt", outputs.text("b")),
                           (tmp_path / "c.txt", _full_disk)])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["b.txt", "sub"]
    assert (tmp_path / "b.txt").read_text() == "earlier"


def test_a_file_this_run_does_not_write_is_not_left_from_an_earlier_one(tmp_path):
    """A figure without matplotlib: its writer writes nothing, and an earlier run's figure would
    not match the report beside it. It stays when the run writes nothing at all."""
    (tmp_path / "curve.png").write_text("earlier")
    with pytest.raises(OutputError):
        outputs.write_all([(tmp_path / "curve.png", lambda path: None), (tmp_path / "c.txt", _full_disk)])
    assert (tmp_path / "curve.png").read_text() == "earlier"
    written = outputs.write_all([(tmp_path / "a.txt", outputs.text("a")), (tmp_path / "curve.png", lambda path: None)])
    assert written == [tmp_path / "a.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_write_all_moves_a_model_with_its_external_data(tmp_path):
    from onnxprune.model import load_model, save_model

    out = tmp_path / "m.onnx"
    written = outputs.write_all([(out, lambda path: save_model(load_model(MODEL), path, external_data=True))])
    assert written == [out, tmp_path / "m.onnx.data"] and load_model(out).graph.initializer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_an_unwritable_folder_is_refused_before_any_work(monkeypatch, tmp_path):
    """Permission bits pass for root; a real probe does not (here /proc)."""
    from onnxprune import api

    monkeypatch.setattr(api, "as_model", lambda model: pytest.fail("the model was loaded"))
    result = cli("compress", MODEL, "--target-data", DATA, "-o", "/proc/new.onnx", *FAST)
    assert_user_error(result, "/proc/new.onnx", "folder /proc is not writable")


# ------------------------------------------------------------------ a closed stdout


@pytest.mark.parametrize("args", [["inspect", MODEL], ["validate", MODEL, MODEL, "--data", DATA, "--no-latency"]])
def test_a_closed_stdout_pipe_keeps_the_result(args):
    """``onnxprune ... | head -1``: the reader goes early; the command still exits with its own code."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen([sys.executable, "-m", "onnxprune.cli", *map(str, args)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()                      # before the command prints anything
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 0, stderr
    assert "internal error" not in stderr and "Broken" not in stderr, stderr


# ------------------------------------------------------------------ statistics files


@pytest.fixture(scope="module")
def real_stats(tmp_path_factory) -> Path:
    stats = tmp_path_factory.mktemp("stats") / "stats.npz"
    result = cli("calibrate", MODEL, "--target-data", DATA, "--calib-size", "20", "-q", "-o", stats)
    assert result.exit_code == 0, result.stderr
    return stats


@pytest.mark.parametrize("content", ["garbage", "zip header", "truncated", "one array"])
def test_a_broken_statistics_file_is_a_user_error(tmp_path, real_stats, content):
    import numpy as np

    broken = tmp_path / "broken.npz"
    if content == "garbage":
        broken.write_bytes(os.urandom(3000))
    elif content == "zip header":
        broken.write_bytes(b"PK\x03\x04" + os.urandom(3000))
    elif content == "truncated":
        broken.write_bytes(real_stats.read_bytes()[:100_000])
    else:
        with open(broken, "wb") as fh:
            np.save(fh, np.zeros(3))
    assert_user_error(cli("merge-stats", broken, "-o", tmp_path / "merged.npz"), "broken.npz", "not a statistics file")
    result = cli("compress", MODEL, "--target-data", DATA, "-o", tmp_path / "o.onnx", "--stats", broken, "--rank", "4",
                 *FAST)
    assert_user_error(result, "broken.npz", "not a statistics file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.npz"]


# ------------------------------------------------------------------ outputs that are one file


@pytest.mark.parametrize("args, clash", [
    (["-o", "s.json", "--figure", "s.json"], "s.json"),
    (["-o", "x.png"], "x.png"),                                              # the default figure is -o .png
    (["-o", "a_shift.png", "--figure", "a.png", "--source-data", DATA], "a_shift.png"),
])
def test_sensitivity_outputs_that_are_one_file_are_refused(monkeypatch, tmp_path, args, clash):
    monkeypatch.chdir(tmp_path)
    result = cli("sensitivity", MODEL, "--target-data", DATA, *args)
    assert_user_error(result, f"{clash} | is the same file as the other output", "-o, --figure")
    assert not list(tmp_path.iterdir())


def test_sweep_budgets_that_name_one_model_are_refused(tmp_path):
    # named to 4 significant digits of their percentage: both 80
    result = cli("sweep", MODEL, "--target-data", DATA, "--flops", "0.80001,0.79999", "-o", tmp_path / "sweep")
    assert_user_error(result, "macs80.onnx | is the same file as the other output")
    assert not list(tmp_path.iterdir())


def test_an_empty_output_path_is_refused_by_sensitivity_and_sweep(monkeypatch, tmp_path):
    """sensitivity -o '' crashed (exit 4) making the heat map's name; sweep -o '' wrote into the
    working folder and said 'wrote /'."""
    monkeypatch.chdir(tmp_path)
    assert_user_error(cli("sensitivity", MODEL, "--target-data", DATA, "-o", ""), "'' | is an empty output path")
    assert_user_error(cli("sweep", MODEL, "--target-data", DATA, "--flops", "0.5", "-o", "", *FAST),
                      "'' | is an empty output folder")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ external data


def _missing_data_message(model: Path) -> None:
    result = cli("inspect", model)
    assert_user_error(result, f"external data file {model.name}.data not found next to {model}")


def test_missing_external_data_is_named(tmp_path):
    model = tmp_path / "lenet.onnx"
    onnx.save(onnx.load(str(MODEL)), str(model), save_as_external_data=True, location="lenet.onnx.data",
              size_threshold=0)
    (tmp_path / "lenet.onnx.data").unlink()
    _missing_data_message(model)


@pytest.mark.real
def test_missing_external_data_of_the_real_model_is_named(shared, tmp_path):
    model = tmp_path / "mnist.onnx"
    model.write_bytes((shared / "models" / "mnist_extdata" / "mnist.onnx").read_bytes())
    _missing_data_message(model)
