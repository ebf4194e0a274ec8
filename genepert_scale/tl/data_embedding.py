"""Data-derived gene embeddings (``--embeddings pca:K``) and the plan that
joins them with embedding files, fold by fold.

``pca:K`` is the gene embedding of Ahlmann-Eltze, Huber & Anders ("Deep
learning-based predictions of gene perturbation effects do not yet
outperform simple linear baselines", Nat. Methods 2025): the top-K principal
components of the training pseudo-bulk with genes as observations. It exists
for every measured gene, so any perturbation of measured genes has features.
It is computed from the training perturbations of each fold only, from their
genes × genes gram (:class:`GeneGram`), which is summed over blocks of
perturbations: the training deltas are never held whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.linalg

from .blocks import BLOCK_SIZE, block_items, position_blocks, read_rows
from .embeddings import EmbeddingTable, Features, Source, join_sources, read_source
from .splits import Split
from ..errors import ParameterError

PCA_PREFIX = "pca:"
#: ``K`` of the evaluation's ``pca_ridge`` baseline (Ahlmann-Eltze et al.'s
#: 10 components), at most ``min(genes − 1, training perturbations)``.
PCA_BASELINE_K = 10


def pca_dims(spec: str) -> int | None:
    """``K`` of a ``pca:K`` source; ``None`` for a file."""
    if not str(spec).startswith(PCA_PREFIX):
        return None
    text = str(spec)[len(PCA_PREFIX):]
    if not text.isdigit() or int(text) < 1:
        raise ParameterError(f"embedding {spec!r}: write pca:K with K a positive integer, e.g. pca:10")
    return int(text)


@dataclass(frozen=True)
class GeneGram:
    """``Σ x_c x_cᵀ`` over perturbations (genes × genes), ``x_c`` a delta row
    centred over genes, and the number of rows: what ``pca:K`` needs of the
    training deltas. A sum over rows, so it is accumulated block by block
    (:func:`gene_gram`, ``+``)."""

    matrix: np.ndarray
    n: int

    def __add__(self, other: GeneGram) -> GeneGram:
        return GeneGram(self.matrix + other.matrix, self.n + other.n)


def gene_gram(delta: np.ndarray) -> GeneGram:
    """The *chunk* step: :class:`GeneGram` of a block of delta rows."""
    centred = np.asarray(delta, dtype=np.float64)
    centred = centred - centred.mean(axis=1, keepdims=True)
    return GeneGram(centred.T @ centred, len(centred))


def streamed_gene_gram(delta: Any, positions: np.ndarray, block_size: int = BLOCK_SIZE) -> GeneGram:
    """:class:`GeneGram` of the rows at ``positions`` of ``delta`` (numpy or
    dask), read a block at a time."""
    q = delta.shape[1]
    total = GeneGram(np.zeros((q, q)), 0)
    for block in position_blocks(positions, block_size):
        total = total + gene_gram(read_rows(delta, block))
    return total


def fold_gene_grams(
    delta: Any,
    split: Split,
    folds: Sequence[int] | None = None,
    block_size: int = BLOCK_SIZE,
    memory_limit: int | str | None = None,
) -> Iterator[tuple[int, GeneGram]]:
    """The :class:`GeneGram` of the training rows of every test fold of
    ``split`` (or of ``folds``), summed over those rows only (never the total
    minus the fold's: test rows do not touch a training gram, even by
    rounding).

    With several folds, and where the grams of every group they train on
    fit the memory budget, each group's gram is summed once and a fold's is
    the sum of its training groups' (each row's product is taken once);
    otherwise each fold's training rows are summed on their own.
    """
    folds = list(split.test_groups if folds is None else folds)
    q = delta.shape[1]
    if len(folds) < 2 or block_items(q * q * 8, memory_limit) <= split.n_groups:
        for k in folds:
            yield k, streamed_gene_gram(delta, np.flatnonzero(split.train_mask(k)), block_size)
        return
    grams = [streamed_gene_gram(delta, np.flatnonzero(split.group == g), block_size)
             for g in range(split.n_groups)]
    for k in folds:
        training = [gram for g, gram in enumerate(grams) if g != k]
        matrix = training[0].matrix.copy()
        for gram in training[1:]:
            matrix += gram.matrix
        yield k, GeneGram(matrix, sum(gram.n for gram in training))


def pca_gene_embedding(delta: np.ndarray | GeneGram, genes: Sequence[str], k: int) -> Source:
    """Gene embedding from the training deltas (perturbations × genes, or
    their :class:`GeneGram`).

    Returns
    -------
    Source
        ``genes`` × ``k`` principal-component scores.

    Notes
    -----
    With ``M = deltaᵀ`` (genes × perturbations), columns centred over genes
    (R's ``prcomp`` with genes as rows, as Ahlmann-Eltze et al.), and
    ``M_c = U S Vᵀ``, the embedding is ``U_K S_K``. ``M_cM_cᵀ = U S² Uᵀ`` is the
    :class:`GeneGram` (genes × genes, whatever the number of perturbations),
    so ``U_K`` and ``S_K²`` are its top ``K`` eigenpairs. Signs are fixed so
    the largest-magnitude entry of every component is positive. The rank of
    ``M_c`` is at most ``min(genes − 1, perturbations)``, the largest ``K``.
    """
    gram = delta if isinstance(delta, GeneGram) else gene_gram(delta)
    q = gram.matrix.shape[0]
    limit = min(q - 1, gram.n)
    if k > limit:
        raise ParameterError(
            f"pca:{k} needs at most min(genes - 1, training perturbations) = {limit} components; "
            "choose a smaller K"
        )
    eigenvalues, vectors = scipy.linalg.eigh(gram.matrix, subset_by_index=(q - k, q - 1))
    scores = vectors[:, ::-1] * np.sqrt(np.maximum(eigenvalues[::-1], 0.0))
    sign = np.sign(scores[np.argmax(np.abs(scores), axis=0), np.arange(k)])
    identity = {"path": f"{PCA_PREFIX}{k}", "dim": k, "n_genes": len(genes),
                "derived": "principal components of the training pseudo-bulk delta, per fold"}
    return Source(pd.Index([str(g) for g in genes]), scores * np.where(sign == 0, 1, sign), identity)


class EmbeddingPlan:
    """The embedding sources of an evaluation, in order: files (read once)
    and ``pca:K`` sources (built from each fold's training deltas)."""

    def __init__(self, specs: str | Sequence[str] | EmbeddingTable, storage_options: dict[str, Any] | None = None):
        if isinstance(specs, EmbeddingTable):
            self.fixed: EmbeddingTable | None = specs
            self.parts: list[Source | int] = []
            return
        specs = [specs] if isinstance(specs, str) else list(specs)
        if not specs:
            raise ParameterError("give at least one embedding source (--embeddings)")
        self.parts = [pca_dims(s) or read_source(s, storage_options) for s in specs]
        self.fixed = None if self.data_derived else join_sources(self.parts)

    @property
    def data_derived(self) -> bool:
        return any(isinstance(p, int) for p in self.parts)

    def table(self, genes: Sequence[str], delta_train: np.ndarray | GeneGram | None = None) -> EmbeddingTable:
        """The joined table; ``pca:K`` parts from ``delta_train`` (training
        perturbations × ``genes``, or their :class:`GeneGram`), or zero
        placeholders without it (enough to match perturbations to genes)."""
        if self.fixed is not None:
            return self.fixed
        sources = []
        for part in self.parts:
            if isinstance(part, Source):
                sources.append(part)
            elif delta_train is None:
                sources.append(Source(pd.Index([str(g) for g in genes]), np.zeros((len(genes), part)),
                                      {"path": f"{PCA_PREFIX}{part}", "dim": part, "n_genes": len(genes)}))
            else:
                sources.append(pca_gene_embedding(delta_train, genes, part))
        return join_sources(sources)


def with_table(features: Features, table: EmbeddingTable) -> Features:
    """``features`` with the vectors of ``table``, which has the genes (in
    order) of the table they were matched against; filler rows of the
    ``random``/``zero`` missing policies are kept."""
    n = len(table.genes)
    if features.vectors.shape[1] != table.dim or n > features.vectors.shape[0]:
        raise ValueError("the table does not fit the features it should replace")
    return dataclasses.replace(features, vectors=np.vstack([table.vectors, features.vectors[n:]]))
