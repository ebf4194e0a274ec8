"""Opening a Perturb-seq screen lazily: an AnnData zarr store (local path or any
fsspec URL) or an ``.h5ad`` file.

``X`` becomes a dask array of CSR row blocks (anndata's lazy element reader);
``obs`` columns are read one at a time, on demand. Opening reads metadata only,
never a chunk of ``X``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import dask.array as da
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from anndata.experimental import read_elem_lazy
from anndata.io import read_elem
from dask.system import CPU_COUNT
from zarr.buffer.cpu import NDBuffer

from ..errors import GenePertInputError, LabelError, ParameterError, StoreError
from .codecs import zarrs_arrays
from .integrity import (
    METADATA_ERRORS, first_bad_chunk, named_chunk_errors, naming_bad_chunks, strict_group,
)
from .store import exists, is_url, zarr_store
from ..validate import check_case_collisions, check_unique_names, check_x_dtype

#: Default number of stored values (non-zeros) per row block of a pass: each
#: block adds every group's sums into the running (groups × genes) sums in one
#: sweep over them, so larger blocks mean fewer sweeps through memory
#: (measured, 1M cells × 2,000 groups on 2 cores, with the fold of the time:
#: 2M values per block 1.5x slower than 8M; 12M 0.15-0.2 s faster than 8M,
#: peak RSS 843 MiB. With the work-table fold, 8M, 12M and 20M ran alike,
#: 13.1-14.3 s, 8M using 60-90 MiB less; three alternating runs of each
#: with --block-rows, 2026-12-01).
TARGET_BLOCK_NNZ = 12_000_000
#: Bytes held per stored value of the block each thread is reading or
#: folding: the block (value + index, up to 8 bytes each) and zarr's decoded
#: chunks while it is assembled.
BYTES_PER_VALUE = 20
#: Share of the memory limit that blocks in flight may use (the rest: the
#: running group sums, the interpreter, the outputs).
BLOCK_MEMORY_SHARE = 0.4

@dataclass(frozen=True)
class Screen:
    """A lazily opened screen.

    Attributes
    ----------
    source
        The path or URL it was opened from (``"AnnData"`` for one in memory).
    group
        The root zarr or h5py group, ``None`` for an AnnData in memory.
    X
        Cells × genes (``X`` or a layer), a dask array whose blocks are CSR
        row blocks (or dense ones).
    var_names
        Gene names, in column order.
    csr
        A direct reader of ``X``'s rows for a CSR zarr store, ``None``
        otherwise (then read the blocks of ``X``).
    obs
        The ``obs`` table of an AnnData (a DataFrame, or anndata's lazy
        table); a store's is read from ``group``, a column at a time.
    x_key
        Where the matrix is in the store: ``"X"`` or ``"layers/NAME"``.
    stored
        Values ``X`` stores: its non-zeros when sparse, else every entry
        (``None``: not known).
    """

    source: str
    group: Any
    X: da.Array
    var_names: pd.Index
    csr: CsrRows | None = None
    obs: Any = None
    x_key: str = "X"
    stored: int | None = None

    @property
    def n_obs(self) -> int:
        return self.X.shape[0]

    def block_bytes(self) -> int:
        """Bytes of the largest block of ``X`` once read (an estimate from the
        mean values per row): its values, and column indices where sparse,
        with the read buffers' head-room."""
        rows = max(self.X.chunks[0], default=0)
        cells = max(self.n_obs * self.n_vars, 1)
        stored = cells if self.stored is None else self.stored
        per_value = self.X.dtype.itemsize + (8 if stored < cells else 0)
        return int(rows * stored / max(self.n_obs, 1) * per_value * BlockBuffers.GROWTH)

    @property
    def n_vars(self) -> int:
        return self.X.shape[1]

    @property
    def obs_columns(self) -> list[str]:
        if self.obs is not None:
            return list(map(str, self.obs.columns))
        obs = self.group["obs"]
        index = _index_key(obs)
        return [k for k in obs.keys() if k != index]

    @property
    def obs_names(self) -> np.ndarray:
        """Cell names, read from the store at each access (a numpy string
        array; nothing in a pass needs them, and as Python strings a million
        cells' names would hold 100 MB)."""
        if self.obs is not None:
            return np.asarray(self.obs.index, dtype=str)
        with named_chunk_errors(self.group, self.source, ("obs",)):
            return read_index(self.group["obs"])

    @contextmanager
    def naming_bad_chunks(self, elements: tuple[str, ...] | None = None) -> Iterator[None]:
        """Name the bad chunk of a failed read of ``elements`` (default: the
        matrix) in a store (:func:`.integrity.named_chunk_errors`); an
        AnnData in memory has no chunks to name."""
        if self.group is None:
            yield
            return
        with named_chunk_errors(self.group, self.source, elements or (self.x_key,)):
            yield

    def obs_column(self, key: str, option: str = "--perturbation-key") -> pd.Series:
        """Read one ``obs`` column (e.g. the perturbation labels), in cell order
        (indexed by position; the names are :attr:`obs_names`); ``option``
        names the option that asked for it in the error for a missing column."""
        columns = self.obs_columns
        if key not in columns:
            raise LabelError(
                f"{self.source}: obs has no column {key!r}; columns there are: "
                f"{', '.join(columns) or '(none)'}. "
                f"Pass the right one with {option}"
            )
        if self.obs is not None:
            return pd.Series(_in_memory(self.obs[key]), name=key)
        with self.naming_bad_chunks((f"obs/{key}",)):
            values = read_elem(self.group["obs"][key])
        return pd.Series(values, name=key)


