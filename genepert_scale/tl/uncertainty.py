"""How sure a summary is: bootstrap confidence intervals of a model's mean
metric over held-out perturbations, and paired tests of one model against
another over the same perturbations.

Both work on per-perturbation values (one per held-out perturbation), so a
reader can tell a real difference from the spread of a few dozen
perturbations.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Metrics given a confidence interval and a paired test.
UNCERTAINTY_METRICS = ("pearson_delta", "rmse_delta")
CONFIDENCE = 0.95
N_RESAMPLES = 2000
#: Resamples drawn at once (bounds memory at ``BATCH × perturbations`` indices).
BATCH = 100


def bootstrap_ci(
    values: np.ndarray,
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean.

    Parameters
    ----------
    values
        One value per perturbation; NaN values are left out.
    confidence
        Coverage of the interval.
    n_resamples
        Bootstrap resamples (perturbations drawn with replacement).
    seed
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    tuple of float
        ``(low, high)``; NaN when no value is finite.

    Notes
    -----
    Resamples are drawn :data:`BATCH` at a time as
    ``rng.integers(0, n, (BATCH, n))``, and the bounds are the
    ``(1 ± confidence)/2`` quantiles (linear interpolation) of the resampled
    means: ``scipy.stats.bootstrap(..., method="percentile", batch=BATCH)``
    with the same generator gives the same interval.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.concatenate([
        values[rng.integers(0, values.size, (min(BATCH, n_resamples - start), values.size))].mean(axis=1)
        for start in range(0, n_resamples, BATCH)
    ])
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_test(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Wilcoxon signed-rank test of ``a − b`` over the pairs where both are finite.

    Returns
    -------
    dict
        ``n`` (pairs), ``mean_difference`` and ``median_difference`` of ``a −
        b``, and scipy's two-sided ``statistic`` and ``pvalue``
        (:func:`scipy.stats.wilcoxon`, zero differences dropped); those two are
        ``None`` when no pair differs.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    difference = a[both] - b[both]
    out: dict[str, Any] = {
        "test": "wilcoxon", "n": int(both.sum()),
        "mean_difference": float(difference.mean()) if difference.size else None,
        "median_difference": float(np.median(difference)) if difference.size else None,
        "statistic": None, "pvalue": None,
    }
    if np.any(difference != 0):
        from scipy import stats  # slow to import; every command's start-up would pay

        result = stats.wilcoxon(a[both], b[both])
        out["statistic"], out["pvalue"] = float(result.statistic), float(result.pvalue)
    return out
