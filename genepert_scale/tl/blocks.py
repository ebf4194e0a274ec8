"""Reading (perturbations × genes) arrays in blocks, within a memory budget.

The deltas of a pseudo-bulk can outgrow memory (100,000 perturbations ×
5,000 genes are 4 GB of float64), so the model code never holds them whole.
It reads rows by position a block at a time (:func:`position_blocks`,
:func:`read_rows`), gene slabs of every row (:func:`read_columns`), and
weighted sums of rows over the array's row chunks (:func:`weighted_sums`:
the kNN, matching-mean and additive baselines, and the true rows themselves,
are sparse weights over the rows). Arrays are numpy arrays, dask arrays
(only the chunks a block needs are read) or anything indexable by an array
of positions (:class:`.embeddings.Features` rows through ``FeatureRows``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import dask.array as da
import numpy as np
from dask.utils import parse_bytes
from scipy import sparse

from ..cluster import _local_memory

#: Perturbations per block of the streamed reads and statistics.
BLOCK_SIZE = 1024
#: Share of the memory budget that one block's working arrays may take.
BLOCK_MEMORY_SHARE = 0.4


def memory_budget(memory_limit: int | str | None = None) -> int:
    """Bytes a run may use: ``memory_limit`` (``"4GiB"`` or bytes), else this
    machine's memory (or its container's limit)."""
    if memory_limit in (None, "auto"):
        return _local_memory()
    return int(parse_bytes(memory_limit)) if isinstance(memory_limit, str) else int(memory_limit)


def block_items(bytes_each: int, memory_limit: int | str | None = None, *, at_least: int = 1) -> int:
    """How many items (rows, or gene columns) of ``bytes_each`` a block may
    hold: :data:`BLOCK_MEMORY_SHARE` of the budget, at least ``at_least``."""
    return max(at_least, int(memory_budget(memory_limit) * BLOCK_MEMORY_SHARE) // max(bytes_each, 1))


def position_blocks(positions: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """``positions`` cut into consecutive blocks of at most ``size``."""
    for start in range(0, len(positions), size):
        yield positions[start : start + size]


def read_rows(array: Any, index: np.ndarray | slice) -> np.ndarray:
    """``array[index]`` as float64 numpy (a dask array reads the chunks it needs)."""
    return np.asarray(array[index], dtype=np.float64)


def read_columns(array: Any, columns: slice) -> np.ndarray:
    """Every row of ``array`` over ``columns``, as float64 numpy."""
    return np.asarray(array[:, columns], dtype=np.float64)


def row_chunks(array: Any, size: int = BLOCK_SIZE) -> list[slice]:
    """Row ranges to read ``array`` by, of at least ``size`` rows (but the
    last): whole row chunks of a dask array, as many as make ``size`` (read
    together, they are decoded in parallel), else blocks of ``size``."""
    n = array.shape[0]
    if isinstance(array, da.Array):
        ends = np.cumsum(array.chunks[0])
        bounds = [0]
        for end in ends:
            if end - bounds[-1] >= size or end == n:
                bounds.append(int(end))
    else:
        bounds = [*range(0, n, size), n]
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


def weighted_sums(array: Any, weights: sparse.csr_array, size: int = BLOCK_SIZE) -> np.ndarray:
    """``weights @ array`` (weights: output rows × rows of ``array``), reading
    only the row chunks that some weight needs, one at a time.

    Memory: the output and one chunk (and the product of the output rows
    that chunk touches).
    """
    out = np.zeros((weights.shape[0], array.shape[1]))
    by_column = sparse.csc_array(weights)
    for rows in row_chunks(array, size):
        part = sparse.csr_array(by_column[:, rows])
        touched = np.flatnonzero(np.diff(part.indptr))
        if touched.size:
            out[touched] += part[touched] @ read_rows(array, rows)
    return out
