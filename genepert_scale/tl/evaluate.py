"""Evaluation over perturbations: GenePert's ridge against baselines on a
split (K-fold, GEARS' simulation, or a custom file), metrics per held-out
perturbation, and their summaries — overall (with bootstrap confidence
intervals and paired tests against the ridge), per GEARS subgroup, and
against novelty (distance to the nearest training perturbation in embedding
space).

Ridge models of every fold come from fold statistics (:mod:`.ridge`), alpha
chosen by an inner CV on the training folds by ``select_by``; the baselines
(:mod:`.baselines`: mean and median of training deltas, control = no
change, Systema's matching mean, the additive model of pairs, cosine
k-nearest neighbours in embedding space, and ridge on ``pca:K`` gene
embeddings) and the metrics need the held-out and training deltas as rows,
so evaluation holds the pseudo-bulk deltas (perturbations × genes) and
feature rows in memory — the size of the pseudo-bulk, not of the screen. A
data-derived embedding (``pca:K``) is rebuilt in every fold from its
training perturbations, so test data never shapes the features.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from .baselines import (
    KNN_K,
    additive_prediction,
    baseline_predictions,
    is_combination,
    matching_mean_prediction,
)
from .data_embedding import PCA_BASELINE_K, PCA_PREFIX, EmbeddingPlan, with_table
from ..pp.de import top_de_genes
from .embeddings import Features, MissingPolicy, encode, perturbation_genes
from ..errors import ParameterError
from .metrics import (
    DE_TOP,
    METRICS,
    centroid_accuracy,
    discrimination_score,
    perturbation_metrics,
    without_genes,
)
from .blocks import BLOCK_SIZE
from .model import Embeddings, GeneMap, TrainingData, fold_statistics, training_data
from ..pp.aggregate import pseudobulk_dataset
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
    gram_stats,
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
        true ``delta`` and the ``fold`` of every test perturbation, the
        ``control_mean``, and in attrs (``pseudobulk_run``, JSON) what the
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
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate GenePert's ridge and the baselines on held-out perturbations.

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
    solver, block_size, storage_options, progress
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
    X = np.asarray(data.delta.compute(), dtype=np.float64)
    data = dataclasses.replace(data, delta=da.from_array(X, chunks=(block_size, -1)))  # read once
    the_split = make_split(split, names, n_folds=n_folds, seed=seed, split_file=split_file,
                           test_share=test_share, storage_options=storage_options)
    fold = the_split.fold
    tested = fold != UNUSED
    with_pairs = any(is_combination(p) for p in names[tested])
    pca = None if plan.data_derived else pca_ridge(names, list(data.genes), X, the_split, pca_baseline,
                                                     alphas=alphas, select_by=select_by, solver=solver)
    models = [RIDGE, "mean_baseline", "median_baseline", "control_baseline", "matching_mean",
              *(["additive"] if with_pairs else []), *([PCA_RIDGE] if pca and pca.fits else []),
              *(f"knn_{k}" for k in knn_k)]
    prediction = np.full((len(models), *X.shape), np.nan, dtype=np.float32)
    centroid, novelty = np.zeros_like(X), np.full(len(names), np.nan)
    subgroup = np.full(len(names), "", dtype=object)
    fell_back = np.zeros(len(names), dtype=bool)
    used = the_split.group != UNUSED
    fits = []
    for features, folds in feature_sets(plan, data, X, the_split):
        stats = fold_statistics(features, data.delta, the_split.group, the_split.n_groups,
                                block_size=block_size, progress=progress)
        G = features.rows()
        rows = Rows(G[used], X[used], the_split.group[used])
        for fit in cross_validate(stats, alphas, rows=rows, solver=solver, folds=folds, select_by=select_by):
            test, train = the_split.test_mask(fit.fold), the_split.train_mask(fit.fold)
            similarity = G[test] @ G[train].T  # shared by the kNN baselines and novelty
            preds = {RIDGE: G[test] @ fit.coef + fit.intercept,
                     **baseline_predictions(similarity, X[train], knn_k)}
            preds["matching_mean"], fell_back[test] = matching_mean_prediction(names[test], names[train], X[train])
            if with_pairs:
                preds["additive"] = additive_prediction(names[test], names[train], X[train])
            if PCA_RIDGE in models:
                preds[PCA_RIDGE] = pca.prediction[test]
            prediction[:, test] = [preds[model] for model in models]
            centroid[test] = X[train].mean(axis=0)
            novelty[test] = nearest_distance(similarity)
            subgroup[test] = subgroups(names, test, train)[test]
            fits.append(fit)
    targets = target_genes(names[tested], genes)
    left_out = targets if exclude_targets else None
    per_perturbation = metrics_table(
        prediction[:, tested], X[tested], models, names[tested], fold[tested],
        centroid=centroid[tested], exclude=targets, left_out=left_out,
        ttest_genes=ttest_de_genes(ds, names[tested], left_out),
    )
    per_perturbation.insert(3, "subgroup", np.tile(subgroup[tested], len(models)))
    per_perturbation.insert(4, "novelty", np.tile(novelty[tested], len(models)))
    predictions = xr.Dataset(
        {
            "prediction": (("model", "perturbation", "gene"), prediction[:, tested]),
            "delta": (("perturbation", "gene"), X[tested].astype(np.float32)),
            "fold": ("perturbation", fold[tested]),
            "control_mean": ("gene", data.control_mean),
        },
        coords={"model": np.asarray(models, dtype=object), "perturbation": names[tested],
                "gene": np.asarray(data.genes, dtype=object)},
        attrs={"pseudobulk_run": json.dumps(data.run)},
    )
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
    }
    baselines = baseline_notes(names[tested], fell_back[tested], per_perturbation, with_pairs, pca,
                               plan.data_derived)
    by_subgroup = {str(name): summarize(table) for name, table in per_perturbation.groupby("subgroup")}
    return Evaluation(per_perturbation, predictions, folds_table, fits,
                      summarize(per_perturbation, ci_seed=seed, n_resamples=n_resamples),
                      by_subgroup, data.features.summary(), parameters,
                      paired_tests(per_perturbation), baselines,
                      {PCA_RIDGE: pca.fits} if PCA_RIDGE in models else {})


@dataclass(frozen=True)
class PcaRidge:
    """The ``pca_ridge`` baseline's held-out predictions (NaN rows: not
    scored), its model of every fold, and what it covered."""

    prediction: np.ndarray = field(repr=False)
    fits: list[FoldFit] = field(repr=False)
    notes: dict[str, Any]


def pca_ridge(
    names: np.ndarray,
    genes: Sequence[str],
    X: np.ndarray,
    split: Split,
    k: int | None,
    *,
    alphas: Sequence[float],
    select_by: SelectBy,
    solver: Solver,
) -> PcaRidge:
    """The linear data-derived baseline (Ahlmann-Eltze, Huber & Anders,
    Nat. Methods 2025): ridge from ``pca:K`` gene embeddings, rebuilt in every
    fold from its training deltas (:class:`.data_embedding.EmbeddingPlan`),
    alpha chosen as for the GenePert ridge.

    Only perturbations whose genes are all measured (``genes``) have such
    features: the others neither train nor are scored. ``K`` is at most
    ``min(genes − 1, training perturbations)``; a fold is skipped (its test
    perturbations not scored) when fewer than two of its inner-CV groups
    hold covered training perturbations.
    """
    position = {g: j for j, g in enumerate(genes)}
    members = [tuple(position.get(g, -1) for g in perturbation_genes(p)) for p in names]
    covered = np.array([min(m) >= 0 for m in members])
    prediction = np.full(X.shape, np.nan)
    test_groups = [f for f in split.test_groups if split.test_mask(f).any()]
    k = min(k or 0, len(genes) - 1, *(int(split.train_mask(f).sum()) for f in test_groups))
    notes: dict[str, Any] = {"embedding": f"{PCA_PREFIX}{k}", "k": k,
                             "n_covered": int(covered.sum()), "folds_skipped": []}
    if k < 1 or not covered.any():
        notes["reason"] = ("no perturbation targets a measured gene" if not covered.any()
                           else "turned off, or too few genes or training perturbations for one component")
        return PcaRidge(prediction, [], notes)
    plan = EmbeddingPlan(f"{PCA_PREFIX}{k}")
    group = np.where(covered, split.group, UNUSED)
    fits = []
    for f in test_groups:
        training_groups = {g for g in group[split.train_mask(f)] if g != UNUSED}
        if len(training_groups) < 2 or not (split.test_mask(f) & covered).any():
            notes["folds_skipped"].append(int(f))
            continue
        table = plan.table(genes, X[split.train_mask(f)])
        G = encode(table.vectors, [m for m, c in zip(members, covered) if c])
        Xc, gc = X[covered], group[covered]
        stats = [gram_stats(G[gc == g], Xc[gc == g]) for g in range(split.n_groups)]
        used = gc != UNUSED
        (fit,) = cross_validate(stats, alphas, rows=Rows(G[used], Xc[used], gc[used]), solver=solver,
                                folds=[f], select_by=select_by)
        test = gc == f
        prediction[np.flatnonzero(covered)[test]] = G[test] @ fit.coef + fit.intercept
        fits.append(fit)
    return PcaRidge(prediction, fits, notes)


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


def ttest_de_genes(ds: xr.Dataset, perturbations: np.ndarray,
                   exclude: np.ndarray | None = None) -> np.ndarray | None:
    """Top-20 DE genes of each perturbation by the Welch t-test against the
    control (GEARS' definition), when the pseudo-bulk has group variances
    (``pseudobulk --group-variance``); else ``None``. With ``exclude``
    (perturbations × genes), the top 20 among the genes it does not mark."""
    if "var" not in ds:
        log.info("pseudo-bulk has no group variances: t-test DE metrics are left empty "
                 "(rerun pseudobulk with --group-variance)")
        return None
    extra = 0 if exclude is None else int(exclude.sum(axis=1).max(initial=0))
    ranked = top_de_genes(ds, DE_TOP + extra).sel(perturbation=list(perturbations)).values
    return without_genes(ranked, exclude, DE_TOP)


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
    left_out: np.ndarray | None = None,
    de_genes: np.ndarray | None = None,
    ttest_genes: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per (model, perturbation): ``perturbation``, ``fold``, ``model``
    and every metric of the prediction (model × perturbation × gene).

    ``centroid`` (the perturbed centroid's delta per row), ``de_genes`` and
    ``ttest_genes`` (top DE gene indices per row), ``exclude`` (genes left out of the
    discrimination score per row) and ``left_out`` (genes left out of every
    metric of the row: ``exclude_targets``) are passed to :mod:`.metrics`;
    set-level metrics compare every row with all rows of ``true``. A
    prediction row with a NaN is one the model does not score: every metric
    of it is NaN.
    """
    tables = []
    for model, pred in zip(models, prediction):
        scored = np.isfinite(pred).all(axis=1)
        pred = np.where(scored[:, None], pred.astype(np.float64), 0.0)
        table = pd.DataFrame({
            **perturbation_metrics(pred, true, de_genes=de_genes, ttest_genes=ttest_genes,
                                   centroid=centroid, exclude=left_out),
            "discrimination_score": discrimination_score(pred, true, exclude=_union(exclude, left_out)),
            "centroid_accuracy": centroid_accuracy(pred, true, exclude=left_out),
        })
        table.loc[~scored] = np.nan
        table.insert(0, "model", model)
        table.insert(0, "fold", fold)
        table.insert(0, "perturbation", names)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def _union(*masks: np.ndarray | None) -> np.ndarray | None:
    """The union of the boolean masks given (``None``: no mask)."""
    given = [m for m in masks if m is not None]
    return np.logical_or.reduce(given) if given else None


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
    (:func:`.uncertainty.paired_test`; differences are reference − model)."""
    wide = {metric: per_perturbation.pivot(index="perturbation", columns="model", values=metric)
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
