"""The ``pca_ridge`` baseline: the linear data-derived model (Ahlmann-Eltze,
Huber & Anders, Nat. Methods 2025), ridge from ``pca:K`` gene embeddings.

:func:`pca_ridge` rebuilds the embeddings in every fold from its training
deltas (a gene PCA from a streamed genes × genes gram,
:func:`.data_embedding.fold_gene_grams`), so test data never shapes the
features, and fits the ridge with alpha chosen as for the GenePert ridge;
:class:`PcaRidge` predicts the held-out perturbations it covers (those
whose genes are all measured).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .blocks import BLOCK_SIZE
from .data_embedding import PCA_PREFIX, EmbeddingPlan, fold_gene_grams
from .embeddings import FeatureRows, Features, perturbation_genes
from .model import fold_statistics
from .ridge import FoldFit, Rows, SelectBy, Solver, cross_validate
from .splits import UNUSED, Split

#: The linear data-derived baseline: ridge on ``pca:K`` gene embeddings.
PCA_RIDGE = "pca_ridge"


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
