"""The models read the pseudo-bulk in perturbation blocks: results do not
depend on the block size or the memory limit that sizes the blocks."""

from __future__ import annotations

import importlib
import pickle

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import sparse

from genepert_scale.io.encodings import PSEUDOBULK
from genepert_scale.pp.aggregate import write_pseudobulk
from genepert_scale.tl.baselines import nearest, top_k
from genepert_scale.tl.blocks import weighted_sums
from genepert_scale.tl.evaluate import evaluate
from genepert_scale.tl.model import fit, predict, write_predictions

N_GENES = 30


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """Singles G0..G23 (measured genes G0..G29), pairs of them and two
    perturbations of unmeasured genes, with group variances; an embedding of
    every gene."""
    root = tmp_path_factory.mktemp("streaming")
    rng = np.random.default_rng(5)
    genes = [f"G{i}" for i in range(N_GENES)]
    code = {g: rng.normal(size=4) for g in [*genes, "X0", "X1"]}
    names = genes[:24] + [f"G{i}+G{i + 3}" for i in range(0, 18, 2)] + ["X0", "X1"]
    hidden = np.vstack([sum(code[g] for g in n.split("+")) for n in names])
    delta = hidden @ rng.normal(size=(4, N_GENES)) + 0.2 * rng.normal(size=(len(names), N_GENES))
    ds = xr.Dataset(
        {"delta": (("perturbation", "gene"), delta), "mean": (("perturbation", "gene"), delta + 1),
         "var": (("perturbation", "gene"), rng.gamma(2.0, 0.1, size=delta.shape)),
         "n_cells": ("perturbation", np.full(len(names), 30)), "control_mean": ("gene", np.ones(N_GENES)),
         "control_var": ("gene", np.full(N_GENES, 0.2)), "n_control_cells": ((), 200)},
        coords={"perturbation": np.array(names, dtype=object), "gene": np.array(genes, dtype=object)},
        attrs=PSEUDOBULK.attrs(),
    )
    pb = write_pseudobulk(ds.chunk({"perturbation": 7}), str(root / "pb.zarr"))
    emb = root / "emb.pkl"
    emb.write_bytes(pickle.dumps({g: list(v + rng.normal(size=4)) for g, v in code.items()}))
    return pb, str(emb), root


#: A memory limit that scores 2 perturbations at a time and reads the medians in slabs of a few genes.
TINY = 20_000


@pytest.mark.parametrize("embedding", ["file", "pca:3"])
def test_tiny_blocks_give_the_one_block_evaluation(screen, embedding):
    pb, emb, _ = screen
    source = emb if embedding == "file" else embedding
    options = {"n_folds": 3, "seed": 4, "knn_k": (1, 5), "alphas": (0.01, 0.1, 1.0, 10.0),
               "n_resamples": 100, "progress": False}
    one = evaluate(pb, source, **options)
    tiny = evaluate(pb, source, block_size=3, memory_limit=TINY, **options)
    assert max(tiny.predictions["prediction"].chunks[1]) == 2  # scored 2 at a time
    assert max(one.predictions["prediction"].chunks[1]) == len(one.predictions["perturbation"])
    expected = {"genepert_ridge", "matching_mean", "additive", "knn_5",
                *(["pca_ridge"] if embedding == "file" else [])}
    assert expected <= set(one.models) and one.models == tiny.models
    pd.testing.assert_frame_equal(tiny.per_perturbation, one.per_perturbation, rtol=1e-10, atol=1e-10)
    assert one.per_perturbation["discrimination_score"].notna().any()
    for column in ("pearson_delta_de20_ttest", "overlap_de_fdr", "n_de_fdr"):
        assert one.per_perturbation[column].notna().any(), column
    np.testing.assert_allclose(tiny.predictions["prediction"].values, one.predictions["prediction"].values,
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(tiny.predictions["delta"].values, one.predictions["delta"].values)
    assert [f.alpha for f in tiny.fold_fits] == [f.alpha for f in one.fold_fits]
    for a, b in zip(tiny.fold_fits, one.fold_fits):
        pd.testing.assert_frame_equal(a.path, b.path, rtol=1e-10, atol=1e-12)
    pd.testing.assert_frame_equal(tiny.folds, one.folds, rtol=1e-10, atol=1e-12)
    assert tiny.baselines == one.baselines and tiny.summary.keys() == one.summary.keys()


def test_set_metrics_beyond_their_work_are_left_empty_with_the_reason(screen, monkeypatch):
    module = importlib.import_module("genepert_scale.tl.scoring")  # set_metrics_fit reads it there
    pb, emb, _ = screen
    monkeypatch.setattr(module, "SET_METRICS_WORK", 10)
    result = evaluate(pb, emb, n_folds=3, knn_k=(1,), n_resamples=10, progress=False)
    assert result.per_perturbation[["discrimination_score", "centroid_accuracy"]].isna().all().all()
    assert result.parameters["set_metrics"]["computed"] is False
    assert "held-out perturbations" in result.parameters["set_metrics"]["reason"]
    assert result.per_perturbation["pearson_delta"].notna().any()


def test_fit_and_predict_in_blocks(screen, tmp_path):
    pb, emb, _ = screen
    one = fit(pb, emb, progress=False)
    tiny = fit(pb, emb, block_size=2, progress=False)
    assert tiny.alpha == one.alpha
    np.testing.assert_allclose(tiny.coef, one.coef, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(tiny.metadata["cv_pearson_delta"], one.metadata["cv_pearson_delta"], rtol=1e-10)
    names = ["G1", "G2+G3", "G25", "X0", "G4+G28"]
    lazy = predict(one, emb, names, block_size=2)
    assert isinstance(lazy["delta"].data, da.Array) and lazy["delta"].chunks[0] == (2, 2, 1)
    whole = predict(one, emb, names, block_size=100)
    np.testing.assert_allclose(lazy["mean"].values, whole["mean"].values, rtol=1e-12)
    path = write_predictions(lazy, str(tmp_path / "pred.csv"))
    table = pd.read_csv(path, index_col="perturbation")
    assert list(table.index) == names
    np.testing.assert_allclose(table.to_numpy(), whole["delta"].values, rtol=1e-12)
    back = xr.open_zarr(write_predictions(lazy, str(tmp_path / "pred.zarr")))
    np.testing.assert_allclose(back["delta"].values, whole["delta"].values, rtol=1e-12)


def test_weighted_sums_read_chunk_by_chunk_equal_the_product():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(23, 5))
    weights = sparse.random_array((9, 23), density=0.2, random_state=1, format="csr")
    for array in (X, da.from_array(X, chunks=(4, 5))):
        np.testing.assert_allclose(weighted_sums(array, weights, size=3), weights @ X, rtol=1e-12)


def test_nearest_in_blocks_breaks_ties_by_position():
    similarity = np.array([[0.5, 0.9, 0.5, 0.9, 0.1, 0.9]])
    columns = np.arange(6)
    whole = nearest(similarity, columns, 2)
    best = None
    for block in (slice(0, 2), slice(2, 4), slice(4, 6)):
        best = nearest(similarity[:, block], columns[block], 2, best)
    assert whole[1].tolist() == best[1].tolist() == [[1, 3]]
    # equal to 12 decimals: a tie, by position
    assert top_k(np.array([[0.3, 0.7 + 1e-15, 0.7]]), np.array([[0, 1, 2]]), 1)[1].tolist() == [[1]]
    assert top_k(np.array([[0.3, 0.7, 0.7 + 1e-15]]), np.array([[0, 1, 2]]), 1)[1].tolist() == [[1]]
