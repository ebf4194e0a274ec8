"""Streaming an ``.h5ad`` into a chunked AnnData zarr store without loading X."""

from __future__ import annotations

import logging
from typing import Any

import h5py
import numpy as np
import scipy.sparse as sp
import zarr
from anndata.io import read_elem, sparse_dataset

from ..errors import StoreError
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
) -> str:
    """Stream ``source`` (``.h5ad``) into the AnnData zarr store ``out``.

    The cell matrices — ``X``, every ``layers/*`` and ``raw/X`` — are copied
    in CSR row blocks (dense ones are sparsified block by block) with our codec
    and chunking, so none is ever loaded whole; every other element (``obs``,
    ``var``, ``uns``, ``obsm``, …) is copied with anndata's element reader and
    writer.
    """
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
        _copy_elements(h5, root, block_rows, f"{source}: ")
        with quiet_zarr_warnings():
            zarr.consolidate_metadata(root.store)
    log.info("converted %s -> %s", source, out)
    return out


def _copy_elements(h5: h5py.Group, root: zarr.Group, block_rows: int | None, source: str) -> None:
    """Copy an AnnData group: cell matrices streamed, the rest element by element."""
    with quiet_zarr_warnings():
        for key in h5:
            element = h5[key]
            if key == "X":
                _copy_x(element, root.create_group(key), block_rows, f"{source}X")
            elif key == "layers" and isinstance(element, h5py.Group):
                layers = _group_like(element, root, key)
                for name in element:
                    _copy_x(element[name], layers.create_group(name), block_rows,
                            f"{source}layers/{name}")
            elif key == "raw" and isinstance(element, h5py.Group):
                _copy_elements(element, _group_like(element, root, key), block_rows, f"{source}raw/")
            else:
                write_element(root, key, read_elem(element))


def _group_like(h5: h5py.Group, parent: zarr.Group, key: str) -> zarr.Group:
    """A zarr group with the encoding attributes of an h5py group."""
    group = parent.create_group(key)
    group.attrs.update({k: str(v) for k, v in h5.attrs.items()})
    return group


def _copy_x(x, group: zarr.Group, block_rows: int | None, source: str) -> None:
    encoding = x.attrs.get("encoding-type", "array")
    if encoding == "csc_matrix":
        raise StoreError(f"{source} is CSC; convert it to CSR in memory first (.tocsr())")
    matrix = sparse_dataset(x) if isinstance(x, h5py.Group) else x
    n_obs, n_vars = matrix.shape
    dtype = "float32" if np.dtype(x["data"].dtype if isinstance(x, h5py.Group) else x.dtype).itemsize <= 4 else "float64"
    appender = CsrAppender(group, n_vars, dtype)
    rows = block_rows or block_rows_for(n_obs, stored_values(x, encoding))

    def read(start: int) -> sp.csr_array:
        return sp.csr_array(matrix[start : start + rows])

    # the next block is read (h5py releases the GIL) while this one is compressed and written
    with threaded_in_order(read, range(0, n_obs, rows), threads=1, ahead=2,
                           name="convert-read") as blocks:
        for block in blocks:
            appender.append(block)
            log.info("convert: %d/%d cells", appender.n_rows, n_obs)