class BlockBuffers:
    """Arrays that blocks are read into, reused from block to block.

    Reading into fresh arrays costs a page fault per 4 KiB page (large arrays
    are new memory maps each time): about a fifth of a pass's CPU time on a
    local store. One set serves one task at a time (:meth:`BufferPool.lease`).
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


class BufferPool:
    """The idle :class:`BlockBuffers` of this process: each running task
    leases one set, so a process holds at most one per thread reading blocks."""

    def __init__(self) -> None:
        self._idle: list[BlockBuffers] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """The number of idle sets."""
        return len(self._idle)

    @contextmanager
    def lease(self) -> Iterator[BlockBuffers]:
        """A set of buffers for the duration of the ``with`` block.

        The set returns to the pool only when the block ends normally: after
        a failed read, zarr may still be writing other chunks into it.
        """
        with self._lock:
            buffers = self._idle.pop() if self._idle else BlockBuffers()
        yield buffers
        with self._lock:
            self._idle.append(buffers)

    def clear(self) -> None:
        """Free the idle buffers (at the end of a pass)."""
        with self._lock:
            self._idle.clear()


#: The process's pool of block buffers (see :class:`BufferPool`).
BLOCK_BUFFERS = BufferPool()


@dataclass(frozen=True)
class CsrRows:
    """Row slices of a CSR matrix stored in a zarr group (its ``data``,
    ``indices`` and ``indptr`` arrays, opened once), read with one slice of
    each array — the same reads as anndata's lazy blocks, without the
    per-block wrapping — and decoded straight into reused buffers
    (:class:`BlockBuffers`).

    Attributes
    ----------
    data, indices, indptr
        The arrays, read through the group's store (zarr's codec pipeline).
    n_vars
        Columns of the matrix.
    source
        Path or URL of the store, for messages.
    zarrs
        The same arrays opened for zarrs' codec pipeline, by path
        (:func:`.codecs.zarrs_arrays`); empty where zarrs is not used.
    """

    data: Any
    indices: Any
    indptr: Any
    n_vars: int
    source: str = ""
    zarrs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, x_group, n_vars: int, source: str = "", *, zarrs: bool = False) -> CsrRows:
        """The rows of the CSR matrix in ``x_group`` (``n_vars`` columns) of
        the store at ``source``; with ``zarrs``, decoded by zarrs' codec
        pipeline where it can (``x_group`` must then be the store at
        ``source`` as :func:`open_group` opens it)."""
        names = ("data", "indices", "indptr")
        fast = zarrs_arrays(source, x_group.path, names) if zarrs else None
        return cls(*(x_group[name] for name in names), n_vars, source,
                   {array.path: array for array in fast or ()})

    def read(self, start: int, stop: int, buffers: BlockBuffers | None = None) -> sp.csr_array:
        """Rows ``start:stop`` as a CSR array (``indptr`` from zero).

        The block's values and indices are read into ``buffers`` (new ones
        when not given): the result is valid until the next read into the
        same buffers. A chunk that cannot be decoded raises
        :class:`.StoreError` naming it.
        """
        with naming_bad_chunks(lambda: self._bad_chunk(start, stop), self.source,
                               f"the chunks of X rows {start}-{stop}"):
            return self._read(start, stop, buffers or BlockBuffers())

    def _read(self, start: int, stop: int, buffers: BlockBuffers) -> sp.csr_array:
        indptr = self._read_slice(self.indptr, start, stop + 1, buffers)
        first, last = int(indptr[0]), int(indptr[-1])
        indices = self._read_slice(self.indices, first, last, buffers)
        # a block's offsets fit int32 when its values do: scipy would otherwise
        # widen the whole (int32) indices array to int64, a block-sized copy
        small = indices.dtype == np.int32 and last - first < 2**31
        offsets = (indptr - first).astype(np.int32 if small else np.int64)
        data = self._read_slice(self.data, first, last, buffers)
        return sp.csr_array((data, indices, offsets), shape=(stop - start, self.n_vars))

    def _read_slice(self, array, first: int, last: int, buffers: BlockBuffers) -> np.ndarray:
        """``array[first:last]``, a view of the whole chunks holding it, read into ``buffers``.

        Whole chunks are read so that each is decoded whole and its checksum
        checked: zarrs decodes a chunk it reads in part without checking its
        CRC32C. For the same reason the array's last chunk, always read in
        part (the array ends inside it), is read by zarr's own pipeline. A
        range beyond the array's end is an error (``indptr`` points past the
        values stored), not a shorter read.
        """
        length = array.shape[0]
        if not 0 <= first <= last <= length:
            raise StoreError(
                f"{self.source}: values {first}-{last} of array {array.path!r} were asked "
                f"for, it holds {length}; the store is inconsistent (X's indptr "
                "and its data or indices disagree). Write it again"
            )
        if first == last:
            return buffers.get(array.path, 0, array.dtype)
        size = array.chunks[0]
        lo, hi = first - first % size, min(-(-last // size) * size, length)
        out = buffers.get(array.path, hi - lo, array.dtype)
        fast = self.zarrs.get(array.path)
        split = hi if fast is None else min(max(length - length % size, lo), hi)
        for reader, start, stop in ((fast or array, lo, split), (array, split, hi)):
            if stop > start:
                view = out[start - lo : stop - lo]
                reader.get_basic_selection(slice(start, stop), out=NDBuffer.from_numpy_array(view))
        return out[first - lo : last - lo]

    def _bad_chunk(self, start: int, stop: int) -> GenePertInputError | None:
        """The error naming the first bad chunk under rows ``start:stop``, if any."""
        bad = first_bad_chunk([(self.indptr.path, self.indptr, start, stop + 1)], self.source)
        if bad is not None:
            return bad
        first, last = int(self.indptr[start]), int(self.indptr[stop])
        return first_bad_chunk([(a.path, a, first, last) for a in (self.indices, self.data)],
                               self.source)


def _in_memory(column: Any) -> Any:
    """The values of an ``obs`` column of an AnnData: a pandas column's
    array (categories kept), or a lazy table's column (an xarray DataArray) read."""
    if isinstance(column, pd.Series):
        return column.array
    values = column.data
    return values.compute() if isinstance(values, da.Array) else values


