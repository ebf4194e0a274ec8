"""Compiled loops over CSR arrays for :mod:`.kernels` (numba, ``nogil`` so that
dask threads run them in parallel).

Only the loops numpy cannot vectorise are here: per-row scaling, the per-gene
moments and the per-group fixed-point scatter; ``log1p`` stays numpy's (SIMD). Each loop
gives the same numbers as its numpy twin in :mod:`.kernels` (the float loops add in
the same order; the scatter adds integers, so its row order does not matter), which
is the fallback when numba is missing and the oracle in the tests.
"""

from __future__ import annotations

import math

import numpy as np

try:
    import numba

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None
    AVAILABLE = False


def _jit(func):
    if not AVAILABLE:
        return func
    return numba.njit(cache=True, nogil=True, error_model="numpy")(func)


@_jit
def _scale_rows(data, indices, indptr, normalize, target_sum, out, moments, counts):
    for row in range(indptr.size - 1):
        start, stop = indptr[row], indptr[row + 1]
        scale = 1.0
        if normalize:
            total = 0.0
            for k in range(start, stop):
                total += np.float64(data[k])
            scale = target_sum / (total if total != 0.0 else 1.0)
        for k in range(start, stop):
            raw = np.float64(data[k])
            if not math.isfinite(raw):
                counts[0] += 1
            elif normalize and raw != math.floor(raw):
                counts[2] += 1
            if raw < 0:
                counts[1] += 1
            value = raw * scale
            out[k] = value
            gene = indices[k]
            moments[gene, 0] += value
            moments[gene, 1] += value * value


def scale_rows(data, indices, indptr, n_genes: int, normalize: bool, target_sum: float):
    """Values scaled to ``target_sum`` per row (or as float64), the per-gene
    sums of those values and of their squares (``(n_genes, 2)``), and the
    counts of non-finite, negative and (when normalizing) non-integer values."""
    out = np.empty(data.size, np.float64)
    moments = np.zeros((n_genes, 2), np.float64)
    counts = np.zeros(3, np.int64)
    _scale_rows(data, indices, indptr, normalize, target_sum, out, moments, counts)
    return out, moments, tuple(int(c) for c in counts)


@_jit
def _moments(values, indices, out):
    for k in range(indices.size):
        gene = indices[k]
        value = values[k]
        out[gene, 0] += value
        out[gene, 1] += value * value


def moments(values, indices, n_genes: int) -> np.ndarray:
    """Per-gene sums of ``values`` and of their squares, ``(n_genes, 2)``."""
    out = np.zeros((n_genes, 2), np.float64)
    _moments(values, indices, out)
    return out


@_jit
def _scatter(out, values, indices, indptr, codes, order, scale, square):
    for i in range(order.size):
        row = order[i]
        group = codes[row]
        if group < 0:
            continue
        target = out[group]
        for k in range(indptr[row], indptr[row + 1]):
            value = values[k] * values[k] if square else values[k]
            target[indices[k]] += np.int64(np.rint(value * scale))


def scatter(out, values, indices, indptr, codes, bits: int, square: bool) -> None:
    """Add CSR rows (or their squares) into ``out[codes[row]]`` in place, as
    int64 fixed point with ``bits`` fractional bits (``kernels.to_fixed``,
    value by value: no block-sized temporaries).

    Rows are visited grouped by code (a stable sort), which keeps one group's
    row of ``out`` in cache while its cells are added.
    """
    order = np.argsort(codes, kind="stable")
    _scatter(out, values, indices, indptr, codes, order, float(2.0**bits), square)
