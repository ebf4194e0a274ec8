"""DE genes from group moments against scanpy's rank_genes_groups t-test
(ranking, p-values, Benjamini–Hochberg FDR) and scipy, and the DE-restricted
metrics against a direct computation."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import xarray as xr
from scipy import stats

import genepert_scale as gps
from genepert_scale.pp.de import (
    NO_GENE,
    bh_fdr,
    fdr_de_genes,
    mse_de,
    pearson_delta_de,
    top_de_genes,
    welch_fdr,
    welch_pvalue,
    welch_t,
)
from genepert_scale.errors import ParameterError
from genepert_scale.pp.aggregate import pseudobulk

K = 20

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.PerformanceWarning")  # scanpy's


def scanpy_rankings(adata: ad.AnnData, ds: xr.Dataset, *, key: str, control: str,
                    rankby_abs: bool) -> tuple[dict[str, list[str]], dict[str, np.ndarray], ad.AnnData]:
    """scanpy's full t-test ranking per perturbation on ds's genes (names; and
    per field ``scores``/``pvals``/``pvals_adj``, a gene → value dict), and the
    log-normalised AnnData it ran on."""
    import scanpy as sc

    adata = adata.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata = adata[:, list(ds.gene.values)].copy()
    sc.tl.rank_genes_groups(adata, groupby=key, method="t-test", reference=control,
                            rankby_abs=rankby_abs, use_raw=False)
    result = adata.uns["rank_genes_groups"]
    groups = result["names"].dtype.names
    names = {g: list(result["names"][g]) for g in groups}
    fields = {field: {g: dict(zip(names[g], np.asarray(result[field][g], dtype=np.float64)))
                      for g in groups}
              for field in ("scores", "pvals", "pvals_adj")}
    return names, fields, adata


def gears_non_dropout(order: list[str], adata: ad.AnnData, key: str, group: str,
                      control: str) -> list[str]:
    """GEARS' top_non_dropout_de_20 filter applied to a full ranking."""
    mean = np.asarray(adata[adata.obs[key] == group].X.mean(axis=0)).ravel()
    ctrl = np.asarray(adata[adata.obs[key] == control].X.mean(axis=0)).ravel()
    keep = set(adata.var_names[(mean != 0) | (ctrl == 0)])
    return [g for g in order if g in keep][:K]


def assert_same_ranking(ds: xr.Dataset, raw: ad.AnnData, *, key: str, control: str) -> None:
    genes = ds.gene.values
    for rankby_abs in (False, True):
        names, fields, logged = scanpy_rankings(raw, ds, key=key, control=control,
                                                rankby_abs=rankby_abs)
        assert set(names) == set(ds.perturbation.values)
        for non_dropout in (False, True):
            top = top_de_genes(ds, K, rankby_abs=rankby_abs, non_dropout=non_dropout)
            for p in ds.perturbation.values:
                ours = list(genes[top.sel(perturbation=p).values])
                expected = (gears_non_dropout(names[p], logged, key, p, control)
                            if non_dropout else names[p][:K])
                assert ours == expected, (p, rankby_abs, non_dropout)
    t, pvalue, fdr = welch_t(ds), welch_pvalue(ds), welch_fdr(ds)
    de = fdr_de_genes(ds)
    for p in ds.perturbation.values:
        scanpy = {field: np.array([values[p][g] for g in genes]) for field, values in fields.items()}
        # scanpy's cells are float32: t agrees to ~1e-7 absolute
        np.testing.assert_allclose(t.sel(perturbation=p).values, scanpy["scores"], rtol=1e-5, atol=1e-6)
        for ours, field in ((pvalue, "pvals"), (fdr, "pvals_adj")):
            np.testing.assert_allclose(ours.sel(perturbation=p).values, scanpy[field],
                                       rtol=1e-3, atol=1e-12, err_msg=f"{p} {field}")
        assert set(genes[de.sel(perturbation=p).values]) == set(genes[scanpy["pvals_adj"] < 0.05]), p


def test_synthetic_ranking_equals_scanpy(small_screen):
    path, _ = small_screen
    ds = pseudobulk(path, control="non-targeting", n_top_genes=None, group_variance=True,
                    progress=False, as_xarray=True)
    assert ds.n_cells.values.min() >= 2
    assert_same_ranking(ds, ad.read_zarr(path), key="perturbation", control="non-targeting")


def test_papalexi_ranking_equals_scanpy(papalexi_path):
    ds = pseudobulk(str(papalexi_path), control="control", n_top_genes=None,
                    group_variance=True, progress=False, block_rows=4096, as_xarray=True)
    assert ds.sizes["perturbation"] == 25
    assert_same_ranking(ds, ad.read_h5ad(papalexi_path), key="perturbation", control="control")


def moments(mean, var, n, control_mean, control_var, n_control, genes=None) -> xr.Dataset:
    mean = np.asarray(mean, dtype=float)
    genes = genes or [f"g{i}" for i in range(mean.shape[1])]
    return xr.Dataset(
        {
            "mean": (("perturbation", "gene"), mean),
            "var": (("perturbation", "gene"), np.asarray(var, dtype=float)),
            "n_cells": ("perturbation", np.asarray(n)),
            "control_mean": ("gene", np.asarray(control_mean, dtype=float)),
            "control_var": ("gene", np.asarray(control_var, dtype=float)),
            "n_control_cells": ((), n_control),
        },
        coords={"perturbation": [f"p{i}" for i in range(mean.shape[0])], "gene": genes},
    )


