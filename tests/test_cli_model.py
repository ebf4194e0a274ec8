"""fit / predict through the API and the CLI; end to end on the real Papalexi screen."""

from __future__ import annotations

import json
import logging
import math
import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from sklearn.linear_model import Ridge

from genepert_scale.cli.commands import main
from genepert_scale.tl.embeddings import normalize_rows
from genepert_scale.errors import EmbeddingError, INPUT_ERROR_EXIT_CODE
from genepert_scale.tl.model import fit, predict, write_predictions
from genepert_scale.io.encodings import PSEUDOBULK
from genepert_scale.pp.aggregate import write_pseudobulk
from genepert_scale.pl.report import FILES
from genepert_scale.tl.ridge import load_model, save_model

DATA = Path(__file__).parents[2] / "shared" / "data"
PAPALEXI = DATA / "papalexi2021_lowmoi_299genes.h5ad"


def write_embedding(path: Path, genes, dim=16, seed=0) -> str:
    rng = np.random.default_rng(seed)
    path.write_bytes(pickle.dumps({g: list(rng.normal(size=dim)) for g in genes}))
    return str(path)


@pytest.fixture
def linear(tmp_path):
    """A pseudo-bulk of 30 perturbations with delta linear in a 6-d embedding
    that also covers 5 unseen genes."""
    rng = np.random.default_rng(1)
    genes = [f"G{i}" for i in range(35)]
    emb = write_embedding(tmp_path / "emb.pkl", genes, dim=6)
    unit = normalize_rows(np.array([v for v in pickle.loads(Path(emb).read_bytes()).values()]))
    delta = unit[:30] @ rng.normal(size=(6, 12)) + 0.05 * rng.normal(size=(30, 12))
    ds = xr.Dataset(
        {"delta": (("perturbation", "gene"), delta), "control_mean": ("gene", np.full(12, 2.0))},
        coords={"perturbation": np.array(genes[:30], dtype=object),
                "gene": np.array([f"R{j}" for j in range(12)], dtype=object)},
        attrs=PSEUDOBULK.attrs(),
    )
    return write_pseudobulk(ds, str(tmp_path / "pb.zarr")), emb, unit, delta


def test_fit_predict_api(linear, tmp_path, caplog):
    pb, emb, unit, delta = linear
    model = fit(pb, emb, alphas=0.5, progress=False)
    ref = Ridge(alpha=0.5).fit(unit[:30], delta)
    np.testing.assert_allclose(model.coef, ref.coef_.T, rtol=1e-8)
    path = save_model(model, str(tmp_path / "model.zarr"))
    assert load_model(path).metadata["embedding"][0]["dim"] == 6
    pred = predict(path, emb, ["G31", "G32+G33"])
    pair = normalize_rows((unit[32] + unit[33])[None])
    np.testing.assert_allclose(pred["delta"].values, ref.predict(np.vstack([unit[31], pair[0]])), rtol=1e-8)
    np.testing.assert_allclose(pred["mean"].values, pred["delta"].values + 2.0)
    with pytest.raises(EmbeddingError, match="NOPE, NOTHERE"):
        predict(path, emb, ["G31", "NOTHERE+G1", "NOPE"])
    superset = write_embedding(tmp_path / "superset.pkl", [f"G{i}" for i in range(40)], dim=6)
    with caplog.at_level(logging.WARNING):
        predict(path, superset, ["G31"])
    assert "differs from the one the model was trained with" in caplog.text
    other = write_embedding(tmp_path / "other.pkl", ["G31"], dim=4)
    with pytest.raises(EmbeddingError, match="has dimension 4 but the model was fitted on dimension 6"):
        predict(path, other, ["G31"])


