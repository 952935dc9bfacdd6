"""Calibration shards as self-contained tasks, run in this process or on a Dask cluster.

A ``ShardTask`` names everything one shard needs: the model (a path the worker reads, or
the serialised model), each sample set (a path the worker opens with the same
preprocessing, plus the rows of its shard, or an in-memory SampleSet of the shard), the
requests, batch size, folds and seed. ``run_shard`` computes its statistics; any process
that can import onnxprune and read the paths can run it. ``run_on_dask`` submits one task
per shard to a ``distributed.Client`` and merges the results with tasks in a fixed tree
(shard 1 + shard 2, shard 3 + shard 4, ...), so the result does not depend on which worker
finished first. Dask is an optional dependency (``pip install onnxprune[dask]``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np
import onnx

from onnxprune.calibration.requests import StatRequest
from onnxprune.calibration.shard import _merge_pair, complete, shard_ranges, tree_reduce
from onnxprune.calibration.stats import Statistics
from onnxprune.errors import CalibrationError, UsageError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SetShard:
    """One sample set's part of a shard task."""

    name: str                      # "target", "source"
    data: object                   # a path (str) the worker opens, or a SampleSet of the shard
    preprocess: dict               # Preprocess fields (used when ``data`` is a path)
    rows: np.ndarray | None        # store rows of the shard's samples (when ``data`` is a path)
    start: int                     # the shard's first position in the whole set
    stop: int
    whole: dict                    # describe() of the whole set
    fingerprint: str               # the whole set's content (``SampleSet.content_sha``)
    requests: list[dict]           # StatRequest.to_dict() of each request
    content: str | None = None     # the shard's content where calibrate runs (checked where ``data`` is opened)


@dataclasses.dataclass
class ShardTask:
    model: str | bytes             # a path the worker loads, or the serialised ModelProto
    sets: list[SetShard]
    index: int                     # 0-based
    count: int
    batch_size: int
    folds: int
    seed: int
    device: str = "cpu"
    threads: int | None = None     # onnxruntime threads per worker (None: its default)
    stats: dict = dataclasses.field(default_factory=dict)   # collect() options (e.g. engine)
    model_hash: str | None = None  # the model's hash where calibrate runs (checked where ``model`` is loaded)


def plan(model_source, model: onnx.ModelProto, samples: dict, sources: dict, requests: dict[str, list],
         *, count: int, batch_size: int, folds: int, seed: int, device: str = "cpu",
         threads: int | None = None, indices: Sequence[int] | None = None,
         stats_options: dict | None = None) -> list[ShardTask]:
    """One ShardTask per shard (``indices``: only these, 0-based) of every set in ``requests``.

    ``samples``: {set: SampleSet} as calibrated; ``sources``: {set: path or None}: with a
    path the worker opens it itself and takes the shard's rows, else the shard's SampleSet
    is shipped with the task. ``model_source``: a path, or None to ship the model.
    """
    from onnxprune.model import model_hash
    from onnxprune.runtime import batch_size_for

    size = batch_size_for(model, int(batch_size))
    ranges = {name: shard_ranges(len(samples[name]), count, size, name=name) for name in requests}
    wire_model = str(model_source) if model_source is not None else model.SerializeToString()
    tasks = []
    for index in (range(count) if indices is None else indices):
        sets = []
        for name, todo in requests.items():
            sample_set = samples[name]
            start, stop = ranges[name][index]
            path = sources.get(name)
            part = sample_set.subset(np.arange(start, stop))
            sets.append(SetShard(
                name=name,
                data=str(path) if path is not None else part,
                preprocess=dataclasses.asdict(sample_set._preprocess),
                rows=part.source_indices if path is not None else None,
                start=start, stop=stop, whole=sample_set.describe(), fingerprint=sample_set.content_sha(),
                requests=[r.to_dict() for r in dict.fromkeys(todo)],
                content=part.content_sha() if path is not None else None))
        tasks.append(ShardTask(model=wire_model, sets=sets, index=int(index), count=int(count), batch_size=size,
                               folds=int(folds), seed=int(seed), device=device, threads=threads,
                               stats=dict(stats_options or {}),
                               model_hash=model_hash(model) if model_source is not None else None))
    return tasks


