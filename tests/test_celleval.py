"""export-cell-eval: the screen's cells and the held-out predictions as the
real.h5ad and pred.h5ad that Arc's cell-eval scores, against scanpy and
against cell-eval itself."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import xarray as xr
from scipy.stats import pearsonr

import genepert_scale as gps
from genepert_scale.cli.commands import main
from genepert_scale.errors import ParameterError
from genepert_scale.io.celleval import export_cell_eval
from genepert_scale.pl.report import write_report
from genepert_scale.pp.aggregate import pseudobulk, write_pseudobulk
from genepert_scale.tl.evaluate import evaluate

N_GENES = 30
#: Genes perturbed (each one's own label form): G1 appears as A+ctrl and ctrl+A.
LABELS = ["G1+ctrl", "ctrl+G1", "G2+ctrl", "G3+ctrl", "G4+ctrl", "G5+ctrl", "G6+ctrl",
          "G7+ctrl", "G8+ctrl", "G1+G2", "ctrl"]


def labelled_screen(seed: int = 0, n_cells: int = 1100) -> ad.AnnData:
    """Raw counts with GEARS-style labels in ``obs["condition"]`` (control
    ``ctrl``; G1 under two labels, ``G1+ctrl`` the more frequent), a
    boolean ``obs["keep"]``, and an effect per perturbation."""
    rng = np.random.default_rng(seed)
    weights = np.array([3, 1, *([2] * 8), 4], dtype=float)
    labels = rng.choice(LABELS, size=n_cells, p=weights / weights.sum())
    rate = np.exp(rng.normal(0.5, 1.2, size=N_GENES))
    shift = {label: np.exp(rng.normal(0, 0.5, size=N_GENES)) for label in LABELS}
    shift["ctrl+G1"] = shift["G1+ctrl"]
    shift["ctrl"] = np.ones(N_GENES)
    counts = rng.poisson(np.vstack([rate * shift[label] for label in labels]))
    obs = pd.DataFrame({"condition": pd.Categorical(labels), "keep": rng.random(n_cells) > 0.1},
                       index=[f"c{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"G{i}" for i in range(N_GENES)])
    return ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A screen (.h5ad), its pseudo-bulk of 20 HVGs over the cells ``keep``
    marks, and a 3-fold evaluation written as a report directory."""
    root = tmp_path_factory.mktemp("celleval")
    adata = labelled_screen()
    screen = str(root / "screen.h5ad")
    adata.write_h5ad(screen)
    ds = pseudobulk(screen, perturbation_key="condition", control="ctrl", n_top_genes=20,
                    obs_filter="keep", as_xarray=True)
    store = write_pseudobulk(ds, str(root / "pb.zarr"))
    rng = np.random.default_rng(1)
    emb = root / "emb.pkl"
    emb.write_bytes(pickle.dumps({f"G{i}": list(rng.normal(size=6)) for i in range(N_GENES)}))
    result = evaluate(store, str(emb), n_folds=3, alphas=0.1, knn_k=(1,), pca_baseline=None,
                      progress=False)
    return screen, write_report(result, str(root / "evaluation")), adata, ds


