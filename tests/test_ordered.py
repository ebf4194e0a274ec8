from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from genepert_scale.io.ordered import in_order


class CountingPool(ThreadPoolExecutor):
    """A thread pool that counts the calls submitted to it."""

    def __init__(self, workers: int):
        super().__init__(workers)
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_in_order_keeps_order_and_never_runs_more_than_ahead_calls_ahead():
    def slow_square(i):
        time.sleep(0.005 * (i % 3))  # finish out of order
        return i * i

    with CountingPool(4) as pool:
        results = []
        for value in in_order(pool, slow_square, range(20), ahead=3):
            results.append(value)
            # taken so far + the ones in flight or done, at most 3 of them
            assert pool.submitted - len(results) <= 2, (pool.submitted, len(results))
    assert results == [i * i for i in range(20)]
    assert pool.submitted == 20


def test_in_order_raises_the_error_of_the_failed_call_in_its_place():
    with ThreadPoolExecutor(2) as pool:
        results = in_order(pool, int, ["1", "2", "x", "4"], ahead=2)
        assert [next(results), next(results)] == [1, 2]
        with pytest.raises(ValueError, match="'x'"):
            next(results)


def test_closing_in_order_cancels_the_calls_not_yet_started():
    release = threading.Event()
    started = []

    def record(i):
        started.append(i)
        if i:  # every call but the first waits to be released
            release.wait(10)
        return i

    with ThreadPoolExecutor(1) as pool:
        results = in_order(pool, record, range(10), ahead=4)
        assert next(results) == 0  # calls 1-3 submitted, 2-3 queued behind the one worker
        results.close()
        release.set()
    assert started in ([0], [0, 1])  # 2 and 3 were cancelled before they started


def test_in_order_needs_at_least_one_call_ahead():
    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="ahead must be at least 1"):
        next(in_order(pool, int, ["1"], ahead=0))
