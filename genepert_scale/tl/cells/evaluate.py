"""Evaluation of the cell model on held-out perturbations, on the K folds
over perturbations that ``evaluate`` uses (:func:`.splits.kfold_split` over
the pseudo-bulk's perturbations with embeddings, same seed; with contexts, a
perturbation is held out in every context at once).

Per fold the cell model is fitted on the control cells and the training
perturbations' cells only; GenePert's ridge on the training perturbations'
pseudo-bulk (the same fits as ``evaluate``; with contexts, one ridge per
context). Every held-out perturbation gets, from the same sampled control
cells of its context, these sets of predicted cells:

* ``latent_ot``: the cell model's (:meth:`.CellsModel.move`);
* ``latent_ot_onehot`` (a *seen* model, an upper bound): the same VAE and
  control cells, a head whose condition is a learned vector per
  perturbation, trained on the OT pairs of every perturbation, the held-out
  ones included (:func:`.model.fit_onehot`): what the head could do if the
  condition were perfect, so the gap between it and ``latent_ot`` is what
  the embedding costs;
* ``ridge_shift``: the control cells plus the ridge's predicted delta;
* ``control_cells``: the control cells unchanged.

Each set is scored against the perturbation's true cells: as a pseudo-bulk
(the mean of the predicted cells minus the control mean of the context gives
a delta, scored with ``evaluate``'s metrics, :func:`.scoring.metrics_table`),
and, as distributions, the energy distance and RBF MMD to a sample of the
perturbation's true cells in a PCA space fitted on the fold's training cells
(:mod:`.distances`).

Memory: true cells are read a block of held-out perturbations at a time (at
most ``block_cells`` cells; each block one pass over the screen's blocks that
hold them), and every perturbation's predicted cells are scored and appended
to ``predicted_path`` (:class:`.output.CellsWriter`) before the next's are
made; what stays are deltas (models × perturbations × genes, as ``evaluate``),
distances, and the 2-D views of the best and worst perturbation.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import scipy.stats
import xarray as xr

from ...validate import check_positive
from ..embeddings import MissingPolicy
from ..evaluate import summarize
from ..scoring import metrics_table, target_genes
from ..metrics import METRICS
from ..model import BLOCK_SIZE, Embeddings, GeneMap, TrainingData, fold_statistics
from ..ridge import DEFAULT_ALPHAS, Rows, check_alphas, cross_validate
from ..splits import Split, kfold_split
from .distances import DEFAULT_COMPONENTS, Pca, energy_distance, mmd_rbf
from .model import (
    CellsConfig,
    CellsModel,
    CellsPart,
    Prepared,
    control_pool,
    fit_onehot,
    fit_on,
    model_uns,
    prepare,
)
from .output import CellsWriter
from .stream import CONTROL, sample_rows

log = logging.getLogger(__name__)

LATENT_OT, LATENT_OT_ONEHOT = "latent_ot", "latent_ot_onehot"
RIDGE_SHIFT, CONTROL_CELLS = "ridge_shift", "control_cells"
MODELS = (LATENT_OT, LATENT_OT_ONEHOT, RIDGE_SHIFT, CONTROL_CELLS)
#: Models that have seen the cells they are scored on, and what that means.
SEEN_MODELS = {
    LATENT_OT_ONEHOT: "seen: the fold's VAE and control cells with a shift head whose condition "
                      "is a learned vector per perturbation, trained on the OT pairs of every "
                      "perturbation including the held-out ones; an upper bound of what the "
                      "embedding can give through this latent and head, not a prediction of "
                      "unseen perturbations",
}
DISTRIBUTION_METRICS = ("energy_distance", "mmd_rbf")
CELL_METRICS = DISTRIBUTION_METRICS + METRICS
#: Metrics where lower is better (the others: higher).
LOWER_IS_BETTER = frozenset({"energy_distance", "mmd_rbf", "rmse_delta", "mae_delta", "mse_de20"})
#: Training cells the evaluation's PCA is fitted on, at most.
PCA_CELLS = 5000
#: True cells read at once while scoring, at most (a block of held-out perturbations).
BLOCK_CELLS = 50_000


@dataclass(frozen=True)
class View:
    """PC1/PC2 of a perturbation's true cells (``points["true"]``) and of
    every model's cells, and every model's energy distance."""

    points: dict[str, np.ndarray]
    energy: dict[str, float]


@dataclass(frozen=True)
class CellsEvaluation:
    """The result of :func:`cells_evaluate`.

    Attributes
    ----------
    per_perturbation
        One row per (held-out perturbation, model): ``perturbation``,
        (``context``,) ``fold``, ``model``, ``n_true_cells``,
        ``n_predicted_cells`` and every metric of :data:`CELL_METRICS`.
    summary
        Per model and metric: mean and std over perturbations and over folds.
    comparison
        ``latent_ot`` against ``ridge_shift``, paired per perturbation
        (:func:`paired_comparison`).
    predicted
        The ``.h5ad`` of the kept control cells (unchanged) and the
        ``latent_ot`` cells of every held-out perturbation (from its fold's model).
    views
        The perturbations where ``latent_ot`` came closest and farthest
        (energy distance), in that order, with their :class:`View`.
    folds
        The split: ``perturbation`` (``context``) and ``fold``.
    fold_log
        Per fold: sizes, seconds, losses per epoch, the ridge's alpha.
    models
        The models scored.
    contexts
        With contexts: :attr:`summary` of every context's perturbations.
    model
        With ``final_model``: the cell model fitted on every perturbation.
    missing, parameters
        Perturbations without embeddings; the run's parameters.
    """

    per_perturbation: pd.DataFrame
    summary: dict[str, dict[str, dict[str, float | None]]]
    comparison: dict[str, dict[str, float | None]]
    predicted: str
    views: dict[str, View] = field(repr=False)
    folds: pd.DataFrame = field(repr=False)
    fold_log: list[dict[str, Any]] = field(repr=False)
    models: tuple[str, ...] = MODELS
    contexts: dict[str, Any] = field(default_factory=dict)
    model: CellsModel | None = field(default=None, repr=False)
    missing: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Scores:
    """What the folds fill in: predicted deltas (model × row × gene),
    distances (model × row), cell counts, and the best and worst views."""

    models: tuple[str, ...]
    delta: np.ndarray
    energy: np.ndarray
    mmd: np.ndarray
    n_true: np.ndarray
    n_predicted: np.ndarray
    best: tuple[float, str, View] | None = None
    worst: tuple[float, str, View] | None = None

    @classmethod
    def empty(cls, models: tuple[str, ...], n: int, genes: int) -> _Scores:
        shape = (len(models), n)
        return cls(models, np.zeros((*shape, genes)), np.full(shape, np.nan),
                   np.full(shape, np.nan), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64))

    def offer(self, name: str, view: View) -> None:
        """Keep ``view`` if its ``latent_ot`` distance is the smallest or largest so far."""
        energy = view.energy[LATENT_OT]
        if not np.isfinite(energy):
            return
        if self.best is None or energy < self.best[0]:
            self.best = (energy, name, view)
        if self.worst is None or energy > self.worst[0]:
            self.worst = (energy, name, view)

    def views(self) -> dict[str, View]:
        return {name: view for _, name, view in (self.best, self.worst) if view is not None}


def cells_evaluate(
    screen: str,
    embeddings: Embeddings,
    *,
    perturbation_key: str = "perturbation",
    control: str = "non-targeting",
    context_key: str | None = None,
    pseudobulk: xr.Dataset | str | None = None,
    pseudobulk_options: Mapping[str, Any] | None = None,
    n_folds: int = 5,
    seed: int = 0,
    alphas: float | Sequence[float] = DEFAULT_ALPHAS,
    missing: MissingPolicy = "drop",
    gene_map: GeneMap = None,
    config: CellsConfig | None = None,
    onehot: bool = True,
    final_model: bool = False,
    eval_cells: int = 500,
    pca_components: int = DEFAULT_COMPONENTS,
    pca_cells: int = PCA_CELLS,
    block_cells: int = BLOCK_CELLS,
    block_rows: int | None = None,
    predicted_path: str | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> CellsEvaluation:
    """K-fold evaluation of the cell model against ``ridge_shift`` and
    ``control_cells`` (see the module docstring).

    Parameters
    ----------
    screen, embeddings, perturbation_key, control, context_key, pseudobulk, pseudobulk_options
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
    onehot
        Also score ``latent_ot_onehot``, the seen upper bound (one more
        head, and OT of every perturbation, per fold).
    final_model
        Also fit the model on every perturbation (:attr:`CellsEvaluation.model`).
    eval_cells
        True cells per held-out perturbation the distances use, at most; as
        many control cells of its context are moved (fewer if fewer are kept).
    pca_components, pca_cells
        The PCA space of the distances: components, and training cells it is
        fitted on at most.
    block_cells
        True cells read at once while scoring, at most.
    block_rows, storage_options, progress
        As :func:`.model.cells_fit`.
    predicted_path
        The local ``.h5ad`` the predicted cells are written to as they are
        made; default a new file in a temporary directory (the report copies it).
    """
    config = (config or CellsConfig()).check()
    alphas = check_alphas(alphas)
    for name, value in (("--eval-cells", eval_cells), ("--pca-components", pca_components),
                        ("--pca-cells", pca_cells), ("block_cells", block_cells)):
        check_positive(name, value, integer=True)
    start = time.perf_counter()
    prepared = prepare(screen, embeddings, perturbation_key=perturbation_key, control=control,
                       context_key=context_key, pseudobulk=pseudobulk,
                       pseudobulk_options=pseudobulk_options, missing=missing, gene_map=gene_map,
                       seed=seed, block_rows=block_rows, storage_options=storage_options,
                       progress=progress)
    source = prepared.source
    names = np.asarray(prepared.perturbations, dtype=object)
    X = np.asarray(prepared.data.delta.compute(), dtype=np.float64)
    split = perturbation_split(names, n_folds, seed)
    ridge, ridge_alphas = ridge_predictions(prepared.data, X, split, source.row_context, alphas,
                                            progress=progress)
    pool = control_pool(source, config.control_cells, seed)
    models = MODELS if onehot else tuple(m for m in MODELS if m != LATENT_OT_ONEHOT)
    scores, fold_log = _Scores.empty(models, len(names), X.shape[1]), []
    centroid = np.zeros_like(X)
    path = predicted_path or str(Path(tempfile.mkdtemp(prefix="genepert-cells-")) / "predicted_cells.h5ad")
    scoring = Scoring(prepared, ridge, scores, seed=seed, eval_cells=eval_cells,
                      pca_components=pca_components, pca_cells=pca_cells, block_cells=block_cells)
    with CellsWriter(path, source.genes, key=source.key, control=source.control,
                     context_key=source.context_key, contexts=source.contexts) as writer:
        for fold in split.test_groups:
            test, train = np.flatnonzero(split.test_mask(fold)), np.flatnonzero(split.train_mask(fold))
            fit_start = time.perf_counter()
            model = fit_on(prepared, train, config, seed=seed, pool=pool)
            if not fold_log:
                writer.add(CellsPart(model.control_x, [model.control] * len(pool), pool,
                                     model.control_context), -1)
            seen = fit_onehot(prepared, model, np.sort(np.concatenate([train, test])), seed=seed) if onehot else None
            score_start = time.perf_counter()
            scoring.fold(model, seen, test, train, writer, fold=fold)
            centroid[test] = context_centroids(X, train, test, source.row_context)
            fold_log.append({"fold": fold, "n_train": int(train.size), "n_test": int(test.size),
                             "fit_seconds": score_start - fit_start,
                             "score_seconds": time.perf_counter() - score_start,
                             "ridge_alpha": named(ridge_alphas.get(fold), source.contexts),
                             "fit_stage_seconds":
                                 {**model.seconds, **(seen.seconds if seen else {})},
                             "vae_loss": model.history["vae"], "head_loss": model.history["head"],
                             **({"onehot_head_loss": seen.history["onehot_head"]} if seen else {})})
            log.info("cells fold %d: %d training, %d held-out perturbations, %.1f s", fold,
                     train.size, test.size, time.perf_counter() - fit_start)
        writer.close({**model_uns(model), "evaluation": "held-out folds"})
    final = fit_on(prepared, np.arange(len(names)), config, seed=seed, pool=pool) if final_model else None
    per_perturbation = score_table(scores, X, split, centroid, prepared)
    parameters = {**split.parameters, "alphas": list(alphas), "missing": missing,
                  "config": dataclasses.asdict(config), "eval_cells": eval_cells,
                  "pca_components": pca_components, "pca_cells": pca_cells,
                  "n_perturbations": len(set(names)), "n_rows": len(names), "n_genes": X.shape[1],
                  "n_cells": source.screen.n_obs, "n_control_cells_kept": int(pool.size),
                  "embedding": list(prepared.data.embedding.sources), "screen": screen,
                  "perturbation_key": perturbation_key, "control": control,
                  "context_key": source.context_key, "seconds": time.perf_counter() - start}
    return CellsEvaluation(
        per_perturbation, summarize(per_perturbation, CELL_METRICS),
        paired_comparison(per_perturbation), path, scores.views(),
        split_table(names, split, prepared), fold_log, models,
        context_summaries(per_perturbation), final, prepared.features.summary(), parameters,
    )


def perturbation_split(names: np.ndarray, n_folds: int, seed: int) -> Split:
    """``evaluate``'s K folds over the perturbations, given to every row of
    each (a perturbation is held out in all its contexts at once)."""
    unique = pd.Index(list(dict.fromkeys(names)))
    split = kfold_split(len(unique), n_folds, seed)
    return dataclasses.replace(split, group=split.group[unique.get_indexer(names)])


def split_table(names: np.ndarray, split: Split, prepared: Prepared) -> pd.DataFrame:
    """The folds of every row: ``perturbation``, (``context``,) ``fold``."""
    table = pd.DataFrame({"perturbation": names, "fold": split.fold})
    if prepared.source.context_key is not None:
        table.insert(1, "context", row_contexts(prepared))
    return table


def row_contexts(prepared: Prepared) -> np.ndarray:
    """The context name of every row."""
    return np.asarray(prepared.source.contexts, dtype=object)[prepared.source.row_context]


def context_centroids(X: np.ndarray, train: np.ndarray, test: np.ndarray,
                      row_context: np.ndarray) -> np.ndarray:
    """For every test row, the mean delta of the training rows of its context."""
    out = np.zeros((len(test), X.shape[1]))
    for c in np.unique(row_context[test]):
        rows = train[row_context[train] == c]
        out[row_context[test] == c] = X[rows].mean(axis=0) if rows.size else 0.0
    return out


def ridge_predictions(
    data: TrainingData,
    X: np.ndarray,
    split: Split,
    row_context: np.ndarray,
    alphas: Sequence[float],
    *,
    progress: bool = False,
) -> tuple[np.ndarray, dict[int, Any]]:
    """GenePert ridge's held-out delta of every row, and the alpha of every
    fold: the fits ``evaluate`` makes (fold statistics, inner CV for alpha),
    one ridge per context (a float per fold without contexts, else a dict
    by context index, see :func:`named`)."""
    predicted, chosen = np.zeros_like(X), {}
    contexts = np.unique(row_context)
    for c in contexts:
        rows = np.flatnonzero(row_context == c)
        features = dataclasses.replace(data.features,
                                       perturbations=[data.features.perturbations[i] for i in rows],
                                       members=[data.features.members[i] for i in rows])
        group = split.group[rows]
        stats = fold_statistics(features, da.from_array(X[rows], chunks=(BLOCK_SIZE, -1)), group,
                                split.n_groups, progress=progress)
        G = features.rows()
        folds = [k for k in split.test_groups if np.any(group == k)]
        for fit in cross_validate(stats, alphas, rows=Rows(G, X[rows], group), folds=folds):
            test = group == fit.fold
            predicted[rows[test]] = G[test] @ fit.coef + fit.intercept
            if len(contexts) == 1:
                chosen[fit.fold] = fit.alpha
            else:
                chosen.setdefault(fit.fold, {})[int(c)] = fit.alpha
    return predicted, chosen


def named(alpha: float | dict[int, float] | None,
          contexts: Sequence[str | None]) -> float | dict[str, float] | None:
    """A fold's alpha, per context name where it is per context."""
    return {str(contexts[c]): a for c, a in alpha.items()} if isinstance(alpha, dict) else alpha


@dataclass
class Scoring:
    """Scores the held-out rows of a fold into ``scores``, writing the
    ``latent_ot`` cells as it goes (see the module docstring)."""

    prepared: Prepared
    ridge: np.ndarray
    scores: _Scores
    seed: int
    eval_cells: int
    pca_components: int
    pca_cells: int
    block_cells: int = BLOCK_CELLS

    def fold(self, model: CellsModel, seen: CellsModel | None, test: np.ndarray,
             train: np.ndarray, writer: CellsWriter, *, fold: int) -> None:
        """Predict and score every held-out row of a fold (``seen``: the one-hot model)."""
        source = self.prepared.source
        rng, picks = np.random.default_rng([self.seed, 4, fold]), np.random.default_rng([self.seed, 6, fold])
        training_cells = np.flatnonzero((source.group == CONTROL) | np.isin(source.group, train))
        pca = Pca.fit(source.gather({"pca": sample_rows(training_cells, self.pca_cells, rng)})["pca"],
                      self.pca_components)
        true_rows = {f"t{p}": sample_rows(source.cells_of(p), self.eval_cells, rng) for p in test}
        condition = {int(p): i for i, p in enumerate(np.sort(np.concatenate([train, test])))}
        for block in self.blocks(test, true_rows):
            true = source.gather({f"t{p}": true_rows[f"t{p}"] for p in block})
            for p in block:
                cells = self.predicted(model, seen, condition[int(p)], int(p),
                                       len(true[f"t{p}"]), picks)
                self.score(int(p), cells, true.pop(f"t{p}"), pca)
                writer.add(cells[LATENT_OT], fold)

    def blocks(self, test: np.ndarray, true_rows: Mapping[str, np.ndarray]) -> Iterator[np.ndarray]:
        """The held-out rows, cut so that a block's true cells are at most
        ``block_cells`` (a row with more is a block of its own)."""
        sizes = [true_rows[f"t{p}"].size for p in test]
        start, total = 0, 0
        for i, size in enumerate(sizes):
            if i > start and total + size > self.block_cells:
                yield test[start:i]
                start, total = i, 0
            total += size
        if start < len(test):
            yield test[start:]

    def predicted(self, model: CellsModel, seen: CellsModel | None, condition: int, p: int,
                  n_true: int, rng: np.random.Generator) -> dict[str, CellsPart]:
        """Every model's cells of row ``p``, from the same sampled control cells of its context."""
        source = self.prepared.source
        kept = model.controls_in(source.row_context[p])
        picked = np.sort(rng.choice(kept, min(n_true, len(kept)), replace=False))
        g = self.prepared.features.rows(np.array([p]))[0].astype(np.float32)
        x = {LATENT_OT: model.move(g, picked),
             RIDGE_SHIFT: np.maximum(model.control_x[picked] + self.ridge[p], 0.0),
             CONTROL_CELLS: model.control_x[picked]}
        if seen is not None:
            x[LATENT_OT_ONEHOT] = seen.move(np.int64(condition), picked)
        label = source.labels[source.perturbations[p]]
        return {name: CellsPart(x[name], [label] * len(picked), model.control_rows[picked],
                                model.control_context[picked]) for name in self.scores.models}

    def score(self, p: int, cells: dict[str, CellsPart], true_x: np.ndarray, pca: Pca) -> None:
        """Distances and deltas of every model's cells of row ``p``."""
        scores, source = self.scores, self.prepared.source
        true_pc = pca.transform(true_x)
        control_mean = self.prepared.control_means[source.row_context[p]]
        points, energy = {"true": true_pc[:, :2]}, {}
        for m, name in enumerate(scores.models):
            pc = pca.transform(cells[name].x)
            energy[name] = scores.energy[m, p] = energy_distance(pc, true_pc)
            scores.mmd[m, p] = mmd_rbf(pc, true_pc)
            scores.delta[m, p] = cells[name].x.mean(axis=0) - control_mean
            points[name] = pc[:, :2]
        scores.n_true[p], scores.n_predicted[p] = len(true_x), len(cells[LATENT_OT].x)
        scores.offer(source.row_name(p), View(points, energy))


def score_table(
    scores: _Scores,
    X: np.ndarray,
    split: Split,
    centroid: np.ndarray,
    prepared: Prepared,
) -> pd.DataFrame:
    """One row per (model, row): pseudo-bulk metrics, distances, cell counts."""
    names = np.asarray(prepared.perturbations, dtype=object)
    table = metrics_table(scores.delta, X, scores.models, names, split.fold, centroid=centroid,
                          exclude=target_genes(names, list(prepared.data.genes)))
    n = len(scores.models)
    table.insert(3, "n_true_cells", np.tile(scores.n_true, n))
    table.insert(4, "n_predicted_cells", np.tile(scores.n_predicted, n))
    table.insert(5, "energy_distance", scores.energy.ravel())
    table.insert(6, "mmd_rbf", scores.mmd.ravel())
    if prepared.source.context_key is not None:
        table.insert(1, "context", np.tile(row_contexts(prepared), n))
    return table


def context_summaries(per_perturbation: pd.DataFrame) -> dict[str, Any]:
    """:func:`.evaluate.summarize` of every context's rows (none without contexts)."""
    if "context" not in per_perturbation:
        return {}
    return {str(context): summarize(table, CELL_METRICS)
            for context, table in per_perturbation.groupby("context", sort=False)}


def paired_comparison(
    per_perturbation: pd.DataFrame,
    model: str = LATENT_OT,
    against: str = RIDGE_SHIFT,
    metrics: Sequence[str] = ("energy_distance", "mmd_rbf", "pearson_delta", "rmse_delta"),
) -> dict[str, dict[str, float | None]]:
    """``model`` against ``against`` per perturbation (per context and
    perturbation with contexts), for every metric: mean of each, mean and
    median of the difference, the share of perturbations where ``model`` is
    better, and the two-sided Wilcoxon signed-rank p-value of the
    differences (at least 6 perturbations)."""
    index = [c for c in ("context", "perturbation") if c in per_perturbation]
    wide = per_perturbation.pivot(index=index, columns="model", values=list(metrics))
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


def _number(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