@pytest.mark.parametrize("select_by", ["pearson_delta", "mse"])
def test_fit_chooses_alpha_by_cv(linear, select_by):
    pb, emb, *_ = linear
    model = fit(pb, emb, alphas=[0.01, 100.0], n_folds=3, select_by=select_by, progress=False)
    assert model.alpha == 0.01  # nearly noiseless: the small penalty validates better by either rule
    assert model.metadata["select_by"] == select_by
    assert len(model.metadata["cv_mse"]) == 2 and model.metadata["cv_mse"][0] < model.metadata["cv_mse"][1]
    pearson = model.metadata["cv_pearson_delta"]
    if select_by == "pearson_delta":
        assert len(pearson) == 2 and pearson[0] > pearson[1]
    else:  # by mse, fit needs the statistics only, not the rows the Pearson needs
        assert pearson == [None, None]


@pytest.mark.parametrize("suffix", ["zarr", "h5ad", "csv"])
def test_prediction_formats(linear, tmp_path, suffix):
    pb, emb, *_ = linear
    pred = predict(fit(pb, emb, alphas=1.0, progress=False), emb, ["G30", "G31+G34"])
    path = write_predictions(pred, str(tmp_path / f"pred.{suffix}"))
    if suffix == "zarr":
        back = xr.open_zarr(path)["delta"].values
    elif suffix == "h5ad":
        adata = ad.read_h5ad(path)  # the control row first, as cell-eval expects
        assert list(adata.obs_names) == ["ctrl", "G30", "G31+G34"]
        np.testing.assert_allclose(adata.X[1:], pred["mean"].values, rtol=1e-6)
        back = adata[1:].layers["delta"]
    else:
        back = pd.read_csv(path, index_col=0).to_numpy()
    np.testing.assert_allclose(back, pred["delta"].values, rtol=1e-6)


def test_cli_predict_unknown_genes(linear, tmp_path, capsys):
    pb, emb, *_ = linear
    model = str(tmp_path / "m.zarr")
    assert main(["fit", pb, "--embeddings", emb, "--alpha", "1", "--out", model, "--no-progress"]) == 0
    code = main(["predict", model, "--embeddings", emb, "--perturbations", "G31,XYZ1+G2",
                 "--out", str(tmp_path / "p.csv")])
    assert code == INPUT_ERROR_EXIT_CODE
    assert "XYZ1" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()
    (tmp_path / "list.txt").write_text("# unseen\nG31\nG32+G30\n")
    assert main(["predict", model, "--embeddings", emb, "--perturbations-file", str(tmp_path / "list.txt"),
                 "--out", str(tmp_path / "p.csv")]) == 0
    assert list(pd.read_csv(tmp_path / "p.csv", index_col=0).index) == ["G31", "G32+G30"]


