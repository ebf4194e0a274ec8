"""Column-major (CSC) ``.h5ad`` streamed into a CSR zarr store within a
memory limit smaller than the matrix: the same arrays as scipy's ``.tocsr()``,
on a synthetic screen and on the real Papalexi screen."""

from __future__ import annotations

import logging
import re
import tracemalloc

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import xarray as xr
import zarr

from genepert_scale.cli.commands import main
from genepert_scale.errors import INPUT_ERROR_EXIT_CODE, ParameterError
from genepert_scale.io.convert import CSC_MEMORY_SHARE, convert_h5ad
from genepert_scale.pp.aggregate import pseudobulk


def assert_same_csr(actual, expected: sp.csr_matrix) -> None:
    """Equal CSR arrays, entry for entry and in the same order."""
    np.testing.assert_array_equal(actual.indptr, expected.indptr)
    np.testing.assert_array_equal(actual.indices, expected.indices)
    np.testing.assert_array_equal(actual.data, expected.data)


@pytest.fixture
def convert_log(caplog) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="genepert_scale.io.convert")
    return caplog


def row_slabs(log: str) -> int:
    """Row slabs of the last CSC conversion in the log."""
    return int(re.findall(r"\(CSC -> CSR\): \d+ cells in (\d+) row slabs", log)[-1])


