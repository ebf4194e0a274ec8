from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from genepert_scale.ordered import in_order


def test_in_order_keeps_order_and_bounds_the_results_ahead():
    started = []
    lock = threading.Lock()

    def slow_square(i):
        with lock:
            started.append(i)
        time.sleep(0.01 * (i % 3))  # finish out of order
        return i * i

    with ThreadPoolExecutor(4) as pool:
        results = in_order(pool, slow_square, range(20), ahead=3)
        first = next(results)
        assert first == 0
        assert len(started) <= 3  # no more than `ahead` submitted before the first is taken
        assert [first, *results] == [i * i for i in range(20)]


def test_in_order_raises_the_error_of_the_failed_call_in_its_place():
    def parse(text):
        return int(text)

    with ThreadPoolExecutor(2) as pool:
        results = in_order(pool, parse, ["1", "2", "x", "4"], ahead=2)
        assert [next(results), next(results)] == [1, 2]
        with pytest.raises(ValueError, match="'x'"):
            next(results)
