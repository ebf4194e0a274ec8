"""Metrics and baselines against direct computations; evaluation and report on a small pseudo-bulk."""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy.spatial.distance import cdist
from scipy.stats import pearsonr
from sklearn.linear_model import Ridge

from genepert_scale.tl.embeddings import normalize_rows
from genepert_scale.errors import ParameterError
from genepert_scale.tl.baselines import knn_prediction
from genepert_scale.tl.baselines import baseline_predictions
from genepert_scale.tl.evaluate import evaluate
from genepert_scale.tl.metrics import METRICS, pearson_rows, perturbation_metrics
from genepert_scale.io.encodings import PSEUDOBULK
from genepert_scale.pp.aggregate import write_pseudobulk
from genepert_scale.pl.report import FILES, write_report
from genepert_scale.pl.report_html import model_table
from genepert_scale.tl.splits import kfold


def test_metrics_equal_direct_computation():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(6, 50))
    pred = true + rng.normal(size=(6, 50))
    m = perturbation_metrics(pred, true)
    for i in range(6):
        top = np.argsort(-np.abs(true[i]))[:20]
        assert m["pearson_delta"][i] == pytest.approx(pearsonr(pred[i], true[i])[0], rel=1e-12)
        assert m["pearson_delta_de20"][i] == pytest.approx(pearsonr(pred[i, top], true[i, top])[0], rel=1e-12)
        assert m["rmse_delta"][i] == pytest.approx(np.sqrt(np.mean((pred[i] - true[i]) ** 2)), rel=1e-12)
        assert m["mae_delta"][i] == pytest.approx(np.mean(np.abs(pred[i] - true[i])), rel=1e-12)


def test_pearson_of_constant_prediction_is_nan():
    assert np.isnan(pearson_rows(np.zeros((1, 5)), np.arange(5.0)[None]))[0]


def test_baselines():
    rng = np.random.default_rng(1)
    G_train, G_test = normalize_rows(rng.normal(size=(30, 4))), normalize_rows(rng.normal(size=(5, 4)))
    X_train = rng.normal(size=(30, 8))
    preds = baseline_predictions(G_test @ G_train.T, X_train, knn_k=(1, 5))
    # GenePert's baseline: the mean of the training deltas, for every test perturbation
    np.testing.assert_allclose(preds["mean_baseline"], np.tile(X_train.mean(0), (5, 1)))
    np.testing.assert_allclose(preds["median_baseline"][2], np.median(X_train, axis=0))
    np.testing.assert_array_equal(preds["control_baseline"], 0.0)
    order = np.argsort(cdist(G_test, G_train, metric="cosine"), axis=1)
    for k in (1, 5):
        np.testing.assert_allclose(preds[f"knn_{k}"], X_train[order[:, :k]].mean(axis=1))
    assert knn_prediction(G_test @ G_train[:2].T, X_train[:2], 10).shape == (5, 8)


def test_kfold():
    fold = kfold(11, 3, seed=4)
    assert sorted(np.bincount(fold)) == [3, 4, 4]
    np.testing.assert_array_equal(fold, kfold(11, 3, seed=4))
    assert not np.array_equal(fold, kfold(11, 3, seed=5))
    with pytest.raises(ParameterError):
        kfold(3, 4, seed=0)


@pytest.fixture
def small(tmp_path):
    """A pseudo-bulk of 40 singles and 6 pairs whose delta is linear in the
    embedding, plus its embedding pickle (one target gene lacks a vector)."""
    rng = np.random.default_rng(2)
    genes = [f"G{i}" for i in range(40)]
    emb = rng.normal(size=(40, 8))
    unit = normalize_rows(emb)
    names = genes + [f"G{i}+G{i + 1}" for i in range(0, 12, 2)] + ["NOVEC"]
    feats = np.vstack([unit, normalize_rows(unit[0:12:2] + unit[1:12:2]), unit[:1]])
    delta = feats @ rng.normal(size=(8, 30)) + 0.1 * rng.normal(size=(len(names), 30))
    ds = xr.Dataset(
        {"delta": (("perturbation", "gene"), delta), "mean": (("perturbation", "gene"), delta + 1),
         "n_cells": ("perturbation", np.full(len(names), 50)), "control_mean": ("gene", np.ones(30))},
        coords={"perturbation": np.array(names, dtype=object),
                "gene": np.array([f"R{j}" for j in range(30)], dtype=object)},
        attrs=PSEUDOBULK.attrs(),
    )
    pb = write_pseudobulk(ds, str(tmp_path / "pb.zarr"))
    emb_path = tmp_path / "emb.pkl"
    emb_path.write_bytes(pickle.dumps({g: list(v) for g, v in zip(genes, emb)}))
    return pb, str(emb_path), feats[:-1], delta[:-1], names[:-1]


