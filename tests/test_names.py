"""Telling cell names apart by hashing their stored bytes (names.py), against
the exact check of the names read as strings."""

from __future__ import annotations

import h5py
import numcodecs
import numpy as np
import pandas as pd
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from factories import counts, write_screen
from genepert_scale.pp import kernels
from genepert_scale.io import names
from genepert_scale.errors import LabelError, StoreError
from genepert_scale.io.names import distinct_by_hash, vlen_utf8_hashes
from genepert_scale.io.screen import open_screen

needs_numba = pytest.mark.skipif(not kernels.USE_NUMBA, reason="the hashes are compiled with numba")

CHUNK = 4
#: 10 names in chunks of 4: the last chunk is padded with two empty names.
UNIQUE = ["AAACCTG-1", "AAACCTG-2", "TTTGGC-1", "", "ß-cell", "c" * 300, "c5", "c6", "c7", "c8"]


def serialized(values) -> np.ndarray:
    return np.frombuffer(numcodecs.VLenUTF8().encode(np.array(values, dtype=object)), np.uint8)


def write_names(path, values, **kwargs):
    array = zarr.create_array(str(path), shape=(len(values),), chunks=(CHUNK,), dtype=str, **kwargs)
    array[:] = np.array(values, dtype=object)
    return zarr.open_array(str(path), mode="r")


@needs_numba
def test_equal_names_hash_alike_and_different_names_differently():
    values = ["cell1", "cell2", "cell1", "", "ünïcode", "cell2 "]
    out = np.zeros(len(values), np.uint64)
    assert vlen_utf8_hashes(serialized(values), len(values), out)
    assert out[0] == out[2] and len(set(out.tolist())) == 5
    one = np.zeros(1, np.uint64)
    assert vlen_utf8_hashes(serialized(["a"]), 1, one) and one[0] == 0xAF63DC4C8601EC8C  # FNV-1a


@needs_numba
def test_only_the_asked_for_names_are_hashed():
    out = np.zeros(2, np.uint64)
    assert vlen_utf8_hashes(serialized(["a", "b", "", ""]), 4, out)  # padding left out
    full = np.zeros(4, np.uint64)
    vlen_utf8_hashes(serialized(["a", "b", "", ""]), 4, full)
    assert np.array_equal(out, full[:2])


@needs_numba
@pytest.mark.parametrize("damage", ["truncated", "fewer names", "more names", "bytes after the last",
                                    "length past the end", "empty"])
def test_a_chunk_that_does_not_parse_is_refused(damage):
    good = serialized(["name-one", "name-two", "name-three"])
    assert vlen_utf8_hashes(good, 3, np.zeros(3, np.uint64))
    bad = {
        "truncated": good[:-3],
        "fewer names": serialized(["name-one", "name-two"]),
        "more names": serialized(["name-one", "name-two", "name-three", "name-four"]),
        "bytes after the last": np.concatenate([good, np.frombuffer(b"xyz", np.uint8)]),
        "length past the end": np.concatenate([good[:4], np.array([255, 255, 0, 0], np.uint8), good[8:]]),
        "empty": good[:0],
    }[damage]
    assert not vlen_utf8_hashes(bad, 3, np.zeros(3, np.uint64))


LAYOUTS = {
    "v3 zstd (anndata)": {"compressors": [ZstdCodec()]},
    "v3 blosc + crc32c": {"compressors": [BloscCodec(cname="lz4"), Crc32cCodec()]},
    "v3 uncompressed": {"compressors": []},
    "v2 blosc (anndata)": {"zarr_format": 2, "compressors": numcodecs.Blosc()},
    "v2 uncompressed": {"zarr_format": 2, "compressors": None},
}


