"""Pure numpy/scipy kernels on one block of cells.

Nothing here knows about dask, zarr or files: every function takes arrays of
one row block and returns arrays. The graph builders in :mod:`.reduce` call
them; tests call them directly against scanpy and numpy oracles.

The streamed pass is a *fold → combine → finalize* reduction (as in flox,
with the chunk step folded in):

- fold: :func:`fold_block` normalizes and logs one CSR row block and adds it
  into a running :class:`PassStats`, in place: per-group sums in one dense
  ``(n_groups, n_genes)`` int64 fixed-point array (:func:`to_fixed`) — the only
  object that grows with the number of groups — and the block's per-gene
  moments. Integer sums are exact, so the result is bit-identical for every
  chunking, number of fold chains, combine order and scheduler;
- combine: :func:`combine_into` adds the running statistics of the chains;
- finish: :func:`finish` sums the per-gene moments in block order;
- finalize: :mod:`.aggregate` divides sums by counts and selects genes.

The fold's loop over the CSR arrays is compiled with numba when it is
importable (and ``GENEPERT_SCALE_NO_NUMBA`` is unset): the cells' totals in
one sweep, then one pass over the values, nothing value-sized allocated
(:mod:`._numba_kernels`). The numpy implementation is the fallback and the
test oracle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np
import scipy.sparse as sp

from . import _numba_kernels, knockdown

InputKind = Literal["counts", "log1p"]

#: Whether the compiled loops are used (numba importable and not disabled).
USE_NUMBA = _numba_kernels.AVAILABLE and not os.environ.get("GENEPERT_SCALE_NO_NUMBA")

#: Fractional bits of the fixed-point (int64) group sums and group sums of
#: squares. Integer addition is associative, so these sums are bit-identical
#: for every chunking, combine order and scheduler.
SUM_BITS = 32
SQUARE_BITS = 24

#: The group code of a cell that counts nowhere, in no group and in no gene
#: moment (one that a cell filter rejects); ``-1`` is a cell in no group
#: whose values still count in the gene moments (one without a label).
NOT_COUNTED = -2

#: Largest value accepted as log1p-normalised data (log1p of 10^13).
LOG1P_MAX = 30.0


@dataclass
class ValueCheck:
    """Counts of suspicious values seen in the blocks combined so far.

    ``first_block`` maps each problem to the first block index where it occurred,
    so that error messages can name the chunk.
    """

    nonfinite: int = 0
    negative: int = 0
    noninteger: int = 0
    too_large: int = 0
    bad_index: int = 0
    first_block: dict[str, int] | None = None

    def combine(self, other: ValueCheck) -> ValueCheck:
        first = dict(other.first_block or {})
        for key, block in (self.first_block or {}).items():
            first[key] = min(block, first.get(key, block))
        return ValueCheck(**{key: getattr(self, key) + getattr(other, key) for key in CHECKS},
                          first_block=first or None)


#: The problems a :class:`ValueCheck` counts (its count fields, in order),
#: also the order of the compiled fold's check counts: non-finite, negative,
#: non-integer (counts) and too large (log1p) values, and gene indices or row
#: offsets outside the stored matrix (a corrupt store).
CHECKS = tuple(f.name for f in fields(ValueCheck) if f.name != "first_block")


@dataclass
class PassStats:
    """Additive statistics of one streamed pass over the cells.

    Attributes
    ----------
    n_cells
        Number of cells seen.
    group_n
        Cells per group, shape ``(n_groups,)``.
    gene_sum, gene_sumsq
        Per-gene sum and sum of squares of the *normalized* values
        (``expm1`` of the log data), used by the ``seurat`` HVG flavor, or
        ``None`` when not asked (see :data:`MOMENTS`).
    gene_log_sum, gene_log_sumsq
        The same for the ``log1p`` values, used by ``cell_ranger``.
    group_sum
        Per-group sums of the ``log1p`` values, dense ``(n_groups, n_genes)``
        int64 fixed point with :data:`SUM_BITS` fractional bits (exact, see
        :func:`to_fixed`).
    group_sumsq
        Per-group sums of squared ``log1p`` values in fixed point with
        :data:`SQUARE_BITS` fractional bits, or ``None`` when not asked.
    gene_raw_sum, gene_raw_sumsq
        Per-gene sums of the raw stored values and their squares (for the
        ``seurat_v3`` flavor), or ``None`` when not asked.
    check
        Counts of suspicious inputs (:data:`CHECKS`).
    block_moments
        Per-gene moments of each folded block (by field name), by block
        index, until :func:`finish` sums them in block order — so the float
        sums do not depend on how blocks were spread over chains.
    target_sums
        The knockdown record (:func:`.knockdown.block_target_sums`), or ``None``.
    """

    n_cells: int
    group_n: np.ndarray
    gene_sum: np.ndarray | None
    gene_sumsq: np.ndarray | None
    gene_log_sum: np.ndarray | None
    gene_log_sumsq: np.ndarray | None
    group_sum: np.ndarray | None
    group_sumsq: np.ndarray | None
    gene_raw_sum: np.ndarray | None
    gene_raw_sumsq: np.ndarray | None
    check: ValueCheck
    block_moments: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    target_sums: tuple[np.ndarray, np.ndarray] | None = None


#: The per-gene moment pairs a fold can sum (each costs a little per stored
#: value, so a pass sums only those its HVG flavor needs) and the
#: :class:`PassStats` fields they fill.
MOMENTS = {
    "normalized": ("gene_sum", "gene_sumsq"),
    "log1p": ("gene_log_sum", "gene_log_sumsq"),
    "raw": ("gene_raw_sum", "gene_raw_sumsq"),
}
#: The moments of a pass unless told otherwise.
DEFAULT_MOMENTS = ("normalized", "log1p")


def normalize_log1p(
    block: sp.csr_array | sp.csr_matrix,
    target_sum: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalize each cell to ``target_sum`` counts, then ``log1p`` (numpy).

    Parameters
    ----------
    block
        Raw counts, CSR, cells in rows.
    target_sum
        Total count of every cell after normalization (scanpy's ``target_sum``).

    Returns
    -------
    normalized
        The normalized values (before ``log1p``), float64, aligned with
        ``block.data``.
    logged
        ``log1p(normalized)``, float64, aligned with ``block.data``.

    Notes
    -----
    Cells with zero counts stay zero, as in ``scanpy.pp.normalize_total``.
    """
    data = block.data.astype(np.float64, copy=False)
    row_len = np.diff(block.indptr)
    row_of_value = np.repeat(np.arange(row_len.size), row_len)
    totals = np.bincount(row_of_value, weights=data, minlength=row_len.size)
    totals[totals == 0] = 1.0
    normalized = data * (target_sum / totals)[row_of_value]
    return normalized, np.log1p(normalized)


