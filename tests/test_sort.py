"""A screen written in group order: the same cells and elements, each group's
cells a run of rows, and a pass in group slabs that then reads each block
about once, with the result of the unsorted screen."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cloud_helpers import assert_same_budgeted
from factories import write_screen
from genepert_scale.cli.commands import main
from genepert_scale.errors import ParameterError, StoreError
from genepert_scale.io.reorder import write_reordered
from genepert_scale.pp import budget
from genepert_scale.pp.aggregate import pseudobulk
from genepert_scale.pp.reduce import blocks_with_groups, slab_block_reads
from genepert_scale.pp.sort import group_order, sort_screen


def _screen(tmp_path, name: str = "s.zarr", seed: int = 5) -> tuple[str, ad.AnnData]:
    """A screen in random order, with a layer, obsm and a context column."""
    rng = np.random.default_rng(seed)
    labels = ["non-targeting"] * 80 + [f"G{i % 30}" for i in range(300)] + ["B+A"] * 10
    labels = list(rng.permutation(labels))
    x = rng.poisson(2, (len(labels), 25)).astype(np.float32)
    path = write_screen(tmp_path / name, x, labels=labels,
                        var_names=["A", "B", *(f"G{i}" for i in range(23))])
    adata = ad.read_zarr(path) if path.endswith(".zarr") else ad.read_h5ad(path)
    adata.obs["line"] = pd.Categorical(rng.choice(["K562", "RPE1"], adata.n_obs))
    adata.layers["counts"] = sp.csr_matrix(x * 2)
    adata.obsm["X_pca"] = rng.normal(size=(adata.n_obs, 3))
    if path.endswith(".zarr"):
        adata.write_zarr(path)
    else:
        adata.write_h5ad(path)
    return path, adata


def _dense(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


@pytest.mark.parametrize("name", ["s.zarr", "s.h5ad"])
def test_the_sorted_store_holds_the_cells_in_group_order(tmp_path, name):
    path, adata = _screen(tmp_path, name)
    # a few kB: many output slabs, each gathered from the blocks holding its rows
    out = sort_screen(path, str(tmp_path / "sorted.zarr"), context_key="line",
                      memory_limit=20_000)
    sorted_ = ad.read_zarr(out)
    labels = adata.obs["perturbation"].astype(str).replace("B+A", "A+B")
    key = pd.DataFrame({"control": labels != "non-targeting", "line": adata.obs["line"],
                        "label": labels})
    expected = np.lexsort((np.arange(adata.n_obs), key.label, key.line, key.control))
    assert list(sorted_.obs_names) == list(adata.obs_names[expected])
    np.testing.assert_array_equal(_dense(sorted_.X), _dense(adata.X)[expected])
    np.testing.assert_array_equal(_dense(sorted_.layers["counts"]),
                                  _dense(adata.layers["counts"])[expected])
    np.testing.assert_array_equal(sorted_.obsm["X_pca"], adata.obsm["X_pca"][expected])
    assert list(sorted_.var_names) == list(adata.var_names)
    assert sp.issparse(sorted_.X) and sorted_.X.format == "csr"


def test_cells_in_no_group_come_last_in_their_order():
    codes = np.array([2, -1, 0, 1, -3, 0, 2])
    assert group_order(codes).tolist() == [2, 5, 3, 0, 6, 1, 4]


def test_a_slab_reads_only_the_blocks_holding_its_cells():
    bounds = np.array([0, 4, 8, 12])
    codes = np.array([-1, -1, -1, -1, 0, -1, -1, 1, -1, -1, -1, -1])
    assert blocks_with_groups(codes, bounds) == [1]
    assert blocks_with_groups(np.full(12, -1), bounds) == [0]
    # slabs (0, 1) and (1, 3): in random order both read every block, in group order one each
    scattered = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    assert slab_block_reads(scattered, [(0, 1), (1, 3)], bounds) == 6
    assert slab_block_reads(np.sort(scattered), [(0, 1), (1, 3)], bounds) == 3


@pytest.mark.usefixtures("pass_memory_only")
def test_group_slabs_on_the_sorted_store_read_it_once_with_the_same_result(
        small_screen, tmp_path, monkeypatch, caplog):
    options = dict(n_top_genes=100, group_variance=True, progress=False, as_xarray=True)
    expected = pseudobulk(small_screen[0], **options)
    out = sort_screen(small_screen[0], str(tmp_path / "sorted.zarr"))
    monkeypatch.setattr(budget, "ONE_PASS_BYTES", 0)
    with caplog.at_level(logging.INFO, logger="genepert_scale"):
        unsorted = pseudobulk(small_screen[0], memory_limit=60_000, block_rows=300, **options)
        unsorted_log, _ = caplog.text, caplog.clear()
        ds = pseudobulk(out, memory_limit=60_000, block_rows=300, **options)
    assert_same_budgeted(unsorted, expected)
    assert_same_budgeted(ds, expected)
    # 10 blocks of 300 rows; each slab reads all of them unsorted, its own run sorted
    slabs, reads, blocks = (int(v) for v in _slab_reads(caplog.text))
    assert slabs >= 3 and blocks == 10 and reads <= blocks + slabs
    assert int(_slab_reads(unsorted_log)[1]) == slabs * blocks
    assert "not in group order" in unsorted_log and "not in group order" not in caplog.text


def _slab_reads(text: str) -> list[str]:
    import re

    found = re.search(r"the (\d+) group slabs read (\d+) blocks in all; the screen has (\d+)",
                      text)
    assert found, text
    return list(found.groups())


def test_the_command_line_sorts_a_screen(tmp_path, capsys):
    path, adata = _screen(tmp_path)
    out = str(tmp_path / "sorted.zarr")
    assert main(["sort", path, out, "--control", "non-targeting"]) == 0
    assert capsys.readouterr().out.strip() == out
    labels = ad.read_zarr(out).obs["perturbation"].astype(str).tolist()
    assert labels[:80] == ["non-targeting"] * 80 and labels[80:] == sorted(labels[80:])


def test_an_order_that_is_not_a_permutation_is_refused(tmp_path):
    path, _ = _screen(tmp_path)
    order = np.arange(390)
    order[3] = 4
    with pytest.raises(ParameterError, match="each of its 390 cells once"):
        write_reordered(path, order, str(tmp_path / "out.zarr"))
    assert not (tmp_path / "out.zarr").exists()


def test_a_csc_matrix_is_refused_naming_it_and_leaving_nothing(tmp_path):
    path = write_screen(tmp_path / "csc.h5ad", layout="csc")
    with pytest.raises(StoreError, match=r"csc.h5ad: X is stored as CSC.*convert"):
        write_reordered(path, np.arange(60), str(tmp_path / "out.zarr"))
    assert not list(tmp_path.glob("*out.zarr*"))


def test_the_rows_wait_in_a_spill_directory_removed_after_writing(tmp_path):
    path, adata = _screen(tmp_path)
    spill = tmp_path / "spill"
    spill.mkdir()
    order = np.random.default_rng(0).permutation(adata.n_obs)
    out = write_reordered(path, order, str(tmp_path / "out.zarr"), memory_limit=10_000,
                          spill_dir=str(spill))
    np.testing.assert_array_equal(_dense(ad.read_zarr(out).X), _dense(adata.X)[order])
    assert not list(spill.iterdir()) and not list(tmp_path.glob(".genepert-reorder-*"))
