"""Reading X's CSR rows (screen.CsrRows) through zarr's public API, with zarr's
own codec pipeline and with zarrs' (codecs.py): every stored layout reads the
same values, and a missing, corrupt or mis-sized chunk is named."""

from __future__ import annotations

from pathlib import Path

import numcodecs
import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from zarr.buffer.cpu import Buffer
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, ZstdCodec
from zarr.storage import LocalStore, MemoryStore

from factories import write_screen
from genepert_scale.errors import ParameterError, StoreError
from genepert_scale.io import codecs
from genepert_scale.io.integrity import StrictStore, strict_group
from genepert_scale.io.screen import open_screen, screen_from_group

CHUNK = 64
N_OBS, N_VARS = 300, 40
#: Row ranges: all, from 0, inside one chunk of values, across chunks, the end, empty.
ROWS = [(0, 300), (0, 7), (31, 97), (63, 65), (290, 300), (5, 5)]

LAYOUTS = {
    "v3 blosc-lz4 + crc32c (ours)": {"compressors": [BloscCodec(cname="lz4"), Crc32cCodec()]},
    "v3 zstd (zarr default)": {"compressors": [ZstdCodec()]},
    "v3 gzip": {"compressors": [GzipCodec()]},
    "v3 uncompressed": {"compressors": []},
    "v3 sharded": {"shards": (4 * CHUNK,)},
    "v3 big-endian": {"serializer": BytesCodec(endian="big")},
    "v2 blosc": {"zarr_format": 2, "compressors": numcodecs.Blosc()},
    "v2 zstd": {"zarr_format": 2, "compressors": numcodecs.Zstd()},
    "v2 uncompressed": {"zarr_format": 2, "compressors": None},
    "v2 delta filter": {"zarr_format": 2, "filters": "delta"},
}

zarrs_installed = pytest.mark.skipif(not codecs.zarrs_installed(), reason="zarrs is not installed")
PIPELINES = ["zarr", pytest.param("zarrs", marks=zarrs_installed)]


@pytest.fixture(params=PIPELINES)
def pipeline(request, monkeypatch) -> str:
    """Decode X with zarr's own codec pipeline, or with zarrs'."""
    monkeypatch.setenv(codecs.ENV_VAR, "1" if request.param == "zarrs" else "0")
    return request.param


def matrix() -> np.ndarray:
    x = sp.random(N_OBS, N_VARS, density=0.3, format="csr", random_state=0, dtype=np.float32)
    return np.ceil(x.toarray() * 9)


def screen_with_x(path, layout: dict, chunk: int = CHUNK) -> str:
    """A screen whose ``X`` arrays are stored in ``layout``, ``chunk`` values a chunk."""
    x_format = layout.get("zarr_format", 3)
    path = write_screen(path, matrix(), zarr_format=x_format)
    group = zarr.open_group(f"{path}/X", mode="r+")
    for name in ("data", "indices", "indptr"):  # small chunks: blocks cut them
        values = group[name][:]
        options = dict(layout)
        if options.get("filters") == "delta":
            options["filters"] = [numcodecs.Delta(dtype=values.dtype.str)]
        del group[name]
        group.create_array(name, shape=values.shape, chunks=(chunk,), dtype=values.dtype,
                           **{k: v for k, v in options.items() if k != "zarr_format"})[:] = values
    zarr.consolidate_metadata(path)
    return path


def read_all(path: str) -> None:
    rows = open_screen(path).csr
    rows.read(0, N_OBS)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS)
def test_every_layout_reads_the_stored_rows(tmp_path, layout, pipeline):
    path = screen_with_x(tmp_path / "s.zarr", layout)
    rows = open_screen(path).csr
    for start, stop in ROWS:
        np.testing.assert_array_equal(rows.read(start, stop).toarray(), matrix()[start:stop])


def test_zarrs_reads_a_complete_local_store_directly(tmp_path, pipeline):
    path = screen_with_x(tmp_path / "s.zarr", LAYOUTS["v3 blosc-lz4 + crc32c (ours)"])
    rows = open_screen(path).csr
    assert isinstance(rows.data.store, StrictStore)
    if pipeline == "zarrs":
        assert set(rows.zarrs) == {"X/data", "X/indices", "X/indptr"}
        assert all(isinstance(array.store, LocalStore) for array in rows.zarrs.values())
    else:
        assert rows.zarrs == {}
    group = strict_group(LocalStore(path, read_only=True), path)
    assert screen_from_group(group, path).csr.zarrs == {}  # a group given: read through its store


def test_other_stores_are_read_through_the_store(tmp_path, pipeline):
    screen_with_x(tmp_path / "s.zarr", LAYOUTS["v3 blosc-lz4 + crc32c (ours)"])
    contents = {file.relative_to(tmp_path / "s.zarr").as_posix(): Buffer.from_bytes(file.read_bytes())
                for file in (tmp_path / "s.zarr").rglob("*") if file.is_file()}
    screen = screen_from_group(strict_group(MemoryStore(contents, read_only=True), "memory"), "memory")
    np.testing.assert_array_equal(screen.csr.read(0, N_OBS).toarray(), matrix())
    assert isinstance(screen.csr.data.store, StrictStore)
    del contents["X/data/c/2"]
    with pytest.raises(StoreError, match=r"memory: chunk '2' of array 'X/data' is missing"):
        screen.csr.read(0, N_OBS)