def to_fixed(values: np.ndarray, bits: int) -> np.ndarray:
    """Round ``values`` to multiples of ``2**-bits``, as int64 numerators.

    Sums of these integers are exact, hence independent of order and grouping;
    the rounding error is at most ``2**-(bits + 1)`` per value.
    """
    with np.errstate(invalid="ignore"):  # NaN/Inf are counted by check_values
        scaled = np.ldexp(values, bits)
        return np.rint(scaled, out=scaled).astype(np.int64)


def from_fixed(values: np.ndarray, bits: int) -> np.ndarray:
    """The float64 values of fixed-point numerators made by :func:`to_fixed`
    (one new array; the scaling by ``2**-bits`` is exact and in place)."""
    out = np.array(values, dtype=np.float64)
    return np.ldexp(out, -bits, out=out)


def check_values(data: np.ndarray, kind: InputKind, block_index: int,
                 bad_index: int = 0) -> ValueCheck:
    """Count non-finite, negative, (for counts) non-integer and (for log1p)
    too large stored values; ``bad_index`` is the count of values or rows
    outside the matrix (:func:`in_range`)."""
    nonfinite = int(np.count_nonzero(~np.isfinite(data)))
    negative = int(np.count_nonzero(data < 0))
    noninteger = 0
    if kind == "counts":
        finite = data[np.isfinite(data)]
        noninteger = int(np.count_nonzero(finite != np.round(finite)))
    return _value_check([nonfinite, negative, noninteger, _too_large(data, kind), bad_index],
                        block_index)