def _index_key(df_group) -> str:
    return df_group.attrs.get("_index", "_index")


def read_index(df_group) -> np.ndarray:
    """The index of an AnnData dataframe (``obs`` or ``var``) as a string array."""
    names = np.asarray(read_elem(df_group[_index_key(df_group)]))
    return names if names.dtype.kind in "OTU" else names.astype(str)


def open_group(path: str, storage_options: dict[str, Any] | None = None):
    """The root group of an AnnData store (zarr, or h5py for ``.h5ad``)."""
    path = str(path)
    if not exists(path, storage_options):
        raise StoreError(f"screen {path} does not exist; check the path or URL")
    if path.endswith(".h5ad"):
        path = path.removeprefix("file://")
        if is_url(path):
            raise StoreError(
                f"{path}: remote .h5ad cannot be streamed; run "
                "'genepert-scale convert' to a zarr store first"
            )
        try:
            return h5py.File(path, "r")
        except OSError as err:
            raise StoreError(f"{path} is not a readable HDF5 (.h5ad) file: {err}") from err
    try:
        return strict_group(zarr_store(path, storage_options), path)
    except GenePertInputError:
        raise
    except METADATA_ERRORS as err:
        raise StoreError(
            f"{path} is not a zarr group ({err}); give an AnnData zarr store or .h5ad"
        ) from err


