"""Where bytes live: paths and fsspec URLs, atomic outputs, and the codec and
chunking of the zarr arrays we write.

Everything that writes an output goes through :func:`atomic_output`: the
output is built under a temporary name beside the target and renamed into
place only when complete, so an interrupted run never leaves a half-written
store, and an existing output is replaced only with ``overwrite=True``. The
writer holds the output's lease meanwhile (:func:`hold_output`, :mod:`.lease`),
so a second run writing the same output fails at once, and the temporaries of
runs that were killed are removed by the next one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import anndata as ad
import dask.array as da
import fsspec
import numpy as np
import xarray as xr
from anndata.io import write_elem
from fsspec.implementations.local import LocalFileSystem
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from ..errors import StoreError
from .integrity import COMPLETE_CHUNKS_ATTR, strict_store
from .lease import TMP_MARK, Lease, hold_lease, sibling
from .retry import RetryingStore

log = logging.getLogger(__name__)

#: Elements per chunk of the 1-D CSR arrays (``data``, ``indices``); 1 MiB of float32.
CSR_CHUNK = 262_144


def is_url(path: str) -> bool:
    """Whether ``path`` names a remote or protocol-qualified location."""
    return "://" in str(path)


def filesystem(path: str, storage_options: dict[str, Any] | None = None):
    """The fsspec filesystem and the protocol-less path for ``path``."""
    fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    return fs, root


def delimiter(path: str) -> str:
    """Column separator of a text table: ``,`` for ``.csv``, tab otherwise (``.tsv``, ``.txt``)."""
    return "," if str(path).lower().endswith(".csv") else "\t"


def exists(path: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a file or directory exists at ``path``."""
    fs, root = filesystem(path, storage_options)
    return fs.exists(root)


def local_parent(path: str) -> str | None:
    """The existing local directory that would hold ``path`` (a place for a
    run's scratch files beside its output), or ``None`` for a URL."""
    if is_url(path) and not str(path).startswith("file://"):
        return None
    parent = os.path.dirname(os.path.abspath(str(path).removeprefix("file://")))
    return parent if os.path.isdir(parent) else None


def zarr_store(path: str, storage_options: dict[str, Any] | None = None, *, mode="r"):
    """A zarr store for a local path or an fsspec URL.

    Stores opened for reading (``mode="r"``) retry transient errors with
    back-off and name the URL and key in their errors
    (:class:`~genepert_scale.io.retry.RetryingStore`).
    """
    read_only = mode == "r"
    if is_url(path) and not str(path).startswith("file://"):
        store = zarr.storage.FsspecStore.from_url(
            str(path), storage_options=storage_options or {}, read_only=read_only
        )
    else:
        store = zarr.storage.LocalStore(str(path).removeprefix("file://"), read_only=read_only)
    return RetryingStore(store, url=str(path)) if read_only else store