def test_evaluate_matches_refit_and_metrics(small):
    pb, emb, G, X, names = small
    result = evaluate(pb, emb, n_folds=4, seed=3, block_size=7, progress=False)
    assert result.missing["dropped_perturbations"] == ["NOVEC"]
    fold = result.folds.set_index("perturbation").loc[names, "fold"].to_numpy()
    np.testing.assert_array_equal(fold, kfold(len(names), 4, seed=3))
    pred = result.predictions["prediction"].sel(model="genepert_ridge", perturbation=names).values
    for fit in result.fold_fits:
        test = fold == fit.fold
        ref = Ridge(alpha=fit.alpha).fit(G[~test], X[~test]).predict(G[test])
        np.testing.assert_allclose(pred[test], ref, rtol=1e-5, atol=1e-5)  # stored as float32
    table = result.per_perturbation
    # pairs among the test perturbations: the additive baseline; no target is a measured gene: no pca_ridge
    assert list(result.models) == ["genepert_ridge", "mean_baseline", "median_baseline", "control_baseline",
                                   "matching_mean", "additive", "knn_1", "knn_5", "knn_10"]
    assert len(table) == 9 * len(names) and "NOVEC" not in set(table.perturbation)
    ridge = table[table.model == "genepert_ridge"].set_index("perturbation").loc[names]
    direct = perturbation_metrics(pred.astype(np.float64), X)
    np.testing.assert_allclose(ridge["rmse_delta"], direct["rmse_delta"], rtol=1e-5)
    summary = result.summary["genepert_ridge"]["pearson_delta"]
    assert summary["mean"] == pytest.approx(ridge["pearson_delta"].mean())
    assert summary["fold_mean"] == pytest.approx(ridge.groupby("fold")["pearson_delta"].mean().mean())
    assert summary["fold_std"] == pytest.approx(ridge.groupby("fold")["pearson_delta"].mean().std())
    # the planted linear structure: ridge must beat the mean of training deltas
    assert summary["mean"] > result.summary["mean_baseline"]["pearson_delta"]["mean"] + 0.3
    assert result.summary["control_baseline"]["pearson_delta"]["mean"] is None


def test_fixed_alpha_and_missing_error(small):
    pb, emb, *_ = small
    result = evaluate(pb, emb, n_folds=2, alphas=5.0, missing="zero", knn_k=(1,), progress=False)
    assert [f.alpha for f in result.fold_fits] == [5.0, 5.0]
    assert "NOVEC" in set(result.per_perturbation.perturbation)
    with pytest.raises(ParameterError, match="at least 2 folds"):
        evaluate(pb, emb, n_folds=2, progress=False)


def test_report_files(small, tmp_path):
    pb, emb, *_ = small
    result = evaluate(pb, emb, n_folds=3, progress=False)
    out = write_report(result, str(tmp_path / "report"))
    for name in FILES:
        assert (tmp_path / "report" / name).exists(), name
    doc = json.loads((tmp_path / "report" / "metrics.json").read_text())
    ridge = doc["models"]["genepert_ridge"]
    folds = ridge["folds"]
    assert len(folds) == 3 and {"alpha", "alpha_path", "select_by", "solver"} <= set(folds[0])
    assert set(folds[0]["alpha_path"][0]) == {"alpha", "train_mse", "val_mse", "val_pearson_delta",
                                              "inner_cv_mse", "inner_cv_pearson_delta"}
    assert len(folds[0]["alpha_path"]) == 13 and doc["parameters"]["select_by"] == "pearson_delta"
    assert ridge["alpha"] == {"select_by": "pearson_delta", "grid": doc["parameters"]["alphas"],
                              "chosen": [f["alpha"] for f in folds]}
    # the chosen alpha is the best inner-CV Pearson of its fold's path
    for f in folds:
        best = max(f["alpha_path"], key=lambda row: row["inner_cv_pearson_delta"])
        assert f["alpha"] == best["alpha"]
    # the contract of DESIGN.md §3, and the uncertainty of every model
    for model, metrics in doc["models"].items():
        for metric in ("pearson_delta", "pearson_delta_de20", "rmse_delta", "mae_delta"):
            assert {"mean", "std", "fold_mean", "fold_std", "n"} <= set(metrics[metric])
        for metric in ("pearson_delta", "rmse_delta"):
            assert len(metrics[metric]["ci95"]) == 2
        if model != "genepert_ridge":
            test = metrics["paired_test"]
            assert test["reference"] == "genepert_ridge" and test["difference"] == f"genepert_ridge - {model}"
            assert {"test", "n", "statistic", "pvalue", "mean_difference", "median_difference"} <= set(
                test["pearson_delta"]) and "rmse_delta" in test
    low, high = ridge["pearson_delta"]["ci95"]
    assert low <= ridge["pearson_delta"]["mean"] <= high
    assert {"matching_mean", "additive", "pca_ridge"} == set(doc["baselines"])
    assert doc["parameters"]["bootstrap"] == {"n_resamples": 2000, "seed": 0, "confidence": 0.95}
    assert doc["missing"]["n_dropped_perturbations"] == 1
    per = pd.read_csv(tmp_path / "report" / "per_perturbation.csv")
    assert list(per.columns[:3]) == ["perturbation", "fold", "model"]
    preds = xr.open_zarr(tmp_path / "report" / "predictions.zarr")
    assert preds["prediction"].dims == ("model", "perturbation", "gene") and "fold" in preds
    assert (tmp_path / "report" / "pearson_per_model.png").read_bytes()[:4] == b"\x89PNG"
    lead = model_table(doc["models"])  # the Virtual Cell Challenge's score first, then the rest
    assert lead in (tmp_path / "report" / "report.html").read_text()
    columns = [c for c in re.findall(r"<th>(.*?)</th>", lead) if c in METRICS]
    assert columns[:3] == ["overlap_de_fdr", "discrimination_score", "mae_delta"]
    assert sorted(columns) == sorted(METRICS)
    assert out.endswith("report")


