"""Sharded and distributed calibration: shards merge to the single-process statistics."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import onnxprune
from onnxprune.calibration.shard import parse_shard, shard_ranges, tree_reduce
from onnxprune.calibration.stats import Statistics
from onnxprune.cli import main
from onnxprune.errors import CalibrationError
from onnxprune.pipeline import Recipe

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "lenet_caffe_mnist.onnx"
USPS = ROOT / "models" / "usps_test.npz"
# DALR on LeNet: 2 Conv inputs as sampled im2col patches (seeded positions) and 2 FC inputs
RECIPE = Recipe(passes=(("low-rank-split", {"method": "dalr", "keep": 0.2}), ("bias-compensate", {})))


@pytest.fixture(scope="module", autouse=True)
def small_data(tmp_path_factory):
    """The first 300 bundled USPS digits (10 batches of 32): enough for 3-4 shards, and fast."""
    global DATA
    DATA = tmp_path_factory.mktemp("data") / "usps300.npz"
    with np.load(USPS) as d:
        np.savez(DATA, x=d["x"][:300], y=d["y"][:300])
    yield


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *words):
    assert result.exit_code == 1, (result.output, result.stderr)
    message = result.stderr.strip()
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    for word in words:
        assert word.lower() in message.lower(), (word, message)


def max_relative_difference(a: Statistics, b: Statistics) -> float:
    assert a.entries() == b.entries()
    worst = 0.0
    for set_name, key, fold in a.entries():
        ma, mb = a.moments(key, set_name, fold), b.moments(key, set_name, fold)
        assert ma.count == mb.count
        for x, y in ((ma.sum, mb.sum), (ma.gram, mb.gram)):
            worst = max(worst, float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-300)))
    return worst


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Statistics:
    out = tmp_path_factory.mktemp("whole") / "all.npz"
    return onnxprune.calibrate(MODEL, DATA, recipe=RECIPE, output=out, progress=False)


def test_shard_ranges_are_disjoint_complete_whole_batches():
    for total, shards, batch in ((2007, 3, 32), (100, 4, 7), (5, 1, 32), (64, 2, 32)):
        ranges = shard_ranges(total, shards, batch)
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        assert all(start % batch == 0 and stop > start for start, stop in ranges)
    with pytest.raises(CalibrationError, match="cannot cut 40 samples"):
        shard_ranges(40, 3, 32)


def test_parse_shard_is_one_based_and_refuses_nonsense():
    assert parse_shard("1/4") == (0, 4) and parse_shard(" 4 / 4 ") == (3, 4)
    for bad in ("0/4", "5/4", "1/0", "a/b", "1-4", "1/4/2"):
        with pytest.raises(CalibrationError, match="--shard"):
            parse_shard(bad)


def test_tree_order_does_not_depend_on_arrival():
    assert tree_reduce(list("abcde"), lambda a, b: f"({a}{b})") == "(((ab)(cd))e)"


def test_merged_shards_equal_the_single_process_statistics(whole, tmp_path):
    files = []
    for i in (3, 1, 2):                                   # any order
        files.append(tmp_path / f"s{i}.npz")
        part = onnxprune.calibrate(MODEL, DATA, recipe=RECIPE, output=files[-1], progress=False, shard=f"{i}/3")
        record = part.header["shard"]
        assert record["index"] == i - 1 and record["count"] == 3
        assert record["sets"]["target"]["set"] == whole.header["sets"]["target"]
    merged = onnxprune.merge_stats(files, tmp_path / "all.npz")
    assert max_relative_difference(whole, merged) <= 1e-10
    # the merged header is the single-process one, plus where it came from
    assert merged.header["sets"] == whole.header["sets"]
    assert merged.header["samples"] == whole.header["samples"]
    assert merged.header["merged_shards"] == {"count": 3, "batch_size": 32}
    assert merged.header["sets"]["target"]["count"] == 150  # the calibration half (split 0.5, as compress)
    assert "shard" not in Statistics.load(tmp_path / "all.npz").header


def test_cli_shards_merge_and_compress_with_them(tmp_path):
    for i in (1, 2):
        result = cli("calibrate", MODEL, "--target-data", DATA, "-o", tmp_path / f"s{i}.npz", "--shard", f"{i}/2", "-q")
        assert result.exit_code == 0, result.output + result.stderr
        assert f"shard {i}/2" in result.output
    result = cli("merge-stats", tmp_path / "s2.npz", tmp_path / "s1.npz", "-o", tmp_path / "all.npz")
    assert result.exit_code == 0, result.output + result.stderr
    out = tmp_path / "small.onnx"
    result = cli("compress", MODEL, "--target-data", DATA, "-o", out, "--stats", tmp_path / "all.npz",
                 "--keep", "0.3", "--calib-size", "200", "--no-latency", "-q")
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(out.with_name("small.report.json").read_text())["calibration_runs"] == 0
    # a lone shard is not the statistics of the calibration set
    result = cli("compress", MODEL, "--target-data", DATA, "-o", tmp_path / "x.onnx", "--stats", tmp_path / "s1.npz",
                 "--no-latency", "-q")
    assert_user_error(result, "shard 1/2", "merge-stats")
    assert not (tmp_path / "x.onnx").exists()


def test_merge_refuses_shards_that_do_not_fit(tmp_path):
    def shard(name, i, n, *extra, model=MODEL, data=DATA):
        result = cli("calibrate", model, "--target-data", data, "-o", tmp_path / name, "--shard", f"{i}/{n}",
                     "-q", *extra)
        assert result.exit_code == 0, result.output + result.stderr
        return tmp_path / name

    a, b, c = shard("a.npz", 1, 3), shard("b.npz", 2, 3), shard("c.npz", 3, 3)
    out = tmp_path / "out.npz"

    def merge(*files):
        return cli("merge-stats", *files, "-o", out)

    assert_user_error(merge(a, c), "2/3 missing")
    assert_user_error(merge(a, a, b, c), "repeats shard 1/3")
    assert_user_error(merge(a, b, shard("half.npz", 2, 2)), "shard count")
    assert_user_error(merge(a, b, shard("spectral.npz", 3, 3, "--method", "spectral")), "recipe")
    assert_user_error(merge(a, b, shard("seed.npz", 3, 3, "--batch-size", "16")), "batch size")
    # float64 products agree with the default's float32 ones to ~1e-6 only, not to one run's 1e-10
    assert_user_error(merge(a, b, shard("numpy.npz", 3, 3, "--engine", "numpy")), "another --engine")
    other = tmp_path / "other.npz"
    with np.load(USPS) as d:
        np.savez(other, x=d["x"][1:301], y=d["y"][1:301])
    assert_user_error(merge(a, b, shard("data.npz", 3, 3, data=other)), "another sample set")
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(MODEL))
    w = model.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 2, w.name))
    onnx.save(model, str(tmp_path / "other.onnx"))
    assert_user_error(merge(a, b, shard("model.npz", 3, 3, model=tmp_path / "other.onnx")), "another model")
    whole = tmp_path / "whole.npz"
    assert cli("calibrate", MODEL, "--target-data", DATA, "-o", whole, "-q").exit_code == 0
    assert_user_error(merge(a, b, whole), "not a shard")
    assert_user_error(cli("merge-stats", a, b, c, "-o", a), "is one of the inputs")
    assert not out.exists()


def test_shard_usage_errors(tmp_path):
    out = tmp_path / "s.npz"
    result = cli("calibrate", MODEL, "--target-data", DATA, "-o", out, "--shard", "4/3", "-q")
    assert result.exit_code == 2 and "'--shard': '4/3': need 1 <= i <= n" in result.stderr, result.stderr
    result = cli("calibrate", MODEL, "--target-data", DATA, "-o", out, "--shard", "1/2", "--workers", "2", "-q")
    assert result.exit_code == 2
    result = cli("calibrate", MODEL, "--target-data", DATA, "-o", out, "--shards", "2", "-q")
    assert result.exit_code == 2
    assert not out.exists()


# ------------------------------------------------------------------------- Dask


@pytest.fixture(scope="module")
def client():
    pytest.importorskip("distributed")
    from onnxprune.calibration.cluster import local_client

    # worker processes, as `calibrate --workers` starts them: in worker *threads* (processes=False)
    # float32 BLAS products came out different in the last bits (~5e-8 relative) from run to run
    client = local_client(2, processes=True)
    yield client
    client.close()
    client.cluster.close()


def test_dask_cluster_of_two_equals_one_process(whole, client, tmp_path):
    first = onnxprune.calibrate(MODEL, DATA, recipe=RECIPE, output=tmp_path / "a.npz", client=client, shards=4,
                                progress=False)
    assert max_relative_difference(whole, first) <= 1e-10
    assert first.header["sets"] == whole.header["sets"]
    assert first.header["merged_shards"]["count"] == 4
    # a fixed merge tree: bit for bit the same however the workers were scheduled
    again = onnxprune.calibrate(MODEL, DATA, recipe=RECIPE, output=tmp_path / "b.npz", client=client, shards=4,
                                progress=False)
    assert max_relative_difference(first, again) == 0.0


def test_a_text_file_calibrates_on_a_cluster_as_in_one_process(client, tmp_path):
    """The workers cannot tokenise (no tokenizer there): a .tsv's tokens are shipped with the tasks,
    not its path."""
    pytest.importorskip("tokenizers")
    import onnx

    from tests.data.test_text import _tsv, build_tokenizer
    from tests.graphs import token_ffn

    data = _tsv(tmp_path, n=40)
    recipe = Recipe(passes=(("low-rank-split", {"method": "dalr", "rank": 4}),),
                    batch_size=8, preprocess={"tokenizer": str(build_tokenizer(tmp_path / "tok.json")), "max_length": 8})
    model = tmp_path / "model.onnx"
    onnx.save(token_ffn(vocab=16), model)
    here = onnxprune.calibrate(model, data, recipe=recipe, output=tmp_path / "a.npz", progress=False)
    there = onnxprune.calibrate(model, data, recipe=recipe, output=tmp_path / "b.npz", client=client, shards=2,
                                progress=False)
    assert max_relative_difference(here, there) <= 1e-10


def test_cli_workers_starts_a_local_cluster(whole, tmp_path):
    pytest.importorskip("distributed")
    out = tmp_path / "w.npz"
    result = cli("calibrate", MODEL, "--target-data", DATA, "-o", out, "--workers", "2", "-q")
    assert result.exit_code == 0, result.output + result.stderr
    assert max_relative_difference(whole, Statistics.load(out)) <= 1e-10


CTRL_C_WHILE_WORKERS_START = """
import asyncio, os, signal, threading
signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal: a job started in the
import distributed                                         # background (CI's `... &`) inherits SIGINT ignored

