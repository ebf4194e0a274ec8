"""Evaluation over perturbations: GenePert's ridge against baselines on a
split (K-fold, GEARS' simulation, or a custom file), metrics per held-out
perturbation, and their summaries — overall, per GEARS subgroup, and against
novelty (distance to the nearest training perturbation in embedding space).

Ridge models of every fold come from fold statistics (:mod:`.ridge`); the
baselines (mean and median of training deltas, control = no change, and
cosine k-nearest neighbours in embedding space) and the metrics need the
held-out and training deltas as rows, so evaluation holds the pseudo-bulk
deltas (perturbations × genes) and feature rows in memory — the size of the
pseudo-bulk, not of the screen. A data-derived embedding (``pca:K``) is
rebuilt in every fold from its training perturbations, so test data never
shapes the features.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from .data_embedding import EmbeddingPlan, with_table
from ..pp.de import top_de_genes
from .embeddings import Features, MissingPolicy, perturbation_genes
from ..errors import ParameterError
from .metrics import DE_TOP, METRICS, centroid_accuracy, discrimination_score, perturbation_metrics
from .model import BLOCK_SIZE, Embeddings, GeneMap, TrainingData, fold_statistics, training_data
from ..pp.pseudobulk import open_pseudobulk
from .ridge import DEFAULT_ALPHAS, FoldFit, Rows, Solver, check_alphas, cross_validate
from .splits import (
    DEFAULT_TEST_SHARE,
    UNUSED,
    Split,
    SplitKind,
    custom_split,
    kfold_split,
    read_split_file,
    simulation_split,
    subgroups,
)

log = logging.getLogger(__name__)

RIDGE = "genepert_ridge"
KNN_K = (1, 5, 10)
#: Quantile bins of the novelty table.
NOVELTY_BINS = 4


def knn_prediction(similarity: np.ndarray, X_train: np.ndarray, k: int) -> np.ndarray:
    """Mean delta of the ``k`` training perturbations most cosine-similar to
    each test perturbation (``similarity = G_test @ G_train.T``, rows of unit norm)."""
    k = min(k, similarity.shape[1])
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    return X_train[nearest].mean(axis=1)


def baseline_predictions(
    similarity: np.ndarray, X_train: np.ndarray, knn_k: Sequence[int] = KNN_K
) -> dict[str, np.ndarray]:
    """Predictions of every baseline for the test rows (``similarity``: test ×
    train cosine similarities, ``G_test @ G_train.T``)."""
    n = similarity.shape[0]
    out = {
        "mean_baseline": np.tile(X_train.mean(axis=0), (n, 1)),
        "median_baseline": np.tile(np.median(X_train, axis=0), (n, 1)),
        "control_baseline": np.zeros((n, X_train.shape[1])),
    }
    for k in knn_k:
        out[f"knn_{k}"] = knn_prediction(similarity, X_train, k)
    return out


def nearest_distance(similarity: np.ndarray) -> np.ndarray:
    """Novelty: cosine distance ``1 − max_j cos(g_i, g_j)`` of every test row to
    its nearest training row (``similarity = G_test @ G_train.T``, rows of unit
    norm; a zero row is at distance 1)."""
    return 1.0 - similarity.max(axis=1)


@dataclass(frozen=True)
class Evaluation:
    """The result of :func:`evaluate`.

    Attributes
    ----------
    per_perturbation
        One row per (test perturbation, model): ``perturbation``, ``fold``,
        ``model``, ``subgroup``, ``novelty`` and every metric.
    predictions
        Held-out predictions ``prediction`` (model × perturbation × gene), the
        true ``delta`` and the ``fold`` of every test perturbation.
    folds
        The split: ``perturbation``, ``fold`` (−1: training only, or left
        out), ``group`` (of the ridge statistics; ``fold`` for test
        perturbations, an inner-CV group for training-only ones),
        ``subgroup`` and ``novelty`` (test perturbations).
    fold_fits
        The ridge model of every fold with its alpha path.
    summary
        Per model and metric: mean and std over perturbations, over folds.
    subgroups
        :func:`summarize` of the test perturbations of every GEARS subgroup.
    missing
        What happened to perturbations whose genes have no vector.
    parameters
        The run's parameters, split and embedding identity.
    """

    per_perturbation: pd.DataFrame
    predictions: xr.Dataset = field(repr=False)
    folds: pd.DataFrame = field(repr=False)
    fold_fits: list[FoldFit] = field(repr=False)
    summary: dict[str, dict[str, dict[str, float | None]]]
    subgroups: dict[str, dict[str, dict[str, dict[str, float | None]]]]
    missing: dict[str, Any]
    parameters: dict[str, Any]

    @property
    def models(self) -> list[str]:
        return list(self.summary)


def make_split(
    kind: SplitKind,
    perturbations: Sequence[str],
    *,
    n_folds: int = 5,
    seed: int = 0,
    split_file: str | None = None,
    test_share: float | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Split:
    """The split of ``kind``; ``n_folds`` are the folds of ``kfold`` and the
    inner-CV groups of the one-test-set splits."""
    if (split_file is not None) != (kind == "custom"):
        raise ParameterError("--split-file goes with --split custom, and --split custom needs it")
    if test_share is not None and kind != "simulation":
        raise ParameterError("--test-share applies to --split simulation only")
    if kind == "kfold":
        return kfold_split(len(perturbations), n_folds, seed)
    if kind == "simulation":
        return simulation_split(perturbations, test_share=test_share or DEFAULT_TEST_SHARE,
                                inner_folds=n_folds, seed=seed)
    if kind == "custom":
        return custom_split(perturbations, read_split_file(split_file, storage_options),
                            inner_folds=n_folds, seed=seed, source=split_file)
    raise ParameterError(f"split {kind!r}: use kfold, simulation or custom")


def evaluate(
    pseudobulk: xr.Dataset | str,
    embeddings: Embeddings,
    *,
    split: SplitKind = "kfold",
    n_folds: int = 5,
    split_file: str | None = None,
    test_share: float | None = None,
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
    """Evaluate GenePert's ridge and the baselines on held-out perturbations.

    Parameters
    ----------
    pseudobulk
        A pseudo-bulk store (path/URL) or Dataset.
    embeddings
        Embedding path(s)/URL(s) and ``pca:K`` sources (several are
        concatenated), or a table.
    split
        ``kfold``, ``simulation`` (GEARS) or ``custom`` (``split_file``); see
        :mod:`.splits`.
    n_folds
        Folds of ``kfold``; for the one-test-set splits, the groups of the
        inner CV that chooses alpha.
    split_file, test_share
        The file of a ``custom`` split; the held-out share of a ``simulation``.
    seed
        Seed of the split (and of ``missing="random"``).
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
    ds = open_pseudobulk(pseudobulk, storage_options) if isinstance(pseudobulk, str) else pseudobulk
    plan = EmbeddingPlan(embeddings, storage_options)
    genes = [str(g) for g in ds["gene"].values]
    template = plan.table(genes)
    data = training_data(ds, template, missing=missing, gene_map=gene_map, seed=seed,
                         storage_options=storage_options)
    names = np.asarray(data.features.perturbations, dtype=object)
    X = np.asarray(data.delta.compute(), dtype=np.float64)
    data = dataclasses.replace(data, delta=da.from_array(X, chunks=(block_size, -1)))  # read once
    the_split = make_split(split, names, n_folds=n_folds, seed=seed, split_file=split_file,
                           test_share=test_share, storage_options=storage_options)
    models = [RIDGE, "mean_baseline", "median_baseline", "control_baseline", *(f"knn_{k}" for k in knn_k)]
    prediction = np.zeros((len(models), *X.shape), dtype=np.float32)
    centroid, novelty = np.zeros_like(X), np.full(len(names), np.nan)
    subgroup = np.full(len(names), "", dtype=object)
    used = the_split.group != UNUSED
    fits = []
    for features, folds in feature_sets(plan, data, X, the_split):
        stats = fold_statistics(dataclasses.replace(data, features=features), the_split.group,
                                the_split.n_groups, block_size=block_size, progress=progress)
        G = features.rows()
        rows = Rows(G[used], X[used], the_split.group[used])
        for fit in cross_validate(stats, alphas, rows=rows, solver=solver, folds=folds):
            test, train = the_split.test_mask(fit.fold), the_split.train_mask(fit.fold)
            similarity = G[test] @ G[train].T  # shared by the kNN baselines and novelty
            preds = {RIDGE: G[test] @ fit.coef + fit.intercept,
                     **baseline_predictions(similarity, X[train], knn_k)}
            prediction[:, test] = [preds[model] for model in models]
            centroid[test] = X[train].mean(axis=0)
            novelty[test] = nearest_distance(similarity)
            subgroup[test] = subgroups(names, test, train)[test]
            fits.append(fit)
    fold = the_split.fold
    tested = fold != UNUSED
    per_perturbation = metrics_table(
        prediction[:, tested], X[tested], models, names[tested], fold[tested],
        centroid=centroid[tested], exclude=target_genes(names[tested], genes),
        ttest_genes=ttest_de_genes(ds, names[tested]),
    )
    per_perturbation.insert(3, "subgroup", np.tile(subgroup[tested], len(models)))
    per_perturbation.insert(4, "novelty", np.tile(novelty[tested], len(models)))
    predictions = xr.Dataset(
        {
            "prediction": (("model", "perturbation", "gene"), prediction[:, tested]),
            "delta": (("perturbation", "gene"), X[tested].astype(np.float32)),
            "fold": ("perturbation", fold[tested]),
        },
        coords={"model": np.asarray(models, dtype=object), "perturbation": names[tested],
                "gene": np.asarray(data.genes, dtype=object)},
    )
    folds_table = pd.DataFrame({"perturbation": names, "fold": fold, "group": the_split.group,
                                "subgroup": subgroup, "novelty": novelty})
    parameters = {
        **the_split.parameters, "alphas": list(alphas), "missing": missing,
        "knn_k": list(knn_k), "solver": solver,
        "pseudobulk": pseudobulk if isinstance(pseudobulk, str) else None,
        "embedding": list(template.sources), "n_perturbations": data.n,
        "n_test_perturbations": int(tested.sum()), "n_genes": len(data.genes),
        "embedding_dim": data.features.dim,
        "subgroup_sizes": {str(k): int(v) for k, v in pd.Series(subgroup[tested]).value_counts().items()},
    }
    by_subgroup = {str(name): summarize(table) for name, table in per_perturbation.groupby("subgroup")}
    return Evaluation(per_perturbation, predictions, folds_table, fits, summarize(per_perturbation),
                      by_subgroup, data.features.summary(), parameters)