@contextlib.contextmanager
def quiet_zarr_warnings() -> Iterator[None]:
    """Silence zarr's notices about v3 consolidated metadata and autosharding.

    We write consolidated metadata on purpose (one read to open a remote store).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        yield


def compressors(dtype_size: int = 4) -> tuple:
    """The byte codecs of arrays we write: Blosc-LZ4 with byte shuffle, then CRC32C.

    LZ4 decodes faster than zstd on few cores (decompression bounds a pass);
    the CRC32C checksum turns a corrupt chunk into an error instead of
    silently wrong numbers.
    """
    return (
        BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle, typesize=dtype_size),
        Crc32cCodec(),
    )


#: Root attributes of an AnnData zarr store.
ANNDATA_ATTRS = {"encoding-type": "anndata", "encoding-version": "0.1.0"}


def write_element(group: zarr.Group, key: str, element: Any) -> None:
    """Write an AnnData element (``obs``, ``var``, ``uns``, ...) into ``group``
    with our codecs (:func:`compressors`): zarr's default zstd has no checksum,
    so a flipped byte in, say, the perturbation codes would silently relabel cells."""
    with ad.settings.override(zarr_write_format=3), quiet_zarr_warnings():
        write_elem(group, key, element, dataset_kwargs={"compressors": compressors(1)})


def check_output_free(
    target: str, *, overwrite: bool, storage_options: dict[str, Any] | None = None
) -> None:
    """Raise if ``target`` exists and ``overwrite`` is false (call it before long work)."""
    if not overwrite and exists(target, storage_options):
        raise StoreError(
            f"output {target} already exists; pass --overwrite (overwrite=True) "
            "to replace it, or choose another path"
        )


def write_dataset(
    ds: xr.Dataset,
    path: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    chunks_at_once: int | None = None,
    along: str = "perturbation",
) -> str:
    """Write an :class:`xarray.Dataset` as a consolidated zarr store, atomically.

    Numeric arrays get our codecs (Blosc-LZ4 + CRC32C); every chunk is
    written, even an all-NaN one, and the store is marked complete
    (:data:`.integrity.COMPLETE_CHUNKS_ATTR`), so a chunk lost later is an
    error when read (:func:`open_dataset`), never NaN. ``xarray.open_zarr``
    reads the result.

    With ``chunks_at_once``, the dask arrays along ``along`` are computed and
    written that many of their chunks at a time (:func:`_write_in_waves`), so
    that what one chunk's computation holds is released before the next.
    """
    encoding = _encoding(ds)
    lazy = [name for name in ds.data_vars
            if along in ds[name].dims and isinstance(ds[name].data, da.Array)]
    with (
        atomic_output(path, overwrite=overwrite, storage_options=storage_options) as tmp,
        quiet_zarr_warnings(),
    ):
        store = zarr_store(tmp, storage_options, mode="w")
        ds = ds.assign_attrs({COMPLETE_CHUNKS_ATTR: True})
        if chunks_at_once and lazy:
            _write_in_waves(ds, store, encoding, lazy, along, chunks_at_once)
        else:
            ds.to_zarr(store, mode="w", consolidated=True, encoding=encoding,
                       write_empty_chunks=True)
    return path


def region_chunks(start: int, stop: int, stored: int) -> tuple[int, ...]:
    """Dask chunks of rows ``start:stop`` that never share a stored chunk of
    ``stored`` rows: cut at every multiple of ``stored`` inside, so that
    parallel writes of one region never read and rewrite the same chunk."""
    edges = sorted({start, stop, *range(-(-start // stored) * stored, stop, stored)})
    return tuple(int(n) for n in np.diff(edges))


#: Bytes per stored chunk of an array written in waves.
WAVE_CHUNK_BYTES = 32 * 2**20


def wave_rows(row_bytes: int) -> int:
    """Rows per stored chunk of an array written in waves whose rows take
    ``row_bytes`` each (:data:`WAVE_CHUNK_BYTES` a chunk, at least one row)."""
    return max(1, WAVE_CHUNK_BYTES // max(row_bytes, 1))


def _write_in_waves(ds: xr.Dataset, store: Any, encoding: dict[str, dict], lazy: list[str],
                    along: str, chunks_at_once: int) -> None:
    """Write ``ds``: its metadata and in-memory arrays first, then its dask
    arrays ``lazy`` (which share their chunks along ``along``) as region
    writes of ``chunks_at_once`` dask chunks each, one after another (a
    stored chunk a region cuts is read and rewritten by the next: inside a region
    each stored chunk is written by one task). Dask arrays without ``along``
    are small (per gene, say): they are computed with the metadata."""
    ds = ds.assign({name: ds[name].compute() for name in ds.data_vars
                    if name not in lazy and isinstance(ds[name].data, da.Array)})
    for name in lazy:
        rows = wave_rows(ds[name].dtype.itemsize * int(np.prod(ds[name].shape[1:])))
        encoding[name] = {**encoding.get(name, {}),
                          "chunks": (min(rows, ds.sizes[along]), *ds[name].shape[1:])}
    ds.to_zarr(store, mode="w", consolidated=True, encoding=encoding, write_empty_chunks=True,
               compute=False, safe_chunks=False)
    parts = ds[lazy]
    parts = parts.drop_vars([name for name in parts.coords if along not in parts[name].dims])
    bounds = np.cumsum((0, *parts[lazy[0]].chunks[parts[lazy[0]].dims.index(along)]))
    stored = encoding[lazy[0]]["chunks"][0]
    for first in range(0, bounds.size - 1, chunks_at_once):
        start, stop = int(bounds[first]), int(bounds[min(first + chunks_at_once, bounds.size - 1)])
        part = parts.isel({along: slice(start, stop)}).chunk(
            {along: region_chunks(start, stop, stored)})
        part.to_zarr(store, region={along: slice(start, stop)}, safe_chunks=False,
                     write_empty_chunks=True)


def _encoding(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    """Our codecs (:func:`compressors`) for the numeric arrays of ``ds``."""
    return {
        name: {"compressors": compressors(ds[name].dtype.itemsize)}
        for name in ds.data_vars
        if ds[name].ndim and ds[name].dtype.kind in "fiu"
    }


def create_dataset(template: xr.Dataset, path: str) -> zarr.Group:
    """Start a local zarr store in the layout of :func:`write_dataset`:
    ``template``'s metadata and its in-memory variables are written, its
    dask-backed variables are left for the caller to fill region by region
    (every chunk of them: the store is marked complete) through the returned
    group, inside :func:`.integrity.complete_chunks`."""
    with quiet_zarr_warnings():
        template.assign_attrs({COMPLETE_CHUNKS_ATTR: True}).to_zarr(
            zarr_store(path, mode="w"), mode="w", consolidated=True, compute=False,
            encoding=_encoding(template), write_empty_chunks=True,
        )
    return zarr.open_group(zarr_store(path, mode="w"), mode="r+")


def open_dataset(path: str, storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """Open a store written by :func:`write_dataset` lazily with xarray; a
    missing chunk raises :class:`.StoreError` naming it when read."""
    store = strict_store(zarr_store(path, storage_options), path)
    with quiet_zarr_warnings():
        ds = xr.open_zarr(store)
    ds.attrs.pop(COMPLETE_CHUNKS_ATTR, None)
    return ds


@contextlib.contextmanager
def atomic_output(
    target: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Iterator[str]:
    """Yield a temporary path beside ``target``; rename it into place on success.

    The output's lease is held throughout (:func:`hold_output`): the
    temporary ``.NAME.tmp-<token>-…`` carries the lease's token, and the lease
    is read back just before the rename, so only one run puts an output in
    place.

    Parameters
    ----------
    target
        Final path or URL of the output (a file or a directory/zarr store).
    overwrite
        Replace an existing output. Without it, an existing ``target`` is an error.
    storage_options
        fsspec options for remote targets.

    Raises
    ------
    StoreError
        If ``target`` exists and ``overwrite`` is false.
    OutputBusyError
        If another run that is alive holds the output's lease, or took it
        over while this one was writing.
    """
    check_output_free(target, overwrite=overwrite, storage_options=storage_options)
    with hold_output(target, storage_options) as lease:
        fs, root = lease.fs, lease.root
        tmp_root = sibling(root, ".", f"{TMP_MARK}{lease.token}-{uuid.uuid4().hex[:6]}")[2]
        try:
            yield _with_protocol(target, tmp_root, fs)
            lease.check()
        except BaseException:
            if fs.exists(tmp_root):
                fs.rm(tmp_root, recursive=True)
            raise
        _replace(fs, tmp_root, root)


def _replace(fs: fsspec.AbstractFileSystem, new: str, root: str) -> None:
    """Move ``new`` to ``root``, replacing what is there (restored if the move fails)."""
    backup = None
    if fs.exists(root):
        backup = f"{new}.old"
        move(fs, root, backup)
    try:
        move(fs, new, root)
    except BaseException:
        if backup is not None:  # put the previous output back
            if fs.exists(root):
                fs.rm(root, recursive=True)
            move(fs, backup, root)
        raise
    if backup is not None:
        fs.rm(backup, recursive=True)


@contextlib.contextmanager
def hold_output(target: str, storage_options: dict[str, Any] | None = None) -> Iterator[Lease]:
    """Hold the lease of the output ``target`` while inside (:mod:`.lease`).

    The run that takes it removes the temporaries of ``target`` that runs
    killed before renaming them left beside it (only a lease holder builds
    temporaries, so none of them belongs to a live run), and logs each; a
    previous output that a killed run had moved aside (``….old``) to replace
    it is put back when ``target`` is missing. Nested calls in one process
    share the lease.

    Raises
    ------
    OutputBusyError
        If another run that may be alive holds the lease.
    """
    with hold_lease(target, storage_options) as (lease, fresh):
        if fresh:
            remove_stale_temporaries(lease)
        yield lease


def remove_stale_temporaries(lease: Lease) -> list[str]:
    """Remove the temporaries of the output of ``lease`` (held by this
    process) that dead runs left; return their paths."""
    fs, prefix = lease.fs, f".{lease.name}{TMP_MARK}"
    fs.invalidate_cache(lease.parent)
    try:
        entries = fs.ls(lease.parent, detail=False) if lease.parent else []
    except FileNotFoundError:
        return []
    stale = sorted(e.rstrip("/") for e in entries if e.rstrip("/").rsplit("/", 1)[-1].startswith(prefix))
    for path in stale:
        gone = lease.taken_over
        whose = (f"the run {gone.describe()}" if gone is not None and f"{TMP_MARK}{gone.token}" in path
                 else "a run that is gone")
        if path.endswith(".old") and not fs.exists(lease.root):
            move(fs, path, lease.root)
            log.warning("%s: put back the previous output from %s, which %s moved aside "
                        "and was killed before replacing it", lease.url, path, whose)
        else:
            fs.rm(path, recursive=True)
            log.warning("%s: removed the stale temporary %s left by %s", lease.url, path, whose)
    return stale


def move(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move a file or folder within ``fs``.

    Local folders are renamed. Object stores have no folders, and a recursive
    ``mv`` there also tries to copy the implied folder keys (and fails), so
    their folders move file by file: copy every object, then delete the source.
    """
    fs.invalidate_cache(src)
    if isinstance(fs, LocalFileSystem) or not fs.isdir(src):
        fs.mv(src, dst, recursive=True)
        return
    files = fs.find(src)
    fs.copy(files, [dst + name[len(src):] for name in files])
    fs.rm(src, recursive=True)
    fs.invalidate_cache(dst)


