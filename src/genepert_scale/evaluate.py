"""K-fold evaluation over perturbations: GenePert's ridge against baselines,
metrics per held-out perturbation, and their summaries.

Ridge models of every fold come from fold statistics (:mod:`.ridge`); the
baselines (mean and median of training deltas, control = no change, and
cosine k-nearest neighbours in embedding space) and the metrics need the
held-out and training deltas as rows, so evaluation holds the pseudo-bulk
deltas (perturbations × genes) and feature rows in memory — the size of the
pseudo-bulk, not of the screen.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .embeddings import MissingPolicy
from .model import BLOCK_SIZE, Embeddings, GeneMap, fold_statistics, training_data
from .ridge import DEFAULT_ALPHAS, FoldFit, Rows, Solver, check_alphas, cross_validate
from .splits import kfold

log = logging.getLogger(__name__)

RIDGE = "genepert_ridge"
METRICS = ("pearson_delta", "pearson_delta_de20", "rmse_delta", "mae_delta")
#: Genes of the ``_de20`` metrics: the largest true |delta|.
DE_TOP = 20
KNN_K = (1, 5, 10)


def pearson_rows(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair; NaN where a row is constant."""
    a = pred - pred.mean(axis=1, keepdims=True)
    b = true - true.mean(axis=1, keepdims=True)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, np.sum(a * b, axis=1) / denom, np.nan)


def perturbation_metrics(pred: np.ndarray, true: np.ndarray, *, de_top: int = DE_TOP) -> dict[str, np.ndarray]:
    """Metrics of every row (perturbation) over all genes, and Pearson over the
    ``de_top`` genes with the largest true ``|delta|``."""
    top = np.argsort(-np.abs(true), axis=1, kind="stable")[:, :de_top]
    error = pred - true
    return {
        "pearson_delta": pearson_rows(pred, true),
        "pearson_delta_de20": pearson_rows(
            np.take_along_axis(pred, top, axis=1), np.take_along_axis(true, top, axis=1)
        ),
        "rmse_delta": np.sqrt(np.mean(error**2, axis=1)),
        "mae_delta": np.mean(np.abs(error), axis=1),
    }


def knn_prediction(G_train: np.ndarray, X_train: np.ndarray, G_test: np.ndarray, k: int) -> np.ndarray:
    """Mean delta of the ``k`` training perturbations most cosine-similar to
    each test perturbation (rows of ``G`` have unit norm)."""
    k = min(k, G_train.shape[0])
    similarity = G_test @ G_train.T
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    return X_train[nearest].mean(axis=1)


def baseline_predictions(
    G_train: np.ndarray, X_train: np.ndarray, G_test: np.ndarray, knn_k: Sequence[int] = KNN_K
) -> dict[str, np.ndarray]:
    """Predictions of every baseline for the test rows."""
    n = G_test.shape[0]
    out = {
        "mean_baseline": np.tile(X_train.mean(axis=0), (n, 1)),
        "median_baseline": np.tile(np.median(X_train, axis=0), (n, 1)),
        "control_baseline": np.zeros((n, X_train.shape[1])),
    }
    for k in knn_k:
        out[f"knn_{k}"] = knn_prediction(G_train, X_train, G_test, k)
    return out


@dataclass(frozen=True)
class Evaluation:
    """The result of :func:`evaluate`.

    Attributes
    ----------
    per_perturbation
        One row per (perturbation, model): ``perturbation``, ``fold``,
        ``model`` and every metric.
    predictions
        Held-out predictions ``prediction`` (model × perturbation × gene), the
        true ``delta`` and the ``fold`` of every perturbation.
    folds
        ``perturbation``, ``fold``.
    fold_fits
        The ridge model of every fold with its alpha path.
    summary
        Per model and metric: mean and std over perturbations, over folds.
    missing
        What happened to perturbations whose genes have no vector.
    parameters
        The run's parameters and embedding identity.
    """

    per_perturbation: pd.DataFrame
    predictions: xr.Dataset = field(repr=False)
    folds: pd.DataFrame = field(repr=False)
    fold_fits: list[FoldFit] = field(repr=False)
    summary: dict[str, dict[str, dict[str, float | None]]]
    missing: dict[str, Any]
    parameters: dict[str, Any]

    @property
    def models(self) -> list[str]:
        return list(self.summary)


