"""Contexts and batches: each perturbation against the controls of its own
context, matched by batch, against direct numpy/scanpy computations."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from genepert_scale.errors import LabelError
from genepert_scale.pp.aggregate import CONTROL_CONTEXT, pseudobulk


def log_normalized(adata: ad.AnnData, genes) -> pd.DataFrame:
    """scanpy's normalize_total(1e4) + log1p over all genes, then the ``genes``."""
    import scanpy as sc

    adata = adata.copy()
    adata.X = adata.X.astype(np.float64)  # the oracle in double precision, as our sums
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    x = adata[:, list(genes)].X
    return pd.DataFrame(x.toarray() if sp.issparse(x) else x, columns=list(genes),
                        index=adata.obs_names)


@pytest.fixture(scope="module")
def two_lines(tmp_path_factory) -> tuple[str, ad.AnnData]:
    """Two cell lines with different baselines; perturbation A acts in K only."""
    rng = np.random.default_rng(3)
    n, genes = 1200, 30
    context = np.where(np.arange(n) % 2 == 0, "K562", "RPE1")
    label = rng.choice(["non-targeting", "A", "B"], n, p=[0.4, 0.3, 0.3])
    rate = np.where(context == "K562", 5.0, 2.0)[:, None] * np.ones((n, genes))
    rate[(label == "A") & (context == "K562"), :5] *= 4  # a planted K562-only effect
    x = rng.poisson(rate).astype(np.float32)
    obs = pd.DataFrame({"perturbation": pd.Categorical(label), "line": pd.Categorical(context)},
                       index=[f"c{i}" for i in range(n)])
    adata = ad.AnnData(sp.csr_matrix(x), obs=obs,
                       var=pd.DataFrame(index=[f"G{i}" for i in range(genes)]))
    path = tmp_path_factory.mktemp("ctx") / "two.zarr"
    adata.write_zarr(path)
    return str(path), adata


def test_each_context_is_compared_with_its_own_controls(two_lines):
    path, adata = two_lines
    ds = pseudobulk(path, n_top_genes="all", context_key="line", as_xarray=True)
    logged = log_normalized(adata, ds.gene.values)
    assert list(ds[CONTROL_CONTEXT].values) == ["K562", "RPE1"]
    for i, (name, line) in enumerate(zip(ds.perturbation.values, ds.context.values)):
        cells = (adata.obs["perturbation"] == name) & (adata.obs["line"] == line)
        controls = (adata.obs["perturbation"] == "non-targeting") & (adata.obs["line"] == line)
        expected = logged[cells.to_numpy()].mean() - logged[controls.to_numpy()].mean()
        np.testing.assert_allclose(ds.delta.values[i], expected, rtol=1e-5, atol=1e-6)
        assert ds.n_cells.values[i] == cells.sum()
        np.testing.assert_allclose(ds.control_mean.sel({CONTROL_CONTEXT: line}).values,
                                   logged[controls.to_numpy()].mean(), rtol=1e-5, atol=1e-6)
    effect = ds.delta.values[:, :5].mean(axis=1)
    k562_a = (ds.perturbation.values == "A") & (ds.context.values == "K562")
    assert effect[k562_a] > 1 and np.all(np.abs(effect[~k562_a]) < 0.3)  # planted, not smeared


def test_a_context_without_controls_is_named(two_lines, tmp_path):
    _, adata = two_lines
    drop = (adata.obs["line"] == "RPE1") & (adata.obs["perturbation"] == "non-targeting")
    adata[~drop.to_numpy()].copy().write_zarr(tmp_path / "s.zarr")
    with pytest.raises(LabelError, match="contexts without control cells .*RPE1"):
        pseudobulk(str(tmp_path / "s.zarr"), context_key="line", n_top_genes="all", as_xarray=True)


