"""Telling that a million cell names differ without reading them as strings.

Opening a screen checks that no two cells share a name
(:func:`.validate.check_unique_names`). Read as strings and sorted, the names
of a million cells take 0.6–0.8 s, all of it before the pass can start (2
vCPUs). Where they are stored as zarr variable-length UTF-8 (anndata's layout
for ``obs`` and ``var`` names), :func:`distinct_by_hash` instead hashes each
chunk's serialized bytes name by name in a compiled loop
(:func:`vlen_utf8_hashes`) and sorts the 64-bit hashes. Names whose hashes
all differ are all different; if two hashes are equal (a repeated name, or
once in a blue moon two names that collide), it answers ``False`` and the
caller reads the names and compares them exactly, which also names the
duplicates. Any other layout, a chunk that is missing, does not decode or
does not parse, or no numba: also ``False``, and the exact check reads the
names through zarr, under the store's own rules for missing chunks, and
reports what is wrong. The hashes do not check that names are valid UTF-8:
nothing in a pass reads cell names.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from ..pp import kernels
from ..pp._numba_kernels import jit
from .chunks import ChunkedVector
from ..errors import StoreError

#: 64-bit FNV-1a: a name's hash starts at the offset basis; each byte is
#: XORed in, then multiplied by the prime (wrapping around).
FNV_OFFSET_BASIS = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


@jit
def _uint32_at(serialized, position):
    # a little-endian uint32 (vlen-utf8's counts and lengths)
    return (np.int64(serialized[position]) | np.int64(serialized[position + 1]) << 8
            | np.int64(serialized[position + 2]) << 16 | np.int64(serialized[position + 3]) << 24)


@jit
def vlen_utf8_hashes(serialized, count, out):
    """Hash the first ``out.size`` of the ``count`` names of a chunk
    serialized by the ``vlen-utf8`` codec into ``out`` (FNV-1a of each
    name's UTF-8 bytes).

    The serialized chunk is a little-endian ``uint32`` count of its names, then
    for each name its length in bytes (``uint32``) and its bytes. Returns
    ``False`` (``out`` then undefined) unless it holds exactly ``count`` names
    that end exactly where it ends. Whether the bytes are valid UTF-8 is not
    checked.
    """
    size = serialized.size
    if size < 4 or _uint32_at(serialized, 0) != count or out.size > count:
        return False
    position = 4
    for item in range(count):
        if position + 4 > size:
            return False
        stop = position + 4 + _uint32_at(serialized, position)
        if stop > size:
            return False
        if item < out.size:
            value = FNV_OFFSET_BASIS
            for k in range(position + 4, stop):
                value = (value ^ np.uint64(serialized[k])) * FNV_PRIME
            out[item] = value
        position = stop
    return position == size


def distinct_by_hash(array: Any, source: str) -> bool:
    """Whether the names in the 1-D string ``array`` are certainly all
    different, told from their hashes (see the module's notes).

    Parameters
    ----------
    array
        A zarr array of names (an AnnData dataframe's index); anything else
        (an h5py dataset, a categorical index stored as a group) answers
        ``False``.
    source
        Path or URL of the store, for messages about its chunks.

    Returns
    -------
    bool
        ``True`` if every name's hash differs; ``False`` if two are equal or
        the names could not be hashed here (a layout numcodecs cannot decode,
        a chunk that is missing, does not decode or does not parse): compare
        the names themselves, read by zarr under the store's own rules, which
        also report what is wrong with a chunk.
    """
    if not kernels.USE_NUMBA or not isinstance(array, zarr.Array):
        return False
    reader = ChunkedVector.of(array, source, serializer="vlen-utf8")
    if reader is None:
        return False
    size = reader.chunk_size
    hashes = np.empty(array.shape[0], np.uint64)
    try:
        for index, serialized in enumerate(reader.serialized_chunks()):
            if not vlen_utf8_hashes(serialized, size, hashes[index * size : (index + 1) * size]):
                return False
    except StoreError:
        return False
    hashes.sort()
    return not np.any(hashes[1:] == hashes[:-1])
