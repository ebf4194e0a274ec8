"""Distances between sets of cells: energy distance and RBF-kernel MMD, in a
PCA space fitted on training cells.

Notes
-----
For samples ``X`` (``n`` cells) and ``Y`` (``m`` cells)::

    energy_distance = 2 E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖
    mmd_rbf         = E k(X, X') + E k(Y, Y') − 2 E k(X, Y),  k(a, b) = exp(−‖a − b‖² / (2 s²))

the within-sample expectations over distinct pairs (U-statistics), the
cross term over all pairs. ``s`` is the median distance between the pooled
points unless given. Both are zero for identical distributions; the energy
distance is the statistic of Székely & Rizzo (scipy's ``energy_distance``
is its 1-D square root form).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import cdist

#: Default principal components of the evaluation space.
DEFAULT_COMPONENTS = 50


def _within_mean(distances: np.ndarray) -> float:
    n = len(distances)
    return float(distances.sum() / (n * (n - 1))) if n > 1 else 0.0


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """The energy distance between two samples of points (rows)."""
    if len(x) == 0 or len(y) == 0:
        return float("nan")
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    cross = cdist(x, y).mean()
    return float(2 * cross - _within_mean(cdist(x, x)) - _within_mean(cdist(y, y)))


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> float:
    """The unbiased squared MMD with a Gaussian kernel (median heuristic
    bandwidth unless given)."""
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dxx, dyy, dxy = cdist(x, x, "sqeuclidean"), cdist(y, y, "sqeuclidean"), cdist(x, y, "sqeuclidean")
    if bandwidth is None:
        pooled = np.concatenate([dxx[np.triu_indices(len(x), 1)], dyy[np.triu_indices(len(y), 1)],
                                 dxy.ravel()])
        bandwidth = float(np.sqrt(np.median(pooled))) or 1.0
    gamma = 1.0 / (2 * bandwidth**2)
    kxx, kyy, kxy = np.exp(-gamma * dxx), np.exp(-gamma * dyy), np.exp(-gamma * dxy)
    return float(_within_mean(kxx - np.eye(len(x))) + _within_mean(kyy - np.eye(len(y)))
                 - 2 * kxy.mean())


@dataclass(frozen=True)
class Pca:
    """A PCA projection: ``(x − mean) @ components.T``."""

    mean: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, n_components: int = DEFAULT_COMPONENTS) -> Pca:
        """Fit on the rows of ``x`` (at most ``min(n_components, rows − 1, columns)`` components)."""
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(axis=0)
        k = max(1, min(n_components, x.shape[0] - 1, x.shape[1]))
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        # a sign per component fixed by its largest loading, so results do not
        # depend on the LAPACK build
        signs = np.sign(vt[np.arange(len(vt)), np.argmax(np.abs(vt), axis=1)])
        return cls(mean, (vt * signs[:, None])[:k])

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T