def block_rows_for(
    n_obs: int,
    nnz: int,
    target_nnz: int = TARGET_BLOCK_NNZ,
    *,
    chunk_values: int | None = None,
    memory_limit: int | None = None,
    threads: int = 1,
) -> int:
    """Rows per block so that one block holds about ``target_nnz`` stored values.

    Parameters
    ----------
    n_obs, nnz
        Cells and stored values of the screen.
    target_nnz
        Stored values per block when memory allows.
    chunk_values
        Values per stored chunk of ``X/data``: the target is rounded to a whole
        number of chunks (at least one), so a block decodes few partial chunks.
    memory_limit
        Bytes the pass may use; caps the block so that ``threads`` blocks
        take at most :data:`BLOCK_MEMORY_SHARE` of it.
    threads
        Threads (or worker threads) computing blocks at once.
    """
    if memory_limit:
        in_flight = BYTES_PER_VALUE * max(threads, 1)
        target_nnz = min(target_nnz, int(memory_limit * BLOCK_MEMORY_SHARE / in_flight))
    if chunk_values:
        target_nnz = max(chunk_values, round(target_nnz / chunk_values) * chunk_values)
    per_row = max(nnz / max(n_obs, 1), 1.0)
    return int(min(max(target_nnz / per_row, 256), max(n_obs, 1)))


def _chunk_values(x_group, encoding: str) -> int | None:
    """Values per stored chunk of ``X/data`` (``None`` for dense or h5py without chunks)."""
    if encoding != "csr_matrix":
        return None
    chunks = getattr(x_group["data"], "chunks", None)
    return int(chunks[0]) if chunks else None


def stored_values(x_group, encoding: str) -> int:
    """Stored values of ``X``: its non-zeros (CSR) or all its entries (dense)."""
    if encoding == "csr_matrix":
        indptr = x_group["indptr"]
        return int(indptr[indptr.shape[0] - 1])
    return int(np.prod(x_group.shape))


def _check_csr_lengths(x_group, nnz: int, n_obs: int, path: str) -> None:
    """Raise if ``X``'s ``indptr`` does not hold one offset per cell plus one,
    or its ``data`` or ``indices`` hold fewer values than ``indptr`` points
    into (a truncated or inconsistent store)."""
    offsets = x_group["indptr"].shape[0]
    if offsets != n_obs + 1:
        raise StoreError(
            f"{path}: X/indptr holds {offsets} offsets but X has {n_obs} rows "
            f"({n_obs + 1} offsets); the store is incomplete or inconsistent. Write it again"
        )
    for name in ("data", "indices"):
        held = x_group[name].shape[0]
        if held < nnz:
            raise StoreError(
                f"{path}: X/indptr ends at {nnz} stored values but X/{name} holds {held}; "
                "the store is incomplete or inconsistent. Write it again"
            )


