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

The data-derived linear baseline (ridge on ``pca:K`` gene embeddings) is a
ridge model, fitted by :mod:`.evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .embeddings import perturbation_genes

#: Neighbour counts of the ``knn_k`` baselines.
KNN_K = (1, 5, 10)


def knn_prediction(similarity: np.ndarray, X_train: np.ndarray, k: int) -> np.ndarray:
    """Mean delta of the ``k`` training perturbations most cosine-similar to
    each test perturbation (``similarity = G_test @ G_train.T``, rows of unit norm)."""
    k = min(k, similarity.shape[1])
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    return X_train[nearest].mean(axis=1)


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
    the deltas of the training perturbations ``t`` with ``genes(t) ∩ S ≠ ∅``,
    each perturbation weighted once (the centroid of the matching
    perturbations; Viñas Torné et al., "Systema", Nat. Biotechnol. 2025).
    For the pair ``A+B`` these are the singles ``A`` and ``B`` and every pair
    with ``A`` or ``B``; for an unseen single gene, the pairs that contain it.
    """
    index = gene_index(train)
    mean = X_train.mean(axis=0)
    prediction = np.empty((len(test), X_train.shape[1]))
    fell_back = np.zeros(len(test), dtype=bool)
    for i, label in enumerate(test):
        rows = sorted({r for gene in perturbation_genes(label) for r in index.get(gene, ())})
        fell_back[i] = not rows
        prediction[i] = X_train[rows].mean(axis=0) if rows else mean
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
        in training, the sum of those single-gene deltas; NaN rows (not
        scored) for single-gene perturbations and for combinations with a
        gene whose single perturbation is not in training.
    """
    single = {perturbation_genes(label)[0]: i for i, label in enumerate(train) if not is_combination(label)}
    prediction = np.full((len(test), X_train.shape[1]), np.nan)
    for i, label in enumerate(test):
        genes = set(perturbation_genes(label))
        if len(genes) > 1 and genes <= single.keys():
            prediction[i] = X_train[[single[g] for g in sorted(genes)]].sum(axis=0)
    return prediction
