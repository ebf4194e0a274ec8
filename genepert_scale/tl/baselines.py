"""Baselines that a perturbation-effect predictor has to beat.

Every function takes the training perturbations' deltas (rows) and returns a
predicted delta for every test perturbation; a row of NaN means the baseline
does not score that perturbation (it is left out of that baseline's metrics).

* ``mean_baseline``, ``median_baseline``: the mean / median training delta;
  ``control_baseline``: no change; ``knn_k``: the mean delta of the ``k``
  training perturbations nearest in embedding space (:func:`baseline_predictions`);
* ``matching_mean`` (:func:`matching_mean_prediction`): Systema's baseline,
  the centroid of the training perturbations that share a gene with the test one;
* ``additive`` (:func:`additive_prediction`): for a pair, the sum of its
  genes' single-gene deltas, the baseline deep models do not beat on
  combinations (Ahlmann-Eltze, Huber & Anders, Nat. Methods 2025).

The kNN, matching-mean and additive baselines combine a few training rows per
test perturbation: each is given by the *row sets* it combines
(:func:`nearest`, :func:`matching_rows`, :func:`additive_rows`) and their
mean or sum (:func:`combine_rows`), so an evaluation can gather the rows of
many test perturbations in one pass over the deltas (:func:`.blocks.weighted_sums`)
instead of holding the training deltas.

The data-derived linear baseline (ridge on ``pca:K`` gene embeddings) is a
ridge model, fitted by :mod:`.evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import sparse

from .blocks import weighted_sums
from .embeddings import perturbation_genes

#: Neighbour counts of the ``knn_k`` baselines.
KNN_K = (1, 5, 10)


#: Decimals to which similarities are compared: those equal to them are
#: ties (broken by position), so that rounding in a matrix product, which
#: differs with the blocks it is computed in, does not choose a neighbour.
TIE_DECIMALS = 12


def top_k(values: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` largest ``values`` and their ``index`` (both rows ×
    columns, the index ascending along each row); values equal to
    :data:`TIE_DECIMALS` decimals are ties, broken by the lower index. The
    chosen entries keep their column order."""
    if values.shape[1] <= k:
        return values, index
    key = np.round(values, TIE_DECIMALS)
    kth = -np.partition(-key, k - 1, axis=1)[:, k - 1 : k]
    above = key > kth
    tied = key == kth
    take = above | (tied & (np.cumsum(tied, axis=1) <= k - above.sum(axis=1, keepdims=True)))
    rows, columns = np.nonzero(take)
    return values[rows, columns].reshape(-1, k), index[rows, columns].reshape(-1, k)