def test_ttest_de_metrics_use_welch_genes_from_the_pass(small_screen, caplog):
    """With group variances, pearson_delta_de20_ttest and mse_de20 are computed on
    the Welch t-test top-20 DE genes (GEARS), overlap_de_fdr and
    spearman_delta_de_fdr on its DE genes at FDR < 0.05; without them they are
    empty, and the log says why."""
    from scipy.stats import pearsonr, spearmanr

    from genepert_scale.pp.de import fdr_de_genes, top_de_genes
    from genepert_scale.tl.evaluate import evaluate
    from genepert_scale.pp.aggregate import pseudobulk

    path, embedding = small_screen
    ds = pseudobulk(path, n_top_genes=None, group_variance=True, progress=False, as_xarray=True)
    result = evaluate(ds, embedding, n_folds=3, seed=1, progress=False)
    table = result.per_perturbation.query("model == 'genepert_ridge'").set_index("perturbation")
    predicted = result.predictions.prediction.sel(model="genepert_ridge")
    true = result.predictions.delta
    de = top_de_genes(ds, 20)
    for name in table.index[:5]:
        genes = de.sel(perturbation=name).values
        p = predicted.sel(perturbation=name).values[genes].astype(float)
        t = true.sel(perturbation=name).values[genes].astype(float)
        assert table.loc[name, "pearson_delta_de20_ttest"] == pytest.approx(pearsonr(p, t)[0], rel=1e-5)
        assert table.loc[name, "mse_de20"] == pytest.approx(np.mean((p - t) ** 2), rel=1e-4)
    fdr = fdr_de_genes(ds)
    for name in table.index:
        genes = np.flatnonzero(fdr.sel(perturbation=name).values)
        p = predicted.sel(perturbation=name).values.astype(float)
        t = true.sel(perturbation=name).values.astype(float)
        top = np.argsort(-np.abs(p), kind="stable")[: len(genes)]
        assert table.loc[name, "n_de_fdr"] == len(genes)
        assert table.loc[name, "overlap_de_fdr"] == pytest.approx(len(set(top) & set(genes)) / len(genes))
        assert table.loc[name, "spearman_delta_de_fdr"] == pytest.approx(spearmanr(p[genes], t[genes])[0])
    assert table["n_de_fdr"].min() >= 2 and result.summary["genepert_ridge"]["overlap_de_fdr"]["n"] == len(table)
    with caplog.at_level("INFO", logger="genepert_scale.tl.evaluate"):
        without = evaluate(ds.drop_vars(["var", "control_var"]), embedding, n_folds=3, seed=1,
                           progress=False).per_perturbation
    assert "no group variances: overlap_de_fdr" in caplog.text
    for column in ("mse_de20", "overlap_de_fdr", "spearman_delta_de_fdr", "n_de_fdr"):
        assert without[column].isna().all(), column
    assert without["pearson_delta"].equals(result.per_perturbation["pearson_delta"])


def test_default_alpha_does_not_lose_to_the_mean_baseline_on_a_weak_signal():
    """A shared profile, a weak linear signal and noise: where a fixed alpha
    beats the mean of the training deltas, the default grid and rule do too,
    and choosing by Pearson scores at least as well as by MSE."""
    from genepert_scale.tl.embeddings import EmbeddingTable

    rng = np.random.default_rng(0)
    n, d, q = 60, 16, 80
    names = [f"P{i}" for i in range(n)]
    unit = normalize_rows(rng.normal(size=(n, d)))
    delta = 2 * rng.normal(size=q) + 0.6 * unit @ rng.normal(size=(d, q)) + rng.normal(size=(n, q))
    ds = xr.Dataset(
        {"delta": (("perturbation", "gene"), delta), "control_mean": ("gene", np.ones(q)),
         "n_cells": ("perturbation", np.full(n, 20))},
        coords={"perturbation": np.array(names, dtype=object),
                "gene": np.array([f"R{j}" for j in range(q)], dtype=object)},
        attrs=PSEUDOBULK.attrs(),
    )
    table = EmbeddingTable(pd.Index(names), unit, ({"path": "memory", "dim": d, "sha256": "-"},))

    def pearson(**options) -> tuple[float, float]:
        result = evaluate(ds, table, n_folds=5, knn_k=(1,), n_resamples=10, progress=False, **options)
        return tuple(result.summary[m]["pearson_delta"]["mean"] for m in ("genepert_ridge", "mean_baseline"))

    fixed, mean = pearson(alphas=1.0)
    default, _ = pearson()
    by_mse, _ = pearson(select_by="mse")
    assert fixed > mean and default > mean and default >= by_mse
