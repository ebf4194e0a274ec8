"""Decoding zarr chunks straight into buffers (chunks.ChunkedVector) against zarr's own reads."""

from __future__ import annotations

import numcodecs
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, ZstdCodec

from genepert_scale.io.chunks import ChunkedVector
from genepert_scale.errors import StoreError

N, CHUNK = 1000, 128
#: Ranges inside one chunk, across several, from 0, to the (partial) last chunk.
RANGES = [(0, 1000), (0, 128), (5, 9), (100, 300), (128, 384), (130, 1000), (999, 1000), (7, 7)]

V3_CODECS = {
    "blosc-lz4 + crc32c (ours)": [BloscCodec(cname="lz4", shuffle="shuffle"), Crc32cCodec()],
    "zstd (zarr default)": [ZstdCodec()],
    "gzip": [GzipCodec()],
    "uncompressed": [],
}


def write(path, values, **kwargs):
    array = zarr.create_array(str(path), shape=values.shape, chunks=(CHUNK,), dtype=values.dtype,
                              **kwargs)
    array[:] = values
    return zarr.open_array(str(path), mode="r")


def assert_reads_like_zarr(array, source):
    vector = ChunkedVector.of(array, source)
    assert vector is not None
    values = array[:]
    scratch = np.empty(CHUNK, array.dtype)
    for first, last in RANGES:
        out = np.full(last - first, -1, array.dtype)
        vector.read(first, last, out, scratch)
        np.testing.assert_array_equal(out, values[first:last])


@pytest.mark.parametrize("codecs", V3_CODECS.values(), ids=V3_CODECS)
@pytest.mark.parametrize("dtype", ["float32", "int32", "int64"])
def test_v3_chunks_decode_to_zarrs_values(tmp_path, codecs, dtype):
    values = np.random.default_rng(0).integers(0, 50, N).astype(dtype)
    array = write(tmp_path / "a.zarr", values, compressors=codecs)
    assert_reads_like_zarr(array, str(tmp_path / "a.zarr"))


@pytest.mark.parametrize("compressor", [numcodecs.Blosc(), numcodecs.Zstd(), None],
                         ids=["blosc", "zstd", "none"])
def test_v2_chunks_decode_to_zarrs_values(tmp_path, compressor):
    values = np.random.default_rng(1).random(N).astype("float32")
    array = write(tmp_path / "a.zarr", values, zarr_format=2, compressors=compressor)
    assert_reads_like_zarr(array, f"file://{tmp_path / 'a.zarr'}")


def test_other_stores_are_read_through_the_store(tmp_path):
    store = zarr.storage.MemoryStore()
    array = zarr.create_array(store, shape=(N,), chunks=(CHUNK,), dtype="int32",
                              compressors=[BloscCodec(cname="lz4"), Crc32cCodec()])
    array[:] = np.arange(N, dtype="int32")
    assert ChunkedVector.of(array, "memory").local_root is None
    assert_reads_like_zarr(array, "memory")
    del store._store_dict["c/3"]
    with pytest.raises(StoreError, match=r"memory: chunk '3' of array '' is missing"):
        ChunkedVector.of(array, "memory").read(0, N, np.empty(N, "int32"), np.empty(CHUNK, "int32"))


@pytest.mark.parametrize("layout", [
    {"shards": (512,)},
    {"serializer": BytesCodec(endian="big")},
    {"zarr_format": 2, "filters": [numcodecs.Delta(dtype="float32")]},
], ids=["sharded", "big-endian", "v2 filters"])
def test_layouts_numcodecs_cannot_decode_are_left_to_zarr(tmp_path, layout):
    array = write(tmp_path / "a.zarr", np.arange(N, dtype="float32"), **layout)
    assert ChunkedVector.of(array, str(tmp_path / "a.zarr")) is None


