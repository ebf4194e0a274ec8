"""Splits of perturbations into folds for cross-validation."""

from __future__ import annotations

import numpy as np

from .errors import ParameterError


def kfold(n: int, n_folds: int, seed: int) -> np.ndarray:
    """Fold of each of ``n`` perturbations: a seeded permutation cut into
    ``n_folds`` near-equal parts (singles and pairs alike, so a pair's genes
    may be seen as singles in training, as in GenePert)."""
    if not 2 <= n_folds <= n:
        raise ParameterError(
            f"folds must be between 2 and the number of perturbations ({n}), got {n_folds}"
        )
    fold = np.empty(n, dtype=np.int64)
    for k, part in enumerate(np.array_split(np.random.default_rng(seed).permutation(n), n_folds)):
        fold[part] = k
    return fold
