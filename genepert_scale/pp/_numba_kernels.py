"""The compiled fold of :mod:`.kernels`: one loop over a CSR row block that
normalizes, logs, sums the per-gene moments and adds every value into its
group's fixed-point row, in place (numba, ``nogil`` so that dask threads run
it in parallel).

Nothing value-sized is allocated: no normalized or logged copy of the data
exists. The cells' total counts (their normalization scales), and which
small counts each cell holds, are found first, in storage order, in one
sequential sweep over the values. Then rows are visited in group order (the
rows of a group one after another), and everything a
value updates sits in one place, usually one cache line: its gene's row of a
small work table that holds the current group's sums and the block's gene
moments. When a group's rows end, its sums are added to the group's row of
the (large) ``(groups × genes)`` sums in one sequential sweep, which the
processor streams, instead of by scattered adds that each miss the cache
(``benchmarks/ab.py``; the numbers are in the README).

Raw counts are small integers, so ``log1p`` of a row's normalized values
comes from a per-row table of the counts below :data:`TABLE_SIZE` that the
row holds; other values are logged one by one. The numpy twin in
:mod:`.kernels` is the fallback when numba is missing and the oracle in the
tests; the two agree up to the last place of ``log1p`` (numba's and numpy's
differ there for a few values).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

try:
    import numba

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None
    AVAILABLE = False

#: Integer counts below this take ``log1p`` from the row's table (at most
#: 64, a power of two: the counts a row holds are the bits of one uint64).
TABLE_SIZE = 64
#: The per-gene moment pairs (sum, sum of squares) the fold can add: of the
#: normalized values, of their log1p, of the raw stored values.
MOMENT_KINDS = ("normalized", "log1p", "raw")
#: Entries of the value-check counts (``kernels.CHECKS``): non-finite,
#: negative, non-integer counts, too large log1p values, and gene indices or
#: row offsets outside the stored matrix (at :data:`BAD_INDEX`).
N_CHECKS = 5
BAD_INDEX = 4


def jit(func: Callable | None = None, *, reassociate: bool = False) -> Callable:
    """Compile ``func`` as this package's kernels are compiled (also ``@jit(reassociate=True)``).

    numba ``njit``: cached on disk, without the GIL (dask threads run kernels
    in parallel), numpy's error model (no exceptions on division by zero);
    ``reassociate`` lets LLVM reorder floating-point sums (vectorise them).
    Without numba, ``func`` is returned as it is.
    """
    if func is None:
        return lambda func: jit(func, reassociate=reassociate)
    if not AVAILABLE:
        return func
    return numba.njit(cache=True, nogil=True, error_model="numpy",
                      fastmath={"reassoc"} if reassociate else False)(func)


if AVAILABLE and not numba.config.DISABLE_JIT:
    # numba's own intrinsic; an import that fails here is an error, not a
    # silent fall back to the numpy loop
    from numba.cpython.unsafe.numbers import trailing_zeros
else:

    def trailing_zeros(bits: np.uint64) -> int:
        """The lowest set bit's position (numba's intrinsic, interpreted)."""
        value = int(bits)
        return (value & -value).bit_length() - 1


@jit
def _row_span(indptr, row, size):
    # The positions of `row`'s values, unsigned (see _fold_rows), and whether
    # its offsets are valid; a row whose offsets are out of order or beyond
    # the stored values (a corrupt X/indptr) gets none.
    start, stop = indptr[row], indptr[row + 1]
    if 0 <= start and start <= stop and stop <= size:
        return np.uint64(start), np.uint64(stop), True
    return np.uint64(0), np.uint64(0), False


@jit
def _in_table(value):
    # Whether a stored value is a count the row's log1p table may hold (once
    # it is also known to be whole). The sweep that finds the entries a row
    # needs and the loop that reads them must agree, so both ask here; a
    # float32 or integer count widened to float64 answers alike.
    return (value >= 0) & (value < TABLE_SIZE)


@jit
def _fixed_point(log, sum_scale, square_scale):
    # A logged value, and its square, as the int64 fixed-point numbers the
    # group sums add (see kernels.to_fixed): one rule for the table and for
    # values logged one by one, so that the two paths add the same integers.
    return np.int64(np.rint(log * sum_scale)), np.int64(np.rint(log * log * square_scale))


@jit(reassociate=True)
def _row_scale(data, start, stop, normalize, target_sum):
    # The row's scale and the counts below TABLE_SIZE it holds (bit c set for
    # count c), which its log1p table needs. The total may be added in any
    # order (vectorised): counts are whole numbers, and float64 sums of whole
    # numbers are exact in every order as long as the row's total stays below
    # 2**53. Counts that are not whole fail the pass (`_check`); one between
    # c and c + 1 sets bit c, an entry the row does not use. Selects, not
    # branches, and a 32-bit conversion keep the loop vectorised (measured on
    # one block: 0.6 ns per value, 1.6 with a branch); only values inside the
    # table are converted.
    present = np.uint64(0)
    if not normalize:
        return 1.0, present
    total = 0.0
    for k in range(start, stop):
        value = data[k]
        total += np.float64(value)
        inside = _in_table(value)
        bit = np.uint64(1) << np.uint64(np.int32(value if inside else 0))
        present |= bit if inside else np.uint64(0)
    return target_sum / (total if total != 0.0 else 1.0), present


@jit
def _row_scales(data, indptr, normalize, target_sum, checks):
    # In storage order: one sequential sweep over the block, which the
    # processor prefetches, instead of a sum at the start of each row visited
    # in group order (the fold 1.13x faster, bit-identical:
    # benchmarks/results/2026-12-01-ab-one-block-row-totals.md). Rows with
    # invalid offsets are counted here, once.
    scales = np.empty(indptr.size - 1)
    present = np.empty(indptr.size - 1, np.uint64)
    for row in range(scales.size):
        start, stop, valid = _row_span(indptr, row, data.size)
        if not valid:
            checks[BAD_INDEX] += 1
        scales[row], present[row] = _row_scale(data, start, stop, normalize, target_sum)
    return scales, present


@jit
def _check(raw, normalize, log1p_max, checks):
    if not math.isfinite(raw):
        checks[0] += 1
    elif normalize and raw != math.floor(raw):
        checks[2] += 1
    if not normalize and raw > log1p_max:
        checks[3] += 1
    if raw < 0:
        checks[1] += 1


@jit
def _padded_width(width):
    # numba aligns arrays to 32 bytes: rows of 1, 2 or 4 int64 never straddle
    # two 64-byte cache lines, a row of 3 would a third of the time, so it
    # gets 4 (the default pass: 1M cells 1.07x faster, bit-identical,
    # benchmarks/results/2026-12-01-ab-work-table-aligned.md). Wider rows
    # cannot be kept inside one line by padding and stay as they are.
    return 4 if width == 3 else width


@jit
def _flush(sums, work, column):
    for gene in range(sums.size):
        sums[gene] += work[gene, column]
        work[gene, column] = 0


@jit
def _flush_group(group_sum, group_sumsq, work, group):
    _flush(group_sum[group], work, 0)
    if group_sumsq is not None:
        _flush(group_sumsq[group], work, 1)


@jit
def _copy_pair(out, moments, column):
    for gene in range(out.shape[0]):
        out[gene, 0] = moments[gene, column]
        out[gene, 1] = moments[gene, column + 1]


@jit
def _fold_rows(data, indices, indptr, codes, order, normalize, target_sum, log1p_max,
               group_sum, sum_scale, group_sumsq, square_scale, norm_moments, log_moments,
               raw_moments, gene_map, scales, present, checks):
    # group_sumsq and the moments are arrays or None: numba compiles one
    # version per combination and prunes the branches of the absent ones.
    # Everything a value updates is in its gene's row of `work` (one cache
    # line for the rows of up to 4 columns the HVG flavors use): the current
    # group's fixed-point sum (and sum of squares), int64, then the block's
    # moment pairs, float64 (`moments` views the same memory).
    # The group columns go to the group's rows of the sums when its rows end.
    # The value loop indexes with unsigned integers: numba wraps negative
    # signed indices around, a compare and a select per access that also keep
    # LLVM from vectorising (the fold 1.17x faster, bit-identical:
    # benchmarks/results/2026-12-01-ab-one-block-unsigned-index.md).
    # Gene indices are checked against the genes and row offsets against the
    # values instead: whatever the store holds, every index stays inside the
    # arrays (fold_rows checks the arguments' shapes).
    # With a gene_map (moments are then None), a gene's group sums sit in
    # column gene_map[gene] of group_sum, and genes mapped to -1 are not summed.
    logs = np.empty(TABLE_SIZE)
    fixed = np.empty(TABLE_SIZE, np.int64)
    fixed_sq = np.zeros(TABLE_SIZE, np.int64)
    norm_col = 2 if group_sumsq is not None else 1
    log_col = norm_col + (2 if norm_moments is not None else 0)
    raw_col = log_col + (2 if log_moments is not None else 0)
    width = raw_col + (2 if raw_moments is not None else 0)
    work = np.zeros((group_sum.shape[1], _padded_width(width)), np.int64)
    moments = work.view(np.float64)
    n_genes = np.uint64(group_sum.shape[1] if gene_map is None else gene_map.size)
    current = -1
    for i in range(order.size):
        row = order[i]
        start, stop, _ = _row_span(indptr, row, data.size)
        group = codes[row]
        if group != current:  # rows come in group order: the last group is complete
            if current >= 0:
                _flush_group(group_sum, group_sumsq, work, current)
            current = group
        scale = scales[row]
        todo = present[row]
        # The row's table: log1p of the counts it holds, and only those. A
        # row of the 1M-cell benchmark screen holds ~26 of the ~56 counts
        # below its largest one (the fold 1.16x faster, bit-identical:
        # 2026-12-01-ab-one-block-row-log1p-table.md; whole runs 1.09x:
        # 2026-12-01-ab-row-log1p-table.md, in benchmarks/results/).
        while todo:
            held = trailing_zeros(todo)
            todo &= todo - np.uint64(1)
            value = math.log1p(held * scale)
            logs[held] = value
            fixed[held], square = _fixed_point(value, sum_scale, square_scale)
            if group_sumsq is not None:
                fixed_sq[held] = square
        for k in range(start, stop):
            raw = np.float64(data[k])
            gene = np.uint64(indices[k])
            if gene >= n_genes:  # also a negative index: a corrupt store, the pass fails
                checks[BAD_INDEX] += 1
                continue
            slot = gene
            if gene_map is not None:  # a gene not summed: nothing to do with its value
                if gene_map[gene] < 0:
                    continue
                slot = np.uint64(gene_map[gene])
            count = int(raw) if normalize and _in_table(raw) else -1
            if count >= 0 and count == raw:
                entry = np.uint64(count)
                norm, log, add, add_sq = raw * scale, logs[entry], fixed[entry], fixed_sq[entry]
            else:
                _check(raw, normalize, log1p_max, checks)
                norm = raw * scale if normalize else math.expm1(raw)
                log = math.log1p(norm) if normalize else raw
                add, add_sq = _fixed_point(log, sum_scale, square_scale)
            if norm_moments is not None:
                moments[gene, norm_col] += norm
                moments[gene, norm_col + 1] += norm * norm
            if log_moments is not None:
                moments[gene, log_col] += log
                moments[gene, log_col + 1] += log * log
            if raw_moments is not None:
                moments[gene, raw_col] += raw
                moments[gene, raw_col + 1] += raw * raw
            if group >= 0:
                work[slot, 0] += add
                if group_sumsq is not None:
                    work[slot, 1] += add_sq
    if current >= 0:
        _flush_group(group_sum, group_sumsq, work, current)
    if norm_moments is not None:
        _copy_pair(norm_moments, moments, norm_col)
    if log_moments is not None:
        _copy_pair(log_moments, moments, log_col)
    if raw_moments is not None:
        _copy_pair(raw_moments, moments, raw_col)


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
    gene_map: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Fold one CSR row block into ``group_sum`` (and ``group_sumsq``) in place.

    Each value is normalized to ``target_sum`` per row (when ``normalize``;
    else it is taken as ``log1p`` data), logged, and added to row
    ``codes[row]`` of the int64 fixed-point sums (``kernels.to_fixed``; rows
    with a negative code only count in the moments). Rows are visited grouped
    by code (a stable sort); each group's values are summed in a work table
    that stays in cache and added to its row of ``group_sum`` in one sweep.

    With ``gene_map`` (``int64``, one entry per gene: a column of
    ``group_sum``, or -1), only the mapped genes are summed, each into its
    column; then no moments can be asked for, and rows with a negative code
    are not visited (their values are not checked either). Rows with a code
    below -1 are never visited.

    Returns
    -------
    moments
        For each of ``moments`` (of :data:`MOMENT_KINDS`), the per-gene sums
        and sums of squares, ``(n_genes, 2)``; only these are computed.
    checks
        Counts of suspicious inputs, in ``kernels.CHECKS`` order.
    scales
        Each row's normalisation scale (``target_sum`` / its total; 1 for
        log1p input).

    Raises
    ------
    ValueError
        If the arrays do not fit together: ``indices`` and ``data`` of
        different lengths, one code per row, codes below the groups.
    """
    n_genes = group_sum.shape[1]
    if (indices.size != data.size or codes.size != indptr.size - 1
            or (codes.size and codes.max() >= group_sum.shape[0])
            or (group_sumsq is not None and group_sumsq.shape != group_sum.shape)):
        raise ValueError(
            f"a CSR block of {indptr.size - 1} rows, {data.size} values and {indices.size} "
            f"indices with {codes.size} codes does not fit {group_sum.shape[0]} groups"
        )
    if gene_map is not None and (moments or gene_map.max(initial=-1) >= n_genes):
        raise ValueError(f"a gene map into {n_genes} columns, with moments {moments}: "
                         "its entries must be below the columns, and no moments asked for")
    sums = {kind: np.zeros((n_genes, 2)) for kind in moments}
    checks = np.zeros(N_CHECKS, np.int64)
    order = np.argsort(codes, kind="stable")
    # rows not counted (codes below -1) are not visited; with a gene map,
    # neither are rows in no group (they add nothing)
    order = order[np.searchsorted(codes[order], -1 if gene_map is None else 0):]
    scales, present = _row_scales(data, indptr, normalize, float(target_sum), checks)
    _fold_rows(data, indices, indptr, codes, order, normalize, float(target_sum),
               float(log1p_max), group_sum, float(2.0**sum_bits), group_sumsq,
               float(2.0**square_bits), *(sums.get(kind) for kind in MOMENT_KINDS),
               None if gene_map is None else gene_map.astype(np.int64, copy=False),
               scales, present, checks)
    return sums, checks, scales


@jit
def target_sums(data, indices, indptr, codes, scales, normalize, group_genes, control_index,
                slot_of_gene, own, of_controls):
    """Add each row's normalised expression of its group's target genes
    (``group_genes``, -1: none) into ``own``, and of every followed gene
    (``slot_of_gene``) into its control group's row of ``of_controls``: the
    knockdown record of :mod:`.knockdown`, one sweep over the block's rows."""
    for row in range(indptr.size - 1):
        group = codes[row]
        if group < 0:
            continue
        start, stop, _ = _row_span(indptr, row, data.size)
        control = control_index[group]
        for k in range(start, stop):
            gene = indices[k]
            if gene < 0 or gene >= slot_of_gene.size:
                continue
            if control >= 0:
                slot = slot_of_gene[gene]
                if slot >= 0:
                    of_controls[control, slot] += _normalized(data[k], scales[row], normalize)
                continue
            for j in range(group_genes.shape[1]):
                if group_genes[group, j] == gene:
                    own[group, j] += _normalized(data[k], scales[row], normalize)


@jit
def _normalized(raw, scale, normalize):
    # as the fold takes it: a count times its row's scale, or expm1 of log1p data
    return np.float64(raw) * scale if normalize else math.expm1(np.float64(raw))