def open_screen(
    path: str,
    *,
    storage_options: dict[str, Any] | None = None,
    block_rows: int | None = None,
    memory_limit: int | None = None,
    threads: int | None = None,
    layer: str | None = None,
) -> Screen:
    """Open an AnnData screen lazily.

    Parameters
    ----------
    path
        Local path or fsspec URL of an AnnData zarr store, or a local ``.h5ad``.
    storage_options
        fsspec options (credentials, endpoint) for URLs.
    block_rows
        Rows per block of ``X``; by default :func:`block_rows_for` sizes blocks
        from the store's chunking, ``memory_limit`` and ``threads``.
    memory_limit
        Bytes a pass over the screen may use (default: no cap beyond
        :data:`TARGET_BLOCK_NNZ` values per block).
    threads
        Threads computing blocks at once (default: the CPUs dask counts,
        ``dask.system.CPU_COUNT``).
    layer
        Read ``layers[layer]`` instead of ``X`` (raw counts often sit in
        ``layers["counts"]``).

    Raises
    ------
    StoreError
        If the path is missing, is not AnnData, or has no usable ``X`` (or layer).
    """
    return screen_from_group(open_group(path, storage_options), str(path), block_rows=block_rows,
                             memory_limit=memory_limit, threads=threads, layer=layer,
                             zarrs=True)


def _x_encoding(x_group, path: str) -> str:
    """The encoding of ``X`` (``"csr_matrix"`` or ``"array"``), after checking it can be streamed."""
    encoding = x_group.attrs.get("encoding-type", "array")
    if encoding == "csc_matrix":
        remedy = (
            f"Run 'genepert-scale convert {path} {path[:-len('.h5ad')]}.zarr' (it streams CSC "
            "into a CSR zarr store within --memory-limit) and give the .zarr store instead"
            if path.endswith(".h5ad") else
            "Write it as CSR: 'genepert-scale convert' streams a CSC .h5ad into a CSR zarr store"
        )
        raise StoreError(f"{path}: X is stored as CSC (column-major); rows cannot be streamed. "
                         f"{remedy}")
    if encoding not in ("csr_matrix", "array"):
        raise StoreError(f"{path}: X has unsupported encoding {encoding!r}")
    if encoding == "array":
        check_x_dtype(x_group.dtype, path)
        return encoding
    missing = [k for k in ("data", "indices", "indptr") if k not in x_group]
    if missing or "shape" not in x_group.attrs:
        raise StoreError(
            f"{path}: X is a CSR matrix without {', '.join(missing) or 'its shape attribute'}; "
            "the store is incomplete, write it again"
        )
    check_x_dtype(x_group["data"].dtype, path)
    return encoding


def screen_from_group(
    group,
    path: str,
    *,
    block_rows: int | None = None,
    memory_limit: int | None = None,
    threads: int | None = None,
    layer: str | None = None,
    zarrs: bool = False,
) -> Screen:
    """A :class:`Screen` over an already opened AnnData root group (zarr or
    h5py), of ``X`` or of ``layers[layer]``, read through the group's store;
    ``zarrs`` (for a group that :func:`open_group` opened from ``path``): a
    CSR matrix through zarrs' codec pipeline where it can (:mod:`.codecs`).
    See :func:`open_screen` for the other parameters."""
    for key in ("X", "obs", "var"):
        if key not in group:
            raise StoreError(
                f"{path} has no '{key}' element; is it an AnnData store "
                "(written by anndata or 'genepert-scale convert')?"
            )
    x_key = "X" if layer is None else f"layers/{layer}"
    if layer is not None and not ("layers" in group and layer in group["layers"]):
        held = list(group["layers"].keys()) if "layers" in group else []
        raise StoreError(f"{path} has no layer {layer!r}; its layers: "
                         f"{', '.join(held) or '(none)'}. Pass one of them, or no --layer for X")
    x_group = group[x_key]
    encoding = _x_encoding(x_group, path)
    with named_chunk_errors(group, path, ("obs", "var")):
        var_names = pd.Index(read_index(group["var"]), dtype=object)
        obs_names = read_index(group["obs"])
    check_unique_names(obs_names, "obs", path)
    check_unique_names(var_names, "var", path)
    check_case_collisions(var_names, path)
    shape = tuple(x_group.attrs["shape"]) if encoding == "csr_matrix" else x_group.shape
    if shape != (len(obs_names), len(var_names)):
        raise StoreError(
            f"{path}: X has shape {shape} but obs has {len(obs_names)} cells and "
            f"var {len(var_names)} genes; the store is inconsistent, rewrite it"
        )
    if encoding == "csr_matrix":
        with named_chunk_errors(group, path, (f"{x_key}/indptr",)):
            nnz = stored_values(x_group, encoding)
        _check_csr_lengths(x_group, nnz, shape[0], path)
    else:
        nnz = stored_values(x_group, encoding)
    rows = block_rows or block_rows_for(
        shape[0], nnz, chunk_values=_chunk_values(x_group, encoding),
        memory_limit=memory_limit, threads=threads or CPU_COUNT,
    )
    X = read_elem_lazy(x_group, chunks=(rows, shape[1]))
    direct = encoding == "csr_matrix" and isinstance(x_group, zarr.Group)
    csr = CsrRows.of(x_group, shape[1], path, zarrs=zarrs) if direct else None
    return Screen(str(path), group, X, var_names, csr, x_key=x_key, stored=nnz)


