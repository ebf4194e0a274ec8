"""Evaluation of a pseudo-bulk with contexts (cell lines, cell types): within
each context, and across contexts.

* **within each context** (the default for a store made with
  ``--context-key``; :func:`within_contexts`): the split of
  :func:`.evaluate.evaluate_perturbations` (K-fold by default) in every
  context on its own rows, each against its context's control
  (:func:`.pp.aggregate.one_context`), one context after the other;
* **across contexts** (``split="context"``; :func:`held_out_contexts`): each
  context held out in turn. GenePert's ridge is trained on the pooled
  (context, perturbation) rows of the other contexts (a perturbation seen in
  several gives several rows) and predicts every perturbation of the held-out
  context from its embedding; ``mean_baseline`` predicts the mean training
  row; ``cross_context_baseline`` a perturbation's mean delta over the
  training contexts where it was perturbed, the mean baseline where it was
  not (counted in ``baselines``).

Both return an :class:`.evaluate.Evaluation` that pools the contexts
(:func:`pooled`) and holds each context's own in ``contexts``.

Across contexts, the ridge statistics are taken in one streamed pass over the
rows, by (context, inner group) (:func:`.model.fold_statistics`); the model of
a held-out context is fitted from the sums of the other contexts' groups,
its alpha chosen by inner CV over groups of perturbations (a perturbation's
rows of every training context in one group, so no perturbation is in both
the inner training and validation rows). No row of the held-out context
enters its model, its centroid or its baseline rows (the training
statistics are the total less the held-out context's, as for any fold:
the other contexts' up to rounding). Memory: the deltas are
read in blocks, as :func:`.evaluate.evaluate_perturbations` reads them; the
held-out rows are scored in blocks sized from the memory budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from ..errors import GenePertInputError, ParameterError, listing
from ..pp.aggregate import CONTROL_CONTEXT, context_names, one_context
from ..pp.params import recorded_run
from .baselines import combined, row_sets
from .blocks import BLOCK_SIZE, block_items, weighted_sums
from .data_embedding import EmbeddingPlan
from .embeddings import EmbeddingTable, FeatureRows, Features, MissingPolicy, featurize
from .evaluate import (
    Evaluation,
    evaluate_perturbations,
    nearest_distance,
    nearest_training,
    paired_tests,
    summarize,
    ttest_de_genes,
)
from .model import Embeddings, GeneMap, as_gene_map, fold_statistics, lazy_delta
from .ridge import (
    DEFAULT_ALPHAS,
    DEFAULT_SELECT_BY,
    FoldFit,
    GramStats,
    Rows,
    SelectBy,
    Solver,
    check_alphas,
    check_select_by,
    cross_validate,
    sum_stats,
)
from .scoring import (
    RIDGE,
    SCORING_ARRAYS,
    PredictionStore,
    TargetGenes,
    perturbation_table,
    row_metrics,
    set_metrics,
)
from .splits import kfold
from .uncertainty import N_RESAMPLES

log = logging.getLogger(__name__)

CROSS_CONTEXT = "cross_context_baseline"
#: The models of the context split, in report order.
CONTEXT_MODELS = (RIDGE, "mean_baseline", CROSS_CONTEXT)
#: Subgroups of a held-out context's perturbations.
SEEN, UNSEEN = "seen_in_training_contexts", "unseen_in_training_contexts"
#: Counts that the pooled parameters and baseline notes sum over contexts.
COUNTS = ("n_perturbations", "n_test_perturbations", "n_scored", "n_fell_back", "n_not_scored",
          "n_combinations", "n_covered")


def evaluate_contexts(
    ds: xr.Dataset,
    embeddings: Embeddings,
    *,
    split: str = "kfold",
    source: str | None = None,
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
    **options: Any,
) -> Evaluation:
    """Evaluate a pseudo-bulk with contexts: within each (``split`` ``kfold``,
    ``simulation`` or ``custom``) or across them (``context``), reported per
    context and pooled.

    Parameters
    ----------
    ds
        The pseudo-bulk Dataset, its contexts kept.
    embeddings
        As :func:`.evaluate.evaluate_perturbations` takes them (files only
        for ``split="context"``).
    split
        The split within each context, or ``context``.
    source
        The store's path, for messages and the parameters.
    seed, n_resamples
        Seed of the splits and the bootstrap; resamples of its intervals.
    **options
        The other keywords of :func:`.evaluate.evaluate_perturbations`
        (``knn_k`` and ``pca_baseline`` do not apply to ``split="context"``).

    Raises
    ------
    ParameterError
        For ``split="context"``: a store without contexts, or with fewer
        than two contexts that have perturbations.
    """
    name = source or "the pseudo-bulk"
    contexts = checked_contexts(ds, split, name)
    present = set(map(str, ds["context"].values))
    common = {"seed": seed, "n_resamples": n_resamples, **options}
    if split == "context":
        per_context = held_out_contexts(ds, [c for c in contexts if c in present], embeddings,
                                        source=name, **common)
    else:
        per_context = within_contexts(ds, [c for c in contexts if c in present], embeddings,
                                      split=split, source=name, **common)
    empty = [c for c in contexts if c not in per_context]
    if empty:
        log.warning("contexts without perturbations to evaluate (left out): %s", listing(empty))
    mode = {"mode": "held_out" if split == "context" else "within", "evaluated": list(per_context),
            "without_perturbations": empty}
    return pooled(per_context, {"pseudobulk": source, "contexts": mode}, seed, n_resamples)


def checked_contexts(ds: xr.Dataset, split: str, source: str) -> list[str]:
    """The store's contexts, checked for ``split``.

    Raises
    ------
    ParameterError
        For ``split="context"``: no contexts, one context chosen
        (``--context``), or one context in all.
    """
    contexts = context_names(ds)
    if split != "context":
        return contexts
    if ds.attrs.get("context"):
        raise ParameterError(f"--split context holds each context of {source} out in turn, but one "
                             f"context ({ds.attrs['context']}) was chosen: drop --context")
    if not contexts:
        raise ParameterError(f"{source} has no contexts (it was made without --context-key); "
                             "--split context needs a store of several contexts")
    if len(contexts) < 2:
        raise ParameterError(f"{source} holds one context ({contexts[0]}); --split context trains on "
                             "other contexts and needs at least two: use --split kfold")
    return contexts


@contextlib.contextmanager
def in_context(context: str) -> Iterator[None]:
    """Errors of input raised inside name ``context`` (same type)."""
    try:
        yield
    except GenePertInputError as err:
        raise type(err)(f"context {context}: {err}") from err


def within_contexts(
    ds: xr.Dataset,
    contexts: Sequence[str],
    embeddings: Embeddings,
    *,
    split: str,
    source: str,
    **options: Any,
) -> dict[str, Evaluation]:
    """:func:`.evaluate.evaluate_perturbations` with ``split`` in each
    context, on its rows against its own control; embedding files are read
    once."""
    plan = EmbeddingPlan(embeddings, options.get("storage_options"))
    table = plan.fixed if plan.fixed is not None else embeddings
    out = {}
    for context in contexts:
        log.info("context %s: evaluating its perturbations (%s split)", context, split)
        with in_context(context):
            out[context] = evaluate_perturbations(one_context(ds, context, source), table,
                                                  split=split, **options)
    return out


@dataclass(frozen=True)
class ContextRows:
    """Every (context, perturbation) row of a store whose genes have vectors.

    Attributes
    ----------
    features
        A feature row per row (a perturbation's rows share its vector).
    delta
        The rows' deltas (lazy).
    names, context
        Each row's perturbation and the position of its context in ``contexts``.
    inner
        Each row's inner-CV group: by perturbation, so a perturbation's rows
        of every context share one.
    contexts, genes
        The contexts and the genes.
    n_inner
        The inner-CV groups.
    """

    features: Features = field(repr=False)
    delta: da.Array = field(repr=False)
    names: np.ndarray = field(repr=False)
    context: np.ndarray = field(repr=False)
    inner: np.ndarray = field(repr=False)
    contexts: list[str]
    genes: list[str]
    n_inner: int

    @property
    def group(self) -> np.ndarray:
        """Group of every row in the statistics: (context, inner group)."""
        return self.context * self.n_inner + self.inner

    def fold_of(self, held_out: int) -> np.ndarray:
        """The groups of the model of context ``held_out``: 0 for its rows,
        ``1 + inner`` for the training rows."""
        return np.where(self.context == held_out, 0, 1 + self.inner)

    def stats_of(self, stats: Sequence[GramStats], held_out: int) -> list[GramStats]:
        """Statistics by the groups of :meth:`fold_of`, from those by :attr:`group`."""
        k, others = self.n_inner, [c for c in range(len(self.contexts)) if c != held_out]
        own = sum_stats(stats[held_out * k : (held_out + 1) * k])
        return [own, *(sum_stats([stats[c * k + j] for c in others]) for j in range(k))]

    def seen_rows(self, test: np.ndarray) -> list[list[int]]:
        """For each row at ``test``, the rows of its perturbation in the other contexts."""
        by_name: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            by_name.setdefault(name, []).append(i)
        return [[r for r in by_name[self.names[t]] if self.context[r] != self.context[t]] for t in test]


def context_rows(
    ds: xr.Dataset,
    table: EmbeddingTable,
    contexts: Sequence[str],
    *,
    n_inner: int,
    seed: int,
    missing: MissingPolicy = "drop",
    gene_map: GeneMap = None,
    storage_options: dict[str, Any] | None = None,
    source: str = "the pseudo-bulk",
) -> ContextRows:
    """The rows of ``contexts`` featurized (:func:`.embeddings.featurize`,
    each perturbation once) and their inner groups (:func:`.splits.kfold`
    over the perturbations, seeded).

    Raises
    ------
    ParameterError
        If fewer than two contexts have rows whose genes have vectors.
    """
    names = np.array([str(p) for p in ds["perturbation"].values], dtype=object)
    context = np.array([str(c) for c in ds["context"].values], dtype=object)
    features = featurize(table, list(dict.fromkeys(names)), missing=missing,
                         gene_map=as_gene_map(gene_map, storage_options), seed=seed)
    member = dict(zip(features.perturbations, features.members))
    keep = np.flatnonzero([n in member and c in contexts for n, c in zip(names, context)])
    with_rows = [c for c in contexts if c in set(context[keep])]
    if len(with_rows) < 2:
        raise ParameterError(f"{source}: --split context needs two contexts with perturbations that "
                             f"have vectors; {listing(with_rows) or 'none'} has them")
    features = dataclasses.replace(features, perturbations=list(names[keep]),
                                   members=[member[n] for n in names[keep]])
    perturbations, codes = np.unique(names[keep].astype(str), return_inverse=True)
    position = {c: i for i, c in enumerate(contexts)}
    return ContextRows(features, lazy_delta(ds)[keep], names[keep],
                       np.array([position[c] for c in context[keep]], dtype=np.int64),
                       kfold(len(perturbations), n_inner, seed)[codes], list(contexts),
                       [str(g) for g in ds["gene"].values], n_inner)


@dataclass(frozen=True)
class HeldOut:
    """What predicts the rows of one held-out context: the ridge model (its
    ``fold`` is the context's position), the training centroid, and the
    positions of the test and training rows."""

    fit: FoldFit
    centroid: np.ndarray
    test: np.ndarray = field(repr=False)
    train: np.ndarray = field(repr=False)

    @property
    def index(self) -> int:
        return self.fit.fold


def held_out_model(
    rows: ContextRows,
    stats: Sequence[GramStats],
    held_out: int,
    *,
    alphas: Sequence[float],
    select_by: SelectBy,
    solver: Solver,
    block_size: int,
) -> HeldOut:
    """The ridge model of context ``held_out`` (:func:`.ridge.cross_validate`
    on the statistics of :meth:`ContextRows.stats_of`) and its training centroid."""
    fold = rows.fold_of(held_out)
    grouped = rows.stats_of(stats, held_out)
    (fit,) = cross_validate(grouped, alphas, rows=Rows(FeatureRows(rows.features), rows.delta, fold, block_size),
                            solver=solver, folds=[0], select_by=select_by)
    train = sum_stats(grouped[1:])
    return HeldOut(dataclasses.replace(fit, fold=held_out), train.x_sum / train.n,
                   np.flatnonzero(fold == 0), np.flatnonzero(fold != 0))


def held_out_contexts(
    ds: xr.Dataset,
    contexts: Sequence[str],
    embeddings: Embeddings,
    *,
    source: str,
    n_folds: int = 5,
    seed: int = 0,
    alphas: float | Sequence[float] = DEFAULT_ALPHAS,
    select_by: SelectBy = DEFAULT_SELECT_BY,
    missing: MissingPolicy = "drop",
    gene_map: GeneMap = None,
    solver: Solver = "auto",
    block_size: int = BLOCK_SIZE,
    memory_limit: int | str | None = None,
    split_file: str | None = None,
    test_share: float | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
    exclude_targets: bool = False,
    n_resamples: int = N_RESAMPLES,
    scratch: str | None = None,
    knn_k: Sequence[int] = (),
    pca_baseline: int | None = None,
) -> dict[str, Evaluation]:
    """The Evaluation of every context held out in turn (:func:`held_out_evaluation`),
    of those that have rows with vectors.

    The keywords are those of :func:`.evaluate.evaluate_perturbations`;
    ``n_folds`` are the inner-CV groups choosing alpha. ``knn_k`` and
    ``pca_baseline`` do not apply: the context split has no kNN or
    ``pca_ridge`` baseline.

    Raises
    ------
    ParameterError
        With a split file, a test share or ``pca:K`` embeddings, or fewer
        than two contexts with rows (:func:`context_rows`).
    """
    del knn_k, pca_baseline  # accepted as evaluate takes them; no such baselines here
    if split_file is not None or test_share is not None:
        raise ParameterError("--split-file and --test-share do not apply to --split context")
    plan = EmbeddingPlan(embeddings, storage_options)
    if plan.data_derived:
        raise ParameterError("--split context takes embedding files; pca:K embeddings are built per "
                             "fold of a split within one context (drop --split context)")
    rows = context_rows(ds, plan.fixed, contexts, n_inner=n_folds, seed=seed, missing=missing,
                        gene_map=gene_map, storage_options=storage_options, source=source)
    stats = fold_statistics(rows.features, rows.delta, rows.group, len(contexts) * n_folds,
                            block_size=block_size, progress=progress)
    alphas, select_by = check_alphas(alphas), check_select_by(select_by)
    shared = {"split": "context", "inner_folds": n_folds, "seed": seed, "alphas": list(alphas),
              "select_by": select_by, "missing": missing, "solver": solver,
              "embedding": list(plan.fixed.sources), "n_genes": len(rows.genes),
              "embedding_dim": rows.features.dim, "pseudobulk_run": recorded_run(ds.attrs)}
    out = {}
    for c in np.unique(rows.context):
        with in_context(contexts[c]):
            model = held_out_model(rows, stats, int(c), alphas=alphas, select_by=select_by,
                                   solver=solver, block_size=block_size)
            out[contexts[c]] = held_out_evaluation(
                ds, rows, model, shared, seed=seed, block_size=block_size, memory_limit=memory_limit,
                exclude_targets=exclude_targets, n_resamples=n_resamples, scratch=scratch)
    return out


def held_out_evaluation(
    ds: xr.Dataset,
    rows: ContextRows,
    model: HeldOut,
    parameters: dict[str, Any],
    *,
    seed: int,
    block_size: int,
    memory_limit: int | str | None = None,
    exclude_targets: bool = False,
    n_resamples: int = N_RESAMPLES,
    scratch: str | None = None,
) -> Evaluation:
    """Score every perturbation of a held-out context with the models of
    :data:`CONTEXT_MODELS` (:func:`score_held_out`), its predictions written
    to a store in ``scratch``; ``parameters``: those every context shares."""
    context = rows.contexts[model.index]
    names = rows.names[model.test]
    block = block_items(len(rows.genes) * 8 * (2 + SCORING_ARRAYS), memory_limit)
    one = one_context(ds, context)
    fold = np.full(len(names), model.index)
    scratch_dir = tempfile.TemporaryDirectory(prefix="genepert-evaluate-", dir=scratch)
    store = PredictionStore(str(Path(scratch_dir.name) / "predictions.zarr"), CONTEXT_MODELS, names,
                            rows.genes, fold, block, one["control_mean"].values, parameters["pseudobulk_run"])
    targets = TargetGenes(names, rows.genes, exclude_targets)
    seen = rows.seen_rows(model.test)
    tables, fell_back = score_held_out(rows, model, seen, store, targets,
                                       ttest_de_genes(one, names, targets.left_out()), block, block_size)
    predictions = store.open()
    values, reason = set_metrics(predictions, rows.delta, model.test, targets, block)
    subgroup = np.array([SEEN if r else UNSEEN for r in seen], dtype=object)
    similarity, _ = nearest_training(rows.features, model.test, model.train, 1, block, block_size)
    novelty = nearest_distance(similarity)
    table = perturbation_table(CONTEXT_MODELS, tables, values, names, fold, subgroup, novelty)
    folds = pd.DataFrame({"perturbation": names, "fold": fold, "group": fold, "subgroup": subgroup,
                          "novelty": novelty})
    notes = {CROSS_CONTEXT: {"n_scored": len(names), "n_fell_back": int(fell_back.sum()),
                             "fell_back": "not perturbed in any training context: the mean baseline"}}
    own = {"held_out_context": context, "training_contexts": [c for c in rows.contexts if c != context],
           "n_training_rows": len(model.train), "n_perturbations": len(names),
           "n_test_perturbations": len(names), "exclude_targets": exclude_targets,
           "bootstrap": {"n_resamples": n_resamples, "seed": seed, "confidence": 0.95},
           "set_metrics": {"computed": reason is None, **({"reason": reason} if reason else {})}}
    return Evaluation(table, predictions, folds, [model.fit], summarize(table, ci_seed=seed, n_resamples=n_resamples),
                      {str(s): summarize(t) for s, t in table.groupby("subgroup")}, rows.features.summary(),
                      {**parameters, **own}, paired_tests(table), notes, {}, scratch_dir)


def score_held_out(
    rows: ContextRows,
    model: HeldOut,
    seen: list[list[int]],
    store: PredictionStore,
    targets: TargetGenes,
    ttest_genes: np.ndarray | None,
    block: int,
    block_size: int = BLOCK_SIZE,
) -> tuple[dict[str, list[pd.DataFrame]], np.ndarray]:
    """Predict and score the held-out rows (``model.test``) a ``block`` at a
    time, their true rows and ``seen`` rows (of the training contexts)
    gathered in one pass over the deltas (:func:`.blocks.weighted_sums`).

    Returns
    -------
    tables
        Per model, the row metrics of every block (:func:`.scoring.row_metrics`).
    fell_back
        Per held-out row: the cross-context baseline fell back on the mean baseline.
    """
    tables: dict[str, list[pd.DataFrame]] = {name: [] for name in CONTEXT_MODELS}
    fell_back = np.zeros(len(model.test), dtype=bool)
    for first in range(0, len(model.test), block):
        part, where = model.test[first : first + block], slice(first, first + block)
        sets = [[t] for t in part] + seen[where]
        sums = weighted_sums(rows.delta, row_sets(sets, len(rows.names)), block_size)
        true, cross = sums[: len(part)], combined(sums[len(part) :], seen[where], "mean")
        fell = np.isnan(cross).all(axis=1)
        cross[fell] = model.centroid
        fell_back[where] = fell
        predictions = {RIDGE: rows.features.rows(part) @ model.fit.coef + model.fit.intercept,
                       "mean_baseline": np.tile(model.centroid, (len(part), 1)), CROSS_CONTEXT: cross}
        store.write_delta(first, true)
        for index, name in enumerate(CONTEXT_MODELS):
            stored = store.write_prediction(index, first, predictions[name])
            tables[name].append(row_metrics(stored, true, centroid=model.centroid,
                                            exclude=targets.left_out(where),
                                            ttest_genes=None if ttest_genes is None else ttest_genes[where]))
    return tables, fell_back


def pooled(per_context: dict[str, Evaluation], parameters: dict[str, Any], seed: int,
           n_resamples: int) -> Evaluation:
    """One Evaluation of every context's: tables with a ``context`` column,
    summaries over all held-out (context, perturbation) rows (``fold_mean``:
    over the folds of every context), paired tests by (context,
    perturbation), :data:`COUNTS` summed (:func:`pool_values`), and
    ``contexts`` = ``per_context``."""
    evaluations = list(per_context.values())
    table = with_context(per_context, "per_perturbation")
    apart = table.assign(fold=table["context"] + "/" + table["fold"].astype(str))
    notes = {name: {**pool_values([e.baselines[name] for e in evaluations if name in e.baselines]),
                    "per_context": {c: e.baselines[name] for c, e in per_context.items() if name in e.baselines}}
             for name in dict.fromkeys(n for e in evaluations for n in e.baselines)}
    shown = table[table["model"] == table["model"].iloc[0]]
    parameters = {**pool_values([e.parameters for e in evaluations]), **parameters,
                  "subgroup_sizes": {str(k): int(v) for k, v in shown["subgroup"].value_counts().items()}}
    return Evaluation(
        table, pooled_predictions(per_context), with_context(per_context, "folds"),
        [fit for e in evaluations for fit in e.fold_fits],
        summarize(apart, ci_seed=seed, n_resamples=n_resamples),
        {str(s): summarize(t) for s, t in apart.groupby("subgroup")},
        {"per_context": {c: e.missing for c, e in per_context.items()}},
        parameters, paired_tests(table), notes, contexts=per_context,
    )


def with_context(per_context: dict[str, Evaluation], attribute: str) -> pd.DataFrame:
    """A table (``per_perturbation`` or ``folds``) of every context, a ``context`` column first."""
    parts = []
    for context, evaluation in per_context.items():
        part = getattr(evaluation, attribute).copy()
        part.insert(0, "context", context)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def pool_values(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Values of several contexts in one: :data:`COUNTS` summed, ``applies``
    where any context's applies, the others where every context has the same."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for part in parts for k in part):
        values = [part.get(key) for part in parts]
        if key in COUNTS and all(isinstance(v, int) for v in values):
            out[key] = sum(values)
        elif key == "applies":
            out[key] = any(values)
        elif all(v == values[0] for v in values):
            out[key] = values[0]
    return out


def pooled_predictions(per_context: dict[str, Evaluation]) -> xr.Dataset:
    """Every context's predictions along ``perturbation`` (lazily), with a
    ``context`` coordinate, the union of the models (NaN rows where a model
    was not part of a context's evaluation) and ``control_mean`` per context
    (over :data:`.pp.aggregate.CONTROL_CONTEXT`); in chunks of the largest
    of the contexts' blocks (a store takes chunks of one size)."""
    models = list(dict.fromkeys(str(m) for e in per_context.values() for m in e.predictions["model"].values))
    parts = [e.predictions.drop_vars("control_mean").reindex(model=models) for e in per_context.values()]
    out = xr.concat(parts, dim="perturbation", data_vars="all", coords="different", compat="equals",
                    combine_attrs="override")
    size = max(max(e.predictions["delta"].data.chunks[0]) for e in per_context.values())
    context = np.repeat(np.asarray(list(per_context), dtype=object),
                        [e.predictions.sizes["perturbation"] for e in per_context.values()])
    control = np.stack([np.asarray(e.predictions["control_mean"].values) for e in per_context.values()])
    return out.chunk({"perturbation": size}).assign(control_mean=((CONTROL_CONTEXT, "gene"), control)).assign_coords(
        {"context": ("perturbation", context), CONTROL_CONTEXT: np.asarray(list(per_context), dtype=object)})
