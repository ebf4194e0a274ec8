"""Evaluation of the cell model on held-out perturbations, on the K folds
over perturbations that ``evaluate`` uses (:func:`.splits.kfold_split` over
the pseudo-bulk's perturbations with embeddings, same seed).

Per fold the cell model is fitted on the control cells and the training
perturbations' cells only; GenePert's ridge on the training perturbations'
pseudo-bulk (the same fits as ``evaluate``). Every held-out perturbation
gets, from the same sampled control cells, three sets of predicted cells:

* ``latent_ot``: the cell model's (:meth:`.CellsModel.move`);
* ``ridge_shift``: the control cells plus the ridge's predicted delta;
* ``control_cells``: the control cells unchanged.

All are clipped at 0 and scored the same way: their pseudo-bulk minus the
control pseudo-bulk against the true delta (GenePert's metrics,
:func:`.evaluate.metrics_table`), and, as distributions, the energy distance
and RBF MMD to a sample of the perturbation's true cells in a PCA space
fitted on the fold's training cells (:mod:`.distances`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import scipy.stats
import xarray as xr

from ...pp.params import InputKindOption
from ...validate import NTopGenes, check_positive
from ..embeddings import MissingPolicy
from ..evaluate import metrics_table, summarize, target_genes
from ..metrics import METRICS
from ..model import BLOCK_SIZE, Embeddings, GeneMap, TrainingData, fold_statistics
from ..ridge import DEFAULT_ALPHAS, FoldFit, Rows, check_alphas, cross_validate
from ..splits import Split, kfold_split
from .distances import DEFAULT_COMPONENTS, Pca, energy_distance, mmd_rbf
from .model import CellsConfig, CellsModel, Prepared, cells_anndata, control_pool, fit_on, prepare
from .stream import CELL_BLOCK_ROWS, CONTROL, sample_rows

log = logging.getLogger(__name__)

LATENT_OT, RIDGE_SHIFT, CONTROL_CELLS = "latent_ot", "ridge_shift", "control_cells"
MODELS = (LATENT_OT, RIDGE_SHIFT, CONTROL_CELLS)
DISTRIBUTION_METRICS = ("energy_distance", "mmd_rbf")
CELL_METRICS = DISTRIBUTION_METRICS + METRICS
#: Metrics where lower is better (the others: higher).
LOWER_IS_BETTER = frozenset({"energy_distance", "mmd_rbf", "rmse_delta", "mae_delta", "mse_de20"})
#: Training cells the evaluation's PCA is fitted on, at most.
PCA_CELLS = 5000


@dataclass(frozen=True)
class CellsEvaluation:
    """The result of :func:`cells_evaluate`.

    Attributes
    ----------
    per_perturbation
        One row per (held-out perturbation, model): ``perturbation``,
        ``fold``, ``model``, ``n_true_cells``, ``n_predicted_cells`` and
        every metric of :data:`CELL_METRICS`.
    summary
        Per model and metric: mean and std over perturbations and over folds.
    comparison
        ``latent_ot`` against ``ridge_shift``, paired per perturbation
        (:func:`paired_comparison`).
    predicted
        The ``latent_ot`` cells of every held-out perturbation (from its
        fold's model) after the kept control cells (unchanged).
    views
        Per perturbation, the first two principal components of its true
        cells (``true``) and of every model's cells.
    folds
        The split: ``perturbation`` and ``fold``.
    fold_log
        Per fold: sizes, seconds, losses per epoch, the ridge's alpha.
    missing, parameters
        Perturbations without embeddings; the run's parameters.
    """

    per_perturbation: pd.DataFrame
    summary: dict[str, dict[str, dict[str, float | None]]]
    comparison: dict[str, dict[str, float | None]]
    predicted: ad.AnnData = field(repr=False)
    views: dict[str, dict[str, np.ndarray]] = field(repr=False)
    folds: pd.DataFrame = field(repr=False)
    fold_log: list[dict[str, Any]] = field(repr=False)
    missing: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Scores:
    """What the folds fill in: predicted deltas (model × perturbation × gene),
    distances (model × perturbation), cell counts, views and predicted cells."""

    delta: np.ndarray
    energy: np.ndarray
    mmd: np.ndarray
    n_true: np.ndarray
    n_predicted: np.ndarray
    views: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    cells: list[tuple[np.ndarray, str, np.ndarray, int]] = field(default_factory=list)

    @classmethod
    def empty(cls, n: int, genes: int) -> _Scores:
        shape = (len(MODELS), n)
        return cls(np.zeros((*shape, genes)), np.full(shape, np.nan), np.full(shape, np.nan),
                   np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64))


def cells_evaluate(
    screen: str,
    embeddings: Embeddings,
    *,
    perturbation_key: str = "perturbation",
    control: str = "non-targeting",
    pseudobulk: xr.Dataset | str | None = None,
    n_top_genes: NTopGenes = "default",
    input: InputKindOption = "auto",
    n_folds: int = 5,
    seed: int = 0,
    alphas: float | Sequence[float] = DEFAULT_ALPHAS,
    missing: MissingPolicy = "drop",
    gene_map: GeneMap = None,
    config: CellsConfig | None = None,
    eval_cells: int = 500,
    pca_components: int = DEFAULT_COMPONENTS,
    pca_cells: int = PCA_CELLS,
    block_rows: int = CELL_BLOCK_ROWS,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> CellsEvaluation:
    """K-fold evaluation of the cell model against ``ridge_shift`` and
    ``control_cells`` (see the module docstring).

    Parameters
    ----------
    screen, embeddings, perturbation_key, control, pseudobulk, n_top_genes, input
        As :func:`.model.cells_fit`.
    n_folds, seed
        The folds over perturbations (``evaluate``'s) and the seed of every
        random choice.
    alphas
        The ridge's alpha grid (chosen per fold by inner CV, as ``evaluate``).
    missing, gene_map
        See :func:`.embeddings.featurize`.
    config
        The cell model's parameters.
    eval_cells
        True cells per held-out perturbation the distances use, at most; as
        many control cells are moved (fewer if fewer are kept).
    pca_components, pca_cells
        The PCA space of the distances: components, and training cells it is
        fitted on at most.
    block_rows, storage_options, progress
        As :func:`.model.cells_fit`.
    """
    config = (config or CellsConfig()).check()
    alphas = check_alphas(alphas)
    for name, value in (("--eval-cells", eval_cells), ("--pca-components", pca_components),
                        ("--pca-cells", pca_cells)):
        check_positive(name, value, integer=True)
    start = time.perf_counter()
    prepared = prepare(screen, embeddings, perturbation_key=perturbation_key, control=control,
                       pseudobulk=pseudobulk, n_top_genes=n_top_genes, input=input, missing=missing,
                       gene_map=gene_map, seed=seed, block_rows=block_rows,
                       storage_options=storage_options, progress=progress)
    names = np.asarray(prepared.perturbations, dtype=object)
    X = np.asarray(prepared.data.delta.compute(), dtype=np.float64)
    split = kfold_split(len(names), n_folds, seed)
    ridge, fits = ridge_predictions(prepared.data, X, split, alphas, progress=progress)
    pool = control_pool(prepared.source, config.control_cells, seed)
    scores, fold_log = _Scores.empty(len(names), X.shape[1]), []
    centroid = np.zeros_like(X)
    for fit in fits:
        test, train = np.flatnonzero(split.test_mask(fit.fold)), np.flatnonzero(split.train_mask(fit.fold))
        fit_start = time.perf_counter()
        model = fit_on(prepared, train, config, seed=seed, pool=pool)
        score_start = time.perf_counter()
        score_fold(prepared, model, test, train, ridge, scores, fold=fit.fold, seed=seed,
                   eval_cells=eval_cells, pca_components=pca_components, pca_cells=pca_cells)
        centroid[test] = X[train].mean(axis=0)
        fold_log.append({"fold": fit.fold, "n_train": int(train.size), "n_test": int(test.size),
                         "fit_seconds": score_start - fit_start,
                         "score_seconds": time.perf_counter() - score_start,
                         "ridge_alpha": fit.alpha, "fit_stage_seconds": model.seconds,
                         "vae_loss": model.history["vae"],
                         "head_loss": model.history["head"]})
        log.info("cells fold %d: %d training, %d held-out perturbations, %.1f s", fit.fold,
                 train.size, test.size, time.perf_counter() - fit_start)
    per_perturbation = score_table(scores, X, names, split, centroid, prepared)
    parameters = {**split.parameters, "alphas": list(alphas), "missing": missing,
                  "config": dataclasses.asdict(config), "eval_cells": eval_cells,
                  "pca_components": pca_components, "pca_cells": pca_cells,
                  "n_perturbations": len(names), "n_genes": X.shape[1],
                  "n_cells": prepared.source.screen.n_obs, "n_control_cells_kept": int(pool.size),
                  "embedding": list(prepared.data.embedding.sources),
                  "screen": screen, "perturbation_key": perturbation_key, "control": control,
                  "seconds": time.perf_counter() - start}
    return CellsEvaluation(
        per_perturbation, summarize(per_perturbation, CELL_METRICS),
        paired_comparison(per_perturbation), predicted_cells(scores, prepared, model),
        scores.views, pd.DataFrame({"perturbation": names, "fold": split.fold}), fold_log,
        prepared.features.summary(), parameters,
    )


def ridge_predictions(
    data: TrainingData,
    X: np.ndarray,
    split: Split,
    alphas: Sequence[float],
    *,
    progress: bool = False,
) -> tuple[np.ndarray, list[FoldFit]]:
    """GenePert ridge's held-out delta of every perturbation, and the fold
    fits: the fits ``evaluate`` makes (fold statistics, inner CV for alpha)."""
    data = dataclasses.replace(data, delta=da.from_array(X, chunks=(BLOCK_SIZE, -1)))
    stats = fold_statistics(data.features, data.delta, split.group, split.n_groups,
                            progress=progress)
    G = data.features.rows()
    fits = cross_validate(stats, alphas, rows=Rows(G, X, split.group), folds=list(split.test_groups))
    predicted = np.zeros_like(X)
    for fit in fits:
        test = split.test_mask(fit.fold)
        predicted[test] = G[test] @ fit.coef + fit.intercept
    return predicted, fits


def score_fold(
    prepared: Prepared,
    model: CellsModel,
    test: np.ndarray,
    train: np.ndarray,
    ridge: np.ndarray,
    scores: _Scores,
    *,
    fold: int,
    seed: int,
    eval_cells: int,
    pca_components: int,
    pca_cells: int,
) -> None:
    """Predict and score every held-out perturbation of a fold into ``scores``."""
    source = prepared.source
    rng = np.random.default_rng([seed, 4, fold])
    training_cells = np.flatnonzero((source.group == CONTROL) | np.isin(source.group, train))
    rows = {f"t{p}": sample_rows(source.cells_of(p), eval_cells, rng) for p in test}
    gathered = source.gather({"pca": sample_rows(training_cells, pca_cells, rng), **rows})
    pca = Pca.fit(gathered.pop("pca"), pca_components)
    G = prepared.features.rows().astype(np.float32)
    control_mean = prepared.data.control_mean
    for p in test:
        true_x = gathered[f"t{p}"]
        picked = np.sort(rng.choice(len(model.control_x), min(len(true_x), len(model.control_x)),
                                    replace=False))
        cells = {LATENT_OT: model.move(G[p], picked),
                 RIDGE_SHIFT: np.maximum(model.control_x[picked] + ridge[p], 0.0),
                 CONTROL_CELLS: model.control_x[picked]}
        true_pc = pca.transform(true_x)
        name = prepared.perturbations[p]
        scores.views[name] = {"true": true_pc[:, :2]}
        for m, model_name in enumerate(MODELS):
            pc = pca.transform(cells[model_name])
            scores.energy[m, p] = energy_distance(pc, true_pc)
            scores.mmd[m, p] = mmd_rbf(pc, true_pc)
            scores.delta[m, p] = cells[model_name].mean(axis=0) - control_mean
            scores.views[name][model_name] = pc[:, :2]
        scores.n_true[p], scores.n_predicted[p] = len(true_x), len(picked)
        scores.cells.append((cells[LATENT_OT], name, model.control_rows[picked], fold))


def score_table(
    scores: _Scores,
    X: np.ndarray,
    names: np.ndarray,
    split: Split,
    centroid: np.ndarray,
    prepared: Prepared,
) -> pd.DataFrame:
    """One row per (model, perturbation): pseudo-bulk metrics, distances, cell counts."""
    table = metrics_table(scores.delta, X, MODELS, names, split.fold, centroid=centroid,
                          exclude=target_genes(names, list(prepared.data.genes)))
    table.insert(3, "n_true_cells", np.tile(scores.n_true, len(MODELS)))
    table.insert(4, "n_predicted_cells", np.tile(scores.n_predicted, len(MODELS)))
    table.insert(5, "energy_distance", scores.energy.ravel())
    table.insert(6, "mmd_rbf", scores.mmd.ravel())
    return table


def paired_comparison(
    per_perturbation: pd.DataFrame,
    model: str = LATENT_OT,
    against: str = RIDGE_SHIFT,
    metrics: Sequence[str] = ("energy_distance", "mmd_rbf", "pearson_delta", "rmse_delta"),
) -> dict[str, dict[str, float | None]]:
    """``model`` against ``against`` per perturbation, for every metric: mean
    of each, mean and median of the difference, the share of perturbations
    where ``model`` is better, and the two-sided Wilcoxon signed-rank p-value
    of the differences (at least 6 perturbations)."""
    wide = per_perturbation.pivot(index="perturbation", columns="model", values=list(metrics))
    out: dict[str, dict[str, float | None]] = {}
    for metric in metrics:
        pair = wide[metric][[model, against]].dropna()
        diff = (pair[model] - pair[against]).to_numpy()
        better = diff < 0 if metric in LOWER_IS_BETTER else diff > 0
        p_value = None
        if len(diff) >= 6 and np.any(diff != 0):
            p_value = float(scipy.stats.wilcoxon(diff).pvalue)
        out[metric] = {
            model: _number(pair[model].mean()), against: _number(pair[against].mean()),
            "mean_difference": _number(diff.mean()) if diff.size else None,
            "median_difference": _number(np.median(diff)) if diff.size else None,
            f"{model}_better_share": _number(better.mean()) if diff.size else None,
            "wilcoxon_p": p_value, "n": int(diff.size),
            "lower_is_better": metric in LOWER_IS_BETTER,
        }
    return out


def predicted_cells(scores: _Scores, prepared: Prepared, model: CellsModel) -> ad.AnnData:
    """The ``latent_ot`` cells of every held-out perturbation, after the kept
    control cells of ``model`` (unchanged, fold ``-1``), with the screen's labels."""
    source = prepared.source
    parts = [(model.control_x, source.control, model.control_rows, -1)] + [
        (x, source.labels[name], rows, fold) for x, name, rows, fold in scores.cells]
    labels = [label for x, label, _, _ in parts for _ in range(len(x))]
    folds = np.concatenate([np.full(len(x), fold) for x, _, _, fold in parts])
    return cells_anndata(np.concatenate([x for x, *_ in parts]), labels,
                         np.concatenate([rows for _, _, rows, _ in parts]), genes=source.genes,
                         key=source.key, control=source.control, obs={"fold": folds},
                         uns={"model": LATENT_OT, "evaluation": "held-out folds"})


def _number(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