def feature_sets(
    plan: EmbeddingPlan, data: TrainingData, X: np.ndarray, split: Split
) -> Iterator[tuple[Features, list[int]]]:
    """Features and the test folds they serve: one set for embedding files;
    one per fold for data-derived sources, from that fold's training deltas."""
    if not plan.data_derived:
        yield data.features, list(split.test_groups)
        return
    for k in split.test_groups:
        table = plan.table(list(data.genes), X[split.train_mask(k)])
        yield with_table(data.features, table), [k]


def ttest_de_genes(ds: xr.Dataset, perturbations: np.ndarray) -> np.ndarray | None:
    """Top-20 DE genes of each perturbation by the Welch t-test against the
    control (GEARS' definition), when the pseudo-bulk has group variances
    (``pseudobulk --group-variance``); else ``None``."""
    if "var" not in ds:
        log.info("pseudo-bulk has no group variances: t-test DE metrics are left empty "
                 "(rerun pseudobulk with --group-variance)")
        return None
    return top_de_genes(ds, DE_TOP).sel(perturbation=list(perturbations)).values


def target_genes(perturbations: Sequence[str], genes: Sequence[str]) -> np.ndarray:
    """Mask (perturbations × genes): the measured genes each perturbation targets."""
    position = {g: j for j, g in enumerate(genes)}
    mask = np.zeros((len(perturbations), len(genes)), dtype=bool)
    for i, p in enumerate(perturbations):
        mask[i, [position[g] for g in perturbation_genes(p) if g in position]] = True
    return mask