def test_batch_matched_controls_on_the_real_screen(papalexi_path):
    adata = ad.read_h5ad(papalexi_path)
    ds = pseudobulk(str(papalexi_path), control="control", n_top_genes=100, batch_key="bio_rep",
                    block_rows=4096, as_xarray=True)
    logged = log_normalized(adata, ds.gene.values)
    rep, label = adata.obs["bio_rep"].astype(str), adata.obs["perturbation"].astype(str)
    control_of = {b: logged[((label == "control") & (rep == b)).to_numpy()].mean()
                  for b in rep.unique()}
    for i, name in enumerate(ds.perturbation.values):
        cells = (label == name).to_numpy()
        weights = rep[cells].value_counts(normalize=True)
        reference = sum(w * control_of[b] for b, w in weights.items())
        expected = logged[cells].mean() - reference
        np.testing.assert_allclose(ds.delta.values[i], expected, rtol=1e-5, atol=1e-6)
    assert json.loads(ds.attrs["batches_without_controls"]) == []
    np.testing.assert_allclose(ds.control_mean.values,
                               logged[(label == "control").to_numpy()].mean(), rtol=1e-5)


def test_a_batch_without_controls_is_reported_and_its_cells_use_the_other_batches(
        papalexi_path, tmp_path):
    adata = ad.read_h5ad(papalexi_path)
    reps = adata.obs["bio_rep"].astype(str)
    lost = reps.unique()[0]
    keep = ~((adata.obs["perturbation"] == "control") & (reps == lost)).to_numpy()
    adata[keep].copy().write_h5ad(tmp_path / "s.h5ad")
    ds = pseudobulk(str(tmp_path / "s.h5ad"), control="control", n_top_genes=50,
                    batch_key="bio_rep", as_xarray=True)
    assert json.loads(ds.attrs["batches_without_controls"]) == [["", lost]]
    sub = adata[keep]
    logged = log_normalized(sub, ds.gene.values)
    rep, label = sub.obs["bio_rep"].astype(str), sub.obs["perturbation"].astype(str)
    name = ds.perturbation.values[0]
    cells = ((label == name) & (rep != lost)).to_numpy()
    weights = rep[cells].value_counts(normalize=True)
    reference = sum(w * logged[((label == "control") & (rep == b)).to_numpy()].mean()
                    for b, w in weights.items())
    np.testing.assert_allclose(ds.delta.values[0],
                               logged[(label == name).to_numpy()].mean() - reference,
                               rtol=1e-5, atol=1e-6)


def test_contexts_and_batches_together_equal_one_context_at_a_time(two_lines, tmp_path):
    path, adata = two_lines
    adata = adata.copy()
    adata.obs["lane"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 3 == 0, "L1", "L2"))
    adata.write_zarr(tmp_path / "lanes.zarr")
    both = pseudobulk(str(tmp_path / "lanes.zarr"), n_top_genes="all", context_key="line",
                      batch_key="lane", as_xarray=True)
    for line in ("K562", "RPE1"):
        adata[(adata.obs["line"] == line).to_numpy()].copy().write_zarr(tmp_path / f"{line}.zarr")
        alone = pseudobulk(str(tmp_path / f"{line}.zarr"), n_top_genes="all", batch_key="lane",
                           as_xarray=True)
        rows = both.context.values == line
        np.testing.assert_allclose(both.delta.values[rows], alone.delta.values, rtol=1e-12)
        np.testing.assert_array_equal(both.perturbation.values[rows], alone.perturbation.values)


def test_one_context_is_modelled_at_a_time(two_lines, tmp_path):
    from genepert_scale.errors import ParameterError
    from genepert_scale.pp.aggregate import one_context, write_pseudobulk

    path, adata = two_lines
    both = pseudobulk(path, n_top_genes="all", context_key="line", as_xarray=True)
    with pytest.raises(ParameterError, match="holds the contexts K562, RPE1, none was chosen"):
        one_context(both)
    k562 = one_context(both, "K562")
    assert k562.attrs["context"] == "K562" and k562.control_mean.dims == ("gene",)
    np.testing.assert_array_equal(k562.delta.values, both.delta.values[both.context == "K562"])
    adata[(adata.obs["line"] == "K562").to_numpy()].copy().write_zarr(tmp_path / "k.zarr")
    alone = pseudobulk(str(tmp_path / "k.zarr"), n_top_genes="all", as_xarray=True)
    np.testing.assert_allclose(k562.control_mean.values, alone.control_mean.values, rtol=1e-12)
    write_pseudobulk(both, str(tmp_path / "pb.zarr"))
    from genepert_scale.pp.aggregate import open_pseudobulk

    assert open_pseudobulk(str(tmp_path / "pb.zarr")).context.dims == ("perturbation",)