def test_a_missing_or_damaged_chunk_is_named(tmp_path):
    path = tmp_path / "a.zarr"
    array = write(path, np.arange(N, dtype="float32"),
                  compressors=[BloscCodec(cname="lz4"), Crc32cCodec()])
    vector = ChunkedVector.of(array, str(path))
    out, scratch = np.empty(N, "float32"), np.empty(CHUNK, "float32")
    chunk = path / "c" / "2"
    damaged = bytearray(chunk.read_bytes())
    damaged[20] ^= 0xFF
    chunk.write_bytes(bytes(damaged))
    with pytest.raises(StoreError, match=r"chunk 2 of array '' \(first index 256\) cannot be decoded"):
        vector.read(0, N, out, scratch)
    chunk.unlink()
    with pytest.raises(StoreError, match=r"chunk '2' of array '' is missing \(key 'c/2'\)"):
        vector.read(0, N, out, scratch)
    vector.read(0, 2 * CHUNK, out[: 2 * CHUNK], scratch)  # the chunks before it still read


def test_a_chunk_of_the_wrong_size_is_an_error_not_a_short_read(tmp_path):
    path = tmp_path / "a.zarr"
    array = write(path, np.arange(N, dtype="float32"), compressors=[BloscCodec(cname="lz4")])
    short = numcodecs.Blosc(cname="lz4").encode(np.arange(CHUNK // 2, dtype="float32"))
    (path / "c" / "1").write_bytes(short)
    vector = ChunkedVector.of(array, str(path))
    with pytest.raises(StoreError, match=r"chunk 1 .*decodes to 256 bytes, a chunk has 512"):
        vector.read(0, N, np.empty(N, "float32"), np.empty(CHUNK, "float32"))


def test_a_range_beyond_the_array_is_an_error_not_padding(tmp_path):
    path = tmp_path / "a.zarr"
    array = write(path, np.arange(N, dtype="float32"), compressors=[BloscCodec(cname="lz4")])
    vector = ChunkedVector.of(array, str(path))
    out, scratch = np.empty(20, "float32"), np.empty(CHUNK, "float32")
    with pytest.raises(StoreError, match=r"values 990-1010 of array '' were asked for, it holds 1000"):
        vector.read(990, 1010, out, scratch)  # inside the stored (padded) last chunk


def test_a_local_read_that_fails_is_tried_again_through_the_store(tmp_path, monkeypatch):
    import builtins

    path = tmp_path / "a.zarr"
    array = write(path, np.arange(N, dtype="int32"), compressors=[BloscCodec(cname="lz4")])
    vector = ChunkedVector.of(array, str(path))
    assert vector.local_root is not None
    real_open, failed = builtins.open, []

    def flaky_open(file, *args, **kwargs):
        if str(file).endswith("/c/3") and not failed:
            failed.append(file)
            raise OSError(5, "Input/output error")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", flaky_open)
    out = np.empty(N, "int32")
    vector.read(0, N, out, np.empty(CHUNK, "int32"))
    assert failed and np.array_equal(out, np.arange(N))


def test_a_csr_screen_decodes_data_indices_and_indptr_by_chunk(tmp_path):
    import scipy.sparse as sp

    from factories import write_screen
    from genepert_scale.io.screen import open_screen

    x = sp.random(300, 40, density=0.3, format="csr", random_state=0, dtype=np.float32).toarray()
    path = write_screen(tmp_path / "s.zarr", np.ceil(x * 9))
    group = zarr.open_group(f"{path}/X", mode="r+")
    for name in ("data", "indices", "indptr"):  # small chunks: blocks cut them
        values = group[name][:]
        del group[name]
        group.create_array(name, shape=values.shape, chunks=(64,), dtype=values.dtype,
                           compressors=[BloscCodec(cname="lz4"), Crc32cCodec()])[:] = values
    zarr.consolidate_metadata(path)
    rows = open_screen(path).csr
    assert set(rows.chunked) == {"X/data", "X/indices", "X/indptr"}
    for start, stop in [(0, 300), (0, 7), (31, 97), (63, 65), (290, 300), (5, 5)]:
        np.testing.assert_array_equal(rows.read(start, stop).toarray(), np.ceil(x * 9)[start:stop])