@pytest.mark.skipif(not PAPALEXI.exists(), reason="../shared/data is not present")
def test_papalexi_end_to_end(tmp_path, capsys):
    """Real screen: pseudobulk (all genes) → evaluate → fit → predict, every
    output written, every number finite."""
    pb = str(tmp_path / "pb.zarr")
    assert main(["pseudobulk", str(PAPALEXI), "--perturbation-key", "perturbation", "--control", "control",
                 "--n-top-genes", "all", "--group-variance", "--out", pb, "--no-progress"]) == 0
    targets = [str(p) for p in xr.open_zarr(pb)["perturbation"].values]
    assert len(targets) == 25
    emb = write_embedding(tmp_path / "emb.pkl", targets + ["UNSEEN1", "UNSEEN2"], dim=32)
    report = tmp_path / "report"
    assert main(["evaluate", pb, "--embeddings", emb, "--folds", "5", "--seed", "1",
                 "--out", str(report), "--no-progress"]) == 0
    assert "genepert_ridge" in capsys.readouterr().out
    for name in FILES:
        assert (report / name).exists(), name
    doc = json.loads((report / "metrics.json").read_text())
    assert doc["parameters"]["n_perturbations"] == 25 and doc["parameters"]["n_genes"] == 299
    for model, metrics in doc["models"].items():
        for metric in ("rmse_delta", "mae_delta"):
            assert math.isfinite(metrics[metric]["mean"]) and math.isfinite(metrics[metric]["fold_std"])
        if model != "control_baseline":
            for metric in ("pearson_delta", "pearson_delta_de20", "pearson_delta_de20_ttest"):
                assert math.isfinite(metrics[metric]["mean"]), (model, metric)
    assert all(f["solver"] == "dual" for f in doc["models"]["genepert_ridge"]["folds"])  # 20 < 32 dims
    per = pd.read_csv(report / "per_perturbation.csv")
    # constant predictions have no Pearson: control = 0, mean baseline = the centroid, and so is
    # matching_mean (no pairs: every single falls back on it); pca_ridge scores only the 9
    # targets among the 299 measured genes
    assert doc["baselines"]["matching_mean"]["n_fell_back"] == 25 and "additive" not in set(per.model)
    assert doc["baselines"]["pca_ridge"]["n_covered"] == 9
    varying = per[~per.model.isin(["control_baseline", "mean_baseline", "matching_mean", "pca_ridge"])]
    fdr = ["overlap_de_fdr", "spearman_delta_de_fdr"]  # NaN without true DE genes (or one)
    assert len(per) == 25 * 9 and np.isfinite(varying.drop(
        columns=["perturbation", "model", "subgroup", *fdr]).to_numpy()).all()
    assert (varying["overlap_de_fdr"].isna() == (varying["n_de_fdr"] == 0)).all()
    assert (varying["spearman_delta_de_fdr"].isna() <= (varying["n_de_fdr"] < 2)).all()
    assert (varying["n_de_fdr"] > 1).any()
    model = str(tmp_path / "model.zarr")
    assert main(["fit", pb, "--embeddings", emb, "--out", model, "--no-progress"]) == 0
    out = str(tmp_path / "pred.h5ad")
    assert main(["predict", model, "--embeddings", emb, "--perturbations", "UNSEEN1,UNSEEN2,UNSEEN1+STAT1",
                 "--out", out]) == 0
    adata = ad.read_h5ad(out)
    assert adata.shape == (4, 299) and np.isfinite(adata.X).all()


def test_cli_evaluate_concatenates_sources(linear, tmp_path):
    pb, emb, *_ = linear
    second = write_embedding(tmp_path / "second.pkl", [f"G{i}" for i in range(30)], dim=3, seed=9)
    out = tmp_path / "report"
    assert main(["evaluate", pb, "--embeddings", emb, "--embeddings", second, "--folds", "3",
                 "--alpha", "1", "10", "--select-by", "mse", "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["parameters"]["embedding_dim"] == 9 and len(doc["parameters"]["embedding"]) == 2
    assert doc["parameters"]["alphas"] == [1.0, 10.0] and doc["parameters"]["select_by"] == "mse"
    assert doc["models"]["genepert_ridge"]["alpha"]["select_by"] == "mse"
    assert {f["select_by"] for f in doc["models"]["genepert_ridge"]["folds"]} == {"mse"}
    assert main(["evaluate", pb, "--embeddings", emb, "--folds", "3", "--out", str(out)]) == INPUT_ERROR_EXIT_CODE


@pytest.mark.slow
def test_demo_ridge_beats_mean_baseline(tmp_path, capsys):
    """The whole chain on the synthetic screen: the planted structure must be found."""
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "genepert_ridge" in printed and "report:" in printed
    models = json.loads((tmp_path / "report" / "metrics.json").read_text())["models"]
    ridge, mean = models["genepert_ridge"], models["mean_baseline"]
    assert ridge["pearson_delta"]["mean"] > mean["pearson_delta"]["mean"] + 0.3
    assert ridge["rmse_delta"]["mean"] < 0.8 * mean["rmse_delta"]["mean"]
    assert len(pd.read_csv(tmp_path / "predictions.csv", index_col=0)) == 4