@needs_numba
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS)
def test_stored_names_are_told_apart_in_every_layout(tmp_path, layout):
    assert distinct_by_hash(write_names(tmp_path / "u.zarr", UNIQUE, **layout), "u")
    repeated = [*UNIQUE[:-1], "TTTGGC-1"]  # across chunks, in the (padded) last one
    assert not distinct_by_hash(write_names(tmp_path / "r.zarr", repeated, **layout), "r")


def test_names_not_hashed_here_go_to_the_exact_check(tmp_path, monkeypatch):
    with h5py.File(tmp_path / "n.h5", "w") as file:
        file["names"] = [name.encode() for name in UNIQUE]
        assert not distinct_by_hash(file["names"], "n.h5")
    sharded = write_names(tmp_path / "s.zarr", UNIQUE, shards=(8,))
    assert not distinct_by_hash(sharded, "s.zarr")
    monkeypatch.setattr(kernels, "USE_NUMBA", False)
    assert not distinct_by_hash(write_names(tmp_path / "u.zarr", UNIQUE), "u.zarr")


@needs_numba
@pytest.mark.parametrize("damage", ["missing", "undecodable"])
def test_a_chunk_the_hashes_cannot_read_goes_to_the_exact_check(tmp_path, damage):
    array = write_names(tmp_path / "u.zarr", UNIQUE)
    chunk = tmp_path / "u.zarr" / "c" / "1"
    if damage == "missing":
        chunk.unlink()
    else:
        chunk.write_bytes(b"not zstd")
    assert not distinct_by_hash(array, str(tmp_path / "u.zarr"))


def screen(path, obs_names, fmt=3):
    """A screen of ``len(obs_names)`` cells named ``obs_names`` (any pandas index)."""
    return write_screen(path, counts(len(obs_names), 3), obs_names=obs_names, zarr_format=fmt)


@pytest.mark.parametrize("fmt", [2, 3])
def test_opening_a_screen_finds_repeated_cell_names(tmp_path, fmt):
    cells = [f"cell{i}" for i in range(500)]
    path = screen(tmp_path / "u.zarr", pd.Index(cells), fmt)
    if kernels.USE_NUMBA:  # anndata's layout is the one the hashes read
        assert distinct_by_hash(zarr.open_group(path, mode="r")["obs/_index"], path)
    assert open_screen(path).obs_names.tolist() == cells
    with pytest.raises(LabelError, match="obs has duplicate cell names: 'cell7'"):
        open_screen(screen(tmp_path / "r.zarr", pd.Index([*cells[:-1], "cell7"]), fmt))


@pytest.mark.parametrize("name", ["c.zarr", "c.h5ad"])
def test_a_categorical_cell_index_is_checked_by_the_exact_check(tmp_path, name):
    # anndata stores a CategoricalIndex as a group, not an array of names
    cells = pd.CategoricalIndex([f"cell{i}" for i in range(6)])
    assert open_screen(screen(tmp_path / name, cells)).n_obs == 6
    with pytest.raises(LabelError, match="obs has duplicate cell names: 'cell0'"):
        open_screen(screen(tmp_path / f"r-{name}", pd.CategoricalIndex(["cell0", *cells[:-1]])))


def test_a_damaged_chunk_of_cell_names_is_named(tmp_path):
    path = screen(tmp_path / "u.zarr", pd.Index([f"cell{i}" for i in range(50)]))
    (tmp_path / "u.zarr" / "obs" / "_index" / "c" / "0").write_bytes(b"not zstd")
    with pytest.raises(StoreError, match="obs/_index"):
        open_screen(path)


@needs_numba
def test_equal_hashes_of_different_names_do_not_fail_the_screen(tmp_path, monkeypatch):
    calls = []

    def all_equal(serialized, count, out):
        calls.append(count)
        out[:] = 0
        return True

    monkeypatch.setattr(names, "vlen_utf8_hashes", all_equal)
    path = screen(tmp_path / "u.zarr", pd.Index([f"cell{i}" for i in range(50)]))
    assert open_screen(path).n_obs == 50  # the names themselves were compared
    assert calls
