"""Evaluation over perturbations: GenePert's ridge against baselines on a
split (K-fold, GEARS' simulation, or a custom file), metrics per held-out
perturbation, and their summaries — overall (with bootstrap confidence
intervals and paired tests against the ridge), per GEARS subgroup, and
against novelty (distance to the nearest training perturbation in embedding
space).

The pseudo-bulk deltas (perturbations × genes) are never held whole: they
are read in perturbation blocks (:mod:`.blocks`), so the memory an
evaluation takes does not grow with them. It runs in two phases:

1. **fit every fold**: ridge models from fold statistics (:mod:`.ridge`),
   alpha chosen by an inner CV on the training folds by ``select_by`` (the
   held-out Pearson sums read the rows a block at a time); each fold's
   training centroid (from the same statistics) and median (gene slabs); the
   ``k`` nearest training perturbations of every test one (similarity blocks);
   the ``pca_ridge`` baseline (:func:`pca_ridge`: its gene PCA from a streamed
   genes × genes gram);
2. **score blocks of test perturbations**: every model's prediction
   (:mod:`.baselines`: mean and median of training deltas, control = no
   change, Systema's matching mean, the additive model of pairs, cosine
   k-nearest neighbours, ridge on ``pca:K`` gene embeddings; the rows that
   the kNN, matching-mean and additive baselines combine, and the true rows,
   are gathered in one pass over the deltas per block), the metrics of
   every row (:mod:`.metrics`), and the predictions written to a zarr store
   block by block (:attr:`Evaluation.predictions` reads it lazily).

The set-level metrics (discrimination score, centroid accuracy) compare
every prediction with every held-out perturbation's truth: they are computed
at the end, where their work and arrays fit (:func:`set_metrics_fit`), and
left empty above that (the reason is in ``parameters["set_metrics"]``). A
data-derived embedding (``pca:K``) is rebuilt in every fold from its
training perturbations, so test data never shapes the features.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from scipy import sparse

from .baselines import (
    KNN_K,
    Combine,
    additive_rows,
    baseline_predictions,  # noqa: F401 - part of this module's face
    combined,
    gene_index,
    is_combination,
    matching_rows,
    nearest,
    row_sets,
    single_rows,
    top_k,
)
from .blocks import BLOCK_SIZE, block_items, position_blocks, read_columns, read_rows, weighted_sums
from .data_embedding import PCA_BASELINE_K, PCA_PREFIX, EmbeddingPlan, fold_gene_grams, with_table
from ..io.integrity import complete_chunks
from ..io.store import create_dataset, open_dataset
from ..pp.de import fdr_de_genes, top_de_genes
from .embeddings import FeatureRows, Features, MissingPolicy, perturbation_genes
from ..errors import ParameterError
from .metrics import (
    DE_TOP,
    METRICS,
    SET_METRICS,
    centroid_accuracy,
    discrimination_score,
    distances,
    kept_de_genes,
    perturbation_metrics,
    ranks,
    without_genes,
)
from .model import Embeddings, GeneMap, TrainingData, fold_statistics, training_data
from ..pp.aggregate import context_names, pseudobulk_dataset, pseudobulk_store
from .ridge import (
    DEFAULT_ALPHAS,
    DEFAULT_SELECT_BY,
    FoldFit,
    Rows,
    SelectBy,
    Solver,
    check_alphas,
    check_select_by,
    cross_validate,
    sum_stats,
    training_stats,
)
from .uncertainty import N_RESAMPLES, UNCERTAINTY_METRICS, bootstrap_ci, paired_test
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
#: The linear data-derived baseline: ridge on ``pca:K`` gene embeddings.
PCA_RIDGE = "pca_ridge"
#: Quantile bins of the novelty table.
NOVELTY_BINS = 4


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
        true ``delta`` (both float32), the ``fold`` of every test
        perturbation and the ``control_mean``, read lazily from a zarr store in
        a temporary directory that lives as long as this Evaluation
        (``scratch``); in attrs (``pseudobulk_run``, JSON) what the
        pseudo-bulk records of its run (:func:`.pp.params.recorded_run`).
    folds
        The split: ``perturbation``, ``fold`` (−1: training only, or left
        out), ``group`` (of the ridge statistics; ``fold`` for test
        perturbations, an inner-CV group for training-only ones),
        ``subgroup`` and ``novelty`` (test perturbations).
    fold_fits
        The ridge model of every fold with its alpha path.
    summary
        Per model and metric: mean and std over perturbations, over folds,
        and (:data:`.uncertainty.UNCERTAINTY_METRICS`) a bootstrap ``ci95`` of the mean.
    subgroups
        :func:`summarize` of the test perturbations of every GEARS subgroup.
    missing
        What happened to perturbations whose genes have no vector.
    parameters
        The run's parameters, split and embedding identity.
    paired_tests
        Per baseline and metric: the ridge against it over the same held-out
        perturbations (:func:`paired_tests`).
    baselines
        Per baseline that does not score every perturbation the same way:
        how many it scored, fell back on, or why it does not apply.
    baseline_fits
        Per fitted baseline (``pca_ridge``): its model of every fold.
    scratch
        The temporary directory of the predictions store (removed with this
        Evaluation).
    contexts
        For a pseudo-bulk with contexts (:mod:`.contexts`): the Evaluation of
        every context (of its held-out perturbations), by name; this one then
        pools them (its tables have a ``context`` column, its predictions a
        ``context`` coordinate and a ``control_mean`` per context).
    """

    per_perturbation: pd.DataFrame
    predictions: xr.Dataset = field(repr=False)
    folds: pd.DataFrame = field(repr=False)
    fold_fits: list[FoldFit] = field(repr=False)
    summary: dict[str, dict[str, dict[str, float | None]]]
    subgroups: dict[str, dict[str, dict[str, dict[str, float | None]]]]
    missing: dict[str, Any]
    parameters: dict[str, Any]
    paired_tests: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline_fits: dict[str, list[FoldFit]] = field(default_factory=dict, repr=False)
    scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False, compare=False)
    contexts: dict[str, Evaluation] = field(default_factory=dict, repr=False)

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
    pseudobulk: xr.Dataset | ad.AnnData | str,
    embeddings: Embeddings,
    *,
    split: SplitKind = "kfold",
    **options: Any,
) -> Evaluation:
    """Evaluate GenePert's ridge and the baselines on held-out perturbations.

    Parameters
    ----------
    pseudobulk
        A pseudo-bulk: a store (path/URL), its Dataset, or its AnnData form
        (:func:`.pp.pseudobulk`). A store with contexts (``--context-key``)
        is evaluated in each context, or across contexts with
        ``split="context"`` (:func:`.contexts.evaluate_contexts`); one
        context of it (:func:`.pp.aggregate.one_context`) as any store.
    embeddings
        Embedding path(s)/URL(s) and ``pca:K`` sources, or a table.
    split
        ``kfold``, ``simulation`` (GEARS), ``custom`` (a file; see
        :mod:`.splits`) or ``context`` (each context held out in turn).
    **options
        The other keywords of :func:`evaluate_perturbations`.
    """
    ds = pseudobulk_store(pseudobulk, options.get("storage_options"))
    if split == "context" or context_names(ds):
        from .contexts import evaluate_contexts

        source = pseudobulk if isinstance(pseudobulk, str) else None
        return evaluate_contexts(ds, embeddings, split=split, source=source, **options)
    return evaluate_perturbations(pseudobulk, embeddings, split=split, **options)


