"""--exclude-targets: a perturbation's own target genes left out of its
metrics, checked against a direct computation on the remaining genes."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy.stats import pearsonr, spearmanr

from genepert_scale.cli.commands import main
from genepert_scale.io.encodings import PSEUDOBULK
from genepert_scale.pp.aggregate import write_pseudobulk
from genepert_scale.pp.de import fdr_de_genes, top_de_genes
from genepert_scale.tl.evaluate import evaluate
from genepert_scale.tl.scoring import target_genes
from genepert_scale.tl.metrics import (
    METRICS,
    centroid_accuracy,
    discrimination_score,
    perturbation_metrics,
    top_delta_genes,
)

N_GENES = 30


def direct_metrics(pred, true, keep, centroid, ttest=None, k=20, ttest_k=None, fdr=None):
    """Every per-row metric from its definition, on the genes ``keep`` marks
    (t-test DE genes: the first ``ttest_k`` kept ones of ``ttest``; DE genes
    at the FDR: the kept ones ``fdr`` marks)."""
    rows = []
    for i in range(len(pred)):
        g = np.flatnonzero(keep[i])
        p, y, c = pred[i, g], true[i, g], centroid[i, g]
        de = np.argsort(-np.abs(y), kind="stable")[:k]
        row = {
            "pearson_delta": pearsonr(p, y)[0],
            "pearson_delta_de20": pearsonr(p[de], y[de])[0],
            "rmse_delta": np.sqrt(np.mean((p - y) ** 2)),
            "mae_delta": np.mean(np.abs(p - y)),
            "pearson_delta_centroid": pearsonr(p - c, y - c)[0],
            "pearson_delta_centroid_de20": pearsonr(p[de] - c[de], y[de] - c[de])[0],
            "direction_de20": np.mean(np.sign(p[de]) == np.sign(y[de])),
        }
        if ttest is not None:
            t = [j for j in ttest[i] if j >= 0 and keep[i, j]][:ttest_k]
            row["pearson_delta_de20_ttest"] = pearsonr(pred[i, t], true[i, t])[0]
            row["mse_de20"] = np.mean((pred[i, t] - true[i, t]) ** 2)
        if fdr is not None:
            f = np.flatnonzero(fdr[i, g])  # positions among the kept genes
            top = np.argsort(-np.abs(p), kind="stable")[: len(f)]
            row["n_de_fdr"] = len(f)
            row["overlap_de_fdr"] = len(set(top) & set(f)) / len(f)
            row["spearman_delta_de_fdr"] = spearmanr(p[f], y[f])[0]
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture
def rows():
    rng = np.random.default_rng(3)
    true = rng.normal(size=(12, N_GENES))
    pred = true + rng.normal(scale=0.8, size=true.shape)
    exclude = np.zeros(true.shape, dtype=bool)
    for i in range(10):  # rows 10 and 11 target no measured gene
        exclude[i, [i, (i + 7) % N_GENES] if i % 3 == 0 else [i]] = True
        true[i, exclude[i]] = -6.0  # the knock-down: the largest |delta| of its row
        pred[i, exclude[i]] = -5.0
    return pred, true, exclude


def test_metrics_leave_out_the_excluded_genes(rows):
    pred, true, exclude = rows
    rng = np.random.default_rng(4)
    centroid = rng.normal(scale=0.3, size=true.shape)
    ttest = np.argsort(-np.abs(true + rng.normal(scale=0.5, size=true.shape)), axis=1)[:, :24]
    ttest[0, -3:] = -1  # a row ranked fewer genes
    fdr = np.abs(true) > 1.0  # the knock-downs among them
    ours = perturbation_metrics(pred, true, centroid=centroid, ttest_genes=ttest, fdr_genes=fdr,
                                exclude=exclude)
    direct = direct_metrics(pred, true, ~exclude, centroid, ttest, fdr=fdr).drop(columns="n_de_fdr")
    for metric, values in direct.items():
        np.testing.assert_allclose(ours[metric], values, rtol=1e-12, atol=1e-12, err_msg=metric)
    top = top_delta_genes(true, exclude=exclude)
    assert not np.take_along_axis(exclude, top, axis=1).any()  # the knock-down is not a DE gene
    assert (top_delta_genes(true)[:10, 0] == np.argmax(np.where(exclude, np.abs(true), 0), axis=1)[:10]).all()


def test_no_excluded_gene_changes_nothing(rows):
    pred, true, _ = rows
    centroid = np.full(true.shape, 0.1)
    plain = perturbation_metrics(pred, true, centroid=centroid)
    none = perturbation_metrics(pred, true, centroid=centroid, exclude=np.zeros(true.shape, bool))
    for metric in plain:
        np.testing.assert_array_equal(plain[metric], none[metric], err_msg=metric)


def test_set_metrics_leave_out_the_excluded_genes(rows):
    pred, true, exclude = rows
    ours = centroid_accuracy(pred, true, exclude=exclude)
    for i in range(len(pred)):
        keep = ~exclude[i]
        d = np.linalg.norm(pred[i, keep] - true[:, keep], axis=1)
        assert ours[i] == np.sum(np.delete(d, i) > d[i]) / (len(true) - 1)
    np.testing.assert_array_equal(centroid_accuracy(pred, true), centroid_accuracy(pred, true, exclude=None))


def knockdown_screen() -> xr.Dataset:
    """Singles G0..G19 over the measured genes G0..G29 (each knocks its own
    gene down by 3, far beyond its response), with the group variances the
    t-test DE genes need."""
    rng = np.random.default_rng(0)
    names = [f"G{i}" for i in range(20)]
    genes = [f"G{i}" for i in range(N_GENES)]
    hidden = rng.normal(size=(N_GENES, 4))
    delta = hidden[:20] @ rng.normal(size=(4, N_GENES)) * 0.3 + 0.05 * rng.normal(size=(20, N_GENES))
    delta[np.arange(20), np.arange(20)] -= 3.0
    n = len(names)
    return xr.Dataset(
        {"delta": (("perturbation", "gene"), delta), "mean": (("perturbation", "gene"), delta + 4),
         "var": (("perturbation", "gene"), np.full((n, N_GENES), 0.5)),
         "n_cells": ("perturbation", np.full(n, 50)), "control_mean": ("gene", np.full(N_GENES, 4.0)),
         "control_var": ("gene", np.full(N_GENES, 0.5)), "n_control_cells": 400},
        coords={"perturbation": np.array(names, dtype=object), "gene": np.array(genes, dtype=object)},
        attrs=PSEUDOBULK.attrs(),
    )


@pytest.fixture(scope="module")
def knockdown(tmp_path_factory):
    root = tmp_path_factory.mktemp("knockdown")
    ds = knockdown_screen()
    rng = np.random.default_rng(1)
    emb = root / "emb.pkl"
    emb.write_bytes(pickle.dumps({f"G{i}": list(rng.normal(size=8)) for i in range(N_GENES)}))
    return write_pseudobulk(ds, str(root / "pb.zarr")), str(emb), ds


def test_evaluate_excludes_targets(knockdown):
    store, emb, ds = knockdown
    options = dict(n_folds=4, knn_k=(1,), pca_baseline=None, alphas=1.0, progress=False)
    result = evaluate(store, emb, exclude_targets=True, **options)
    assert result.parameters["exclude_targets"] is True
    preds = result.predictions
    names = [str(p) for p in preds.perturbation.values]
    genes = [str(g) for g in preds.gene.values]
    keep = ~target_genes(names, genes)
    assert keep.sum() == len(names) * (N_GENES - 1)
    true = ds["delta"].sel(perturbation=names).values  # float64, as evaluate scores it
    full = top_de_genes(ds, N_GENES).sel(perturbation=names).values  # every gene, ranked
    fdr = fdr_de_genes(ds).sel(perturbation=names).values
    assert fdr[np.arange(len(names)), np.arange(len(names))].all()  # each knock-down is DE
    per = result.per_perturbation.set_index(["model", "perturbation"])
    fold = preds.fold.values
    centroid = np.vstack([true[fold != f].mean(axis=0) for f in fold])  # the training folds'
    for model in ("genepert_ridge", "mean_baseline"):
        pred = preds["prediction"].sel(model=model).values.astype(np.float64)
        direct = direct_metrics(pred, true, keep, centroid, full, ttest_k=20, fdr=fdr)
        ours = per.loc[model].loc[names]
        for metric in direct:
            if model == "mean_baseline" and "centroid" in metric:
                continue  # constant against the centroid: NaN by design
            np.testing.assert_allclose(ours[metric], direct[metric], rtol=1e-9, atol=1e-12,
                                       err_msg=f"{model} {metric}")
        np.testing.assert_allclose(ours["discrimination_score"],
                                   discrimination_score(pred, true, exclude=~keep))
    plain = evaluate(store, emb, **options).per_perturbation.set_index(["model", "perturbation"])
    ridge, ridge_plain = per.loc["genepert_ridge"], plain.loc["genepert_ridge"]
    changed = ~np.isclose(ridge_plain.loc[names, "pearson_delta"], ridge.loc[names, "pearson_delta"])
    assert changed.all()  # every perturbation targets a measured gene
    np.testing.assert_array_equal(ridge_plain.loc[names, "n_de_fdr"], fdr.sum(axis=1))
    np.testing.assert_array_equal(ridge.loc[names, "n_de_fdr"], fdr.sum(axis=1) - 1)
    np.testing.assert_array_equal(ridge_plain["discrimination_score"], ridge["discrimination_score"])
    assert set(METRICS) <= set(per.columns)


def test_cli_exclude_targets(knockdown, tmp_path):
    store, emb, _ = knockdown
    out = tmp_path / "report"
    assert main(["evaluate", store, "--embeddings", emb, "--folds", "3", "--alpha", "1",
                 "--pca-baseline", "0", "--exclude-targets", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["parameters"]["exclude_targets"] is True