def run_shard(task: ShardTask, *, progress: bool = False) -> Statistics:
    """The statistics of one shard, with its ``"shard"`` header record."""
    from onnxprune.calibration.collect import collect
    from onnxprune.data.preprocess import Preprocess
    from onnxprune.data.samples import open_samples
    from onnxprune.model import load_model, model_hash

    shard = f"shard {task.index + 1}/{task.count}"
    if isinstance(task.model, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(task.model))
    else:
        model = load_model(task.model)
        found = None if task.model_hash is None else model_hash(model)
        if found != task.model_hash:
            raise CalibrationError(task.model, f"is another model where {shard} ran ({found}) than where "
                                   f"calibrate runs ({task.model_hash})",
                                   "every worker must read the same model file (a shared path)")
    stats = None
    for part in task.sets:
        if isinstance(part.data, str):
            whole = open_samples(part.data, model, preprocess=Preprocess(**part.preprocess))
            sample_set = whole.subset(_positions_of(whole, part.rows, part.data))
            if part.content is not None and sample_set.content_sha() != part.content:
                raise CalibrationError(part.data, f"holds other samples where {shard} ran than where calibrate "
                                       "runs", "every worker must read the same data (a shared path), unchanged "
                                       "while calibrate runs")
        else:
            sample_set = part.data
        requests = [StatRequest.from_dict(r) for r in part.requests]
        piece = collect(model, {part.name: sample_set}, requests, batch_size=task.batch_size, folds=task.folds,
                        device=task.device, progress=progress, seed=task.seed, offset=part.start,
                        **_collect_options(task))
        stats = piece if stats is None else stats.merge(piece)
    stats.header["shard"] = shard_record(task)
    return stats


def shard_record(task: ShardTask) -> dict:
    """The ``"shard"`` header record of ``task``'s statistics."""
    return {"index": task.index, "count": task.count, "batch_size": task.batch_size,
            "sets": {p.name: {"start": p.start, "stop": p.stop, "set": p.whole, "fingerprint": p.fingerprint}
                     for p in task.sets}}


def _collect_options(task: ShardTask) -> dict:
    options = dict(task.stats)
    if task.threads:
        options["threads"] = task.threads
    return options


