"""Writing a screen with its cells in another order, within a memory budget.

A pass whose groups do not fit in memory at once runs slab by slab of groups
(:mod:`..pp.budget`), and each slab reads only the row blocks holding its
cells (:func:`..pp.reduce.blocks_with_groups`). In a screen whose cells are
in the order of their groups (:func:`..pp.sort.sort_screen`) a slab is a
run of rows, so all the slabs together read the screen about once.

:func:`write_reordered` writes the cell matrices (``X``, every layer,
``raw/X``) as CSR, an external distribution sort in two steps, so that the
screen is read once whatever its order and the memory limit: its row blocks
are read in turn and each block's rows are saved to a local spill directory,
split by the *output slab* they go to (runs of output rows holding at most
as many values as the budget allows); then each output slab is read back,
put in order and written. The per-cell elements (``obs``, ``obsm``,
``obsp``) are reordered in memory, as anndata holds them; the others are
copied.
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import zarr
from anndata.experimental import read_elem_lazy
from anndata.io import read_elem

from ..cluster import _local_memory
from ..errors import ParameterError, StoreError
from ..validate import memory_bytes
from .convert import slabs
from .integrity import complete_chunks, mark_complete
from .ordered import threaded_in_order
from .screen import block_rows_for, open_group, read_index, stored_values
from .store import (
    ANNDATA_ATTRS,
    CsrAppender,
    atomic_output,
    is_url,
    quiet_zarr_warnings,
    write_element,
    zarr_store,
)

log = logging.getLogger(__name__)

#: Share of the memory limit the blocks in hand (reading), or an output slab (writing), may take.
REORDER_MEMORY_SHARE = 0.5
#: Bytes per value of an output slab: its rows as gathered, stacked, and put in order
#: (a float32 value and an int32 column each, with the stacking's copies).
SLAB_BYTES_PER_VALUE = 36


def write_reordered(
    source: str,
    order: np.ndarray,
    out: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    memory_limit: int | str | None = None,
    spill_dir: str | None = None,
) -> str:
    """Write the AnnData at ``source`` to the zarr store ``out`` with its
    cells in ``order`` (row ``i`` of ``out`` is row ``order[i]`` of ``source``).

    Parameters
    ----------
    source
        An AnnData zarr store (path or URL) or ``.h5ad``.
    order
        A permutation of the cells.
    out
        The output store (path or URL), written atomically.
    overwrite
        Replace an existing ``out``.
    storage_options
        fsspec options for URLs.
    memory_limit
        Bytes (or a string such as ``"2GiB"``) the writing may use; by
        default this machine's memory (or its container's limit).
    spill_dir
        Local directory the rows wait in between being read and written
        (about the size of the matrices, uncompressed); default: beside a
        local ``out``, else the system's temporary directory.

    Raises
    ------
    ParameterError
        If ``order`` is not a permutation of the cells.
    StoreError
        If a cell matrix is stored as CSC (``genepert-scale convert`` first).
    """
    group = open_group(source, storage_options)
    n_obs = read_index(group["obs"]).size
    order = np.asarray(order)
    if order.shape != (n_obs,) or not np.array_equal(np.sort(order), np.arange(n_obs)):
        raise ParameterError(f"{source}: the new order must hold each of its {n_obs} cells "
                             "once")
    budget = int((memory_bytes(memory_limit) or _local_memory()) * REORDER_MEMORY_SHARE)
    if spill_dir is None and not is_url(out):
        spill_dir = os.path.dirname(os.path.abspath(out))
    with (
        atomic_output(out, overwrite=overwrite, storage_options=storage_options) as tmp,
        tempfile.TemporaryDirectory(prefix=".genepert-reorder-", dir=spill_dir) as spill,
        complete_chunks(),
        quiet_zarr_warnings(),
    ):
        root = zarr.open_group(zarr_store(tmp, storage_options, mode="w"), mode="w",
                               zarr_format=3)
        root.attrs.update(ANNDATA_ATTRS)
        mark_complete(root)
        _reorder_elements(group, root, Reorder(order, budget, spill), f"{source}: ")
        zarr.consolidate_metadata(root.store)
    log.info("wrote %s: the %d cells of %s in the new order", out, n_obs, source)
    return out


@dataclass(frozen=True)
class Reorder:
    """A reordering: the new order of the cells, the bytes the blocks in hand
    or an output slab may take, and the spill directory."""

    order: np.ndarray
    budget: int
    spill: str


def _reorder_elements(group, root: zarr.Group, plan: Reorder, source: str) -> None:
    """Write every element of the AnnData ``group`` into ``root``, the cells in the new order."""
    for key in group:
        element = group[key]
        if key == "X":
            _reorder_matrix(element, root.create_group(key), plan, f"{source}X")
        elif key == "layers" or (key == "raw" and "X" in element):
            sub = root.create_group(key)
            sub.attrs.update({k: str(v) for k, v in element.attrs.items()})
            if key == "raw":
                _reorder_elements(element, sub, plan, f"{source}raw/")
                continue
            for name in element:
                _reorder_matrix(element[name], sub.create_group(name), plan,
                                f"{source}layers/{name}")
        else:
            write_element(root, key, _reordered(key, read_elem(element), plan.order))


def _reordered(key: str, element: Any, order: np.ndarray) -> Any:
    """An in-memory element with its cells in ``order`` (``obs``, and each
    entry of ``obsm`` and ``obsp``); any other as it is."""
    if key == "obs":
        return element.iloc[order]
    if key == "obsm":
        return {k: v.iloc[order] if hasattr(v, "iloc") else v[order] for k, v in element.items()}
    if key == "obsp":
        return {k: v[order][:, order] for k, v in element.items()}
    return element


def _reorder_matrix(element, group: zarr.Group, plan: Reorder, source: str) -> None:
    """Write the cell matrix ``element`` (CSR or dense) into ``group`` as CSR
    rows in the new order, an output slab at a time (see the module's docstring)."""
    encoding = element.attrs.get("encoding-type", "array")
    if encoding == "csc_matrix":
        raise StoreError(f"{source} is stored as CSC (column-major); write the screen as "
                         "CSR first ('genepert-scale convert'), then reorder it")
    n_obs, n_vars = (int(n) for n in (element.attrs["shape"] if encoding == "csr_matrix"
                                      else element.shape))
    per_row = (np.diff(element["indptr"][:]) if encoding == "csr_matrix"
               else np.full(n_obs, n_vars))
    # blocks in flight: one read ahead, the one distributed, and its pieces
    rows = block_rows_for(n_obs, stored_values(element, encoding), memory_limit=plan.budget,
                          threads=3)
    matrix = read_elem_lazy(element, chunks=(rows, n_vars))
    stored = element["data"].dtype if encoding == "csr_matrix" else element.dtype
    appender = CsrAppender(group, n_vars, "float32" if stored.itemsize <= 4 else "float64")
    destination = np.empty(n_obs, np.int64)
    destination[plan.order] = np.arange(n_obs)
    offsets = np.concatenate(([0], np.cumsum(per_row[plan.order])))
    output_slabs = slabs(offsets, max(plan.budget // SLAB_BYTES_PER_VALUE, 1))
    _distribute(matrix, destination, np.array([stop for _, stop in output_slabs]), plan.spill,
                source)
    for k, (first, stop) in enumerate(output_slabs):
        appender.append(_collect(plan.spill, k, first, stop, n_vars))
        log.info("reorder %s: %d/%d cells written", source, stop, n_obs)


def _distribute(matrix, destination: np.ndarray, stops: np.ndarray, spill: str,
                source: str) -> None:
    """Read ``matrix`` once, in row blocks, and save each block's rows bound
    for output slab ``k`` (slabs ending at output rows ``stops``) as one file
    of ``spill``, with their output rows."""
    bounds = np.cumsum((0, *matrix.chunks[0]))

    def read(block: int) -> sp.csr_array:
        return sp.csr_array(matrix.blocks[block].compute(scheduler="sync"))

    with threaded_in_order(read, range(len(bounds) - 1), threads=1, ahead=2,
                           name="reorder-read") as blocks:
        for i, block in enumerate(blocks):
            rows = destination[bounds[i] : bounds[i + 1]]
            slab = np.searchsorted(stops, rows, side="right")
            by_slab = np.argsort(slab, kind="stable")
            found, starts = np.unique(slab[by_slab], return_index=True)
            for k, picked in zip(found, np.split(by_slab, starts[1:])):
                piece = block[picked]
                np.savez(os.path.join(spill, f"{k}-{i}.npz"), data=piece.data,
                         indices=piece.indices, indptr=piece.indptr, rows=rows[picked])
            log.info("reorder %s: %d/%d cells read", source, bounds[i + 1], bounds[-1])


def _collect(spill: str, k: int, first: int, stop: int, n_vars: int) -> sp.csr_array:
    """Output rows ``first:stop`` (slab ``k``) from their files in ``spill``,
    in order; the files are removed as they are read."""
    pieces, rows = [], []
    for path in glob.glob(os.path.join(spill, f"{k}-*.npz")):
        with np.load(path) as saved:
            pieces.append(sp.csr_array((saved["data"], saved["indices"], saved["indptr"]),
                                       shape=(saved["rows"].size, n_vars)))
            rows.append(saved["rows"])
        os.remove(path)
    rows = np.concatenate(rows)
    placed = np.argsort(rows)
    if not np.array_equal(rows[placed], np.arange(first, stop)):
        raise AssertionError(f"output slab {k} gathered rows other than {first}-{stop - 1}")
    return sp.csr_array(sp.vstack(pieces, format="csr")[placed])
