"""Mapping over a thread pool in order, with a bounded number of calls ahead.

The writers (``synth``, ``convert``) produce row blocks in threads — numpy's
sampling and h5py's reads release the GIL — while the calling thread
compresses and appends the previous ones, in order.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def in_order(pool: Executor, func: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
    """``map(func, items)`` on ``pool``, in order, with a bounded number of
    calls submitted but not yet taken.

    ``Executor.map`` submits every item at once and holds every result until
    it is taken; this keeps at most ``ahead`` calls in flight or done.

    Parameters
    ----------
    pool
        Runs the calls.
    func
        Called on each item.
    items
        The items, consumed lazily.
    ahead
        Calls submitted and not yet taken, at most (≥ 1; ``1`` runs each call
        only when its result is asked for).

    Yields
    ------
    R
        ``func(item)`` for each item, in the order of ``items``.

    Raises
    ------
    Exception
        The exception of a failed call, in its place. Calls still pending
        when the iterator is closed (taken to the end, failed, or closed by
        the caller) are cancelled.
    """
    if ahead < 1:
        raise ValueError(f"ahead must be at least 1, got {ahead}")
    pending: collections.deque[Future[R]] = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(func, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


@contextlib.contextmanager
def threaded_in_order(
    func: Callable[[T], R], items: Iterable[T], *, threads: int, ahead: int, name: str
) -> Iterator[Iterator[R]]:
    """:func:`in_order` on a pool of ``threads`` threads named ``name``, both
    closed on exit: the calls not yet started are cancelled, the running ones
    waited for (also when the caller's loop fails)."""
    with (
        ThreadPoolExecutor(threads, thread_name_prefix=name) as pool,
        contextlib.closing(in_order(pool, func, items, ahead)) as results,
    ):
        yield results