def _positions_of(whole, rows: np.ndarray, path: str) -> np.ndarray:
    """Positions in the freshly opened ``whole`` set of the store ``rows`` (identical when the
    worker sees the same files as the client)."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(whole)):
        raise CalibrationError(path, f"has {len(whole)} samples on this worker, fewer than the client saw",
                               "workers must read the same data (a shared path)")
    return rows


def run_on_dask(tasks: Sequence[ShardTask], client) -> Statistics:
    """Run ``tasks`` on the workers of ``client`` and merge them there in a fixed tree order."""
    tasks = sorted(tasks, key=lambda t: t.index)
    futures = [client.submit(run_shard, task, key=f"onnxprune-shard-{task.index + 1}-of-{task.count}-{_token(task)}",
                             pure=False) for task in tasks]

    def combine(a, b):
        return client.submit(_merge_pair, a, b, pure=False)

    merged = tree_reduce(futures, combine)
    return complete(merged.result(), shard_record(tasks[0]))


def _token(task: ShardTask) -> str:
    return f"{os.getpid()}-{id(task):x}"


def local_client(workers: int, *, processes: bool = True):
    """A ``distributed.Client`` on a new local cluster of ``workers`` single-threaded workers."""
    distributed = require_dask()
    from distributed.deploy.spec import SpecCluster

    before = set(SpecCluster._instances)
    try:
        # ":0": any free port, so two local clusters (or another program on 8787) never collide
        cluster = distributed.LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=processes,
                                           dashboard_address=":0")
    except KeyboardInterrupt:
        # Ctrl-C while its workers start: Dask's exit hook would close the half-started cluster and
        # fail an assertion on them (a traceback after "interrupted"); they end with this process
        for half in set(SpecCluster._instances) - before:
            half.shutdown_on_close = False
        logging.getLogger("distributed").setLevel(logging.CRITICAL)    # and its reports on them
        raise
    return distributed.Client(cluster)


#: how long ``connect`` waits for a scheduler that neither answers nor refuses (seconds)
CONNECT_TIMEOUT = 20
#: how long ``connect`` then waits for the scheduler's first worker (seconds)
WORKERS_TIMEOUT = 120
#: schemes whose address is a host and port that a plain socket can try first
_SOCKET_SCHEMES = ("tcp", "tls", "ws", "wss")
#: schemes whose Dask handshake ``connect`` tries first, with a time limit (not TLS ones, which
#: need the client's credentials)
_PLAIN_SCHEMES = ("tcp", "ws")


def connect(address: str):
    """A ``distributed.Client`` connected to the scheduler at ``address`` (``tcp://host:port``), once
    it has a worker. A malformed address is a UsageError; a refused connection or an unknown host
    fails at once, a silent one after ``CONNECT_TIMEOUT`` s; no worker after ``WORKERS_TIMEOUT`` s
    is a CalibrationError."""
    import socket

    distributed = require_dask()          # first: without Dask, the imports below fail
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import get_backend

    hint = "check the address (tcp://host:8786) and that `dask scheduler` runs there"

    def not_an_address(exc: Exception) -> UsageError:
        return UsageError(f"--cluster {address!r} is not a Dask scheduler address ({exc}): give tcp://host:port")

    try:
        scheme, location = parse_address(address)
        host, port = parse_host_port(location) if scheme in _SOCKET_SCHEMES else (None, None)
    except (ValueError, TypeError) as exc:
        raise not_an_address(exc) from None
    try:        # ucx:// is registered, but its connector needs a package this install may lack
        get_backend(scheme).get_connector()
    except (TypeError, ImportError, RuntimeError) as exc:
        raise CalibrationError(address, f"this Dask cannot connect over {scheme}:// ({type(exc).__name__}: {exc})",
                               "give a tcp://host:port address") from None
    except ValueError as exc:             # a scheme Dask does not know (http://...)
        raise not_an_address(exc) from None
    if scheme in _SOCKET_SCHEMES:
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
        except (ConnectionRefusedError, socket.gaierror) as exc:
            raise CalibrationError(address, f"cannot reach the Dask scheduler ({type(exc).__name__}: {exc})",
                                   hint) from None
        except OSError:
            pass                     # a timeout or an unreachable network: Dask's own attempt says it
    if scheme in _PLAIN_SCHEMES:
        not_dask = "check the port: a scheduler listens on 8786 (its dashboard, a web page, on 8787)"
        try:
            _handshake(address, CONNECT_TIMEOUT)
        except (TimeoutError, asyncio.TimeoutError):
            raise CalibrationError(address, "is not a Dask scheduler: it accepted the connection but sent no Dask "
                                   f"handshake in {CONNECT_TIMEOUT} s", not_dask) from None
        except OSError as exc:
            raise CalibrationError(address, f"cannot reach the Dask scheduler ({type(exc).__name__}: {exc})",
                                   hint) from None
        except Exception as exc:     # another protocol's bytes, read as Dask frames (a MemoryError, ...)
            raise CalibrationError(address, f"is not a Dask scheduler: it answered in another protocol "
                                   f"({type(exc).__name__})", not_dask) from None
    try:
        client = distributed.Client(address, timeout=f"{CONNECT_TIMEOUT}s")
    except (OSError, TimeoutError) as exc:
        raise CalibrationError(address, f"cannot reach the Dask scheduler ({type(exc).__name__}: {exc})",
                               hint) from None
    except ValueError as exc:             # a scheme Dask does not know (http://...)
        raise not_an_address(exc) from None
    try:
        wait_for_workers(client, address)
    except CalibrationError:
        client.close()
        raise
    return client


def wait_for_workers(client, address: str) -> None:
    """Return once the scheduler of ``client`` has a worker; CalibrationError after
    ``WORKERS_TIMEOUT`` s without one (tasks would wait for a worker forever)."""
    if client.scheduler_info().get("workers"):
        return
    log.warning("%s: the Dask scheduler has no workers yet; waiting up to %d s for one", address, WORKERS_TIMEOUT)
    try:
        client.wait_for_workers(1, timeout=WORKERS_TIMEOUT)
    except (TimeoutError, OSError):
        raise CalibrationError(address, f"the Dask scheduler has no workers (waited {WORKERS_TIMEOUT} s)",
                               f"start some: dask worker {address}") from None


def _handshake(address: str, timeout: float) -> None:
    """Connect to ``address`` and exchange Dask's handshake, all within ``timeout`` s. Dask's own
    connect then waits for the peer's handshake without a limit (a web server on that port hangs
    it for good) and reads another protocol's bytes as a frame length (a MemoryError)."""
    import concurrent.futures

    from distributed.comm import connect as dask_connect

    async def exchange():
        comm = await asyncio.wait_for(dask_connect(address, timeout=timeout), timeout)
        await comm.close()

    # in a thread of its own: the caller may be running an event loop already (a notebook)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, exchange()).result()


def require_dask():
    try:
        import distributed
    except ImportError:
        raise CalibrationError("--cluster/--workers", "Dask is not installed",
                               'pip install "onnxprune[dask]"') from None
    # Dask logs every scheduler/worker event at INFO: show them only when onnxprune is verbose
    quiet = max(logging.WARNING, logging.getLogger().getEffectiveLevel())
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("distributed").setLevel(quiet)
    return distributed
