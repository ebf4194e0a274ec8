"""The compiled fold of :mod:`.kernels`: one loop over a CSR row block that
normalizes, logs, sums the per-gene moments and adds every value into its
group's fixed-point row, in place (numba, ``nogil`` so that dask threads run
it in parallel).

Nothing block-sized is allocated: no normalized or logged copy of the data
exists, each value is read once. Rows are visited in group order and a
group's values are added into a scratch row of ``n_genes`` sums that stays in
cache; the group's row of the (large) sums is then updated in one sequential
sweep, which the processor streams, instead of by scattered adds that each
miss the cache (the whole 1M-cell pass 1.22x faster, bit-identical:
``benchmarks/ab.py``, ``benchmarks/results/2026-12-01-vm-ab.md``). Raw counts are small integers, so ``log1p``
of a row's normalized values comes from a per-row table of the first
:data:`TABLE_SIZE` counts (filled on demand); other values are logged one by
one. The numpy twin in :mod:`.kernels` is the fallback when numba is missing
and the oracle in the tests; the two agree up to the last place of
``log1p`` (numba's and numpy's differ there for a few values).
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

#: Integer counts below this take ``log1p`` from the row's table.
TABLE_SIZE = 64
#: The per-gene moment pairs (sum, sum of squares) the fold can add: of the
#: normalized values, of their log1p, of the raw stored values.
MOMENT_KINDS = ("normalized", "log1p", "raw")
#: Entries of the value-check counts: non-finite, negative, non-integer
#: counts, too large log1p values.
N_CHECKS = 4


def _jit(func):
    if not AVAILABLE:
        return func
    return numba.njit(cache=True, nogil=True, error_model="numpy")(func)


@_jit
def _row_scale(data, start, stop, normalize, target_sum):
    if not normalize:
        return 1.0
    total = 0.0
    for k in range(start, stop):
        total += np.float64(data[k])
    return target_sum / (total if total != 0.0 else 1.0)


@_jit
def _check(raw, normalize, log1p_max, checks):
    if not math.isfinite(raw):
        checks[0] += 1
    elif normalize and raw != math.floor(raw):
        checks[2] += 1
    if not normalize and raw > log1p_max:
        checks[3] += 1
    if raw < 0:
        checks[1] += 1


@_jit
def _flush(sums, scratch):
    for gene in range(sums.size):
        sums[gene] += scratch[gene]
        scratch[gene] = 0


@_jit
def _fold_rows(data, indices, indptr, codes, order, normalize, target_sum, log1p_max,
               group_sum, sum_scale, group_sumsq, square_scale, norm_moments, log_moments,
               raw_moments, checks):
    # group_sumsq and the moments are arrays or None: numba compiles one
    # version per combination and prunes the branches of the absent ones
    logs = np.empty(TABLE_SIZE)
    fixed = np.empty(TABLE_SIZE, np.int64)
    fixed_sq = np.zeros(TABLE_SIZE, np.int64)
    n_genes = group_sum.shape[1]
    scratch = np.zeros(n_genes, np.int64)  # the current group's sums
    scratch_sq = np.zeros(n_genes if group_sumsq is not None else 0, np.int64)
    current = -1
    for i in range(order.size):
        row = order[i]
        start, stop = indptr[row], indptr[row + 1]
        group = codes[row]
        if group != current:  # rows come in group order: the last group is complete
            if current >= 0:
                _flush(group_sum[current], scratch)
                if group_sumsq is not None:
                    _flush(group_sumsq[current], scratch_sq)
            current = group
        scale = _row_scale(data, start, stop, normalize, target_sum)
        filled = 0
        for k in range(start, stop):
            raw = np.float64(data[k])
            gene = indices[k]
            count = int(raw) if normalize and 0.0 <= raw < TABLE_SIZE else -1
            if count >= 0 and count == raw:
                while filled <= count:  # the row's table, up to this count
                    value = math.log1p(filled * scale)
                    logs[filled] = value
                    fixed[filled] = np.int64(np.rint(value * sum_scale))
                    if group_sumsq is not None:
                        fixed_sq[filled] = np.int64(np.rint(value * value * square_scale))
                    filled += 1
                norm, log, add, add_sq = raw * scale, logs[count], fixed[count], fixed_sq[count]
            else:
                _check(raw, normalize, log1p_max, checks)
                norm = raw * scale if normalize else math.expm1(raw)
                log = math.log1p(norm) if normalize else raw
                add = np.int64(np.rint(log * sum_scale))
                add_sq = np.int64(np.rint(log * log * square_scale))
            if norm_moments is not None:
                norm_moments[gene, 0] += norm
                norm_moments[gene, 1] += norm * norm
            if log_moments is not None:
                log_moments[gene, 0] += log
                log_moments[gene, 1] += log * log
            if raw_moments is not None:
                raw_moments[gene, 0] += raw
                raw_moments[gene, 1] += raw * raw
            if group >= 0:
                scratch[gene] += add
                if group_sumsq is not None:
                    scratch_sq[gene] += add_sq
    if current >= 0:
        _flush(group_sum[current], scratch)
        if group_sumsq is not None:
            _flush(group_sumsq[current], scratch_sq)


def fold_rows(
    data: np.ndarray,
    indices: np.ndarray,
    indptr: np.ndarray,
    codes: np.ndarray,
    *,
    normalize: bool,
    target_sum: float,
    log1p_max: float,
    group_sum: np.ndarray,
    sum_bits: int,
    group_sumsq: np.ndarray | None,
    square_bits: int,
    moments: tuple[str, ...],
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Fold one CSR row block into ``group_sum`` (and ``group_sumsq``) in place.

    Each value is normalized to ``target_sum`` per row (when ``normalize``;
    else it is taken as ``log1p`` data), logged, and added to row
    ``codes[row]`` of the int64 fixed-point sums (``kernels.to_fixed``; rows
    with a negative code only count in the moments). Rows are visited grouped
    by code (a stable sort); each group's values are summed in a scratch row
    that stays in cache and added to its row of ``group_sum`` in one sweep.

    Returns
    -------
    moments
        For each of ``moments`` (of :data:`MOMENT_KINDS`), the per-gene sums
        and sums of squares, ``(n_genes, 2)``; only these are computed.
    checks
        Counts of non-finite, negative, non-integer (counts) and too large
        (log1p) values.
    """
    n_genes = group_sum.shape[1]
    sums = {kind: np.zeros((n_genes, 2)) for kind in moments}
    checks = np.zeros(N_CHECKS, np.int64)
    order = np.argsort(codes, kind="stable")
    _fold_rows(data, indices, indptr, codes, order, normalize, float(target_sum),
               float(log1p_max), group_sum, float(2.0**sum_bits), group_sumsq,
               float(2.0**square_bits), *(sums.get(kind) for kind in MOMENT_KINDS), checks)
    return sums, checks