def evaluate_perturbations(
    pseudobulk: xr.Dataset | ad.AnnData | str,
    embeddings: Embeddings,
    *,
    split: SplitKind = "kfold",
    n_folds: int = 5,
    split_file: str | None = None,
    test_share: float | None = None,
    seed: int = 0,
    alphas: float | Sequence[float] = DEFAULT_ALPHAS,
    select_by: SelectBy = DEFAULT_SELECT_BY,
    missing: MissingPolicy = "drop",
    gene_map: GeneMap = None,
    knn_k: Sequence[int] = KNN_K,
    pca_baseline: int | None = PCA_BASELINE_K,
    n_resamples: int = N_RESAMPLES,
    exclude_targets: bool = False,
    solver: Solver = "auto",
    block_size: int = BLOCK_SIZE,
    memory_limit: int | str | None = None,
    scratch: str | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate GenePert's ridge and the baselines on held-out perturbations
    of one context.

    Parameters
    ----------
    pseudobulk
        A pseudo-bulk: a store (path/URL), its Dataset, or its AnnData form
        (:func:`.pp.pseudobulk`); one context of it (:func:`.pp.aggregate.one_context`).
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
        Seed of the split (and of ``missing="random"`` and the bootstrap).
    alphas
        A grid (alpha chosen per fold by inner CV on its training folds) or one alpha.
    select_by
        What the inner CV chooses alpha by: ``pearson_delta`` (the mean
        per-perturbation Pearson of predicted vs true delta, the report's
        lead metric) or ``mse``.
    missing, gene_map
        See :func:`.embeddings.featurize`; dropped perturbations are left out
        for every model.
    knn_k
        Neighbour counts of the ``knn_k`` baselines.
    pca_baseline
        ``K`` of the ``pca_ridge`` baseline (ridge on ``pca:K`` gene
        embeddings of each fold's training deltas, for the perturbations of
        measured genes); ``None`` or 0: none. It is left out when the
        embeddings are already data-derived.
    n_resamples
        Bootstrap resamples of the confidence intervals.
    exclude_targets
        Leave each perturbation's own target genes (those of its label that
        are measured) out of its metrics, as the Virtual Cell Challenge does:
        their knock-down is no prediction of the response. The
        discrimination score leaves them out always.
    block_size
        Perturbations per block of the streamed reads and statistics.
    memory_limit
        Bytes (or ``"4GiB"``) the evaluation may use (default: this
        machine's memory): sizes the blocks of held-out perturbations scored
        at once and the gene slabs of the medians (:mod:`.blocks`).
    scratch
        Directory for the predictions store while the Evaluation lives
        (default: the system's temporary directory).
    solver, storage_options, progress
        See :func:`.model.fit`.
    """
    alphas = check_alphas(alphas)
    select_by = check_select_by(select_by)
    ds = pseudobulk_dataset(pseudobulk, storage_options)
    plan = EmbeddingPlan(embeddings, storage_options)
    genes = [str(g) for g in ds["gene"].values]
    template = plan.table(genes)
    data = training_data(ds, template, missing=missing, gene_map=gene_map, seed=seed,
                         storage_options=storage_options)
    names = np.asarray(data.features.perturbations, dtype=object)
    the_split = make_split(split, names, n_folds=n_folds, seed=seed, split_file=split_file,
                           test_share=test_share, storage_options=storage_options)
    fold = the_split.fold
    tested = fold != UNUSED
    with_pairs = any(is_combination(p) for p in names[tested])
    options = {"alphas": alphas, "select_by": select_by, "solver": solver, "block_size": block_size}
    pca = None if plan.data_derived else pca_ridge(names, list(data.genes), data.delta, the_split,
                                                     pca_baseline, memory_limit=memory_limit, **options)
    models = [RIDGE, "mean_baseline", "median_baseline", "control_baseline", "matching_mean",
              *(["additive"] if with_pairs else []), *([PCA_RIDGE] if pca and pca.fits else []),
              *(f"knn_{k}" for k in knn_k)]
    gathered = 2 + len(knn_k) + with_pairs  # the true rows, matching mean, kNN, additive
    rows = block_items(len(genes) * 8 * (gathered + SCORING_ARRAYS), memory_limit)
    folds = fold_models(plan, data, the_split, max(knn_k, default=1), rows, memory_limit,
                        progress=progress, **options)
    novelty, subgroup = fold_columns(names, the_split, folds)
    singles = {k: single_rows(names, the_split.train_mask(k)) for k in folds} if with_pairs else {}
    scoring = Scoring(data.delta, names, the_split.group, folds, models, tuple(knn_k), pca,
                      gene_index(names), singles, block_size)
    scratch_dir = tempfile.TemporaryDirectory(prefix="genepert-evaluate-", dir=scratch)
    store = PredictionStore(str(Path(scratch_dir.name) / "predictions.zarr"), models, names[tested],
                            data.genes, fold[tested], rows, data.control_mean, data.run)
    targets = TargetGenes(names[tested], genes, exclude_targets)
    tables, fell_back = score_blocks(scoring, np.flatnonzero(tested), store,
                                     ttest_de_genes(ds, names[tested], targets.left_out()), rows, targets,
                                     fdr_genes=fdr_de_mask(ds))
    predictions = store.open()
    values, reason = set_metrics(predictions, data.delta, np.flatnonzero(tested), targets, rows)
    per_perturbation = perturbation_table(models, tables, values, names[tested], fold[tested],
                                          subgroup[tested], novelty[tested])
    folds_table = pd.DataFrame({"perturbation": names, "fold": fold, "group": the_split.group,
                                "subgroup": subgroup, "novelty": novelty})
    parameters = {
        **the_split.parameters, "alphas": list(alphas), "select_by": select_by, "missing": missing,
        "knn_k": list(knn_k), "solver": solver, "exclude_targets": exclude_targets,
        "pseudobulk": pseudobulk if isinstance(pseudobulk, str) else None,
        "embedding": list(template.sources), "n_perturbations": data.n,
        "n_test_perturbations": int(tested.sum()), "n_genes": len(data.genes),
        "embedding_dim": data.features.dim, "pseudobulk_run": data.run,
        "subgroup_sizes": {str(k): int(v) for k, v in pd.Series(subgroup[tested]).value_counts().items()},
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "confidence": 0.95},
        "set_metrics": {"computed": reason is None, **({"reason": reason} if reason else {})},
    }
    baselines = baseline_notes(names[tested], fell_back, per_perturbation, with_pairs, pca,
                               plan.data_derived)
    by_subgroup = {str(name): summarize(table) for name, table in per_perturbation.groupby("subgroup")}
    return Evaluation(per_perturbation, predictions, folds_table, [folds[k].fit for k in folds],
                      summarize(per_perturbation, ci_seed=seed, n_resamples=n_resamples),
                      by_subgroup, data.features.summary(), parameters,
                      paired_tests(per_perturbation), baselines,
                      {PCA_RIDGE: pca.fits} if PCA_RIDGE in models else {}, scratch_dir)


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
        nearest training perturbations (:func:`nearest_training`).
    """

    fit: FoldFit
    features: Features
    centroid: np.ndarray
    median: np.ndarray
    test: np.ndarray
    similarity: np.ndarray = field(repr=False)
    neighbours: np.ndarray = field(repr=False)


def fit_folds(
    plan: EmbeddingPlan,
    data: TrainingData,
    split: Split,
    *,
    alphas: Sequence[float],
    select_by: SelectBy,
    solver: Solver,
    block_size: int,
    progress: bool,
    memory_limit: int | str | None = None,
) -> Iterator[tuple[FoldFit, Features, np.ndarray]]:
    """The ridge model of every test fold (alpha chosen by inner CV on its
    training folds), the features it was fitted on, and the fold's training
    centroid (from the same statistics: the total minus the fold's)."""
    for features, test_folds in feature_sets(plan, data, data.delta, split, block_size, memory_limit):
        stats = fold_statistics(features, data.delta, split.group, split.n_groups, block_size=block_size,
                                progress=progress)
        rows = Rows(FeatureRows(features), data.delta, split.group, block_size)
        total = sum_stats(list(stats))
        for fit in cross_validate(stats, alphas, rows=rows, solver=solver, folds=test_folds,
                                  select_by=select_by):
            train = training_stats(total, stats, (fit.fold,))
            yield fit, features, train.x_sum / train.n


def fold_models(
    plan: EmbeddingPlan,
    data: TrainingData,
    split: Split,
    k: int,
    test_block: int,
    memory_limit: int | str | None = None,
    **options: Any,
) -> dict[int, FoldModel]:
    """Phase 1: every test fold's :class:`FoldModel` (:func:`fit_folds`,
    :func:`training_medians`, :func:`nearest_training` for ``k`` neighbours)."""
    medians = training_medians(data.delta, split, memory_limit)
    folds = {}
    for fit, features, centroid in fit_folds(plan, data, split, memory_limit=memory_limit, **options):
        test, train = np.flatnonzero(split.test_mask(fit.fold)), np.flatnonzero(split.train_mask(fit.fold))
        similarity, neighbours = nearest_training(features, test, train, k, test_block, options["block_size"])
        folds[fit.fold] = FoldModel(fit, features, centroid, medians[fit.fold], test, similarity, neighbours)
    return folds


def fold_columns(names: np.ndarray, split: Split, folds: dict[int, FoldModel]) -> tuple[np.ndarray, np.ndarray]:
    """Per perturbation, its novelty (:func:`nearest_distance`) and GEARS
    subgroup (:func:`.splits.subgroups`) as a test perturbation (NaN and ``""``
    for the others)."""
    novelty, subgroup = np.full(len(names), np.nan), np.full(len(names), "", dtype=object)
    for k, model in folds.items():
        novelty[model.test] = nearest_distance(model.similarity)
        test = split.test_mask(k)
        subgroup[test] = subgroups(names, test, split.train_mask(k))[test]
    return novelty, subgroup


def training_medians(delta: Any, split: Split, memory_limit: int | str | None = None) -> dict[int, np.ndarray]:
    """Per test fold, the median training delta of every gene, from slabs of
    genes read across all perturbations (as many as fit the budget)."""
    n, q = delta.shape
    train = {k: split.train_mask(k) for k in split.test_groups}
    out = {k: np.empty(q) for k in split.test_groups}
    slab = block_items(2 * n * 8, memory_limit)  # the slab, and a fold's training rows of it
    for first in range(0, q, slab):
        columns = read_columns(delta, slice(first, first + slab))
        for k, mask in train.items():
            out[k][first : first + slab] = np.median(columns[mask], axis=0, overwrite_input=True)
    return out


def nearest_training(
    features: Features,
    test: np.ndarray,
    train: np.ndarray,
    k: int,
    test_block: int,
    block_size: int = BLOCK_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` training perturbations most cosine-similar to each test one
    (:func:`.baselines.nearest`: ties to the lower position), from blocks of
    ``test_block`` test × ``block_size`` training feature rows.

    Returns
    -------
    similarity, neighbours
        Test × ``min(k, training perturbations)``: similarities and positions.
    """
    width = min(k, len(train))
    similarity, neighbours = np.empty((len(test), width)), np.empty((len(test), width), dtype=np.int64)
    for first in range(0, len(test), test_block):
        block = slice(first, first + test_block)
        G = features.rows(test[block])
        best = None
        for columns in position_blocks(train, block_size):
            best = nearest(G @ features.rows(columns).T, columns, k, best)
        similarity[block], neighbours[block] = best
    return similarity, neighbours


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
    (:func:`fdr_de_mask`, read a block at a time) their DE genes at the FDR.

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
    :attr:`Evaluation.predictions`, written a block of perturbations at a
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
    """The per-perturbation table of :attr:`Evaluation.per_perturbation`:
    every model's rows (:func:`model_table`), each with the ``subgroup`` and
    ``novelty`` of its perturbation."""
    table = pd.concat([model_table(model, tables[model], set_values.get(model), names, fold)
                       for model in models], ignore_index=True)
    table.insert(3, "subgroup", np.tile(subgroup, len(models)))
    table.insert(4, "novelty", np.tile(novelty, len(models)))
    return table


@dataclass(frozen=True)
class PcaRidge:
    """The ``pca_ridge`` baseline: per fold its model and the features it was
    fitted on (the ``pca:K`` rows of the covered perturbations), which
    perturbations it covers, and notes on what it covered."""

    models: dict[int, tuple[FoldFit, Features]] = field(repr=False)
    covered: np.ndarray = field(repr=False)
    notes: dict[str, Any]

    @property
    def fits(self) -> list[FoldFit]:
        return [fit for fit, _ in self.models.values()]

    def predict(self, block: np.ndarray, fold: np.ndarray, n_genes: int) -> np.ndarray:
        """Predictions for perturbations at ``block`` (of folds ``fold``); NaN
        rows for the perturbations not covered or of skipped folds."""
        out = np.full((len(block), n_genes), np.nan)
        position = np.cumsum(self.covered) - 1  # among the covered perturbations
        for k, (fit, features) in self.models.items():
            rows = np.flatnonzero((fold == k) & self.covered[block])
            out[rows] = features.rows(position[block[rows]]) @ fit.coef + fit.intercept
        return out


def pca_ridge(
    names: np.ndarray,
    genes: Sequence[str],
    delta: Any,
    split: Split,
    k: int | None,
    *,
    alphas: Sequence[float],
    select_by: SelectBy,
    solver: Solver,
    block_size: int = BLOCK_SIZE,
    memory_limit: int | str | None = None,
) -> PcaRidge:
    """The linear data-derived baseline (Ahlmann-Eltze, Huber & Anders,
    Nat. Methods 2025): ridge from ``pca:K`` gene embeddings, rebuilt in every
    fold from its training deltas (:func:`.data_embedding.fold_gene_grams`),
    alpha chosen as for the GenePert ridge; ``delta`` is read in blocks
    (and the folds' grams summed as ``memory_limit`` allows).

    Only perturbations whose genes are all measured (``genes``) have such
    features: the others neither train nor are scored. ``K`` is at most
    ``min(genes − 1, training perturbations)``; a fold is skipped (its test
    perturbations not scored) when fewer than two of its inner-CV groups
    hold covered training perturbations.
    """
    position = {g: j for j, g in enumerate(genes)}
    members = [tuple(position.get(g, -1) for g in perturbation_genes(p)) for p in names]
    covered = np.array([min(m) >= 0 for m in members])
    test_groups = [f for f in split.test_groups if split.test_mask(f).any()]
    k = min(k or 0, len(genes) - 1, *(int(split.train_mask(f).sum()) for f in test_groups))
    notes: dict[str, Any] = {"embedding": f"{PCA_PREFIX}{k}", "k": k,
                             "n_covered": int(covered.sum()), "folds_skipped": []}
    if k < 1 or not covered.any():
        notes["reason"] = ("no perturbation targets a measured gene" if not covered.any()
                           else "turned off, or too few genes or training perturbations for one component")
        return PcaRidge({}, covered, notes)
    plan = EmbeddingPlan(f"{PCA_PREFIX}{k}")
    group = np.where(covered, split.group, UNUSED)
    fitted = []
    for f in test_groups:
        training_groups = {g for g in group[split.train_mask(f)] if g != UNUSED}
        if len(training_groups) < 2 or not (split.test_mask(f) & covered).any():
            notes["folds_skipped"].append(int(f))
        else:
            fitted.append(f)
    rows = np.flatnonzero(covered)
    covered_delta, covered_group = delta[rows], group[rows]
    covered_members = [members[i] for i in rows]
    models = {}
    for f, gram in fold_gene_grams(delta, split, fitted, block_size, memory_limit):
        features = Features(list(names[rows]), covered_members, plan.table(genes, gram).vectors)
        stats = fold_statistics(features, covered_delta, covered_group, split.n_groups,
                                block_size=block_size, progress=False)
        (fit,) = cross_validate(stats, alphas, rows=Rows(FeatureRows(features), covered_delta, covered_group,
                                                         block_size),
                                solver=solver, folds=[f], select_by=select_by)
        models[f] = (fit, features)
    return PcaRidge(models, covered, notes)


def baseline_notes(
    names: np.ndarray,
    fell_back: np.ndarray,
    per_perturbation: pd.DataFrame,
    with_pairs: bool,
    pca: PcaRidge | None,
    data_derived: bool,
) -> dict[str, dict[str, Any]]:
    """What ``metrics.json`` says of the baselines that do not score every
    test perturbation alike: ``matching_mean`` (how many fell back on the
    mean baseline), ``additive`` and ``pca_ridge`` (how many were scored, or
    why the baseline is absent)."""
    def scored(model: str) -> int:
        table = per_perturbation[per_perturbation.model == model]
        return int(table["rmse_delta"].notna().sum())

    n = len(names)
    notes: dict[str, dict[str, Any]] = {
        "matching_mean": {"n_scored": n, "n_fell_back": int(fell_back.sum()),
                          "fell_back": "no training perturbation shares a gene: the mean baseline"},
    }
    n_pairs = int(sum(is_combination(p) for p in names))
    notes["additive"] = (
        {"applies": True, "n_combinations": n_pairs, "n_scored": scored("additive"),
         "n_not_scored": n - scored("additive"),
         "not_scored": "single-gene perturbations, and combinations with a gene not perturbed alone in training"}
        if with_pairs else {"applies": False, "reason": "no combination among the test perturbations"}
    )
    if data_derived:
        notes[PCA_RIDGE] = {"applies": False, "reason": "the embeddings are data-derived already"}
    elif pca is not None:
        applies = bool(pca.fits)
        notes[PCA_RIDGE] = {"applies": applies, **pca.notes,
                            **({"n_scored": scored(PCA_RIDGE), "n_not_scored": n - scored(PCA_RIDGE),
                                "not_scored": "perturbations of genes that are not measured, and "
                                              "test perturbations of skipped folds"} if applies else {})}
        if not applies and "reason" not in notes[PCA_RIDGE]:
            notes[PCA_RIDGE]["reason"] = "no fold had covered training perturbations in two inner-CV groups"
    return notes


def feature_sets(
    plan: EmbeddingPlan,
    data: TrainingData,
    delta: Any,
    split: Split,
    block_size: int = BLOCK_SIZE,
    memory_limit: int | str | None = None,
) -> Iterator[tuple[Features, list[int]]]:
    """Features and the test folds they serve: one set for embedding files;
    one per fold for data-derived sources, from that fold's training deltas
    (``delta``, numpy or dask, read in blocks; :func:`.data_embedding.fold_gene_grams`)."""
    if not plan.data_derived:
        yield data.features, list(split.test_groups)
        return
    for k, gram in fold_gene_grams(delta, split, block_size=block_size, memory_limit=memory_limit):
        yield with_table(data.features, plan.table(list(data.genes), gram)), [k]


def ttest_de_genes(ds: xr.Dataset, perturbations: np.ndarray,
                   exclude: np.ndarray | None = None) -> np.ndarray | None:
    """Top-20 DE genes of each perturbation by the Welch t-test against the
    control (GEARS' definition), when the pseudo-bulk has group variances
    (``pseudobulk --group-variance``); else ``None``. With ``exclude``
    (perturbations × genes), the top 20 among the genes it does not mark."""
    if not _has_variances(ds, "pearson_delta_de20_ttest, mse_de20"):
        return None
    extra = 0 if exclude is None else int(exclude.sum(axis=1).max(initial=0))
    ranked = top_de_genes(ds, DE_TOP + extra).sel(perturbation=list(perturbations)).values
    return without_genes(ranked, exclude, DE_TOP)


def fdr_de_mask(ds: xr.Dataset) -> xr.DataArray | None:
    """Each perturbation's DE genes at FDR < :data:`.de.DE_FDR` by the Welch
    t-test against the control (:func:`.de.fdr_de_genes`, lazy on a lazy
    pseudo-bulk), when it has group variances; else ``None``."""
    if not _has_variances(ds, "overlap_de_fdr, spearman_delta_de_fdr, n_de_fdr"):
        return None
    return fdr_de_genes(ds)


def _has_variances(ds: xr.Dataset, metrics: str) -> bool:
    """Whether ``ds`` has group variances; if not, log that ``metrics`` stay empty."""
    if "var" in ds:
        return True
    log.info("pseudo-bulk has no group variances: %s are left empty "
             "(rerun pseudobulk with --group-variance)", metrics)
    return False


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


def summarize(
    per_perturbation: pd.DataFrame,
    metrics: Sequence[str] = METRICS,
    *,
    ci_seed: int | None = None,
    n_resamples: int = N_RESAMPLES,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per model and metric: ``mean``/``std`` over perturbations,
    ``fold_mean``/``fold_std`` over the per-fold means (NaN values, e.g. the
    Pearson of a constant prediction, are left out; all-NaN gives ``None``).

    With ``ci_seed``, the :data:`.uncertainty.UNCERTAINTY_METRICS` also get
    ``ci95``: the seeded percentile-bootstrap 95 % interval of ``mean`` over
    the perturbations (:func:`.uncertainty.bootstrap_ci`).
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
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
        if ci_seed is not None:
            for metric in UNCERTAINTY_METRICS:
                low, high = bootstrap_ci(table[metric].to_numpy(), n_resamples=n_resamples, seed=ci_seed)
                out[str(model)][metric]["ci95"] = [_number(low), _number(high)]
    return out


def paired_tests(
    per_perturbation: pd.DataFrame, reference: str = RIDGE
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per other model and :data:`.uncertainty.UNCERTAINTY_METRICS`: the
    ``reference`` model against it over the same held-out perturbations
    (:func:`.uncertainty.paired_test`; differences are reference − model);
    with a ``context`` column, a perturbation of each context is a pair."""
    index = [column for column in ("context", "perturbation") if column in per_perturbation]
    wide = {metric: per_perturbation.pivot(index=index, columns="model", values=metric)
            for metric in UNCERTAINTY_METRICS}
    return {
        str(model): {metric: paired_test(wide[metric][reference].to_numpy(), wide[metric][model].to_numpy())
                     for metric in UNCERTAINTY_METRICS}
        for model in dict.fromkeys(per_perturbation["model"]) if model != reference
    }


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
