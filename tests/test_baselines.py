"""The field's baselines against direct computations: Systema's matching mean,
the additive model of pairs, and ridge on pca:K gene embeddings, alone and
inside an evaluation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import xarray as xr
from sklearn.linear_model import Ridge

from genepert_scale.io.encodings import PSEUDOBULK
from genepert_scale.pp.aggregate import write_pseudobulk
from genepert_scale.tl.baselines import additive_prediction, matching_mean_prediction
from genepert_scale.tl.data_embedding import pca_gene_embedding
from genepert_scale.tl.evaluate import evaluate

TRAIN = ["A", "B", "C", "A+B", "B+C", "D+E", "F"]
TEST = ["A+C", "B+D", "E", "G", "G+H", "C+F", "D"]


def genes_of(label: str) -> set[str]:
    return set(label.split("+"))


def test_matching_mean_is_the_centroid_of_the_training_perturbations_sharing_a_gene():
    X_train = np.random.default_rng(0).normal(size=(len(TRAIN), 6))
    prediction, fell_back = matching_mean_prediction(TEST, TRAIN, X_train)
    for i, label in enumerate(TEST):
        sharing = [j for j, t in enumerate(TRAIN) if genes_of(t) & genes_of(label)]
        expected = X_train[sharing].mean(axis=0) if sharing else X_train.mean(axis=0)
        np.testing.assert_allclose(prediction[i], expected, rtol=1e-14)
        assert fell_back[i] == (not sharing)
    # A+C: A, C, A+B, B+C; E: only the pair D+E; G and G+H: nothing shares a gene
    assert fell_back.tolist() == [False, False, False, True, True, False, False]


def test_additive_is_the_sum_of_the_singles_when_both_are_in_training():
    X_train = np.random.default_rng(1).normal(size=(len(TRAIN), 6))
    prediction = additive_prediction(TEST, TRAIN, X_train)
    single = {t: j for j, t in enumerate(TRAIN) if "+" not in t}
    for i, label in enumerate(TEST):
        parts = label.split("+")
        if len(parts) == 2 and all(p in single for p in parts):
            np.testing.assert_allclose(prediction[i], X_train[single[parts[0]]] + X_train[single[parts[1]]])
        else:
            assert np.isnan(prediction[i]).all(), label
    # scored: A+C and C+F; not: B+D (no single D), singles, G+H
    assert np.isfinite(prediction).all(axis=1).tolist() == [True, False, False, False, False, True, False]


N_GENES, N_SINGLES = 30, 24


@pytest.fixture(scope="module")
def pair_screen(tmp_path_factory):
    """24 singles G0..G23 and 10 pairs of them plus 4 perturbations of
    unmeasured genes X0..X3 (measured genes G0..G29); deltas linear in a
    hidden gene code, plus noise; an embedding file for every gene."""
    root = tmp_path_factory.mktemp("baselines")
    rng = np.random.default_rng(3)
    genes = [f"G{i}" for i in range(N_GENES)]
    others = [f"X{i}" for i in range(4)]
    code = {g: rng.normal(size=4) for g in genes + others}
    names = genes[:N_SINGLES] + [f"G{i}+G{i + 1}" for i in range(0, 20, 2)] + others
    hidden = np.vstack([sum(code[g] for g in n.split("+")) for n in names])
    delta = hidden @ rng.normal(size=(4, N_GENES)) + 0.2 * rng.normal(size=(len(names), N_GENES))
    ds = xr.Dataset(
        {"delta": (("perturbation", "gene"), delta), "mean": (("perturbation", "gene"), delta + 1),
         "n_cells": ("perturbation", np.full(len(names), 30)), "control_mean": ("gene", np.ones(N_GENES))},
        coords={"perturbation": np.array(names, dtype=object), "gene": np.array(genes, dtype=object)},
        attrs=PSEUDOBULK.attrs(),
    )
    pb = write_pseudobulk(ds, str(root / "pb.zarr"))
    emb = root / "emb.pkl"
    emb.write_bytes(pickle.dumps({g: list(code[g] + rng.normal(size=4)) for g in genes + others}))
    return pb, str(emb), names, delta


def test_evaluation_scores_every_baseline_as_computed_directly(pair_screen):
    pb, emb, names, delta = pair_screen
    result = evaluate(pb, emb, n_folds=4, seed=1, pca_baseline=3, knn_k=(1,), progress=False)
    assert {"matching_mean", "additive", "pca_ridge"} <= set(result.models)
    folds = result.folds.set_index("perturbation").loc[names, "fold"].to_numpy()
    predicted = result.predictions["prediction"]
    covered = np.array([not n.startswith("X") for n in names])
    n_fell_back = n_additive = 0
    assert [fit.fold for fit in result.baseline_fits["pca_ridge"]] == [0, 1, 2, 3]
    for fit in result.baseline_fits["pca_ridge"]:
        test, train = folds == fit.fold, folds != fit.fold
        # pca:3 gene embedding from the fold's training deltas, L2 rows; pairs: l2(sum)
        source = pca_gene_embedding(delta[train], [f"G{i}" for i in range(N_GENES)], 3)
        vectors = source.vectors / np.linalg.norm(source.vectors, axis=1, keepdims=True)
        rows = np.vstack([vectors[[int(g[1:]) for g in n.split("+")]].sum(axis=0) if c else np.zeros(3)
                          for n, c in zip(names, covered)])
        rows /= np.where(covered, np.linalg.norm(rows, axis=1), 1.0)[:, None]
        model = Ridge(alpha=fit.alpha).fit(rows[train & covered], delta[train & covered])
        got = predicted.sel(model="pca_ridge", perturbation=[n for n, t in zip(names, test) if t]).values
        np.testing.assert_allclose(got[covered[test]], model.predict(rows[test & covered]), rtol=1e-4, atol=1e-5)
        assert np.isnan(got[~covered[test]]).all()
    for k in range(4):
        test, train = folds == k, folds != k
        test_names, train_names = [n for n, t in zip(names, test) if t], [n for n, t in zip(names, train) if t]
        for model in ("matching_mean", "additive"):
            got = predicted.sel(model=model, perturbation=test_names).values
            for i, label in enumerate(test_names):
                singles = {t: j for j, t in enumerate(train_names) if "+" not in t}
                sharing = [j for j, t in enumerate(train_names) if genes_of(t) & genes_of(label)]
                if model == "matching_mean":
                    expected = delta[train][sharing].mean(axis=0) if sharing else delta[train].mean(axis=0)
                    n_fell_back += not sharing
                elif "+" in label and all(g in singles for g in label.split("+")):
                    expected = sum(delta[train][singles[g]] for g in label.split("+"))
                    n_additive += 1
                else:
                    expected = np.full(N_GENES, np.nan)
                np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-6)
    notes = result.baselines
    assert notes["matching_mean"]["n_fell_back"] == n_fell_back > 0
    assert notes["additive"]["n_scored"] == n_additive > 0
    assert notes["additive"]["n_scored"] + notes["additive"]["n_not_scored"] == len(names)
    assert notes["pca_ridge"]["n_covered"] == covered.sum() and notes["pca_ridge"]["k"] == 3
    # a baseline's unscored perturbations have no metric at all and are left out of its summary
    table = result.per_perturbation.query("model == 'additive'")
    assert table["pearson_delta"].notna().sum() == n_additive == result.summary["additive"]["rmse_delta"]["n"]
    assert table.loc[table["rmse_delta"].isna(), ["discrimination_score", "direction_de20"]].isna().all().all()


def test_baselines_absent_where_they_do_not_apply(pair_screen):
    pb, emb, names, _ = pair_screen
    result = evaluate(pb, emb, n_folds=3, alphas=1.0, pca_baseline=None, knn_k=(1,), progress=False)
    assert "pca_ridge" not in result.models and result.baselines["pca_ridge"]["applies"] is False
    derived = evaluate(pb, ["pca:3"], n_folds=3, alphas=1.0, knn_k=(1,), progress=False)
    assert "pca_ridge" not in derived.models
    assert derived.baselines["pca_ridge"]["reason"] == "the embeddings are data-derived already"