def scanpy_log_normalised(adata: ad.AnnData) -> ad.AnnData:
    import scanpy as sc

    adata = adata.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def test_real_holds_the_screens_cells_as_the_pseudobulk_saw_them(evaluated, tmp_path):
    screen, evaluation, adata, ds = evaluated
    out = gps.io.export_cell_eval(evaluation, screen, str(tmp_path / "export"), block_rows=200)
    real = ad.read_h5ad(f"{out}/real.h5ad")
    genes = [str(g) for g in ds.gene.values]
    assert list(real.var_names) == genes
    kept = adata[adata.obs["keep"].to_numpy()]
    assert list(real.obs_names) == list(kept.obs_names)  # every held-out and control cell, in order
    merged = kept.obs["condition"].astype(str).replace({"ctrl+G1": "G1+ctrl"})
    assert list(real.obs["condition"].astype(str)) == list(merged)
    info = real.uns["genepert_scale"]
    assert dict(zip(info["relabelled"]["from"], info["relabelled"]["to"])) == {"ctrl+G1": "G1+ctrl"}
    assert (info["control"], info["perturbation_key"], info["input_kind"]) == ("ctrl", "condition", "counts")
    oracle = scanpy_log_normalised(kept)[:, genes].X.toarray()
    np.testing.assert_allclose(real.X.toarray(), oracle, rtol=2e-6, atol=1e-6)
    assert info["max_delta_difference"] < 1e-5
    recorded = json.loads(xr.open_zarr(f"{evaluation}/predictions.zarr").attrs["pseudobulk_run"])
    assert (recorded["perturbation_key"], recorded["control"]) == ("condition", "ctrl")
    assert recorded["parameters"]["obs_filter"] == "keep"
    document = json.loads(open(f"{evaluation}/metrics.json").read())
    assert document["parameters"]["pseudobulk_run"] == recorded


def test_pred_holds_the_clipped_predictions_at_the_true_cell_counts(evaluated, tmp_path):
    screen, evaluation, _, _ = evaluated
    out = export_cell_eval(evaluation, screen, str(tmp_path / "export"))
    real, pred = (ad.read_h5ad(f"{out}/{name}.h5ad") for name in ("real", "pred"))
    assert list(pred.var_names) == list(real.var_names)
    real_counts = real.obs["condition"].value_counts()
    assert pred.obs["condition"].value_counts().sort_index().equals(real_counts.sort_index())
    control = real[real.obs["condition"] == "ctrl"].X.toarray()
    np.testing.assert_array_equal(pred[pred.obs["condition"] == "ctrl"].X.toarray(), control)
    predictions = xr.open_zarr(f"{evaluation}/predictions.zarr")
    delta = predictions["prediction"].sel(model="genepert_ridge").values.astype(np.float64)
    expected = np.maximum(control.astype(np.float64).mean(axis=0) + delta, 0)
    labels = {"G1": "G1+ctrl", "G1+G2": "G1+G2"}
    for row, name in zip(expected, predictions.perturbation.values):
        cells = pred[pred.obs["condition"] == labels.get(str(name), f"{name}+ctrl")].X.toarray()
        np.testing.assert_allclose(cells, np.broadcast_to(row, cells.shape), rtol=1e-6, atol=1e-7)
    assert pred.X.min() >= 0
    clipped = pred.uns["genepert_scale"]["clipped"]
    assert clipped["n_values"] == int((control.mean(axis=0) + delta < 0).sum())
    assert clipped["of"] == delta.size


def test_another_screen_or_model_is_refused(evaluated, tmp_path):
    screen, evaluation, adata, _ = evaluated
    shuffled = adata.copy()
    shuffled.X = adata.X[np.random.default_rng(0).permutation(adata.n_obs)]
    with pytest.raises(ParameterError, match="give the screen .* its pseudo-bulk was made from"):
        export_cell_eval(evaluation, shuffled, str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    with pytest.raises(ParameterError, match="has no model 'nope'; its models: genepert_ridge"):
        export_cell_eval(evaluation, screen, str(tmp_path / "b"), model="nope")


def test_one_context_exports_its_own_cells(tmp_path):
    from genepert_scale.pp.aggregate import one_context

    adata = labelled_screen(seed=4, n_cells=1600)
    adata.obs["line"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 3 == 0, "L2", "L1"))
    screen = str(tmp_path / "screen.zarr")
    adata.write_zarr(screen)
    both = pseudobulk(screen, perturbation_key="condition", control="ctrl", n_top_genes=20,
                      context_key="line", as_xarray=True)
    emb = tmp_path / "emb.pkl"
    rng = np.random.default_rng(1)
    emb.write_bytes(pickle.dumps({f"G{i}": list(rng.normal(size=6)) for i in range(N_GENES)}))
    result = evaluate(one_context(both, "L1"), str(emb), n_folds=3, alphas=0.1, knn_k=(1,),
                      pca_baseline=None, progress=False)
    evaluation = write_report(result, str(tmp_path / "evaluation"))
    out = export_cell_eval(evaluation, screen, str(tmp_path / "export"))
    real = ad.read_h5ad(f"{out}/real.h5ad")
    in_line = adata.obs_names[(adata.obs["line"] == "L1").to_numpy()]
    assert list(real.obs_names) == list(in_line)
    info = real.uns["genepert_scale"]
    assert info["context"] == "L1" and info["max_delta_difference"] < 1e-5  # its own controls