async def never(self):
    await asyncio.sleep(3600)

distributed.Nanny.start_unsafe = never          # its worker never comes up
from onnxprune.calibration.cluster import local_client
done = threading.Event()

def press():        # Ctrl-C every 3 s until it lands (a loaded machine's event loop can swallow one)
    while not done.wait(3):
        os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=press, daemon=True).start()
try:
    local_client(1)
except KeyboardInterrupt:
    done.set()
    print("interrupted")
"""


def test_ctrl_c_while_local_workers_start_leaves_no_traceback():
    """Ctrl-C while `--workers` starts its cluster: Dask's exit hook closed the half-started
    cluster and failed an assertion on its starting worker, a traceback after `interrupted`."""
    pytest.importorskip("distributed")
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_WORKERS_START], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.stdout.strip() == "interrupted", result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_unreachable_scheduler_is_one_line(tmp_path, monkeypatch):
    """A refused connection or an unknown host fails at once (not after the connect timeout)."""
    pytest.importorskip("distributed")
    import time

    from onnxprune.calibration import cluster
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 15)
    for address in ("tcp://127.0.0.1:9", "tcp://nonexistent.invalid:8786", "ws://127.0.0.1:9"):
        started = time.perf_counter()
        result = cli("calibrate", MODEL, "--target-data", DATA, "-o", tmp_path / "c.npz", "--cluster", address, "-q")
        assert_user_error(result, "cannot reach the Dask scheduler")
        assert time.perf_counter() - started < 10
    assert not (tmp_path / "c.npz").exists()


@pytest.mark.parametrize("reply", [None, b"SSH-2.0-OpenSSH_9.6\r\n" * 4])
def test_a_server_that_is_no_scheduler_is_one_line(tmp_path, monkeypatch, reply):
    """A port where something else listens (the dashboard's web server, ssh): Dask's own connect
    waits for its handshake for ever on a silent one and reads another protocol's bytes as a
    frame length (MemoryError); calibrate says in one line that it is no scheduler."""
    pytest.importorskip("distributed")
    import socket
    import threading
    import time

    from onnxprune.calibration import cluster
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 2)
    server = socket.create_server(("127.0.0.1", 0))
    accepted, timers = [], []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)
            if reply:
                conn.sendall(reply)
            else:       # silent, then hangs up: without the handshake's time limit, "cannot reach" after 10 s
                timers.append(threading.Timer(10, conn.close))
                timers[-1].start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        started = time.perf_counter()
        result = cli("calibrate", MODEL, "--target-data", DATA, "-o", tmp_path / "c.npz", "--cluster",
                     f"tcp://127.0.0.1:{server.getsockname()[1]}", "-q")
        assert time.perf_counter() - started < 10
    finally:
        server.close()
        for timer in timers:
            timer.cancel()
        for conn in accepted:
            conn.close()
    assert_user_error(result, "not a Dask scheduler", "8786")
    assert not (tmp_path / "c.npz").exists()


def test_a_scheme_this_dask_cannot_use_is_one_line(tmp_path, monkeypatch):
    """ucx:// is a registered Dask scheme whose connector needs a package Dask no longer ships
    (a TypeError from its backend); an install where it is there is made to fail the same way."""
    pytest.importorskip("distributed")
    from distributed.comm.registry import get_backend

    def broken(self):
        raise TypeError("the ucx backend needs a package this install lacks")

    monkeypatch.setattr(type(get_backend("ucx")), "get_connector", broken)
    result = cli("calibrate", MODEL, "--target-data", DATA, "-o", tmp_path / "c.npz", "--cluster", "ucx://127.0.0.1:9")
    assert_user_error(result, "cannot connect over ucx://", "tcp://host:port")


def test_cluster_without_dask_installed_says_so(tmp_path, monkeypatch):
    import sys

    for name in ("distributed", "distributed.comm.addressing", "distributed.comm.registry"):
        monkeypatch.setitem(sys.modules, name, None)                  # importing it: ImportError
    result = cli("calibrate", MODEL, "--target-data", DATA, "-o", tmp_path / "c.npz", "--cluster", "tcp://127.0.0.1:9")
    assert_user_error(result, "Dask is not installed", "onnxprune[dask]")
    assert not (tmp_path / "c.npz").exists()


@pytest.mark.parametrize("address", ["foo", "", "tcp://127.0.0.1:abc", "http://127.0.0.1:8786"])
def test_malformed_scheduler_address_is_a_usage_error(tmp_path, address):
    pytest.importorskip("distributed")
    result = cli("calibrate", MODEL, "--target-data", DATA, "-o", tmp_path / "c.npz", "--cluster", address, "-q")
    assert result.exit_code == 2, result.output + result.stderr
    assert "is not a Dask scheduler address" in result.stderr and "tcp://host:port" in result.stderr
    assert not (tmp_path / "c.npz").exists()


def test_a_scheduler_without_workers_fails_after_waiting(tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    from onnxprune.calibration import cluster
    monkeypatch.setattr(cluster, "WORKERS_TIMEOUT", 2)
    with distributed.LocalCluster(n_workers=0, processes=False, protocol="tcp", dashboard_address=":0") as empty:
        result = cli("calibrate", MODEL, "--target-data", DATA, "-o", tmp_path / "c.npz", "--cluster",
                     empty.scheduler_address, "-q")
    assert_user_error(result, "has no workers (waited 2 s)", "dask worker")
    assert not (tmp_path / "c.npz").exists()


def test_a_client_without_workers_fails_after_waiting(tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    from onnxprune.calibration import cluster
    monkeypatch.setattr(cluster, "WORKERS_TIMEOUT", 2)
    with distributed.LocalCluster(n_workers=0, processes=False, protocol="tcp", dashboard_address=":0") as empty, \
            distributed.Client(empty) as client:
        with pytest.raises(CalibrationError, match="has no workers"):        # waited forever before
            onnxprune.calibrate(MODEL, DATA, recipe=RECIPE, output=tmp_path / "c.npz", client=client, progress=False)
        assert client.status == "running"               # the caller's client: left open
    assert not (tmp_path / "c.npz").exists()


def test_relative_paths_reach_workers_elsewhere(whole, client, tmp_path, monkeypatch):
    """The workers started in another folder: the data and model paths they get are absolute."""
    import shutil

    shutil.copy(DATA, tmp_path / "data.npz")
    shutil.copy(MODEL, tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)                    # the workers' folder stays where they started
    stats = onnxprune.calibrate("model.onnx", "data.npz", recipe=RECIPE, output="s.npz", client=client, shards=2,
                                progress=False)
    assert max_relative_difference(whole, stats) <= 1e-10


def test_statistics_of_other_data_are_refused(whole, tmp_path):
    """compress --stats and merge-stats tell data of the same size apart by content, not only rows."""
    with np.load(DATA) as d:
        edited = {"x": d["x"].copy(), "y": d["y"]}
    edited["x"][200:240] = 255 - edited["x"][200:240]              # inside the last shard, not its ends
    np.savez(tmp_path / "edited.npz", **edited)
    stats = tmp_path / "s.npz"
    assert cli("calibrate", MODEL, "--target-data", DATA, "-o", stats, "-q").exit_code == 0
    result = cli("compress", MODEL, "--target-data", tmp_path / "edited.npz", "--stats", stats, "--no-latency",
                 "-o", tmp_path / "c.onnx")
    assert result.exit_code == 1 and result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr
    assert "the target statistics were gathered on other data" in result.stderr
    assert not (tmp_path / "c.onnx").exists()
    for i, data in ((1, DATA), (2, DATA), (3, tmp_path / "edited.npz")):
        assert cli("calibrate", MODEL, "--target-data", data, "--shard", f"{i}/3", "-o", tmp_path / f"p{i}.npz",
                   "-q").exit_code == 0
    result = cli("merge-stats", *(tmp_path / f"p{i}.npz" for i in (1, 2, 3)), "-o", tmp_path / "m.npz")
    assert_user_error(result, "another sample set")
    assert not (tmp_path / "m.npz").exists()


def test_api_shard_counts_are_checked(tmp_path):
    from onnxprune.errors import RecipeError

    for shards, message in ((-3, "must be an integer >= 1"), (0, "must be an integer >= 1"),
                            (2, "cuts the work for a cluster")):
        with pytest.raises(RecipeError, match=message):
            onnxprune.calibrate(MODEL, DATA, recipe=RECIPE, output=tmp_path / "s.npz", shards=shards, progress=False)
    assert not (tmp_path / "s.npz").exists()


def test_shard_one_of_one_is_the_whole_set(whole, tmp_path):
    one = tmp_path / "one.npz"
    assert cli("calibrate", MODEL, "--target-data", DATA, "--shard", "1/1", "-o", one, "-q").exit_code == 0
    result = cli("compress", MODEL, "--target-data", DATA, "--stats", one, "--method", "dalr-bc", "--keep", "0.2",
                 "--allocation", "global", "--no-latency", "-o", tmp_path / "c.onnx", "-q")
    assert result.exit_code == 0, result.output + result.stderr


def test_messages_for_files_that_are_not_shards_or_statistics(whole, tmp_path):
    merged = tmp_path / "merged.npz"
    for i in (1, 2):
        assert cli("calibrate", MODEL, "--target-data", DATA, "--shard", f"{i}/2", "-o", tmp_path / f"p{i}.npz",
                   "-q").exit_code == 0
    assert cli("merge-stats", tmp_path / "p1.npz", tmp_path / "p2.npz", "-o", merged).exit_code == 0
    assert_user_error(cli("merge-stats", merged, "-o", tmp_path / "again.npz"), "merged already, from 2 shards")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    result = cli("compress", MODEL, "--target-data", DATA, "--stats", tmp_path / "objects.npy", "--keep", "0.5",
                 "-o", tmp_path / "c.onnx")
    assert "pickled objects, which are never loaded" in result.stderr and "allow_pickle" not in result.stderr


def test_too_many_shards_are_refused_before_a_cluster_starts(tmp_path, monkeypatch):
    from onnxprune.calibration import cluster

    monkeypatch.setattr(cluster, "local_client", lambda *a, **k: pytest.fail("a cluster was started"))
    result = cli("calibrate", MODEL, "--target-data", DATA, "-o", tmp_path / "c.npz", "--workers", "2",
                 "--shards", "20")
    assert_user_error(result, "into 20 shards")


def test_more_workers_than_shards_start_no_idle_processes(tmp_path, monkeypatch):
    """--workers N alone means N shards: a count the data cannot take fails before N processes
    start (--workers 1000 on 5 batches); with --shards K only min(N, K) workers start."""
    from onnxprune.calibration import cluster

    started = []

    def no_cluster(workers, **kw):
        started.append(workers)
        raise CalibrationError("local cluster", "not started in this test")

    monkeypatch.setattr(cluster, "local_client", no_cluster)
    result = cli("calibrate", MODEL, "--target-data", DATA, "-o", tmp_path / "c.npz", "--workers", "1000")
    assert_user_error(result, "into 1000 shards", "fewer --workers")
    assert started == []
    result = cli("calibrate", MODEL, "--target-data", DATA, "-o", tmp_path / "c.npz", "--workers", "1000",
                 "--shards", "2")
    assert_user_error(result, "not started in this test")
    assert started == [2]
    assert not (tmp_path / "c.npz").exists()


def test_stats_with_sequential_mode_is_a_usage_error(whole, tmp_path):
    stats = tmp_path / "s.npz"
    whole.save(stats)
    result = cli("compress", MODEL, "--target-data", DATA, "--stats", stats, "--mode", "sequential", "--keep", "0.5",
                 "-o", tmp_path / "c.onnx")
    assert result.exit_code == 2 and "--mode sequential gathers its statistics anew" in result.stderr, result.stderr
    assert not (tmp_path / "c.onnx").exists()


def test_a_worker_that_reads_other_data_or_another_model_is_refused(client, tmp_path):
    """Workers open the data and model paths themselves: a file that is not what calibrate saw
    (another copy on that machine, or one edited meanwhile) is an error, not other statistics."""
    import shutil

    from onnxprune.api import as_model, as_samples
    from onnxprune.calibration import cluster as tasks_on

    data, model = tmp_path / "data.npz", tmp_path / "model.onnx"
    shutil.copy(DATA, data)
    shutil.copy(MODEL, model)
    original = as_model(str(model))
    samples = {"target": as_samples(str(data), original, RECIPE.preprocess)}
    requests = {"target": [r for p in RECIPE.build() for r, _ in p.requests(original)]}

    def tasks():
        return tasks_on.plan(str(model), original, samples, {"target": str(data)}, requests, count=2,
                             batch_size=32, folds=2, seed=0)

    planned = tasks()
    with np.load(DATA) as d:                      # the same shape, one sample of the second shard changed
        x = d["x"].copy()
        x[250] = 255 - x[250]
        np.savez(data, x=x, y=d["y"])
    with pytest.raises(CalibrationError, match="holds other samples where shard 2/2 ran"):
        tasks_on.run_on_dask(planned, client)
    shutil.copy(DATA, data)
    planned = tasks()
    import onnx
    edited = onnx.load(MODEL)
    edited.graph.initializer[-1].raw_data = bytes(len(edited.graph.initializer[-1].raw_data))
    onnx.save(edited, model)
    with pytest.raises(CalibrationError, match=r"is another model where shard [12]/2 ran"):
        tasks_on.run_on_dask(planned, client)