def nearest(similarity: np.ndarray, columns: np.ndarray, k: int,
            best: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar training rows of every test row (similarity and
    training position, ties to the lower position), merged with the ``best``
    of earlier blocks of training rows (whose positions are all lower).

    Parameters
    ----------
    similarity
        Test rows × a block of training rows (``G_test @ G_train.T``).
    columns
        Positions of that block's training rows, ascending.
    """
    found = top_k(similarity, np.broadcast_to(columns, similarity.shape), min(k, similarity.shape[1]))
    if best is None:
        return found
    return top_k(np.hstack([best[0], found[0]]), np.hstack([best[1], found[1]]), k)


def knn_prediction(similarity: np.ndarray, X_train: np.ndarray, k: int) -> np.ndarray:
    """Mean delta of the ``k`` training perturbations most cosine-similar to
    each test perturbation (``similarity = G_test @ G_train.T``, rows of unit
    norm; ties to the earlier training row)."""
    _, rows = nearest(similarity, np.arange(similarity.shape[1]), k)
    return combine_rows(rows, X_train, "mean")


def baseline_predictions(
    similarity: np.ndarray, X_train: np.ndarray, knn_k: Sequence[int] = KNN_K
) -> dict[str, np.ndarray]:
    """Predictions of the mean, median, control and kNN baselines for the
    test rows (``similarity``: test × train cosine similarities, ``G_test @ G_train.T``)."""
    n = similarity.shape[0]
    out = {
        "mean_baseline": np.tile(X_train.mean(axis=0), (n, 1)),
        "median_baseline": np.tile(np.median(X_train, axis=0), (n, 1)),
        "control_baseline": np.zeros((n, X_train.shape[1])),
    }
    for k in knn_k:
        out[f"knn_{k}"] = knn_prediction(similarity, X_train, k)
    return out


#: How a baseline combines its rows: their mean, or their sum.
Combine = Literal["mean", "sum"]


def row_sets(rows: Sequence[Sequence[int] | None], n_columns: int) -> sparse.csr_array:
    """A 0/1 matrix with ones at ``rows[i]`` in row ``i`` (none for ``None``)."""
    sets = [() if r is None else r for r in rows]
    indptr = np.cumsum([0, *(len(r) for r in sets)])
    indices = np.fromiter((c for r in sets for c in r), dtype=np.int64, count=int(indptr[-1]))
    return sparse.csr_array((np.ones(indices.size), indices, indptr), shape=(len(sets), n_columns))


def combined(sums: np.ndarray, rows: Sequence[Sequence[int] | None], how: Combine) -> np.ndarray:
    """The rows' mean (their sum divided by their number) or sum from their
    ``sums``; NaN where a row set is empty or ``None`` (not scored)."""
    count = np.array([0 if r is None else len(r) for r in rows], dtype=np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = sums / count if how == "mean" else sums.copy()
    out[count[:, 0] == 0] = np.nan
    return out


def combine_rows(rows: Sequence[Sequence[int] | None], X: np.ndarray, how: Combine) -> np.ndarray:
    """The mean or sum of ``X``'s rows at ``rows[i]`` for every ``i`` (:func:`combined`)."""
    return combined(weighted_sums(X, row_sets(rows, len(X))), rows, how)


def gene_index(perturbations: Sequence[str]) -> dict[str, list[int]]:
    """Gene → the positions of the perturbations that perturb it."""
    index: dict[str, list[int]] = {}
    for i, label in enumerate(perturbations):
        for gene in set(perturbation_genes(label)):
            index.setdefault(gene, []).append(i)
    return index


def is_combination(label: str) -> bool:
    """Whether a perturbation perturbs more than one gene (``A+B``)."""
    return len(set(perturbation_genes(label))) > 1


def matching_rows(test: Sequence[str], index: dict[str, list[int]],
                  keep: np.ndarray | None = None) -> list[list[int]]:
    """For each test label, the rows (of ``index``, :func:`gene_index`; only
    those in ``keep`` if given) whose perturbations share a gene with it, sorted."""
    return [sorted({r for gene in perturbation_genes(label) for r in index.get(gene, ())
                    if keep is None or keep[r]}) for label in test]


def single_rows(labels: Sequence[str], keep: np.ndarray | None = None) -> dict[str, int]:
    """Gene → the row of its single-gene perturbation (the last one; only
    rows in ``keep`` if given)."""
    return {perturbation_genes(label)[0]: i for i, label in enumerate(labels)
            if (keep is None or keep[i]) and not is_combination(label)}


def additive_rows(test: Sequence[str], single: dict[str, int]) -> list[list[int] | None]:
    """For each test label: the rows of its genes' singles (:func:`single_rows`)
    if it is a combination whose genes were all perturbed alone, else ``None``."""
    out: list[list[int] | None] = []
    for label in test:
        genes = set(perturbation_genes(label))
        out.append([single[g] for g in sorted(genes)] if len(genes) > 1 and genes <= single.keys() else None)
    return out


def matching_mean_prediction(
    test: Sequence[str], train: Sequence[str], X_train: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Systema's matching-mean baseline.

    Parameters
    ----------
    test, train
        Test and training perturbation labels (``A``, ``A+B``).
    X_train
        Training deltas, one row per ``train`` label.

    Returns
    -------
    prediction
        Test × genes.
    fell_back
        Per test perturbation: no training perturbation shares a gene with
        it, so it got the mean of every training delta (the mean baseline).

    Notes
    -----
    For a test perturbation with genes ``S``, the prediction is the mean of
    the deltas of the training perturbations ``t`` with ``genes(t) ∩ S ≠ ∅``
    (:func:`matching_rows`), each perturbation weighted once (the centroid of
    the matching perturbations; Viñas Torné et al., "Systema", Nat.
    Biotechnol. 2025). For the pair ``A+B`` these are the singles ``A`` and
    ``B`` and every pair with ``A`` or ``B``; for an unseen single gene, the
    pairs that contain it.
    """
    rows = matching_rows(test, gene_index(train))
    prediction = combine_rows(rows, X_train, "mean")
    fell_back = np.array([not r for r in rows], dtype=bool)
    prediction[fell_back] = X_train.mean(axis=0)
    return prediction, fell_back


def additive_prediction(test: Sequence[str], train: Sequence[str], X_train: np.ndarray) -> np.ndarray:
    """The additive baseline of combinations.

    Parameters
    ----------
    test, train
        Test and training perturbation labels.
    X_train
        Training deltas, one row per ``train`` label.

    Returns
    -------
    numpy.ndarray
        Test × genes: for a combination whose genes were all perturbed alone
        in training, the sum of those single-gene deltas (:func:`additive_rows`);
        NaN rows (not scored) for single-gene perturbations and for
        combinations with a gene whose single perturbation is not in training.
    """
    return combine_rows(additive_rows(test, single_rows(train)), X_train, "sum")