def in_range(
    data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_genes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A CSR block without the rows whose offsets are out of order or beyond
    the stored values and the values whose gene index is outside
    ``0..n_genes - 1`` (a corrupt store), and how many rows and values were
    left out: the same count as the compiled loop's, which leaves them out
    of every sum too (though a left-out value still counts in its row's
    total there, so a corrupt row's normalized values may differ; the pass
    fails on any). Values that no row points to are kept when every row and
    index is valid (the readers give no such blocks)."""
    starts, stops = indptr[:-1].astype(np.int64), indptr[1:].astype(np.int64)
    valid = (starts >= 0) & (starts <= stops) & (stops <= data.size)
    if valid.all() and (not indices.size or 0 <= indices.min() <= indices.max() < n_genes):
        return data, indices, indptr, 0
    lengths = np.where(valid, stops - starts, 0)
    row = np.repeat(np.arange(lengths.size), lengths)
    position = np.repeat(np.where(valid, starts, 0) - np.cumsum(lengths) + lengths, lengths)
    position += np.arange(position.size)
    genes = indices[position]
    kept = (genes >= 0) & (genes < n_genes)
    left_out = int(np.count_nonzero(~valid) + np.count_nonzero(~kept))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(row[kept], minlength=lengths.size))])
    return data[position[kept]], genes[kept], offsets, left_out


def _too_large(data: np.ndarray, kind: InputKind) -> int:
    """Stored log1p values above :data:`LOG1P_MAX` (beyond the exact sums' range)."""
    if kind == "counts":
        return 0
    with np.errstate(invalid="ignore"):
        return int(np.count_nonzero(data > LOG1P_MAX))


def _value_check(counts: list[int], block_index: int) -> ValueCheck:
    """The :class:`ValueCheck` of one block from its counts (in :data:`CHECKS` order)."""
    found = dict(zip(CHECKS, counts, strict=True))
    first = {key: block_index for key, count in found.items() if count}
    return ValueCheck(**found, first_block=first or None)


def _moments_numpy(
    data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_genes: int,
    kind: InputKind, target_sum: float, moments: tuple[str, ...],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The numpy twin of the compiled fold's per-value work: the block's
    ``log1p`` values and the per-gene ``moments`` (by field name, see :data:`MOMENTS`)."""
    block = sp.csr_array((data, indices, indptr), shape=(indptr.size - 1, n_genes))
    if kind == "counts":
        normalized, logged = normalize_log1p(block, target_sum)
    else:
        logged = data.astype(np.float64, copy=False)
        normalized = np.expm1(logged)
    values = {"normalized": normalized, "log1p": logged,
              "raw": data.astype(np.float64, copy=False)}
    sums = {}
    for moment in moments:
        total, squares = MOMENTS[moment]
        sums[total] = np.bincount(indices, weights=values[moment], minlength=n_genes)
        sums[squares] = np.bincount(indices, weights=values[moment] ** 2, minlength=n_genes)
    return logged, sums


def _scatter_numpy(out, values, indices, indptr, codes, bits: int,
                   gene_map: np.ndarray | None = None) -> None:
    """Add the CSR rows' ``values`` into ``out[code]`` as fixed point (``np.add.at``),
    each in its gene's column (``gene_map[gene]`` where given; -1: not summed)."""
    rows = np.repeat(codes, np.diff(indptr))
    columns = indices if gene_map is None else gene_map[indices]
    member = (rows >= 0) & (columns >= 0)
    np.add.at(out, (rows[member], columns[member]), to_fixed(values[member], bits))


def gene_columns(selected: np.ndarray) -> np.ndarray:
    """The gene map of :func:`fold_block` that sums the ``selected`` genes
    (a boolean mask over all genes) into consecutive columns."""
    selected = np.asarray(selected, dtype=bool)
    return np.where(selected, np.cumsum(selected) - 1, -1).astype(np.int64)


def accumulator_bytes(n_groups: int, n_genes: int, with_group_sumsq: bool) -> int:
    """Size of the running group sums of :func:`new_stats` (what each fold chain holds)."""
    return n_groups * n_genes * np.dtype(np.int64).itemsize * (2 if with_group_sumsq else 1)


def new_stats(n_groups: int, n_genes: int, with_group_sumsq: bool) -> PassStats:
    """Empty running statistics: zero group sums, no cells."""
    sumsq = np.zeros((n_groups, n_genes), np.int64) if with_group_sumsq else None
    return PassStats(0, np.zeros(n_groups, np.int64), *(None,) * 4,
                     np.zeros((n_groups, n_genes), np.int64), sumsq, None, None, ValueCheck())


def fold_block(
    acc: PassStats | None,
    block: sp.csr_array | sp.csr_matrix | np.ndarray,
    codes: np.ndarray,
    n_groups: int,
    *,
    kind: InputKind = "counts",
    target_sum: float = 1e4,
    with_group_sumsq: bool = False,
    moments: tuple[str, ...] = DEFAULT_MOMENTS,
    block_index: int = 0,
    gene_map: np.ndarray | None = None,
    targets: knockdown.Targets | None = None,
    target_codes: np.ndarray | None = None,
    use_numba: bool | None = None,
) -> PassStats:
    """The *fold*: normalize + ``log1p`` one block and add it into ``acc``.

    Parameters
    ----------
    acc
        Running statistics, updated in place and returned; ``None`` starts new
        ones (:func:`new_stats`). It must not be shared with any other computation.
    block
        Cells × genes, CSR (counts or ``log1p`` values, see ``kind``).
    codes
        Group of each row, ``-1`` for cells in no group, :data:`NOT_COUNTED`
        for cells that are not read at all.
    n_groups
        Number of groups (perturbations and the control).
    kind
        ``"counts"`` normalizes and logs; ``"log1p"`` takes the values as they are.
    target_sum
        Total count per cell after normalization.
    with_group_sumsq
        Also sum the squared ``log1p`` values per group (for group variances).
    moments
        The per-gene moments to sum (keys of :data:`MOMENTS`).
    block_index
        Position of the block: names it in :class:`ValueCheck`, and orders the
        block's gene moments, kept apart until :func:`finish`.
    gene_map
        Sum only some genes: for each gene its column of the group sums, or
        -1 (:func:`gene_columns`). No moments can be asked for then, and the
        values of rows in no group are neither read nor checked (a pass
        that already checked them, :mod:`.reduce`).
    targets, target_codes
        Also add the block's knockdown record (:mod:`.knockdown`) of these
        targets, the rows grouped by ``target_codes`` (default ``codes``).
    use_numba
        Force the compiled (``True``) or numpy (``False``) loop; default :data:`USE_NUMBA`.
    """
    block = block if isinstance(block, sp.csr_array | sp.csr_matrix) else sp.csr_array(block)
    n_genes = block.shape[1]
    codes = np.asarray(codes)
    target_codes = codes if target_codes is None else np.asarray(target_codes)
    counted = int(np.count_nonzero(codes != NOT_COUNTED))
    compiled = USE_NUMBA if use_numba is None else use_numba
    if not compiled and counted < codes.size:
        kept = codes != NOT_COUNTED
        block, codes, target_codes = block[kept], codes[kept], target_codes[kept]
    data, indices, indptr = block.data, block.indices, block.indptr
    if acc is None:
        n_columns = n_genes if gene_map is None else int(gene_map.max(initial=-1)) + 1
        acc = new_stats(n_groups, n_columns, with_group_sumsq)
    if compiled:
        pairs, counts, scales = _numba_kernels.fold_rows(
            data, indices, indptr, codes, normalize=kind == "counts", target_sum=target_sum,
            log1p_max=LOG1P_MAX, group_sum=acc.group_sum, sum_bits=SUM_BITS,
            group_sumsq=acc.group_sumsq, square_bits=SQUARE_BITS, moments=moments,
            gene_map=gene_map,
        )
        check = _value_check([int(c) for c in counts], block_index)
        sums = {name: np.ascontiguousarray(pair[:, i])
                for moment, pair in pairs.items() for i, name in enumerate(MOMENTS[moment])}
    else:
        data, indices, indptr, outside = in_range(data, indices, indptr, n_genes)
        check = check_values(data, kind, block_index, outside)
        scales = knockdown.row_scales(data, indptr, target_sum)
        logged, sums = _moments_numpy(data, indices, indptr, n_genes, kind, target_sum, moments)
        _scatter_numpy(acc.group_sum, logged, indices, indptr, codes, SUM_BITS, gene_map)
        if acc.group_sumsq is not None:
            _scatter_numpy(acc.group_sumsq, logged * logged, indices, indptr, codes,
                           SQUARE_BITS, gene_map)
    if targets is not None:
        record = knockdown.block_target_sums(sp.csr_array((data, indices, indptr), block.shape),
                                             target_codes, targets, scales, kind == "counts",
                                             compiled)
        acc.target_sums = knockdown.add_into(acc.target_sums, record)
    acc.n_cells += counted
    acc.check = acc.check.combine(check)
    np.add(acc.group_n, np.bincount(codes[codes >= 0], minlength=n_groups), out=acc.group_n)
    acc.block_moments[block_index] = sums
    return acc


def slab_means(stats: PassStats) -> tuple[np.ndarray, np.ndarray | None]:
    """Group means, and mean squares (or ``None``), of the fixed-point sums
    of ``stats`` (float64; a group without cells gets zeros), each computed
    in the memory of its sums, which ``stats`` gives up."""
    n = np.maximum(stats.group_n, 1)[:, None]
    means = _from_fixed_in_place(stats.group_sum, SUM_BITS)
    means /= n
    squares = None
    if stats.group_sumsq is not None:
        squares = _from_fixed_in_place(stats.group_sumsq, SQUARE_BITS)
        squares /= n
    stats.group_sum = stats.group_sumsq = None
    return means, squares


def _from_fixed_in_place(values: np.ndarray, bits: int) -> np.ndarray:
    """:func:`from_fixed` of a C-contiguous int64 array, written over it (an
    exact scaling of each element, read before it is overwritten)."""
    out = np.ascontiguousarray(values).view(np.float64)
    np.multiply(values, 2.0**-bits, out=out, casting="unsafe")
    return out


def finish(stats: PassStats) -> PassStats:
    """The gene moments of ``stats``: its blocks' moments summed in block
    order (the same order for any number of chains or workers)."""
    order = sorted(stats.block_moments)
    for name in stats.block_moments[order[0]]:
        total = np.zeros_like(stats.block_moments[order[0]][name])
        for index in order:
            total += stats.block_moments[index][name]
        setattr(stats, name, total)
    stats.block_moments = {}
    return stats


def block_stats(
    block: sp.csr_array | sp.csr_matrix,
    codes: np.ndarray,
    n_groups: int,
    **options,
) -> PassStats:
    """Statistics of one row block: :func:`fold_block` into fresh statistics,
    finished. ``options`` are :func:`fold_block`'s keywords."""
    return finish(fold_block(None, block, codes, n_groups, **options))


def combine_into(parts: list[PassStats]) -> PassStats:
    """The *combine* step: add ``parts[1:]`` into ``parts[0]`` in place (the
    folds' own accumulators, which nothing else holds)."""
    total = parts[0]
    for part in parts[1:]:
        total.n_cells += part.n_cells
        total.check = total.check.combine(part.check)
        for name in ("group_n", "group_sum", "group_sumsq"):
            mine = getattr(total, name)
            if mine is not None:
                np.add(mine, getattr(part, name), out=mine)
        total.block_moments.update(part.block_moments)
        total.target_sums = knockdown.add_into(total.target_sums, part.target_sums)
    return total


def clipped_moments(
    block: sp.csr_array | sp.csr_matrix, clip: np.ndarray, counted: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene sum and sum of squares of ``min(x, clip[gene])`` over one
    block (only its ``counted`` rows, where given).

    The second pass of the ``seurat_v3`` flavor (Seurat's clipped variance).
    """
    block = sp.csr_array(block)
    if counted is not None and not counted.all():
        block = block[counted]
    values = np.minimum(block.data.astype(np.float64, copy=False), clip[block.indices])
    n_genes = block.shape[1]
    return (
        np.bincount(block.indices, weights=values, minlength=n_genes),
        np.bincount(block.indices, weights=values * values, minlength=n_genes),
    )


def add_pairs(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Combine step for :func:`clipped_moments`: add the sums left to right."""
    total, total_sq = parts[0]
    for part, part_sq in parts[1:]:
        total, total_sq = total + part, total_sq + part_sq
    return total, total_sq
