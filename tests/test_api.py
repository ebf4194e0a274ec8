"""The Python face: ``gps.pp.pseudobulk`` on every form of AnnData a scanpy
user holds, equal to the store path and to scanpy, returning AnnData."""

from __future__ import annotations

import anndata as ad
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp

import genepert_scale as gps
from conftest import scanpy_pseudobulk
from genepert_scale.errors import StoreError
from genepert_scale.io.convert import convert_h5ad

OPTIONS = {"perturbation_key": "perturbation", "control": "control", "n_top_genes": 100,
           "block_rows": 4096}


@pytest.fixture(scope="module")
def papalexi(papalexi_path):
    return ad.read_h5ad(papalexi_path)


@pytest.fixture(scope="module")
def from_path(papalexi_path):
    return gps.pp.pseudobulk(str(papalexi_path), **OPTIONS)


def assert_same_anndata(actual: ad.AnnData, expected: ad.AnnData) -> None:
    assert list(actual.obs_names) == list(expected.obs_names)
    assert list(actual.var_names) == list(expected.var_names)
    np.testing.assert_array_equal(actual.X, expected.X)
    np.testing.assert_array_equal(actual.layers["delta"], expected.layers["delta"])
    np.testing.assert_array_equal(actual.obs["n_cells"], expected.obs["n_cells"])


def test_the_result_is_anndata_in_scanpy_layout(from_path, papalexi):
    pb = from_path
    assert isinstance(pb, ad.AnnData) and pb.obs_names[0] == "control"
    assert list(pb.obs["perturbation"]) == list(pb.obs_names)
    assert pb.obs["is_control"].sum() == 1 and pb.obs.loc["control", "n_cells"] == 2386
    hvg, means = scanpy_pseudobulk(papalexi, key="perturbation", control="control",
                                   n_top_genes=100)
    assert set(pb.var_names) == set(hvg.index[hvg["highly_variable"]])
    assert {"means", "dispersions", "dispersions_norm"} <= set(pb.var.columns)
    np.testing.assert_allclose(pb.X, means.loc[pb.obs_names, pb.var_names], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pb.layers["delta"], pb.X - pb.X[0], atol=1e-6)
    assert "parameters" in pb.uns["genepert_scale"]


def test_in_memory_forms_equal_the_path(papalexi, from_path):
    dense = papalexi.copy()
    dense.X = papalexi.X.toarray()
    dask_backed = papalexi.copy()
    dask_backed.X = da.from_array(sp.csr_matrix(papalexi.X), chunks=(3000, papalexi.n_vars),
                                  asarray=False)
    csc = papalexi.copy()
    csc.X = sp.csc_matrix(papalexi.X)
    for adata in (papalexi, dense, dask_backed, csc):
        assert_same_anndata(gps.pp.pseudobulk(adata, **OPTIONS), from_path)


def test_a_layer_is_read_instead_of_x(papalexi, from_path, tmp_path):
    layered = papalexi.copy()
    layered.layers["counts"] = layered.X.copy()
    layered.X = sp.csr_matrix(layered.X.shape, dtype=np.float32)  # X holds something else
    assert_same_anndata(gps.pp.pseudobulk(layered, layer="counts", **OPTIONS), from_path)
    layered.write_zarr(tmp_path / "layered.zarr")
    assert_same_anndata(gps.pp.pseudobulk(str(tmp_path / "layered.zarr"), layer="counts",
                                          **OPTIONS), from_path)
    with pytest.raises(StoreError, match="no layer 'raw'; its layers: counts"):
        gps.pp.pseudobulk(layered, layer="raw", **OPTIONS)


def test_backed_and_lazy_forms_equal_the_path(papalexi_path, from_path, tmp_path):
    backed = ad.read_h5ad(papalexi_path, backed="r")
    assert_same_anndata(gps.pp.pseudobulk(backed, **OPTIONS), from_path)
    store = convert_h5ad(str(papalexi_path), str(tmp_path / "p.zarr"), block_rows=5000)
    lazy = ad.experimental.read_lazy(store)
    assert_same_anndata(gps.pp.pseudobulk(lazy, **OPTIONS), from_path)
    assert_same_anndata(gps.pp.pseudobulk(store, **OPTIONS), from_path)


def test_the_anndata_result_round_trips_through_h5ad(from_path, tmp_path):
    from_path.write_h5ad(tmp_path / "pb.h5ad")
    back = ad.read_h5ad(tmp_path / "pb.h5ad")
    assert_same_anndata(back, from_path)
    assert back.uns["genepert_scale"]["parameters"] == from_path.uns["genepert_scale"]["parameters"]


def test_as_xarray_gives_the_store_layout(papalexi):
    ds = gps.pp.pseudobulk(papalexi, as_xarray=True, **OPTIONS)
    assert set(ds.dims) >= {"perturbation", "gene"} and "control" not in ds.perturbation.values


def test_the_rooms_import_on_first_use():
    import subprocess
    import sys

    code = ("import sys, genepert_scale as gps; assert 'genepert_scale.tl' not in sys.modules; "
            "gps.tl.fit; assert 'genepert_scale.tl.model' in sys.modules; "
            "assert not hasattr(gps, 'nothing')")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_public_names_stay_functions_when_their_modules_are_imported():
    import genepert_scale.pl.report  # noqa: F401 - the module named like a function once was
    import genepert_scale.tl.evaluate  # noqa: F401

    assert callable(gps.tl.evaluate) and callable(gps.pl.write_report)
    assert gps.tl.evaluate.__module__ == "genepert_scale.tl.evaluate"


def test_models_take_the_anndata_form(small_screen):
    pb = gps.pp.pseudobulk(small_screen[0], n_top_genes=50)
    ds = gps.pp.pseudobulk(small_screen[0], n_top_genes=50, as_xarray=True)
    from_anndata = gps.tl.fit(pb, small_screen[1], alphas=[1.0], progress=False)
    from_dataset = gps.tl.fit(ds, small_screen[1], alphas=[1.0], progress=False)
    np.testing.assert_allclose(from_anndata.coef, from_dataset.coef, rtol=1e-5, atol=1e-7)