def counts(n_obs: int, n_vars: int, density: float, seed: int) -> sp.csc_matrix:
    """Random UMI-like counts, with some empty rows and an empty column."""
    rng = np.random.default_rng(seed)
    x = sp.random(n_obs, n_vars, density=density, format="csc", random_state=rng, dtype=np.float32)
    x.data = np.ceil(x.data * 20)
    rows, columns = np.ones(n_obs, np.float32), np.ones(n_vars, np.float32)
    rows[rng.choice(n_obs, n_obs // 50, replace=False)] = 0
    columns[n_vars // 2] = 0
    x = sp.csc_matrix(sp.diags(rows) @ x @ sp.diags(columns))
    x.eliminate_zeros()
    return x


def test_synthetic_csc_equals_tocsr_in_several_row_slabs(tmp_path, convert_log):
    x = counts(2000, 400, 0.3, seed=1)
    adata = ad.AnnData(x, obs={"perturbation": np.where(np.arange(2000) % 5, "A", "non-targeting")})
    adata.layers["counts"] = x * 2
    adata.raw = adata.copy()
    adata.write_h5ad(tmp_path / "csc.h5ad")
    matrix_bytes = x.nnz * (4 + 4)
    out = convert_h5ad(str(tmp_path / "csc.h5ad"), str(tmp_path / "out.zarr"),
                       memory_limit=matrix_bytes // 4)
    assert row_slabs(convert_log.text) >= 3
    back = ad.read_zarr(out)
    assert_same_csr(back.X, x.tocsr())
    assert_same_csr(back.layers["counts"], (x * 2).tocsr())
    assert_same_csr(back.raw.X, x.tocsr())
    assert back.X.dtype == np.float32 and back.obs.equals(adata.obs)
    assert zarr.open_group(out)["X"].attrs["encoding-type"] == "csr_matrix"


def test_non_canonical_csc_is_ordered_as_tocsr_orders_it(tmp_path, convert_log):
    """Rows unsorted within a column and a duplicate entry (row 1 of column 1,
    kept twice, in place) come out as scipy's ``.tocsr()`` gives them."""
    data = np.arange(1, 9, dtype=np.float32)
    indices = np.array([2, 0, 1, 1, 3, 1, 0, 2], dtype=np.int32)
    x = sp.csc_matrix((data, indices, np.array([0, 3, 6, 6, 8])), shape=(4, 4))
    assert not x.has_canonical_format
    ad.AnnData(x).write_h5ad(tmp_path / "odd.h5ad")
    out = convert_h5ad(str(tmp_path / "odd.h5ad"), str(tmp_path / "odd.zarr"), memory_limit=400)
    assert row_slabs(convert_log.text) >= 2
    assert_same_csr(ad.read_zarr(out).X, x.tocsr())


def peak_python_memory(source, out, **options) -> int:
    """Peak bytes Python (numpy, zarr, numcodecs) allocated converting ``source``."""
    tracemalloc.start()
    try:
        convert_h5ad(str(source), str(out), **options)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_csc_conversion_memory_does_not_grow_with_the_matrix(tmp_path):
    """Under one memory limit, a matrix four times larger (same cells, four
    times the genes) peaks at the same memory, and above what copying it as
    CSR in small row blocks takes (zarr's buffers of the chunks being
    written, a few MiB) by less than the transposition's share of the limit."""
    small, large = counts(5000, 100, 0.3, seed=2), counts(5000, 400, 0.3, seed=2)
    ad.AnnData(small).write_h5ad(tmp_path / "small.h5ad")
    ad.AnnData(large).write_h5ad(tmp_path / "large.h5ad")
    ad.AnnData(large.tocsr()).write_h5ad(tmp_path / "large_csr.h5ad")
    limit = 2_000_000
    peak_small = peak_python_memory(tmp_path / "small.h5ad", tmp_path / "small.zarr",
                                    memory_limit=limit)
    copy_csr = peak_python_memory(tmp_path / "large_csr.h5ad", tmp_path / "csr.zarr",
                                  block_rows=256)
    peak_large = peak_python_memory(tmp_path / "large.h5ad", tmp_path / "large.zarr",
                                    memory_limit=limit)
    assert abs(peak_large - peak_small) < CSC_MEMORY_SHARE * limit / 2, (peak_small, peak_large)
    assert peak_large - copy_csr < CSC_MEMORY_SHARE * limit, (copy_csr, peak_large)
    assert_same_csr(ad.read_zarr(tmp_path / "large.zarr").X, large.tocsr())


def test_memory_limit_too_small_for_the_rows_is_an_error(tmp_path):
    ad.AnnData(counts(3000, 20, 0.1, seed=3)).write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(ParameterError, match=r"too small to transpose 3000 rows .* at least \d+ bytes"):
        convert_h5ad(str(tmp_path / "csc.h5ad"), str(tmp_path / "out.zarr"), memory_limit="10kB")
    assert not (tmp_path / "out.zarr").exists()


@pytest.fixture(scope="module")
def papalexi_csc(papalexi_path, tmp_path_factory):
    """The real screen written as CSC, and its X as scipy's ``.tocsr()`` of that CSC."""
    adata = ad.read_h5ad(papalexi_path)
    adata.X = sp.csc_matrix(adata.X)
    path = tmp_path_factory.mktemp("csc") / "papalexi_csc.h5ad"
    adata.write_h5ad(path)
    return path, adata.X.tocsr()


def test_papalexi_csc_by_the_cli_equals_tocsr_and_pseudobulks_alike(papalexi_csc, papalexi_path,
                                                                    tmp_path, convert_log):
    path, expected = papalexi_csc
    limit = expected.nnz * (4 + 4) // 4  # a quarter of the matrix
    out = tmp_path / "from_csc.zarr"
    assert main(["convert", str(path), str(out), "--memory-limit", str(limit)]) == 0
    assert row_slabs(convert_log.text) >= 3
    assert_same_csr(ad.read_zarr(out).X, expected)
    from_csr = convert_h5ad(str(papalexi_path), str(tmp_path / "from_csr.zarr"))
    options = {"control": "control", "n_top_genes": 100, "progress": False}
    xr.testing.assert_equal(pseudobulk(str(out), **options, as_xarray=True).drop_attrs(),
                            pseudobulk(from_csr, **options, as_xarray=True).drop_attrs())


def test_pseudobulk_of_a_csc_h5ad_says_to_convert(papalexi_csc, tmp_path, capsys):
    path, _ = papalexi_csc
    code = main(["pseudobulk", str(path), "--control", "control", "--out", str(tmp_path / "pb.zarr")])
    assert code == INPUT_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert "X is stored as CSC (column-major)" in err
    assert f"Run 'genepert-scale convert {path} {str(path)[:-5]}.zarr'" in err
