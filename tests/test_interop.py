"""AnnData exports of the pseudo-bulk and of predictions, read back by anndata."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import xarray as xr

from genepert_scale.cli.commands import main
from genepert_scale.errors import ParameterError
from genepert_scale.pp.labels import gears_condition
from genepert_scale.io.interop import (
    predictions_to_anndata,
    pseudobulk_to_anndata,
    write_h5ad,
)
from genepert_scale.pp.aggregate import pseudobulk, write_pseudobulk


@pytest.fixture(scope="module")
def pb(small_screen) -> xr.Dataset:
    return pseudobulk(small_screen[0], n_top_genes=60, group_variance=True, progress=False, as_xarray=True)


def test_gears_conditions():
    assert gears_condition("KLF1", "non-targeting") == "KLF1+ctrl"
    assert gears_condition("KLF1+BAK1", "non-targeting") == "KLF1+BAK1"
    assert gears_condition("non-targeting", "non-targeting") == "ctrl"


def test_pseudobulk_export_reads_back(pb, tmp_path):
    path = write_h5ad(pseudobulk_to_anndata(pb), str(tmp_path / "pb.h5ad"))
    back = ad.read_h5ad(path)
    control = pb.attrs["control"]
    assert list(back.obs_names) == [control, *pb.perturbation.values]
    assert list(back.var_names) == list(pb.gene.values)
    assert back.obs.loc[control, "condition"] == "ctrl" and back.obs["is_control"].sum() == 1
    rows = back[list(pb.perturbation.values)]
    np.testing.assert_allclose(rows.X, pb["mean"].values, rtol=1e-6)
    np.testing.assert_allclose(rows.layers["delta"], pb["delta"].values, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows.layers["var"], pb["var"].values, rtol=1e-6)
    np.testing.assert_allclose(back[control].X.ravel(), pb.control_mean.values, rtol=1e-6)
    np.testing.assert_array_equal(rows.obs["n_cells"], pb.n_cells.values)
    assert back.obs.loc[control, "n_cells"] == int(pb.n_control_cells)
    pairs = [p for p in pb.perturbation.values if "+" in p]
    assert pairs and all(back.obs.loc[p, "condition"] == p for p in pairs)
    meta = back.uns["genepert_scale"]
    np.testing.assert_allclose(meta["control_mean"], pb.control_mean.values)
    assert json.loads(meta["parameters"])["n_top_genes"] == 60
    assert "dispersions_norm" in back.var


def test_export_pseudobulk_command(pb, tmp_path, capsys):
    store = write_pseudobulk(pb, str(tmp_path / "pb.zarr"))
    out = tmp_path / "pb.h5ad"
    assert main(["export-pseudobulk", store, str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    back = ad.read_h5ad(out)
    assert back.n_obs == pb.sizes["perturbation"] + 1
    assert main(["export-pseudobulk", store, str(out)]) != 0  # exists, no --overwrite


def test_predictions_export_reads_back_with_scanpy(pb, tmp_path):
    import scanpy as sc

    rng = np.random.default_rng(0)
    names = ["GENEA", "GENEB+GENEC"]
    genes = pb.gene.values[:10]
    delta = xr.DataArray(rng.normal(size=(2, 10)), dims=("perturbation", "gene"),
                         coords={"perturbation": names, "gene": genes, "fold": ("perturbation", [0, 3])})
    adata = predictions_to_anndata(delta, pb.control_mean, uns={"model": "genepert_ridge"})
    path = write_h5ad(adata, str(tmp_path / "pred.h5ad"))
    back = sc.read_h5ad(path)
    assert list(back.obs["condition"]) == ["ctrl", "GENEA+ctrl", "GENEB+GENEC"]
    assert list(back.obs["fold"].iloc[1:]) == [0, 3]
    expected = pb.control_mean.sel(gene=genes).values + delta.values
    np.testing.assert_allclose(back[names].X, np.maximum(expected, 0), rtol=1e-6)  # clipped at zero
    assert back.uns["genepert_scale"]["clipped"]["n_values"] == (expected < 0).sum()
    np.testing.assert_allclose(back[names].layers["delta"], delta.values, rtol=1e-6)
    assert back.uns["genepert_scale"]["model"] == "genepert_ridge"


def test_predictions_need_the_control_mean_of_every_gene(pb):
    delta = xr.DataArray(np.zeros((1, 2)), dims=("perturbation", "gene"),
                         coords={"perturbation": ["A"], "gene": ["nope", pb.gene.values[0]]})
    with pytest.raises(ParameterError, match="lacks 1 predicted genes"):
        predictions_to_anndata(delta, pb.control_mean)
    with pytest.raises(ParameterError, match="shape"):
        predictions_to_anndata(delta, np.zeros(3))