def screen_from_anndata(
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    block_rows: int | None = None,
    memory_limit: int | None = None,
    threads: int | None = None,
) -> Screen:
    """A :class:`Screen` over an AnnData: in memory (dense or sparse ``X``),
    dask-backed or lazy (``anndata.experimental.read_lazy``); a backed one is
    opened from its file instead. The pass reads it in the same row blocks
    as a store, through the same kernels.

    Parameters
    ----------
    adata
        The AnnData.
    layer
        Use ``adata.layers[layer]`` instead of ``X``.
    block_rows, memory_limit, threads
        As for :func:`open_screen`.
    """
    if adata.isbacked:
        return open_screen(str(adata.filename), block_rows=block_rows, memory_limit=memory_limit,
                           threads=threads, layer=layer)
    if layer is not None and layer not in adata.layers:
        held = [str(name) for name in adata.layers.keys() if name is not None]  # 0.13: None is X
        raise StoreError(f"the AnnData has no layer {layer!r}; its layers: "
                         f"{', '.join(held) or '(none)'}")
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None:
        raise StoreError("the AnnData has no X; pass layer= to use one of its layers")
    check_x_dtype(matrix.dtype, "the AnnData")
    n_obs, n_vars = matrix.shape
    if sp.issparse(matrix) and matrix.format != "csr":
        matrix = sp.csr_matrix(matrix)  # already in memory: one CSR copy
    nnz = matrix.nnz if sp.issparse(matrix) else n_obs * n_vars
    rows = block_rows or block_rows_for(n_obs, nnz, memory_limit=memory_limit,
                                        threads=threads or CPU_COUNT)
    if isinstance(matrix, da.Array):
        X = matrix.rechunk((rows, n_vars))
    else:
        X = da.from_array(matrix, chunks=(rows, n_vars), asarray=False)
    var_names = pd.Index(np.asarray(adata.var_names, dtype=str), dtype=object)
    check_unique_names(var_names, "var", "the AnnData")
    return Screen("AnnData", None, X, var_names, obs=adata.obs, stored=nnz)


def open_data(data: Screen | str | ad.AnnData, **options: Any) -> Screen:
    """A :class:`Screen` of ``data``: an opened one, a path or URL
    (:func:`open_screen`) or an AnnData (:func:`screen_from_anndata`);
    ``options`` are theirs (``storage_options`` only for paths)."""
    if isinstance(data, Screen):
        return data
    if isinstance(data, ad.AnnData):
        options.pop("storage_options", None)
        return screen_from_anndata(data, **options)
    if isinstance(data, str | os.PathLike):
        return open_screen(os.fspath(data), **options)
    raise ParameterError(f"cannot read a screen from {type(data).__name__}: give an AnnData, "
                         "or the path or URL of an AnnData zarr store or .h5ad")
