"""Store integrity: missing chunks are errors, corrupt chunks are named.

zarr fills a chunk that is absent from the store with the array's
``fill_value`` — a truncated upload or a lost object reads as zeros, silently.
:class:`StrictStore` wraps any zarr store and raises :class:`StoreError`
instead, for the arrays where an absent chunk cannot be legitimate:

- every array under ``X`` (an all-``fill_value`` chunk of CSR ``data``,
  ``indices`` or ``indptr``, or of a count matrix, does not occur in real data;
  a dense ``X`` written by another tool with ``write_empty_chunks=False`` and a
  chunk of cells that are all zero would be reported, and must be rewritten);
- every array of stores we wrote, which are written with all chunks present
  and marked so (:data:`COMPLETE_CHUNKS_ATTR`): AnnData screens under
  :func:`complete_chunks` and :func:`mark_complete`, xarray outputs (pseudo-bulk,
  models, predictions) by :func:`.store.write_dataset`.

A chunk that is present but cannot be decoded (checksum mismatch from the
CRC32C codec of stores we write, a decompression error elsewhere) fails inside
zarr without naming the chunk; :func:`named_chunk_errors` finds and names it
after the fact, so the steady state pays nothing. Stores without a checksum
codec can decode damaged bytes into wrong numbers; only a checksum prevents that.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import zarr
from zarr.abc.buffer import Buffer, BufferPrototype
from zarr.abc.store import ByteRequest, Store
from zarr.storage import WrapperStore

from ..errors import GenePertInputError, StoreError

log = logging.getLogger(__name__)

#: Root attribute of stores written with every chunk present.
COMPLETE_CHUNKS_ATTR = "genepert_scale_complete_chunks"

_METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})


def is_chunk_key(key: str) -> bool:
    """Whether ``key`` names a chunk (not a metadata document)."""
    return key.rsplit("/", 1)[-1] not in _METADATA_NAMES


class StrictStore(WrapperStore[Store]):
    """A zarr store that raises on missing chunks below given prefixes.

    Parameters
    ----------
    store
        The wrapped store.
    strict_prefixes
        Key prefixes (``"X/"``; ``""`` for every key) whose missing chunks are errors.
    source
        Path or URL of the store, for messages.
    """

    def __init__(self, store: Store, strict_prefixes: tuple[str, ...] = ("X/",), source: str = ""):
        super().__init__(store)
        self.strict_prefixes = strict_prefixes
        self.source = source

    def _with_store(self, store: Store) -> StrictStore:
        return type(self)(store, self.strict_prefixes, self.source)

    def _check(self, key: str, value: Buffer | None) -> Buffer | None:
        if value is None and is_chunk_key(key) and key.startswith(self.strict_prefixes):
            raise missing_chunk_error(self.source, key)
        return value

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        return self._check(key, await self._store.get(key, prototype, byte_range))

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        return [self._check(key, value) for (key, _), value in zip(key_ranges, values)]


def strict_store(store: Store, source: str) -> StrictStore:
    """``store`` behind a :class:`StrictStore`.

    Arrays under ``X`` are always strict; in a store marked with
    :data:`COMPLETE_CHUNKS_ATTR` (every store we write) all arrays are.
    """
    complete = zarr.open_group(store, mode="r").attrs.get(COMPLETE_CHUNKS_ATTR)
    return StrictStore(store, ("",) if complete else ("X/",), source)


def strict_group(store: Store, source: str) -> zarr.Group:
    """Open the root group of ``store`` behind :func:`strict_store` (its
    metadata is read a second time only for a store marked complete)."""
    root = zarr.open_group(StrictStore(store, ("X/",), source), mode="r")
    if root.attrs.get(COMPLETE_CHUNKS_ATTR):
        root = zarr.open_group(StrictStore(store, ("",), source), mode="r")
    return root


@contextlib.contextmanager
def complete_chunks() -> Iterator[None]:
    """Write every chunk, even one equal to the fill value, inside this context."""
    with zarr.config.set({"array.write_empty_chunks": True}):
        yield


def mark_complete(root: zarr.Group) -> None:
    """Mark a store written under :func:`complete_chunks` (all of its arrays become strict)."""
    root.attrs[COMPLETE_CHUNKS_ATTR] = True


def _arrays(node: Any, name: str) -> Iterator[tuple[str, Any]]:
    if hasattr(node, "keys"):
        for key in sorted(node.keys()):
            yield from _arrays(node[key], f"{name}/{key}")
    else:
        yield name, node


def find_bad_chunk(
    group: Any, source: str, elements: tuple[str, ...] = ("X",)
) -> GenePertInputError | None:
    """Read every chunk of the arrays below ``elements``; name the first bad one.

    Works on zarr and h5py groups. Returns the error to raise, or ``None`` when
    every chunk decodes.
    """
    try:
        arrays = [item for element in elements if element in group
                  for item in _arrays(group[element], element)]
    except GenePertInputError as err:
        return err
    except Exception as err:  # noqa: BLE001 - unreadable metadata is the finding
        return StoreError(
            f"{source}: the metadata below {', '.join(elements)} cannot be read "
            f"({type(err).__name__}: {err}); the store is corrupt. Copy or write it again"
        )
    return first_bad_chunk(((name, array, 0, None) for name, array in arrays), source)


def first_bad_chunk(
    spans: Iterable[tuple[str, Any, int, int | None]], source: str
) -> GenePertInputError | None:
    """Read the chunks covering each ``(name, array, start, stop)`` span
    (``stop=None``: to the end) once; name the first that fails, or ``None``."""
    for name, array, first, last in spans:
        step = (getattr(array, "chunks", None) or (65_536,))[0] if array.ndim else 1
        end = max(array.shape[:1] or (1,)) if last is None else last
        for start in range(first - first % step, end, step):
            try:
                np.asarray(array[start : start + step] if array.ndim else array[()])
            except GenePertInputError as err:
                return err
            except Exception as err:  # noqa: BLE001 - any decode failure names the chunk
                return undecodable_chunk_error(source, name, start // step, start, err)
    return None


def missing_chunk_error(source: str, key: str) -> StoreError:
    """The error for chunk ``key`` of a strict array, absent from the store at ``source``."""
    rooted = f"/{key}"  # a root array's chunk keys have no array path
    array, _, chunk = rooted.rpartition("/c/") if "/c/" in rooted else rooted.rpartition("/")
    array = array.removeprefix("/")
    return StoreError(
        f"{source}: chunk {chunk!r} of array {array!r} is missing (key {key!r}); "
        "the store is incomplete (interrupted upload or copy?). Copy or write it again; "
        "its fill value (zeros, empty names) is never read in its place"
    )


def undecodable_chunk_error(source: str, name: str, index: int, first: int,
                            err: Exception) -> StoreError:
    """The error for chunk ``index`` (from element ``first`` on) of array
    ``name``, present but failing to decode with ``err``."""
    return StoreError(
        f"{source}: chunk {index} of array {name!r} (first index {first}) "
        f"cannot be decoded ({type(err).__name__}: {err}); the store is corrupt. "
        "Copy or write it again"
    )


#: How reading a damaged chunk fails inside zarr, h5py and the codecs.
DECODE_ERRORS = (OSError, ValueError, RuntimeError, TypeError)
#: How opening a missing, foreign or damaged zarr group fails inside zarr (a
#: damaged ``zarr.json`` may still be JSON, with a misspelt key: a TypeError).
METADATA_ERRORS = (FileNotFoundError, KeyError, ValueError, TypeError)


@contextlib.contextmanager
def named_chunk_errors(
    group: Any, source: str, elements: tuple[str, ...] = ("X",)
) -> Iterator[None]:
    """Turn a failure while reading ``elements`` into a :class:`StoreError` naming the chunk.

    On a read or decode failure (:data:`DECODE_ERRORS`) inside the context
    that is not already named, every chunk below ``elements`` is read once
    (:func:`find_bad_chunk`); see :func:`naming_bad_chunks`.
    """
    with naming_bad_chunks(lambda: find_bad_chunk(group, source, elements), source,
                           ", ".join(elements)):
        yield


@contextlib.contextmanager
def naming_bad_chunks(
    find: Callable[[], GenePertInputError | None], source: str, what: str
) -> Iterator[None]:
    """On a read or decode failure (:data:`DECODE_ERRORS`) inside the context,
    call ``find`` (which reads the chunks of ``what`` once); if it names a bad
    chunk, raise that error from the original one, otherwise let the original
    exception propagate unchanged. Errors already named pass through."""
    try:
        yield
    except GenePertInputError:
        raise
    except DECODE_ERRORS as err:
        log.warning("%s: reading failed (%s); scanning %s for a bad chunk",
                    source, type(err).__name__, what)
        bad = find()
        if bad is None:
            raise
        raise bad from err