@contextlib.contextmanager
def local_directory(path: str, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """A local directory whose files end up at ``path``.

    For a local ``path`` it is ``path`` itself; for a URL, a temporary local
    directory uploaded to ``path`` on success. For writers that only write
    local files (matplotlib, h5py, pandas).
    """
    if not is_url(path) or str(path).startswith("file://"):
        local = str(path).removeprefix("file://")
        os.makedirs(local, exist_ok=True)
        yield local
        return
    fs, root = filesystem(path, storage_options)
    with tempfile.TemporaryDirectory() as local:
        yield local
        fs.put(local.rstrip("/") + "/", root, recursive=True)


def _with_protocol(original: str, root: str, fs) -> str:
    if not is_url(original):
        return root
    protocol = original.split("://", 1)[0]
    return f"{protocol}://{root}"


def new_csr_arrays(group: zarr.Group, n_vars: int, dtype: str = "float32") -> None:
    """Create the empty, growable ``data``/``indices``/``indptr`` arrays of an
    AnnData CSR element in ``group``."""
    group.attrs.update(
        {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [0, n_vars]}
    )
    for name, dt in (("data", dtype), ("indices", "int32")):
        group.create_array(
            name, shape=(0,), chunks=(CSR_CHUNK,), dtype=dt, compressors=compressors(4)
        )
    indptr = group.create_array(
        "indptr", shape=(1,), chunks=(CSR_CHUNK,), dtype="int64", compressors=compressors(8)
    )
    indptr[:] = 0


class CsrAppender:
    """Append CSR row blocks to an AnnData CSR element, one block at a time.

    Memory is one block; the arrays grow on disk.
    """

    def __init__(self, group: zarr.Group, n_vars: int, dtype: str = "float32"):
        new_csr_arrays(group, n_vars, dtype)
        self.group = group
        self.n_vars = n_vars
        self.n_rows = 0
        self.nnz = 0

    def append(self, block) -> None:
        """Append the rows of a scipy CSR block."""
        if block.shape[1] != self.n_vars:
            raise StoreError(
                f"block has {block.shape[1]} columns, expected {self.n_vars}"
            )
        self.append_parts(block.data, block.indices, block.indptr)

    def append_parts(self, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray) -> None:
        """Append CSR rows given as arrays (``indptr`` from 0, one more than the rows)."""
        self.group["data"].append(data.astype(self.group["data"].dtype, copy=False))
        self.group["indices"].append(indices.astype("int32", copy=False))
        self.group["indptr"].append(indptr[1:].astype("int64") + self.nnz)
        self.n_rows += len(indptr) - 1
        self.nnz += int(indptr[-1])
        self.group.attrs["shape"] = [self.n_rows, self.n_vars]