def evaluate(
    pseudobulk: xr.Dataset | str,
    embeddings: Embeddings,
    *,
    n_folds: int = 5,
    seed: int = 0,
    alphas: float | Sequence[float] = DEFAULT_ALPHAS,
    missing: MissingPolicy = "drop",
    gene_map: GeneMap = None,
    knn_k: Sequence[int] = KNN_K,
    solver: Solver = "auto",
    block_size: int = BLOCK_SIZE,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> Evaluation:
    """K-fold cross-validation of GenePert's ridge and the baselines.

    Parameters
    ----------
    pseudobulk
        A pseudo-bulk store (path/URL) or Dataset.
    embeddings
        Embedding path(s)/URL(s) (several are concatenated) or a table.
    n_folds, seed
        Folds over perturbations and their seed.
    alphas
        A grid (alpha chosen per fold by inner CV on its training folds) or one alpha.
    missing, gene_map
        See :func:`.embeddings.featurize`; dropped perturbations are left out
        for every model.
    knn_k
        Neighbour counts of the ``knn_k`` baselines.
    solver, block_size, storage_options, progress
        See :func:`.model.fit`.
    """
    alphas = check_alphas(alphas)
    data = training_data(pseudobulk, embeddings, missing=missing, gene_map=gene_map, seed=seed,
                         storage_options=storage_options)
    fold = kfold(data.n, n_folds, seed)
    fold_stats = fold_statistics(data, fold, n_folds, block_size=block_size, progress=progress)
    G = data.features.rows()
    X = np.asarray(data.delta.compute(), dtype=np.float64)
    fits = cross_validate(fold_stats, alphas, rows=Rows(G, X, fold), solver=solver)
    names = np.asarray(data.features.perturbations, dtype=object)
    models = [RIDGE, "mean_baseline", "median_baseline", "control_baseline", *(f"knn_{k}" for k in knn_k)]
    prediction = np.zeros((len(models), *X.shape), dtype=np.float32)
    for fit in fits:
        test, train = fold == fit.fold, fold != fit.fold
        preds = {RIDGE: G[test] @ fit.coef + fit.intercept,
                 **baseline_predictions(G[train], X[train], G[test], knn_k)}
        prediction[:, test] = [preds[model] for model in models]
    per_perturbation = metrics_table(prediction, X, models, names, fold)
    predictions = xr.Dataset(
        {
            "prediction": (("model", "perturbation", "gene"), prediction),
            "delta": (("perturbation", "gene"), X.astype(np.float32)),
            "fold": ("perturbation", fold),
        },
        coords={"model": np.asarray(models, dtype=object), "perturbation": names,
                "gene": np.asarray(data.genes, dtype=object)},
    )
    parameters = {
        "n_folds": n_folds, "seed": seed, "alphas": list(alphas), "missing": missing,
        "knn_k": list(knn_k), "solver": solver,
        "pseudobulk": pseudobulk if isinstance(pseudobulk, str) else None,
        "embedding": list(data.embedding.sources), "n_perturbations": data.n,
        "n_genes": len(data.genes), "embedding_dim": data.features.dim,
    }
    return Evaluation(
        per_perturbation, predictions, pd.DataFrame({"perturbation": names, "fold": fold}), fits,
        summarize(per_perturbation), data.features.summary(), parameters,
    )


def metrics_table(
    prediction: np.ndarray, true: np.ndarray, models: Sequence[str], names: np.ndarray, fold: np.ndarray
) -> pd.DataFrame:
    """One row per (model, perturbation): ``perturbation``, ``fold``, ``model``
    and every metric of the prediction (model × perturbation × gene)."""
    tables = []
    for model, pred in zip(models, prediction):
        table = pd.DataFrame(perturbation_metrics(pred.astype(np.float64), true))
        table.insert(0, "model", model)
        table.insert(0, "fold", fold)
        table.insert(0, "perturbation", names)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def summarize(per_perturbation: pd.DataFrame) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per model and metric: ``mean``/``std`` over perturbations,
    ``fold_mean``/``fold_std`` over the per-fold means (NaN values, e.g. the
    Pearson of a constant prediction, are left out; all-NaN gives ``None``)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for model, table in per_perturbation.groupby("model", sort=False):
        fold_means = table.groupby("fold")[list(METRICS)].mean()
        out[str(model)] = {
            metric: {
                "mean": _number(table[metric].mean()),
                "std": _number(table[metric].std()),
                "fold_mean": _number(fold_means[metric].mean()),
                "fold_std": _number(fold_means[metric].std()),
                "n": int(table[metric].notna().sum()),
            }
            for metric in METRICS
        }
    return out


def _number(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)
