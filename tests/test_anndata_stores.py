"""Screens as anndata writes them (its default zarr — v3 and sharded since
anndata 0.13, v2 before —, zarr v2, zarr v3 and .h5ad) pseudo-bulk to the same
result."""

from __future__ import annotations

from importlib.metadata import version

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from genepert_scale.io import codecs
from genepert_scale.io.screen import open_screen
from genepert_scale.pp.aggregate import pseudobulk

ARRAYS = ("mean", "delta", "n_cells", "control_mean")
PIPELINES = ["zarr", pytest.param("zarrs", marks=pytest.mark.skipif(
    not codecs.zarrs_installed(), reason="zarrs is not installed"))]


def screen(n_obs: int = 40_000, n_vars: int = 100, seed: int = 0) -> ad.AnnData:
    """Counts of ``n_obs`` cells in 12 perturbations and a control, CSR."""
    rng = np.random.default_rng(seed)
    x = sp.random(n_obs, n_vars, density=0.2, format="csr", random_state=seed, dtype=np.float32)
    x.data = rng.integers(1, 30, x.nnz).astype(np.float32)
    labels = ["non-targeting", *[f"P{i}" for i in range(12)]]
    obs = pd.DataFrame({"perturbation": pd.Categorical(rng.choice(labels, n_obs))},
                       index=[f"cell{i}" for i in range(n_obs)])
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_vars)]))


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    """The same screen (800,000 stored values: several of anndata's chunks)
    written by anndata in each of its formats."""
    tmp, adata = tmp_path_factory.mktemp("anndata"), screen()
    paths = {name: str(tmp / name) for name in ("default.zarr", "v2.zarr", "v3.zarr", "s.h5ad")}
    adata.write_zarr(paths["default.zarr"])
    for fmt in (2, 3):
        with ad.settings.override(zarr_write_format=fmt):
            adata.write_zarr(paths[f"v{fmt}.zarr"])
    adata.write_h5ad(paths["s.h5ad"])
    return paths


def test_anndata_0_13_writes_sharded_zarr_v3_by_default(stores):
    data = zarr.open_group(stores["default.zarr"], mode="r")["X/data"]
    assert data.nchunks > 1
    if tuple(int(p) for p in version("anndata").split(".")[:2]) >= (0, 13):
        assert data.metadata.zarr_format == 3 and data.shards is not None


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_stores_anndata_writes_pseudobulk_identically(stores, pipeline, monkeypatch):
    monkeypatch.setenv(codecs.ENV_VAR, "1" if pipeline == "zarrs" else "0")
    results = {name: pseudobulk(path, n_top_genes=20, block_rows=3000, progress=False, as_xarray=True)
               for name, path in stores.items()}
    reference = results.pop("s.h5ad")
    for name, result in results.items():
        assert list(result.perturbation.values) == list(reference.perturbation.values), name
        assert list(result.gene.values) == list(reference.gene.values), name
        for array in ARRAYS:
            np.testing.assert_array_equal(result[array].values, reference[array].values,
                                          err_msg=f"{name}: {array}")
    rows = open_screen(stores["default.zarr"]).csr
    assert bool(rows.zarrs) == (pipeline == "zarrs")
