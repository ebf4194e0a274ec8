"""Evaluation over perturbations: GenePert's ridge against baselines on a
split (K-fold, GEARS' simulation, or a custom file), metrics per held-out
perturbation, and their summaries — overall (with bootstrap confidence
intervals and paired tests against the ridge), per GEARS subgroup, and
against novelty (distance to the nearest training perturbation in embedding
space).

The pseudo-bulk deltas (perturbations × genes) are never held whole: they
are read in perturbation blocks (:mod:`.blocks`), so the memory an
evaluation takes does not grow with them. It runs in two phases:

1. **fit every fold** (here): ridge models from fold statistics
   (:mod:`.ridge`), alpha chosen by an inner CV on the training folds by
   ``select_by`` (the held-out Pearson sums read the rows a block at a
   time); each fold's training centroid (from the same statistics) and
   median (gene slabs); the ``k`` nearest training perturbations of every
   test one (similarity blocks); the ``pca_ridge`` baseline
   (:mod:`.pca_ridge`: its gene PCA from a streamed genes × genes gram);
2. **score blocks of test perturbations** (:mod:`.scoring`): every model's
   prediction, the metrics of every row, and the predictions written to a
   zarr store block by block (:attr:`Evaluation.predictions` reads it
   lazily); then the set-level metrics, where they fit
   (:func:`.scoring.set_metrics_fit`).

A data-derived embedding (``pca:K``) is rebuilt in every fold from its
training perturbations, so test data never shapes the features.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import xarray as xr

from .baselines import KNN_K, gene_index, is_combination, nearest, single_rows
from .blocks import BLOCK_SIZE, block_items, position_blocks, read_columns
from .data_embedding import PCA_BASELINE_K, EmbeddingPlan, fold_gene_grams, with_table
from ..pp.de import fdr_de_genes, top_de_genes
from .embeddings import FeatureRows, Features, MissingPolicy
from ..errors import ParameterError
from .metrics import DE_TOP, METRICS, without_genes
from .pca_ridge import PCA_RIDGE, PcaRidge, pca_ridge
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
from .scoring import (
    RIDGE,
    SCORING_ARRAYS,
    FoldModel,
    PredictionStore,
    Scoring,
    TargetGenes,
    perturbation_table,
    score_blocks,
    set_metrics,
)
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
    """Phase 1: every test fold's :class:`.scoring.FoldModel` (:func:`fit_folds`,
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
