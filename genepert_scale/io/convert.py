"""Streaming an ``.h5ad`` into a chunked AnnData zarr store without loading X.

Row-major (CSR) and dense matrices are copied in row blocks. Column-major
(CSC) ones — common from R pipelines — are transposed to CSR within a memory
budget (:func:`csc_to_csr`): the entries per row are counted in one pass over
column slabs, then rows are filled slab by slab, each from one pass over the
column slabs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import h5py
import numpy as np
import scipy.sparse as sp
import zarr
from anndata.io import read_elem, sparse_dataset

from ..cluster import _local_memory
from ..errors import ParameterError, StoreError
from ..validate import memory_bytes
from .integrity import complete_chunks, mark_complete
from .ordered import threaded_in_order
from .screen import block_rows_for, stored_values
from .store import (
    ANNDATA_ATTRS,
    CsrAppender,
    atomic_output,
    quiet_zarr_warnings,
    write_element,
    zarr_store,
)

log = logging.getLogger(__name__)


def convert_h5ad(
    source: str,
    out: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    block_rows: int | None = None,
    memory_limit: int | str | None = None,
) -> str:
    """Stream ``source`` (``.h5ad``) into the AnnData zarr store ``out``.

    The cell matrices — ``X``, every ``layers/*`` and ``raw/X`` — are copied
    in CSR row blocks (dense ones are sparsified block by block; CSC ones are
    transposed by :func:`csc_to_csr`) with our codec and chunking, so none is
    ever loaded whole; every other element (``obs``, ``var``, ``uns``,
    ``obsm``, …) is copied with anndata's element reader and writer.

    Parameters
    ----------
    source
        Local ``.h5ad`` file.
    out
        Output zarr store (path or URL).
    overwrite
        Replace an existing ``out``.
    storage_options
        fsspec options for ``out``.
    block_rows
        Rows per block copied from a CSR or dense matrix (default: from the
        matrix and ``memory_limit``).
    memory_limit
        Bytes (or a string such as ``"2GiB"``) the conversion may use; by
        default this machine's memory (or its container's limit).
    """
    limit = memory_bytes(memory_limit)
    try:
        h5 = h5py.File(source, "r")
    except OSError as err:
        raise StoreError(f"{source} is not a readable .h5ad file: {err}") from err
    with (
        h5,
        atomic_output(out, overwrite=overwrite, storage_options=storage_options) as tmp,
        complete_chunks(),
    ):
        if "X" not in h5:
            raise StoreError(f"{source} has no X; nothing to convert")
        root = zarr.open_group(zarr_store(tmp, storage_options, mode="w"), mode="w", zarr_format=3)
        root.attrs.update(ANNDATA_ATTRS)
        mark_complete(root)
        _copy_elements(h5, root, Budget(block_rows, limit), f"{source}: ")
        with quiet_zarr_warnings():
            zarr.consolidate_metadata(root.store)
    log.info("converted %s -> %s", source, out)
    return out


@dataclass(frozen=True)
class Budget:
    """How a cell matrix may be read: rows per CSR block (``None``: sized from
    the memory), and the memory limit (``None``: this machine's)."""

    block_rows: int | None
    memory_limit: int | None


def _copy_elements(h5: h5py.Group, root: zarr.Group, budget: Budget, source: str) -> None:
    """Copy an AnnData group: cell matrices streamed, the rest element by element."""
    with quiet_zarr_warnings():
        for key in h5:
            element = h5[key]
            if key == "X":
                _copy_x(element, root.create_group(key), budget, f"{source}X")
            elif key == "layers" and isinstance(element, h5py.Group):
                layers = _group_like(element, root, key)
                for name in element:
                    _copy_x(element[name], layers.create_group(name), budget,
                            f"{source}layers/{name}")
            elif key == "raw" and isinstance(element, h5py.Group):
                _copy_elements(element, _group_like(element, root, key), budget, f"{source}raw/")
            else:
                write_element(root, key, read_elem(element))


def _group_like(h5: h5py.Group, parent: zarr.Group, key: str) -> zarr.Group:
    """A zarr group with the encoding attributes of an h5py group."""
    group = parent.create_group(key)
    group.attrs.update({k: str(v) for k, v in h5.attrs.items()})
    return group


def _value_dtype(x) -> str:
    """The dtype we store a matrix's values in: float32, or float64 for wider input."""
    stored = x["data"].dtype if isinstance(x, h5py.Group) else x.dtype
    return "float32" if np.dtype(stored).itemsize <= 4 else "float64"


def _copy_x(x, group: zarr.Group, budget: Budget, source: str) -> None:
    encoding = x.attrs.get("encoding-type", "array")
    if encoding == "csc_matrix":
        csc_to_csr(x, CsrAppender(group, int(x.attrs["shape"][1]), _value_dtype(x)),
                   memory_limit=budget.memory_limit, source=source)
        return
    matrix = sparse_dataset(x) if isinstance(x, h5py.Group) else x
    n_obs, n_vars = matrix.shape
    appender = CsrAppender(group, n_vars, _value_dtype(x))
    # blocks in flight: two read ahead and the one being written
    rows = budget.block_rows or block_rows_for(n_obs, stored_values(x, encoding),
                                               memory_limit=budget.memory_limit, threads=3)

    def read(start: int) -> sp.csr_array:
        return sp.csr_array(matrix[start : start + rows])

    # the next block is read (h5py releases the GIL) while this one is compressed and written
    with threaded_in_order(read, range(0, n_obs, rows), threads=1, ahead=2,
                           name="convert-read") as blocks:
        for block in blocks:
            appender.append(block)
            log.info("convert: %d/%d cells", appender.n_rows, n_obs)


#: Share of the memory limit the CSC → CSR transposition may use (the rest:
#: the interpreter, h5py's and zarr's buffers while a row slab is written).
CSC_MEMORY_SHARE = 0.6
#: Bytes per row held throughout: the CSR ``indptr``, and the counts,
#: cursors and offsets of a row slab.
CSC_BYTES_PER_ROW = 32
#: Bytes per stored value of a row slab (the value, up to 8 bytes, and its column).
ROW_SLAB_BYTES_PER_VALUE = 12
#: Bytes per stored value of a column slab while its entries are sorted into a
#: row slab: the values and row indices as stored, and the index arrays of the
#: entries picked.
COLUMN_SLAB_BYTES_PER_VALUE = 64
#: Stored values per column slab at most: large enough that reads are long,
#: small enough to leave the budget to the row slab (fewer passes).
MAX_COLUMN_SLAB_VALUES = 4_000_000


@dataclass(frozen=True)
class SlabPlan:
    """Stored values per row slab and per column slab of :func:`csc_to_csr`."""

    row_values: int
    column_values: int

    @classmethod
    def within(cls, n_obs: int, memory_limit: int | None, source: str) -> SlabPlan:
        """The largest slabs that fit ``CSC_MEMORY_SHARE`` of ``memory_limit``
        (default: this machine's memory), beside the per-row arrays.

        Raises
        ------
        ParameterError
            If the per-row arrays alone do not fit.
        """
        limit = memory_limit or _local_memory()
        budget = int(limit * CSC_MEMORY_SHARE) - CSC_BYTES_PER_ROW * (n_obs + 1)
        if budget <= 0:
            need = int(2 * CSC_BYTES_PER_ROW * (n_obs + 1) / CSC_MEMORY_SHARE)
            raise ParameterError(
                f"{source}: --memory-limit {limit} bytes is too small to transpose "
                f"{n_obs} rows from CSC to CSR; give at least {need} bytes"
            )
        column_values = min(budget // 4 // COLUMN_SLAB_BYTES_PER_VALUE, MAX_COLUMN_SLAB_VALUES)
        row_budget = budget - column_values * COLUMN_SLAB_BYTES_PER_VALUE
        return cls(max(row_budget // ROW_SLAB_BYTES_PER_VALUE, 1), max(column_values, 1))


def slabs(offsets: np.ndarray, max_values: int) -> list[tuple[int, int]]:
    """Split the items of a CSR/CSC ``indptr`` (``offsets``) into runs
    ``[start, stop)`` of at most ``max_values`` stored values (or one item
    that alone holds more)."""
    bounds, start, n = [], 0, len(offsets) - 1
    while start < n:
        stop = int(np.searchsorted(offsets, offsets[start] + max_values, side="right")) - 1
        stop = min(max(stop, start + 1), n)
        bounds.append((start, stop))
        start = stop
    return bounds


def csc_to_csr(x: h5py.Group, appender: CsrAppender, *, memory_limit: int | None = None,
               source: str = "X") -> int:
    """Write the CSC matrix ``x`` (an AnnData ``csc_matrix`` group) as CSR rows
    through ``appender``, within ``memory_limit``; return the row slabs.

    Notes
    -----
    One pass over column slabs counts the entries of every row (their
    cumulative sum is the CSR ``indptr``). Then for each row slab (rows holding
    at most :attr:`SlabPlan.row_values` entries) one pass over the column
    slabs picks the entries of those rows and puts each at its row's cursor;
    columns come in increasing order, so each row's entries end up ordered by
    column, as scipy's ``.tocsr()`` orders them (duplicates kept, in place).
    The matrix is read once per row slab; memory is the row slab, one column
    slab and a few integers per row.
    """
    n_obs, n_vars = (int(v) for v in x.attrs["shape"])
    csc = Csc(_csc_indptr(x, n_vars, source), x["indices"], x["data"])
    plan = SlabPlan.within(n_obs, memory_limit, source)
    columns = slabs(csc.indptr, plan.column_values)
    row_ptr = np.zeros(n_obs + 1, dtype=np.int64)
    for lo, hi in ((csc.indptr[a], csc.indptr[b]) for a, b in columns):
        rows = csc.indices[lo:hi]
        _check_rows(rows, n_obs, source)
        row_ptr[1:] += np.bincount(rows, minlength=n_obs)
    np.cumsum(row_ptr, out=row_ptr)
    row_slabs = slabs(row_ptr, plan.row_values)
    log.info("convert %s (CSC -> CSR): %d cells in %d row slabs, each read from %d column slabs",
             source, n_obs, len(row_slabs), len(columns))
    for first, last in row_slabs:
        data, indices = _fill_rows(csc, columns, row_ptr, first, last,
                                   appender.group["data"].dtype)
        appender.append_parts(data, indices, row_ptr[first : last + 1] - row_ptr[first])
        log.info("convert: %d/%d cells", appender.n_rows, n_obs)
    return len(row_slabs)


class Csc(NamedTuple):
    """A stored CSC matrix: ``indptr`` in memory, the other two read by slices."""

    indptr: np.ndarray
    indices: h5py.Dataset
    data: h5py.Dataset


def _fill_rows(csc: Csc, columns: list[tuple[int, int]], row_ptr: np.ndarray, first: int,
               last: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The CSR values and column indices of rows ``[first, last)``, from one
    pass over the column slabs."""
    base = row_ptr[first]
    data = np.empty(row_ptr[last] - base, dtype=dtype)
    indices = np.empty(row_ptr[last] - base, dtype=np.int32)
    cursor = row_ptr[first:last] - base
    for a, b in columns:
        lo, hi = csc.indptr[a], csc.indptr[b]
        rows = csc.indices[lo:hi]
        picked = np.flatnonzero((rows >= first) & (rows < last))
        if not len(picked):
            continue
        row = rows[picked] - first
        column = np.searchsorted(csc.indptr[a : b + 1] - lo, picked, side="right") - 1 + a
        order = np.argsort(row, kind="stable")  # by row; within a row, by column
        row = row[order]
        per_row = np.bincount(row, minlength=last - first)
        rank = np.arange(len(row)) - (np.cumsum(per_row) - per_row)[row]
        at = cursor[row] + rank
        data[at] = csc.data[lo:hi][picked[order]]
        indices[at] = column[order]
        cursor += per_row
    return data, indices


def _csc_indptr(x: h5py.Group, n_vars: int, source: str) -> np.ndarray:
    """``X/indptr`` of a CSC matrix (one offset per gene plus one), checked."""
    missing = [k for k in ("data", "indices", "indptr") if k not in x]
    if missing:
        raise StoreError(f"{source} is a CSC matrix without {', '.join(missing)}; "
                         "the file is incomplete, write it again")
    col_ptr = np.asarray(x["indptr"][:], dtype=np.int64)
    nnz = int(col_ptr[-1]) if len(col_ptr) else 0
    if (len(col_ptr) != n_vars + 1 or np.any(np.diff(col_ptr) < 0)
            or min(x["indices"].shape[0], x["data"].shape[0]) < nnz):
        raise StoreError(
            f"{source}: CSC indptr ({len(col_ptr)} offsets, ending at {nnz}) does not fit "
            f"{n_vars} genes and {x['indices'].shape[0]} stored values; the file is "
            "inconsistent, write it again"
        )
    return col_ptr


def _check_rows(rows: np.ndarray, n_obs: int, source: str) -> None:
    if len(rows) and (rows.min() < 0 or rows.max() >= n_obs):
        raise StoreError(f"{source}: CSC row indices outside 0..{n_obs - 1}; the file is "
                         "corrupt, write it again")
