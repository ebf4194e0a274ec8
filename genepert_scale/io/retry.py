"""Reads that survive a flaky object store.

:class:`RetryingStore` wraps any zarr store (as zarr-python's own
``WrapperStore`` subclasses do, so code keeps depending on the store
abstraction): a read that fails with a *transient* error (a timeout, a dropped
connection, an ``OSError`` such as an S3 ``503 SlowDown``) is retried with
exponential back-off and jitter; when the attempts are spent, or the error is
*permanent* (access denied, anything that is not an ``OSError``), it becomes a
:class:`~genepert_scale.errors.StoreError` that names the URL and the key.
A missing key is not an error here: the wrapped store answers ``None`` and zarr
reads the fill value, as without the wrapper.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from zarr.abc.buffer import Buffer, BufferPrototype
from zarr.abc.store import ByteRequest, Store
from zarr.storage import WrapperStore

from ..errors import StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``OSError`` subclasses that retrying cannot cure.
PERMANENT_OS_ERRORS: tuple[type[OSError], ...] = (
    PermissionError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a read is retried.

    Attributes
    ----------
    attempts
        Tries in all (the first one included).
    initial_delay
        Seconds before the first retry; each further retry waits ``factor``
        times longer, at most ``max_delay``, times a random jitter in [0.5, 1.5).
    factor, max_delay
        See ``initial_delay``.
    """

    attempts: int = 5
    initial_delay: float = 0.2
    factor: float = 2.0
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be at least 1, got {self.attempts}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        base = min(self.initial_delay * self.factor**retry, self.max_delay)
        return base * (0.5 + random.random())


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` may go away when the read is tried again."""
    return isinstance(err, OSError) and not isinstance(err, PERMANENT_OS_ERRORS)


class RetryingStore(WrapperStore[Store]):
    """A zarr store whose reads are retried on transient errors.

    Parameters
    ----------
    store
        The store to wrap.
    url
        Where the store lives, for messages.
    policy
        Attempts and back-off.
    """

    def __init__(self, store: Store, *, url: str = "", policy: RetryPolicy = RetryPolicy()):
        super().__init__(store)
        self.url = url or str(store)
        self.policy = policy

    def _with_store(self, store: Store) -> RetryingStore:
        return type(self)(store, url=self.url, policy=self.policy)

    def __repr__(self) -> str:
        return f"RetryingStore({self.url!r}, {self.policy})"

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Await ``call()`` until it succeeds, retrying transient errors."""
        attempt = 0
        while True:
            try:
                return await call()
            except Exception as err:
                attempt += 1
                if not is_transient(err):
                    raise StoreError(
                        f"reading {self.url} key {what!r} failed permanently "
                        f"({type(err).__name__}: {err}); check the URL, the credentials "
                        "and the storage options"
                    ) from err
                if attempt >= self.policy.attempts:
                    raise StoreError(
                        f"reading {self.url} key {what!r} failed {attempt} times "
                        f"({type(err).__name__}: {err}); the store is unreachable "
                        "or overloaded, try again later"
                    ) from err
                delay = self.policy.delay(attempt - 1)
                log.warning(
                    "transient error reading %s key %r (%s: %s); retry %d of %d in %.1f s",
                    self.url, what, type(err).__name__, err, attempt,
                    self.policy.attempts - 1, delay,
                )
                await asyncio.sleep(delay)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        return await self._retry(key, lambda: self._store.get(key, prototype, byte_range))

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        keys = ", ".join(sorted({key for key, _ in key_ranges}))
        return await self._retry(
            keys, lambda: self._store.get_partial_values(prototype, key_ranges)
        )

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)
