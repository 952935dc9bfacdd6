"""linalg.blas_threads: the BLAS thread limit, set by the first concurrent user and restored by
the last; where BLAS ignores it (OpenBLAS from a thread other than the main one, once the main
thread has set a count), a warning says so once."""

from __future__ import annotations

import logging
import threading

import pytest

from onnxprune.linalg import common


def blas_counts() -> list[int]:
    from threadpoolctl import threadpool_info

    return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]


def test_the_limit_holds_inside_and_is_restored_after():
    pytest.importorskip("threadpoolctl")
    before = blas_counts()
    with common.blas_threads(1):
        assert all(n == 1 for n in blas_counts())
        with common.blas_threads(1):              # nested (the planner inside the pipeline)
            assert all(n == 1 for n in blas_counts())
        assert all(n == 1 for n in blas_counts())
    assert blas_counts() == before


def test_a_limit_ignored_in_a_thread_is_warned_about_once(caplog, monkeypatch):
    pytest.importorskip("threadpoolctl")
    monkeypatch.setitem(common._blas_state, "ignored", False)
    with common.blas_threads(1):                   # the main thread sets a count first
        pass
    seen = []

    def work():
        with common.blas_threads(1):
            seen.append(blas_counts())

    with caplog.at_level(logging.WARNING, logger="onnxprune.linalg.common"):
        for _ in range(2):
            thread = threading.Thread(target=work)
            thread.start()
            thread.join()
    warned = [r for r in caplog.records if "BLAS ignored the limit" in r.getMessage()]
    ignored = any(n != 1 for counts in seen for n in counts)
    assert len(warned) == (1 if ignored else 0), (seen, [r.getMessage() for r in warned])