def test_welch_t_and_pvalue_equal_scipy_and_handle_zero_variance():
    rng = np.random.default_rng(0)
    mean, var = rng.random((3, 6)), rng.random((3, 6))
    mean[0, :2] = [0.5, 0.2]
    var[0, :2] = 0.0
    n = np.array([5, 9, 1])
    cm, cv = rng.random(6), rng.random(6)
    cm[:2] = [0.5, 0.0]
    cv[:2] = 0.0
    ds = moments(mean, var, n, cm, cv, 11)
    t, p = welch_t(ds).values, welch_pvalue(ds).values
    expected = stats.ttest_ind_from_stats(mean, np.sqrt(var), n[:, None], cm, np.sqrt(cv), 11,
                                          equal_var=False)
    np.testing.assert_allclose(t[:2, 2:], expected.statistic[:2, 2:])
    np.testing.assert_allclose(p[:2, 1:], expected.pvalue[:2, 1:], rtol=1e-12)
    assert t[0, 0] == 0.0 and t[0, 1] == np.inf  # 0/0 -> 0 as scanpy; d/0 -> inf
    assert p[0, 0] == 1.0 and p[0, 1] == 0.0  # 0/0: no evidence (scanpy); d/0: certain
    assert np.isnan(t[2]).all() and np.isnan(p[2]).all()  # one cell: no test
    lazy = welch_pvalue(ds.chunk({"perturbation": 2, "gene": 4}))
    assert lazy.chunks is not None
    np.testing.assert_array_equal(lazy.values, p)


def direct_bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg by its definition: q_(i) = min over j >= i of m p_(j) / j."""
    m = len(p)
    order = np.argsort(p)
    q = np.empty(m)
    for i in range(m):
        q[order[i]] = min(1.0, min(m * p[order[j]] / (j + 1) for j in range(i, m)))
    return q


def test_bh_fdr_equals_scipy_and_the_definition():
    rng = np.random.default_rng(2)
    p = rng.random((5, 40)) ** 3
    p[1, :10] = p[1, 0]  # ties
    p[2, 5] = 0.0
    p[3] = 1.0
    p[4] = np.nan  # an untested row
    q = bh_fdr(p)
    np.testing.assert_allclose(q[:4], stats.false_discovery_control(p[:4], axis=-1, method="bh"),
                               rtol=1e-12)
    for row in range(4):
        np.testing.assert_allclose(q[row], direct_bh(p[row]), rtol=1e-12)
    assert np.isnan(q[4]).all()
    assert bh_fdr(p[0]).shape == (40,)


def test_fdr_de_genes_thresholds_the_adjusted_pvalues_lazily():
    rng = np.random.default_rng(3)
    mean = rng.normal(size=(4, 50)) * np.linspace(0, 1, 50)
    ds = moments(mean, np.ones_like(mean), [30, 30, 30, 1], np.zeros(50), np.ones(50), 40)
    q = welch_fdr(ds).values
    for fdr in (0.05, 0.2):
        lazy = fdr_de_genes(ds.chunk({"perturbation": 1, "gene": 7}), fdr)
        assert lazy.chunks is not None and lazy.dtype == bool
        de = lazy.values
        np.testing.assert_array_equal(de[:3], q[:3] < fdr)
        assert de[:3].any() and not de[3].any()  # one cell: no DE genes
    assert fdr_de_genes(ds, 0.2).values.sum() > fdr_de_genes(ds, 0.05).values.sum()
    assert gps.pp.fdr_de_genes is fdr_de_genes
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ParameterError, match="fdr must be in"):
            fdr_de_genes(ds, bad)


def test_top_de_genes_is_lazy_on_dask_and_pads_with_no_gene():
    mean = np.array([[1.0, 0.0, 3.0, 2.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    ds = moments(mean, np.ones_like(mean), [4, 4, 1], np.full(4, 0.5), np.ones(4), 8)
    lazy = top_de_genes(ds.chunk({"perturbation": 1, "gene": 2}), 3, rankby_abs=False)
    assert lazy.chunks is not None
    top = lazy.values
    np.testing.assert_array_equal(top[0], [2, 3, 0])
    np.testing.assert_array_equal(top[1], [3, NO_GENE, NO_GENE])  # genes 0-2 dropped out
    np.testing.assert_array_equal(top[2], [NO_GENE] * 3)
    unfiltered = top_de_genes(ds, 3, rankby_abs=False, non_dropout=False)
    np.testing.assert_array_equal(unfiltered.values[1], [3, 0, 1])  # ties by position


def test_missing_variance_is_a_clear_error(small_screen):
    ds = pseudobulk(small_screen[0], n_top_genes=20, group_variance=False, progress=False,
                    as_xarray=True)
    with pytest.raises(ParameterError, match="--group-variance"):
        welch_t(ds)


def test_metrics_equal_direct_computation():
    rng = np.random.default_rng(1)
    pred, true = rng.normal(size=(4, 30)), rng.normal(size=(4, 30))
    idx = np.array([rng.permutation(30)[:K] for _ in range(4)])
    idx[3, 5:] = NO_GENE
    r, mse = pearson_delta_de(pred, true, idx), mse_de(pred, true, idx)
    for i, row in enumerate(idx):
        genes = row[row != NO_GENE]
        assert r[i] == pytest.approx(stats.pearsonr(pred[i, genes], true[i, genes])[0])
        assert mse[i] == pytest.approx(np.mean((pred[i, genes] - true[i, genes]) ** 2))
    idx[0] = NO_GENE
    true[1] = 1.0
    r, mse = pearson_delta_de(pred, true, idx), mse_de(pred, true, idx)
    assert np.isnan(r[0]) and np.isnan(mse[0]) and np.isnan(r[1]) and np.isfinite(mse[1])
    with pytest.raises(ParameterError, match="out of range"):
        pearson_delta_de(pred, true, idx + 30)