@pytest.mark.parametrize("layout", ["v3 blosc-lz4 + crc32c (ours)", "v3 sharded"])
def test_a_missing_chunk_is_named(tmp_path, layout, pipeline):
    path = screen_with_x(tmp_path / "s.zarr", LAYOUTS[layout])
    (tmp_path / "s.zarr" / "X" / "data" / "c" / "1").unlink()  # a chunk, or the second shard
    first = CHUNK * (4 if "sharded" in layout else 1)
    rows = open_screen(path).csr
    with pytest.raises(StoreError, match=r"chunk '1' of array 'X/data' is missing \(key 'X/data/c/1'\)"):
        rows.read(0, N_OBS)
    indptr = zarr.open_array(f"{path}/X/indptr", mode="r")[:]
    rows.read(0, int(np.searchsorted(indptr, first, side="right")) - 1)  # before it: fine


def damage(path: str, index: int) -> None:
    """Flip a byte in the middle of chunk ``index`` of ``X/data``."""
    chunk = Path(path) / "X" / "data" / "c" / str(index)
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    chunk.write_bytes(bytes(damaged))


@pytest.mark.parametrize("layout", ["v3 blosc-lz4 + crc32c (ours)", "v3 zstd (zarr default)"])
def test_a_damaged_chunk_is_named(tmp_path, layout, pipeline):
    path = screen_with_x(tmp_path / "s.zarr", LAYOUTS[layout])
    damage(path, 2)
    with pytest.raises(StoreError, match=r"chunk 2 of array 'X/data' \(first index 128\) cannot be decoded"):
        read_all(path)


@pytest.mark.parametrize("where", ["cut by the block", "the last"])
def test_a_damaged_chunk_read_in_part_is_named(tmp_path, where, pipeline):
    """A block that reads part of a chunk still checks the whole chunk's CRC32C
    (zarrs checks none when it decodes part of a chunk)."""
    path = screen_with_x(tmp_path / "s.zarr", LAYOUTS["v3 blosc-lz4 + crc32c (ours)"])
    indptr = zarr.open_array(f"{path}/X/indptr", mode="r")[:]
    if where == "the last":
        index, rows = (int(indptr[-1]) - 1) // CHUNK, (N_OBS - 1, N_OBS)
    else:  # rows that end inside chunk 2
        index, rows = 2, (0, int(np.searchsorted(indptr, 2 * CHUNK + 1)))
        assert 2 * CHUNK < indptr[rows[1]] < 3 * CHUNK
    damage(path, index)
    with pytest.raises(StoreError, match=rf"chunk {index} of array 'X/data' \(first index "
                                         rf"{index * CHUNK}\) cannot be decoded"):
        open_screen(path).csr.read(*rows)


def test_a_chunk_of_the_wrong_size_is_named_not_a_short_read(tmp_path, pipeline):
    path = screen_with_x(tmp_path / "s.zarr", {"compressors": [BloscCodec(cname="lz4")]})
    short = numcodecs.Blosc(cname="lz4").encode(np.ones(CHUNK // 2, dtype="float32"))
    (tmp_path / "s.zarr" / "X" / "data" / "c" / "1").write_bytes(short)
    with pytest.raises(StoreError, match=r"chunk 1 of array 'X/data' \(first index 64\) cannot be decoded"):
        read_all(path)


def test_row_offsets_beyond_the_values_are_an_error_not_a_short_read(tmp_path, pipeline):
    path = screen_with_x(tmp_path / "s.zarr", LAYOUTS["v3 uncompressed"])
    indptr = zarr.open_array(f"{path}/X/indptr", mode="r+")
    held = int(indptr[N_OBS])
    indptr[100] = held + 10  # row 99 ends past the stored values
    rows = open_screen(path).csr
    with pytest.raises(StoreError, match=rf"values \d+-{held + 10} of array 'X/indices' were asked "
                                         rf"for, it holds {held}"):
        rows.read(90, 100)


def test_the_environment_variable_turns_zarrs_off_and_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv(codecs.ENV_VAR, "0")
    assert not codecs.zarrs_enabled()
    assert codecs.zarrs_arrays(str(tmp_path), "X", ("data",)) is None
    monkeypatch.setenv(codecs.ENV_VAR, "maybe")
    with pytest.raises(ParameterError, match="GENEPERT_SCALE_ZARRS='maybe': set it to 0"):
        codecs.zarrs_enabled()
    monkeypatch.delenv(codecs.ENV_VAR)
    assert codecs.zarrs_enabled() == (codecs.BY_DEFAULT and codecs.zarrs_installed())


@pytest.mark.parametrize("path", ["s3://bucket/s.zarr", "https://host/s.zarr", "missing.zarr"])
def test_zarrs_reads_only_local_directories(path):
    assert codecs.local_root(path) is None