def metrics_table(
    prediction: np.ndarray,
    true: np.ndarray,
    models: Sequence[str],
    names: np.ndarray,
    fold: np.ndarray,
    *,
    centroid: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    de_genes: np.ndarray | None = None,
    ttest_genes: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per (model, perturbation): ``perturbation``, ``fold``, ``model``
    and every metric of the prediction (model × perturbation × gene).

    ``centroid`` (the perturbed centroid's delta per row), ``de_genes`` and
    ``ttest_genes`` (top DE gene indices per row) and ``exclude`` (genes left out of the
    discrimination score per row) are passed to :mod:`.metrics`; set-level
    metrics compare every row with all rows of ``true``.
    """
    tables = []
    for model, pred in zip(models, prediction):
        pred = pred.astype(np.float64)
        table = pd.DataFrame({
            **perturbation_metrics(pred, true, de_genes=de_genes, ttest_genes=ttest_genes,
                                   centroid=centroid),
            "discrimination_score": discrimination_score(pred, true, exclude=exclude),
            "centroid_accuracy": centroid_accuracy(pred, true),
        })
        table.insert(0, "model", model)
        table.insert(0, "fold", fold)
        table.insert(0, "perturbation", names)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def summarize(
    per_perturbation: pd.DataFrame, metrics: Sequence[str] = METRICS
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per model and metric: ``mean``/``std`` over perturbations,
    ``fold_mean``/``fold_std`` over the per-fold means (NaN values, e.g. the
    Pearson of a constant prediction, are left out; all-NaN gives ``None``)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for model, table in per_perturbation.groupby("model", sort=False):
        fold_means = table.groupby("fold")[list(metrics)].mean()
        out[str(model)] = {
            metric: {
                "mean": _number(table[metric].mean()),
                "std": _number(table[metric].std()),
                "fold_mean": _number(fold_means[metric].mean()),
                "fold_std": _number(fold_means[metric].std()),
                "n": int(table[metric].notna().sum()),
            }
            for metric in metrics
        }
    return out


def novelty_table(per_perturbation: pd.DataFrame, metric: str = "pearson_delta",
                  bins: int = NOVELTY_BINS) -> pd.DataFrame:
    """Mean ``metric`` per model in quantile bins of novelty: columns
    ``bin``, ``novelty_low``, ``novelty_high``, ``n`` and one per model."""
    table = per_perturbation.dropna(subset=["novelty"])
    if table.empty:
        return pd.DataFrame(columns=["bin", "novelty_low", "novelty_high", "n"])
    codes = pd.qcut(table["novelty"], q=bins, duplicates="drop")
    means = table.groupby([codes, "model"], observed=True, sort=True)[metric].mean().unstack("model")
    counts = table[table["model"] == table["model"].iloc[0]].groupby(codes, observed=True).size()
    out = pd.DataFrame({
        "bin": range(len(means)),
        "novelty_low": [float(i.left) for i in means.index],
        "novelty_high": [float(i.right) for i in means.index],
        "n": counts.reindex(means.index).to_numpy(),
    })
    models = list(dict.fromkeys(table["model"]))
    return pd.concat([out, means[models].reset_index(drop=True)], axis=1)


def _number(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)
