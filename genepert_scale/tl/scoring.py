"""Scoring of held-out perturbations: every model's prediction for a block
of them, the metrics of every row, and the predictions stored block by
block — phase 2 of :func:`.evaluate.evaluate_perturbations`.

A :class:`Scoring` holds what predicts: every fold's :class:`FoldModel`
(the ridge, the training centroid and median, the nearest training
perturbations), the ``pca_ridge`` baseline (:mod:`.pca_ridge`) and the
baselines of :mod:`.baselines` (mean and median of training deltas,
control = no change, Systema's matching mean, the additive model of pairs,
cosine k-nearest neighbours). The rows that the kNN, matching-mean and
additive baselines combine, and the true rows, are gathered in one pass
over the deltas per block (:meth:`Scoring.gather`); :func:`score_blocks`
computes the metrics of every row (:func:`row_metrics`, :mod:`.metrics`)
and writes the predictions to a zarr store (:class:`PredictionStore`;
:attr:`.evaluate.Evaluation.predictions` reads it lazily).

The set-level metrics (discrimination score, centroid accuracy) compare
every prediction with every held-out perturbation's truth: they are computed
at the end, where their work and arrays fit (:func:`set_metrics_fit`), and
left empty above that (the reason is in ``parameters["set_metrics"]``).
:func:`metrics_table` scores predictions held in memory alike (the
cell-level models of :mod:`.cells`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from scipy import sparse

from .baselines import Combine, additive_rows, combined, matching_rows, row_sets, top_k
from .blocks import read_rows, weighted_sums
from ..io.integrity import complete_chunks
from ..io.store import create_dataset, open_dataset
from .embeddings import Features, perturbation_genes
from .metrics import (
    SET_METRICS,
    centroid_accuracy,
    discrimination_score,
    distances,
    kept_de_genes,
    perturbation_metrics,
    ranks,
)
from .pca_ridge import PCA_RIDGE, PcaRidge
from .ridge import FoldFit
from .splits import UNUSED

log = logging.getLogger(__name__)

#: GenePert's ridge, by its model name.
RIDGE = "genepert_ridge"

#: (held-out perturbations × genes) float64 arrays a scored block holds
#: besides its gathered rows: one model's prediction and the metrics'
#: temporaries (or, for the set-level metrics, a model's stored predictions
#: and a block of true rows).
SCORING_ARRAYS = 8


@dataclass(frozen=True)
class FoldModel:
    """What predicts the held-out perturbations of one fold.

    Attributes
    ----------
    fit
        The ridge model.
    features
        The features it was fitted on (per fold for data-derived embeddings).
    centroid, median
        Mean and median of the training deltas, per gene.
    test
        Positions of the fold's test perturbations, ascending.
    similarity, neighbours
        Per test perturbation, the cosine similarity and position of its
        nearest training perturbations (:func:`.evaluate.nearest_training`).
    """

    fit: FoldFit
    features: Features
    centroid: np.ndarray
    median: np.ndarray
    test: np.ndarray
    similarity: np.ndarray = field(repr=False)
    neighbours: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Scoring:
    """What predicts blocks of held-out perturbations with every model.

    Attributes
    ----------
    delta
        The pseudo-bulk deltas (lazy).
    names, group
        Perturbation labels and their split groups.
    folds
        Every test fold's models.
    models
        The models, in report order.
    knn_k
        Neighbour counts of the kNN baselines.
    pca
        The ``pca_ridge`` baseline, if any.
    index
        Gene → positions of the perturbations of it (:func:`.baselines.gene_index`).
    singles
        Per fold, gene → position of its single-gene training perturbation
        (:func:`.baselines.single_rows`); empty when the additive baseline
        is not scored.
    block_size
        Rows per read of the deltas.
    """

    delta: Any
    names: np.ndarray
    group: np.ndarray
    folds: dict[int, FoldModel]
    models: list[str]
    knn_k: tuple[int, ...]
    pca: PcaRidge | None
    index: dict[str, list[int]] = field(repr=False)
    singles: dict[int, dict[str, int]] = field(repr=False)
    block_size: int

    def by_fold(self, fold: np.ndarray) -> Iterator[tuple[FoldModel, np.ndarray]]:
        """Every fold in ``fold`` (a block's) with its rows of the block."""
        for k in np.unique(fold):
            yield self.folds[int(k)], np.flatnonzero(fold == k)

    def per_row(self, fold: np.ndarray, value: Callable[[FoldModel], np.ndarray]) -> np.ndarray:
        """``value`` of every row's fold model, one row each (block × genes)."""
        out = np.empty((len(fold), self.delta.shape[1]))
        for model, rows in self.by_fold(fold):
            out[rows] = value(model)
        return out

    def row_sets(self, block: np.ndarray, fold: np.ndarray) -> dict[str, tuple[list, Combine]]:
        """The rows the gathered models combine for each perturbation of a
        block, and how: its own (``delta``, the truth), its nearest training
        perturbations (``knn_k``), the training perturbations sharing a gene
        (``matching_mean``) and a pair's training singles (``additive``)."""
        sets: dict[str, tuple[list, Combine]] = {"delta": ([[p] for p in block], "sum")}
        knn = {k: [None] * len(block) for k in self.knn_k}
        matching: list = [None] * len(block)
        additive: list = [None] * len(block)
        for model, rows in self.by_fold(fold):
            at = np.searchsorted(model.test, block[rows])
            for k in self.knn_k:
                _, nearest_rows = top_k(model.similarity[at], model.neighbours[at], k)
                for i, r in zip(rows, nearest_rows.tolist()):
                    knn[k][i] = r
            train = (self.group != model.fit.fold) & (self.group != UNUSED)
            labels = self.names[block[rows]]
            for i, r in zip(rows, matching_rows(labels, self.index, train)):
                matching[i] = r
            if self.singles:
                for i, r in zip(rows, additive_rows(labels, self.singles[model.fit.fold])):
                    additive[i] = r
        sets.update({f"knn_{k}": (knn[k], "mean") for k in self.knn_k})
        sets["matching_mean"] = (matching, "mean")
        if self.singles:
            sets["additive"] = (additive, "sum")
        return sets

    def gather(self, block: np.ndarray, fold: np.ndarray) -> dict[str, np.ndarray]:
        """Every row set of :meth:`row_sets` combined, in one pass over the deltas."""
        sets = self.row_sets(block, fold)
        weights = sparse.vstack([row_sets(rows, self.delta.shape[0]) for rows, _ in sets.values()], format="csr")
        sums = weighted_sums(self.delta, weights, self.block_size)
        out, first = {}, 0
        for name, (rows, how) in sets.items():
            out[name] = combined(sums[first : first + len(rows)], rows, how)
            first += len(rows)
        return out

    def predictions(self, block: np.ndarray, fold: np.ndarray,
                    gathered: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
        """Every model's prediction for a block (NaN rows: not scored), one at a time."""
        for model in self.models:
            if model in gathered:
                yield model, gathered[model]
            elif model == RIDGE:
                out = np.empty((len(block), self.delta.shape[1]))
                for fm, rows in self.by_fold(fold):
                    out[rows] = fm.features.rows(block[rows]) @ fm.fit.coef + fm.fit.intercept
                yield model, out
            elif model == "mean_baseline":
                yield model, self.per_row(fold, lambda fm: fm.centroid)
            elif model == "median_baseline":
                yield model, self.per_row(fold, lambda fm: fm.median)
            elif model == "control_baseline":
                yield model, np.zeros((len(block), self.delta.shape[1]))
            elif model == PCA_RIDGE:
                yield model, self.pca.predict(block, fold, self.delta.shape[1])


def score_blocks(
    scoring: Scoring,
    tested: np.ndarray,
    store: PredictionStore,
    ttest_genes: np.ndarray | None,
    rows: int,
    targets: TargetGenes,
    fdr_genes: xr.DataArray | None = None,
) -> tuple[dict[str, list[pd.DataFrame]], np.ndarray]:
    """Predict and score the held-out perturbations (positions ``tested``) a
    block of ``rows`` at a time, writing the predictions into ``store``;
    ``targets`` tells the genes left out of each row's metrics, ``fdr_genes``
    (:func:`.evaluate.fdr_de_mask`, read a block at a time) their DE genes at the FDR.

    Returns
    -------
    tables
        Per model, the row metrics of every block (:func:`row_metrics`).
    fell_back
        Per held-out perturbation: the matching mean fell back on the mean baseline.
    """
    tables: dict[str, list[pd.DataFrame]] = {model: [] for model in scoring.models}
    fell_back = np.zeros(len(tested), dtype=bool)
    for first in range(0, len(tested), rows):
        block = tested[first : first + rows]
        fold = scoring.group[block]
        gathered = scoring.gather(block, fold)
        true = gathered.pop("delta")
        fell = np.isnan(gathered["matching_mean"]).all(axis=1)
        gathered["matching_mean"][fell] = scoring.per_row(fold[fell], lambda fm: fm.centroid)
        fell_back[first : first + len(block)] = fell
        centroid = scoring.per_row(fold, lambda fm: fm.centroid)
        store.write_delta(first, true)
        left_out = targets.left_out(slice(first, first + len(block)))
        fdr = None if fdr_genes is None else fdr_genes.sel(perturbation=list(scoring.names[block])).values
        for index, (model, prediction) in enumerate(scoring.predictions(block, fold, gathered)):
            stored = store.write_prediction(index, first, prediction)
            tables[model].append(row_metrics(
                stored, true, centroid=centroid, exclude=left_out, fdr_genes=fdr,
                ttest_genes=None if ttest_genes is None else ttest_genes[first : first + len(block)]))
        log.info("scored %d of %d held-out perturbations", first + len(block), len(tested))
    return tables, fell_back


class PredictionStore:
    """The held-out predictions as a zarr store, in the layout of
    :attr:`.evaluate.Evaluation.predictions`, written a block of perturbations at a
    time: ``prediction`` (model × perturbation × gene) and the true
    ``delta``, both float32, every perturbation's ``fold``, the
    ``control_mean`` and the pseudo-bulk's ``run`` (attrs ``pseudobulk_run``)."""

    def __init__(self, path: str, models: Sequence[str], perturbations: np.ndarray,
                 genes: Sequence[str], fold: np.ndarray, rows: int,
                 control_mean: np.ndarray, run: dict[str, Any]):
        n, q = len(perturbations), len(genes)
        template = xr.Dataset(
            {
                "prediction": (("model", "perturbation", "gene"),
                               da.empty((len(models), n, q), chunks=(1, rows, q), dtype=np.float32)),
                "delta": (("perturbation", "gene"), da.empty((n, q), chunks=(rows, q), dtype=np.float32)),
                "fold": ("perturbation", fold),
                "control_mean": ("gene", np.asarray(control_mean)),
            },
            coords={"model": np.asarray(models, dtype=object), "perturbation": perturbations,
                    "gene": np.asarray(genes, dtype=object)},
            attrs={"pseudobulk_run": json.dumps(run)},
        )
        self.path = path
        self.group = create_dataset(template, path)

    def write_delta(self, first: int, true: np.ndarray) -> None:
        with complete_chunks():
            self.group["delta"][first : first + len(true)] = true.astype(np.float32)

    def write_prediction(self, model: int, first: int, prediction: np.ndarray) -> np.ndarray:
        """Store a block of one model's prediction; the stored (float32) values."""
        stored = prediction.astype(np.float32)
        with complete_chunks():
            self.group["prediction"][model, first : first + len(stored)] = stored
        return stored

    def open(self) -> xr.Dataset:
        """The store, lazily."""
        return open_dataset(self.path)


def row_metrics(
    prediction: np.ndarray,
    true: np.ndarray,
    *,
    centroid: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    ttest_genes: np.ndarray | None = None,
    fdr_genes: np.ndarray | None = None,
) -> pd.DataFrame:
    """``n_de_fdr`` (each perturbation's true DE genes at the FDR, but those
    of ``exclude``; NaN without ``fdr_genes``) and the per-perturbation
    metrics (:data:`.metrics.ROW_METRICS`) of one model's prediction rows; a
    row with a NaN is one the model does not score: every metric of it is
    NaN. ``centroid``, ``exclude`` (genes left out of every metric of a
    row), ``ttest_genes`` (top DE gene indices per row) and ``fdr_genes`` (DE
    gene mask per row) are passed to :func:`.metrics.perturbation_metrics`."""
    scored = np.isfinite(prediction).all(axis=1)
    pred = np.where(scored[:, None], prediction.astype(np.float64), 0.0)
    table = pd.DataFrame(perturbation_metrics(pred, true, ttest_genes=ttest_genes, fdr_genes=fdr_genes,
                                              centroid=centroid, exclude=exclude))
    table.loc[~scored] = np.nan
    table.insert(0, "n_de_fdr", np.nan if fdr_genes is None else kept_de_genes(fdr_genes, exclude).sum(axis=1))
    return table


#: The most ``perturbations² × genes`` of the set-level metrics per model
#: (about two minutes of the l1 distances on one core).
SET_METRICS_WORK = 2**37


def set_metrics_fit(n: int, q: int) -> str | None:
    """Why the set-level metrics of ``n`` held-out perturbations over ``q``
    genes are not computed (their work grows as ``n² × q``), or ``None``."""
    if n * n * q > SET_METRICS_WORK:
        return (f"{n} held-out perturbations x {q} genes: each prediction is compared with every "
                f"held-out truth ({n}^2 x {q} values per model, more than {SET_METRICS_WORK:.3g})")
    return None


def set_metrics(
    predictions: xr.Dataset,
    delta: Any,
    tested: np.ndarray,
    targets: TargetGenes,
    rows: int,
) -> tuple[dict[str, pd.DataFrame], str | None]:
    """:func:`set_metric_values` where they fit (:func:`set_metrics_fit`),
    else none; and why not (``None``: computed)."""
    reason = set_metrics_fit(len(tested), predictions.sizes["gene"])
    if reason is not None:
        log.warning("set-level metrics left empty: %s", reason)
        return {}, reason
    return set_metric_values(predictions, delta, tested, targets, rows), None


def set_metric_values(
    predictions: xr.Dataset,
    delta: Any,
    tested: np.ndarray,
    targets: TargetGenes,
    rows: int,
) -> dict[str, pd.DataFrame]:
    """Per model, the set-level metrics (:data:`.metrics.SET_METRICS`) of its
    stored predictions against every held-out truth; NaN for the
    perturbations it does not score.

    Blocks of ``rows`` predictions are compared with blocks of ``rows`` true
    rows (``delta`` at ``tested``), their own block first (where each
    prediction's distance to its own truth is taken, as in the one-block
    computation), and the counts of nearer and farther truths
    (:func:`.metrics.ranks`) summed. ``targets``: the genes left out of each
    row's discrimination distances (its targets, always) and of its centroid
    distances (with ``exclude_targets``).
    """
    n = len(tested)
    blocks = [slice(first, min(first + rows, n)) for first in range(0, n, rows)]
    models = [str(m) for m in predictions["model"].values]
    nearer = {m: np.zeros(n, dtype=np.int64) for m in models}
    farther = {m: np.zeros(n, dtype=np.int64) for m in models}
    for block in blocks:
        mask, left_out = targets.mask(block), targets.left_out(block)
        for m, model in enumerate(models):
            stored = predictions["prediction"].isel(model=m, perturbation=block).values
            pred = np.where(np.isfinite(stored).all(axis=1)[:, None], stored.astype(np.float64), 0.0)
            for other in [block, *(b for b in blocks if b != block)]:
                true = read_rows(delta, tested[other])
                l1, l2 = distances(pred, true, "l1", mask), distances(pred, true, "l2", left_out)
                if other == block:
                    own = np.diagonal(l1).copy(), np.diagonal(l2).copy()
                nearer[model][block] += ranks(l1, own[0])[0]
                farther[model][block] += ranks(l2, own[1])[1]
    out = {}
    for m, model in enumerate(models):
        table = pd.DataFrame({"discrimination_score": 1.0 - nearer[model] / n,
                              "centroid_accuracy": farther[model] / (n - 1) if n > 1 else np.nan})
        table.loc[~np.isfinite(predictions["prediction"].isel(model=m).values).all(axis=1)] = np.nan
        out[model] = table
    return out


def model_table(
    model: str,
    blocks: list[pd.DataFrame],
    set_values: pd.DataFrame | None,
    names: np.ndarray,
    fold: np.ndarray,
) -> pd.DataFrame:
    """One model's rows of the per-perturbation table: ``perturbation``,
    ``fold``, ``model``, ``n_de_fdr`` and every metric
    (:data:`.metrics.METRICS`; the set-level ones NaN when not computed)."""
    table = pd.concat(blocks, ignore_index=True)
    for metric in SET_METRICS:
        table[metric] = np.nan if set_values is None else set_values[metric].to_numpy()
    table.insert(0, "model", model)
    table.insert(0, "fold", fold)
    table.insert(0, "perturbation", names)
    return table


def perturbation_table(
    models: Sequence[str],
    tables: dict[str, list[pd.DataFrame]],
    set_values: dict[str, pd.DataFrame],
    names: np.ndarray,
    fold: np.ndarray,
    subgroup: np.ndarray,
    novelty: np.ndarray,
) -> pd.DataFrame:
    """The per-perturbation table of :attr:`.evaluate.Evaluation.per_perturbation`:
    every model's rows (:func:`model_table`), each with the ``subgroup`` and
    ``novelty`` of its perturbation."""
    table = pd.concat([model_table(model, tables[model], set_values.get(model), names, fold)
                       for model in models], ignore_index=True)
    table.insert(3, "subgroup", np.tile(subgroup, len(models)))
    table.insert(4, "novelty", np.tile(novelty, len(models)))
    return table


def target_genes(perturbations: Sequence[str], genes: Sequence[str]) -> np.ndarray:
    """Mask (perturbations × genes): the measured genes each perturbation targets."""
    position = {g: j for j, g in enumerate(genes)}
    mask = np.zeros((len(perturbations), len(genes)), dtype=bool)
    for i, p in enumerate(perturbations):
        mask[i, [position[g] for g in perturbation_genes(p) if g in position]] = True
    return mask


@dataclass(frozen=True)
class TargetGenes:
    """The measured target genes of the held-out perturbations ``names``,
    by blocks of them: always left out of the discrimination score, and of
    every metric with ``exclude_targets``."""

    names: np.ndarray
    genes: Sequence[str]
    exclude_targets: bool

    def mask(self, block: slice = slice(None)) -> np.ndarray:
        """Perturbations of ``block`` × genes: their targets (:func:`target_genes`)."""
        return target_genes(self.names[block], self.genes)

    def left_out(self, block: slice = slice(None)) -> np.ndarray | None:
        """The genes left out of every metric of ``block``'s rows (``None``: none)."""
        return self.mask(block) if self.exclude_targets else None


def metrics_table(
    prediction: np.ndarray,
    true: np.ndarray,
    models: Sequence[str],
    names: np.ndarray,
    fold: np.ndarray,
    *,
    centroid: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per (model, perturbation) of predictions held in memory
    (model × perturbation × gene): ``perturbation``, ``fold``, ``model`` and
    every metric (:func:`row_metrics`; the set-level ones compare every row
    with all rows of ``true``). ``exclude``: genes left out of each row's
    discrimination score (its targets)."""
    tables = []
    for model, pred in zip(models, prediction):
        scored = np.isfinite(pred).all(axis=1)
        filled = np.where(scored[:, None], pred.astype(np.float64), 0.0)
        values = pd.DataFrame({"discrimination_score": discrimination_score(filled, true, exclude=exclude),
                               "centroid_accuracy": centroid_accuracy(filled, true)})
        values.loc[~scored] = np.nan
        tables.append(model_table(model, [row_metrics(pred, true, centroid=centroid)], values, names, fold))
    return pd.concat(tables, ignore_index=True)