def cell_eval_command() -> list[str]:
    """``cell-eval`` beside this Python, or its module."""
    executable = shutil.which("cell-eval", path=str(sys.executable).rsplit("/", 1)[0])
    return [executable] if executable else [sys.executable, "-m", "cell_eval"]


@pytest.mark.slow
def test_cell_eval_scores_the_export_as_the_evaluation_did(tmp_path):
    pytest.importorskip("cell_eval")
    screen, pb, evaluation, out = (str(tmp_path / name) for name in ("s.zarr", "pb.zarr", "ev", "ce"))
    assert main(["synth", screen, "--cells", "1500", "--genes", "200", "--perturbations", "24",
                 "--seed", "5", "--no-progress"]) == 0
    assert main(["pseudobulk", screen, "--out", pb, "--no-progress"]) == 0
    assert main(["evaluate", pb, "--embeddings", str(tmp_path / "s_embedding.pkl"), "--folds", "4",
                 "--pca-baseline", "0", "--out", evaluation, "--no-progress"]) == 0
    assert main(["export-cell-eval", evaluation, screen, "--out", out, "--no-progress"]) == 0
    command = [*cell_eval_command(), "run", "-ap", f"{out}/pred.h5ad", "-ar", f"{out}/real.h5ad",
               "--control-pert", "non-targeting", "--pert-col", "perturbation", "--profile", "anndata"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = pd.read_csv(tmp_path / "cell-eval-outdir" / "results.csv").set_index("perturbation")
    ours = pd.read_csv(f"{evaluation}/per_perturbation.csv").query("model == 'genepert_ridge'")
    assert set(theirs.index) == set(ours.perturbation)  # synth's labels are their own names
    # cell-eval reproduces our Pearson delta of the predictions as exported (clipped at
    # zero), perturbation by perturbation, to float32 rounding of the cells' values and
    # of its per-perturbation means (relative 6e-8 each): 1e-5 leaves room for it.
    real = ad.read_h5ad(f"{out}/real.h5ad")
    pred = ad.read_h5ad(f"{out}/pred.h5ad")
    for name, value in theirs["pearson_delta"].items():
        means = [np.asarray(a[a.obs["perturbation"] == p].X.mean(axis=0), dtype=np.float64).ravel()
                 for a in (pred, real) for p in (name, "non-targeting")]
        assert value == pytest.approx(pearsonr(means[0] - means[1], means[2] - means[3])[0], abs=1e-5)
    info = pred.uns["genepert_scale"]
    assert theirs["pearson_delta"].mean() == pytest.approx(info["pearson_delta"]["expected"], abs=1e-6)
    # against the evaluation's own (unclipped) mean: clipping the predicted means at
    # zero moves each perturbation's Pearson by up to ~1e-2 and the mean by ~1e-3 on
    # such a screen (lowly expressed genes predicted below zero), so 5e-3
    evaluated_mean = json.loads((tmp_path / "ev" / "metrics.json").read_text())[
        "models"]["genepert_ridge"]["pearson_delta"]["mean"]
    assert theirs["pearson_delta"].mean() == pytest.approx(evaluated_mean, abs=5e-3)
    assert info["clipped"]["n_values"] > 0