def test_the_anndata_form_has_a_control_row_per_context(two_lines):
    path, _ = two_lines
    pb = pseudobulk(path, n_top_genes="all", context_key="line")  # the AnnData form
    controls = pb.obs[pb.obs["is_control"]]
    assert list(controls["context"]) == ["K562", "RPE1"]
    assert list(controls.index) == ["K562/non-targeting", "RPE1/non-targeting"]
    ds = pseudobulk(path, n_top_genes="all", context_key="line", as_xarray=True)
    rows = pb[~pb.obs["is_control"].to_numpy()]
    np.testing.assert_allclose(rows.layers["delta"], ds.delta.values.astype(np.float32))
    assert list(rows.obs["perturbation"]) == list(ds.perturbation.values)
    assert list(rows.obs["context"]) == list(ds.context.values)


def normalized(adata: ad.AnnData, gene: str) -> np.ndarray:
    """Each cell's ``gene`` on the 1e4-normalised scale, before log1p (float64)."""
    x = sp.csr_matrix(adata.X, dtype=np.float64)
    totals = np.asarray(x.sum(axis=1)).ravel()
    column = np.asarray(x[:, adata.var_names.get_loc(gene)].todense()).ravel()
    return column * 1e4 / np.where(totals == 0, 1, totals)


@pytest.mark.parametrize("batch_key", [None, "bio_rep"])
def test_knockdown_on_the_real_screen(papalexi_path, batch_key):
    adata = ad.read_h5ad(papalexi_path)
    ds = pseudobulk(str(papalexi_path), control="control", n_top_genes=100, block_rows=4096,
                    batch_key=batch_key, as_xarray=True)
    label, rep = adata.obs["perturbation"].astype(str), adata.obs["bio_rep"].astype(str)
    measured = [p for p in ds.perturbation.values if p in adata.var_names]
    assert len(measured) == 9
    for name, value in zip(ds.perturbation.values, ds.knockdown.values):
        if name not in measured:
            assert np.isnan(value)
            continue
        expression = normalized(adata, name)
        cells = (label == name).to_numpy()
        if batch_key is None:
            reference = expression[(label == "control").to_numpy()].mean()
        else:
            weights = rep[cells].value_counts(normalize=True)
            reference = sum(w * expression[((label == "control") & (rep == b)).to_numpy()].mean()
                            for b, w in weights.items())
        np.testing.assert_allclose(value, 1 - expression[cells].mean() / reference, rtol=1e-9)


def test_min_knockdown_drops_and_lists_the_weak(papalexi_path):
    full = pseudobulk(str(papalexi_path), control="control", n_top_genes=50, block_rows=4096,
                      as_xarray=True)
    weak = full.perturbation.values[full.knockdown.values < 0.5]
    assert weak.size
    ds = pseudobulk(str(papalexi_path), control="control", n_top_genes=50, block_rows=4096,
                    min_knockdown=0.5, as_xarray=True)
    assert set(full.perturbation.values) - set(ds.perturbation.values) == set(weak)
    assert sorted(json.loads(ds.attrs["low_knockdown_perturbations"])) == sorted(weak)
    assert np.isnan(ds.knockdown.values).sum() == 16  # no measured target: kept


def test_the_compiled_knockdown_record_equals_numpy():
    from genepert_scale.pp import knockdown
    from genepert_scale.pp.groups import group_cells

    rng = np.random.default_rng(2)
    x = sp.random(300, 12, density=0.4, format="csr", random_state=3, dtype=np.float32)
    x.data = np.floor(x.data * 40)
    labels = rng.choice(["ctrl", "G1", "G2+G5", "G7", "G3+NOPE"], 300)
    codes = np.array([["ctrl", "G1", "G2+G5", "G3+NOPE", "G7"].index(v) for v in labels], np.int32)
    codes[:7] = -1
    grouped, groups = group_cells(codes, ["ctrl", "G1", "G2+G5", "G3+NOPE", "G7"])
    targets = knockdown.targets_of(groups, [f"G{i}" for i in range(12)], "ctrl")
    scales = knockdown.row_scales(x.data, x.indptr, 1e4)
    compiled, numpy = (knockdown.block_target_sums(sp.csr_array(x), grouped, targets, scales,
                                                   True, use_numba=flag) for flag in (True, False))
    for a, b in zip(compiled, numpy):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert compiled[0][groups.perturbation == "G3+NOPE", 1] == 0  # an unmeasured target
