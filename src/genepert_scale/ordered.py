"""Mapping over a thread pool in order, with a bounded number of results ahead.

The writers (``synth``, ``convert``) produce row blocks in threads — numpy's
sampling and h5py's reads release the GIL — while the calling thread
compresses and appends the previous ones, in order.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def in_order(pool: Executor, func: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
    """``map(func, items)`` on ``pool``, in order, with at most ``ahead``
    calls submitted but not yet taken (``Executor.map`` would submit every
    item at once and hold all results).
    """
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(func, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
