"""Every metric against a direct computation, row by row."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from scipy.stats import pearsonr, spearmanr

from genepert_scale.tl.evaluate import nearest_distance, novelty_table
from genepert_scale.tl.scoring import target_genes
from genepert_scale.tl.metrics import (
    METRICS,
    VCC_SCORE,
    centroid_accuracy,
    de_overlap,
    discrimination_score,
    perturbation_metrics,
    top_delta_genes,
)


@pytest.fixture
def rows():
    rng = np.random.default_rng(3)
    true = rng.normal(size=(9, 40))
    pred = true + rng.normal(scale=1.5, size=true.shape)
    return pred, true


def test_centroid_and_direction_metrics(rows):
    pred, true = rows
    rng = np.random.default_rng(4)
    centroid = rng.normal(size=40)
    de = np.stack([rng.choice(40, 20, replace=False) for _ in range(len(true))])
    m = perturbation_metrics(pred, true, de_genes=de, centroid=centroid)
    for i in range(len(true)):
        d = de[i]
        assert m["pearson_delta_de20"][i] == pytest.approx(pearsonr(pred[i, d], true[i, d])[0], rel=1e-12)
        assert m["pearson_delta_centroid"][i] == pytest.approx(
            pearsonr(pred[i] - centroid, true[i] - centroid)[0], rel=1e-12)
        assert m["pearson_delta_centroid_de20"][i] == pytest.approx(
            pearsonr(pred[i, d] - centroid[d], true[i, d] - centroid[d])[0], rel=1e-12)
        agree = [np.sign(pred[i, g]) == np.sign(true[i, g]) for g in d]
        assert m["direction_de20"][i] == pytest.approx(sum(agree) / 20)
    # default DE genes: the largest true |delta|; no centroid: NaN
    default = perturbation_metrics(pred, true)
    top = top_delta_genes(true)
    assert set(top[0]) == set(np.argsort(-np.abs(true[0]))[:20])
    np.testing.assert_allclose(default["direction_de20"],
                               np.mean(np.sign(np.take_along_axis(pred, top, 1))
                                       == np.sign(np.take_along_axis(true, top, 1)), axis=1))
    assert np.isnan(default["pearson_delta_centroid"]).all()
    # the mean baseline is the centroid: constant against it, so no Pearson
    # (also when stored as float32, as evaluation stores predictions)
    at_centroid = np.tile(centroid, (9, 1)).astype(np.float32).astype(np.float64)
    assert np.isnan(perturbation_metrics(at_centroid, true, centroid=centroid)["pearson_delta_centroid"]).all()


@pytest.mark.parametrize("metric, scipy_metric", [("l1", "cityblock"), ("l2", "euclidean")])
def test_discrimination_score(rows, metric, scipy_metric):
    pred, true = rows
    exclude = np.zeros_like(true, dtype=bool)
    exclude[np.arange(9), np.arange(9)] = True  # perturbation i targets gene i
    score = discrimination_score(pred, true, exclude=exclude, metric=metric)
    n = len(true)
    for i in range(n):
        keep = ~exclude[i]
        d = cdist(pred[i : i + 1, keep], true[:, keep], metric=scipy_metric)[0]
        rank = np.sum(d < d[i])
        assert score[i] == pytest.approx(1 - rank / n)
    assert discrimination_score(true, true).tolist() == [1.0] * n  # perfect: own effect nearest
    constant = np.tile(true.mean(0), (n, 1))  # one answer for all: the same ranking for every row
    assert discrimination_score(constant, true).mean() < 0.75


def test_centroid_accuracy(rows):
    pred, true = rows
    score = centroid_accuracy(pred, true)
    d = cdist(pred, true)
    for i in range(len(true)):
        others = np.delete(d[i], i)
        assert score[i] == pytest.approx(np.sum(others > d[i, i]) / (len(true) - 1))
    assert centroid_accuracy(true, true).tolist() == [1.0] * len(true)
    assert np.isnan(centroid_accuracy(pred[:1], true[:1])).all()


def test_novelty_and_targets():
    rng = np.random.default_rng(5)
    G = rng.normal(size=(12, 6))
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    np.testing.assert_allclose(nearest_distance(G[:4] @ G[4:].T), cdist(G[:4], G[4:], "cosine").min(axis=1))
    mask = target_genes(["B", "A+C", "Z"], ["A", "B", "C"])
    assert mask.tolist() == [[False, True, False], [True, False, True], [False, False, False]]


def test_novelty_table():
    import pandas as pd

    per = pd.DataFrame({
        "model": ["m1"] * 8 + ["m2"] * 8,
        "novelty": list(np.linspace(0, 0.7, 8)) * 2,
        "pearson_delta": list(range(8)) + [1.0] * 8,
    })
    table = novelty_table(per, bins=4)
    assert list(table.columns) == ["bin", "novelty_low", "novelty_high", "n", "m1", "m2"]
    assert table["n"].tolist() == [2, 2, 2, 2]
    assert table["m1"].tolist() == [0.5, 2.5, 4.5, 6.5] and (table["m2"] == 1.0).all()


def direct_de_fdr(pred, true, fdr_genes, exclude):
    """overlap_de_fdr and spearman_delta_de_fdr of every row from their
    definitions: the true DE genes F not excluded, the |F| genes not excluded
    of largest predicted |delta| (ties: lower index first)."""
    overlap, spearman = [], []
    for i in range(len(pred)):
        kept = [j for j in range(pred.shape[1]) if not exclude[i, j]]
        f = [j for j in kept if fdr_genes[i, j]]
        top = sorted(kept, key=lambda j: (-abs(pred[i, j]), j))[: len(f)]
        overlap.append(len(set(top) & set(f)) / len(f) if f else np.nan)
        spearman.append(spearmanr(pred[i, f], true[i, f])[0] if len(f) >= 2 else np.nan)
    return np.array(overlap), np.array(spearman)


def test_de_fdr_metrics(rows):
    pred, true = rows
    rng = np.random.default_rng(6)
    fdr_genes = np.abs(true) > 1.0
    fdr_genes[0] = False  # no true DE gene
    fdr_genes[1] = False
    fdr_genes[1, 3] = True  # one: an overlap, no Spearman
    pred[2, :10] = np.round(pred[2, :10])  # ties in |pred| and in ranks
    exclude = np.zeros_like(fdr_genes)
    exclude[np.arange(9), rng.integers(0, 40, 9)] = True
    exclude[4, np.flatnonzero(fdr_genes[4])[:2]] = True  # targets among the true DE genes
    for mask in (None, exclude):
        m = perturbation_metrics(pred, true, fdr_genes=fdr_genes, exclude=mask)
        overlap, spearman = direct_de_fdr(pred, true, fdr_genes, np.zeros_like(fdr_genes) if mask is None else mask)
        np.testing.assert_allclose(m["overlap_de_fdr"], overlap, rtol=1e-12)
        np.testing.assert_allclose(m["spearman_delta_de_fdr"], spearman, rtol=1e-12)
        assert np.isnan(m["overlap_de_fdr"][0]) and np.isfinite(m["overlap_de_fdr"][1])
    perfect = de_overlap(np.where(fdr_genes, 5.0, 0.1) * np.sign(true), fdr_genes)
    assert (perfect[2:] == 1.0).all()  # the largest predicted changes are the DE genes
    assert np.isnan(perturbation_metrics(pred, true)["overlap_de_fdr"]).all()  # no DE genes given


def test_vcc_score_metrics_are_metrics():
    assert VCC_SCORE == ("overlap_de_fdr", "discrimination_score", "mae_delta")
    assert set(VCC_SCORE) <= set(METRICS)
