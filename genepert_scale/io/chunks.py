"""Reading a range of a 1-D zarr array chunk by chunk, straight into a buffer.

zarr-python reads a slice through its asynchronous codec pipeline: each chunk
hops to zarr's event loop and a worker thread, is decoded into a new buffer
and copied into the output. On a local million-cell screen that machinery
costs more than the decompression itself (``benchmarks/``, 1M cells on 2
cores: decoding every chunk of ``X`` once takes 2.4 s through zarr's reads,
1.0 s here, process start included).

:class:`ChunkedVector` serves the arrays of a CSR ``X`` (1-D, regular chunks,
unsharded, little-endian, numcodecs compressors): it fetches the chunks'
bytes — local files read by the calling thread; from any other store (object
stores, memory) through the zarr store, concurrently, with its retries and
missing-chunk errors — and
decodes them with numcodecs, a Blosc chunk directly into the caller's array.
It also hands over the serialized bytes of a string array's chunks, from
which :mod:`.names` checks a million cell names without making them into
strings. Any other layout is left to zarr (:meth:`ChunkedVector.of` returns
``None``).
A missing chunk is always an error here, as for every array of ``X``
(:mod:`.integrity`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numcodecs
import numpy as np
import zarr
from numcodecs.abc import Codec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.sync import sync
from zarr.storage import LocalStore

from ..errors import StoreError
from .integrity import DECODE_ERRORS, StrictStore, missing_chunk_error, undecodable_chunk_error
from .retry import RetryingStore

#: zarr v3 bytes-to-bytes codecs and the numcodecs codec that decodes each
#: (decoding needs none of their settings).
V3_DECODERS = {
    "blosc": numcodecs.Blosc,
    "zstd": numcodecs.Zstd,
    "gzip": numcodecs.GZip,
    "crc32c": lambda: numcodecs.CRC32C(location="end"),
}


Serializer = Literal["bytes", "vlen-utf8"]


def decoders(array: Any, serializer: Serializer = "bytes") -> tuple[Codec, ...] | None:
    """The numcodecs codecs that decode one stored chunk of ``array`` to the
    bytes its ``serializer`` wrote, in the order they apply, or ``None`` if its
    layout needs zarr's own pipeline.

    ``serializer`` is ``"bytes"`` (numbers, in this machine's byte order: the
    chunk decodes to the values) or ``"vlen-utf8"`` (strings, as anndata
    stores ``obs`` and ``var`` names: a count, then each string's length
    and UTF-8 bytes; :func:`.names.vlen_utf8_hashes` reads it).
    """
    meta = array.metadata
    if array.ndim != 1 or not isinstance(meta.chunk_grid, RegularChunkGrid):
        return None
    if serializer == "bytes" and _foreign_byte_order(array.dtype):
        return None
    if meta.zarr_format == 2:
        filters = [codec.codec_id for codec in meta.filters or ()]
        if filters != ([] if serializer == "bytes" else [serializer]):
            return None
        return () if meta.compressor is None else (meta.compressor,)
    first, *compressors = (codec.to_dict() for codec in meta.codecs)
    config = first.get("configuration") or {}
    if first["name"] != serializer or config.get("endian", sys.byteorder) != sys.byteorder:
        return None  # sharded, array-to-array codecs, or a foreign byte order
    if any(codec["name"] not in V3_DECODERS for codec in compressors):
        return None
    return tuple(V3_DECODERS[codec["name"]]() for codec in reversed(compressors))


def _foreign_byte_order(dtype: Any) -> bool:
    dtype = np.dtype(dtype)
    return dtype.newbyteorder("=").str != dtype.str


class BlockBuffers:
    """Arrays that blocks are read into, reused from block to block.

    Reading into fresh arrays costs a page fault per 4 KiB page (large arrays
    are new memory maps each time): about a fifth of a pass's CPU time on a
    local store. One set serves one task at a time (:meth:`.screen.BufferPool.lease`).
    """

    #: Head-room when an array grows, so that slightly larger blocks do not
    #: each reallocate it.
    GROWTH = 1.25

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int, dtype: np.dtype) -> np.ndarray:
        """A writable array of ``size`` elements of ``dtype``, kept under ``name``."""
        array = self._arrays.get(name)
        if array is None or array.dtype != dtype or array.size < size:
            grown = size if array is None else int(size * self.GROWTH)
            array = self._arrays[name] = np.empty(grown, dtype)
        return array[:size]


def local_root(store: Any) -> str | None:
    """The directory of a local store, seen through our own wrappers (a
    local read needs no retries; a missing chunk is an error here too), or
    ``None`` for any other store, whose reads go through the store."""
    while isinstance(store, StrictStore | RetryingStore):
        store = store._store  # zarr's documented attribute of a WrapperStore
    return str(store.root) if isinstance(store, LocalStore) else None


@dataclass(frozen=True)
class ChunkedVector:
    """A 1-D zarr array read by decoding its chunks into the caller's array.

    Attributes
    ----------
    array
        The zarr array (for its metadata and, on a remote store, its store).
    codecs
        :func:`decoders` of the array.
    local_root
        The directory of a local store (:func:`local_root`), ``None`` for
        any other.
    source
        Path or URL of the store, for messages.
    """

    array: Any
    codecs: tuple[Codec, ...]
    local_root: str | None
    source: str

    @classmethod
    def of(cls, array: Any, source: str, serializer: Serializer = "bytes") -> ChunkedVector | None:
        """The reader of ``array`` in the store at ``source``, or ``None``
        when its layout is one zarr must decode (see :func:`decoders`)."""
        codecs = decoders(array, serializer)
        return None if codecs is None else cls(array, codecs, local_root(array.store), source)

    @property
    def chunk_size(self) -> int:
        return int(self.array.chunks[0])

    def read(self, first: int, last: int, out: np.ndarray, scratch: np.ndarray) -> None:
        """Decode values ``first:last`` into ``out`` (of that length).

        Chunks inside the range decode straight into ``out``; the (at most
        two) that it cuts decode into ``scratch``, one chunk long, and are
        copied from there. A range beyond the array's end is an error (the
        stored last chunk is padded to full size: it would decode).
        """
        if not 0 <= first <= last <= self.array.shape[0]:
            raise StoreError(
                f"{self.source}: values {first}-{last} of array {self.array.path!r} were asked "
                f"for, it holds {self.array.shape[0]}; the store is inconsistent (X's indptr "
                "and its data or indices disagree). Write it again"
            )
        size = self.chunk_size
        indices = range(first // size, -(-last // size))
        for index, raw in zip(indices, self._fetch(indices)):
            start, stop = index * size, (index + 1) * size
            lo, hi = max(start, first), min(stop, last)
            whole = lo == start and hi == stop
            self._decode(index, raw, out[lo - first : hi - first] if whole else scratch)
            if not whole:
                out[lo - first : hi - first] = scratch[lo - start : hi - start]

    def read_into(self, first: int, last: int, buffers: BlockBuffers) -> np.ndarray:
        """Values ``first:last``, decoded into (and valid until the next read
        into) ``buffers``, which also hold the scratch chunk of :meth:`read`."""
        path, dtype = self.array.path, self.array.dtype
        out = buffers.get(path, last - first, dtype)
        self.read(first, last, out, buffers.get(f"{path} chunk", self.chunk_size, dtype))
        return out

    def serialized_chunks(self) -> Iterator[np.ndarray]:
        """Every chunk's bytes as its serializer wrote them (``uint8``), in
        order: for a ``vlen-utf8`` array, what :func:`.names.vlen_utf8_hashes`
        reads. zarr stores the last chunk whole, padded with the fill value."""
        indices = range(-(-self.array.shape[0] // self.chunk_size))
        for index, raw in zip(indices, self._fetch(indices)):
            with self._naming_errors(index):
                for codec in self.codecs:
                    raw = codec.decode(raw)
            yield np.frombuffer(raw, np.uint8)

    def _key(self, index: int) -> str:
        chunk = self.array.metadata.encode_chunk_key((index,))
        return f"{self.array.path}/{chunk}" if self.array.path else chunk

    def _fetch(self, indices: Sequence[int]) -> Iterator[Any]:
        """The stored bytes of chunks ``indices``: a local store's read one by
        one as they are decoded (a read that fails is tried again through the
        store, with its retries), any other store's fetched concurrently."""
        if self.local_root is None:
            yield from sync(self._fetch_through_store([self._key(i) for i in indices]))
            return
        for index in indices:
            key = self._key(index)
            try:
                with open(os.path.join(self.local_root, key), "rb") as file:
                    yield file.read()
            except FileNotFoundError:
                raise missing_chunk_error(self.source, key) from None
            except OSError:
                yield from sync(self._fetch_through_store([key]))

    async def _fetch_through_store(self, keys: list[str]) -> list[Any]:
        """The chunks ``keys`` from the zarr store, at most zarr's
        ``async.concurrency`` requests at a time."""
        store, prototype = self.array.store, default_buffer_prototype()
        limit = asyncio.Semaphore(zarr.config.get("async.concurrency"))

        async def get(key: str) -> Any:
            async with limit:
                value = await store.get(key, prototype)
            if value is None:  # a store that reads missing chunks as absent
                raise missing_chunk_error(self.source, key)
            return value.as_numpy_array()

        return await asyncio.gather(*(get(key) for key in keys))

    def _decode(self, index: int, raw: Any, dest: np.ndarray) -> None:
        """Decode chunk ``index`` from ``raw`` into ``dest`` (one chunk long)."""
        with self._naming_errors(index):
            *checks, compressor = self.codecs or (None,)
            for codec in checks:
                raw = codec.decode(raw)
            _decompress_into(compressor, raw, dest)

    @contextlib.contextmanager
    def _naming_errors(self, index: int) -> Iterator[None]:
        """Turn a failure to decode chunk ``index`` into a :class:`.StoreError` naming it."""
        try:
            yield
        except DECODE_ERRORS as err:
            raise undecodable_chunk_error(self.source, self.array.path, index,
                                          index * self.chunk_size, err) from err


def _decompress_into(codec: Codec | None, raw: Any, dest: np.ndarray) -> None:
    """Decode ``raw`` with ``codec`` (``None``: stored as is) into ``dest``,
    checking that it holds exactly one chunk."""
    if isinstance(codec, numcodecs.Blosc):
        # the decoded size is bytes 4-8 of the Blosc header; numcodecs only
        # checks that the destination is large enough
        nbytes = int.from_bytes(memoryview(raw)[4:8], "little")
        decoded = None
    else:
        decoded = np.frombuffer(raw if codec is None else codec.decode(raw), np.uint8)
        nbytes = decoded.nbytes
    if nbytes != dest.nbytes:
        raise ValueError(f"it decodes to {nbytes} bytes, a chunk has {dest.nbytes}")
    if decoded is None:
        codec.decode(raw, out=dest)
    else:
        dest.view(np.uint8)[:] = decoded
