"""Pure numpy/scipy kernels on one block of cells.

Nothing here knows about dask, zarr or files: every function takes arrays of
one row block and returns arrays. The graph builders in :mod:`.reduce` call
them; tests call them directly against scanpy and numpy oracles.

The streamed pass is a *chunk → combine → finalize* reduction (as in flox):

- chunk: :func:`block_stats` turns one CSR row block into :class:`PassStats`;
- combine: :meth:`PassStats.combine` adds partial statistics;
- finalize: :mod:`.pseudobulk` divides sums by counts and selects genes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import scipy.sparse as sp

InputKind = Literal["counts", "log1p"]

#: Above this share of non-zeros, group sums are kept dense when combined.
_DENSE_SHARE = 0.25

#: Fractional bits of the fixed-point (int64) group sums and group sums of
#: squares. Integer addition is associative, so these sums are bit-identical
#: for every chunking, combine order and scheduler.
SUM_BITS = 32
SQUARE_BITS = 24

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
    first_block: dict[str, int] | None = None

    def combine(self, other: ValueCheck) -> ValueCheck:
        first = dict(other.first_block or {})
        for key, block in (self.first_block or {}).items():
            first[key] = min(block, first.get(key, block))
        return ValueCheck(
            self.nonfinite + other.nonfinite,
            self.negative + other.negative,
            self.noninteger + other.noninteger,
            self.too_large + other.too_large,
            first or None,
        )


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
        (``expm1`` of the log data), used by the ``seurat`` HVG flavor.
    gene_log_sum, gene_log_sumsq
        The same for the ``log1p`` values, used by ``cell_ranger``.
    group_sum
        Per-group sums of the ``log1p`` values, ``(n_groups, n_genes)``, in
        int64 fixed point with :data:`SUM_BITS` fractional bits (exact, see
        :func:`to_fixed`), sparse while sparse enough, dense after.
    group_sumsq
        Per-group sums of squared ``log1p`` values in fixed point with
        :data:`SQUARE_BITS` fractional bits, or ``None`` when not asked.
    gene_raw_sum, gene_raw_sumsq
        Per-gene sums of the raw stored values and their squares (for the
        ``seurat_v3`` flavor), or ``None`` when not asked.
    check
        Counts of non-finite, negative and non-integer inputs.
    """

    n_cells: int
    group_n: np.ndarray
    gene_sum: np.ndarray
    gene_sumsq: np.ndarray
    gene_log_sum: np.ndarray
    gene_log_sumsq: np.ndarray
    group_sum: np.ndarray | sp.csr_array
    group_sumsq: np.ndarray | sp.csr_array | None
    gene_raw_sum: np.ndarray | None
    gene_raw_sumsq: np.ndarray | None
    check: ValueCheck

    def combine(self, other: PassStats) -> PassStats:
        """Add two partial results (associative, fixed operand order)."""
        merged = {}
        for field in fields(self):
            a, b = getattr(self, field.name), getattr(other, field.name)
            if field.name == "check":
                merged[field.name] = a.combine(b)
            elif a is None:
                merged[field.name] = None
            elif sp.issparse(a) or sp.issparse(b):
                merged[field.name] = _add_maybe_sparse(a, b)
            else:
                merged[field.name] = a + b
        return PassStats(**merged)


def _add_maybe_sparse(
    a: np.ndarray | sp.csr_array, b: np.ndarray | sp.csr_array
) -> np.ndarray | sp.csr_array:
    if sp.issparse(a) and sp.issparse(b):
        total = (a + b).tocsr()
        if total.nnz > _DENSE_SHARE * np.prod(total.shape):
            return total.toarray()
        return total
    dense, sparse = (a, b) if sp.issparse(b) else (b, a)
    out = np.array(dense, dtype=np.result_type(dense, sparse.dtype), copy=True)
    coo = sparse.tocoo()
    np.add.at(out, (coo.row, coo.col), coo.data)
    return out


def normalize_log1p(
    block: sp.csr_array | sp.csr_matrix,
    target_sum: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalize each cell to ``target_sum`` counts, then ``log1p``.

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
        return np.rint(np.ldexp(values, bits)).astype(np.int64)


def from_fixed(values: np.ndarray, bits: int) -> np.ndarray:
    """The float64 values of fixed-point numerators made by :func:`to_fixed`."""
    return np.ldexp(np.asarray(values, dtype=np.float64), -bits)


def check_values(data: np.ndarray, kind: InputKind, block_index: int) -> ValueCheck:
    """Count non-finite, negative, (for counts) non-integer and (for log1p)
    too large stored values."""
    nonfinite = int(np.count_nonzero(~np.isfinite(data)))
    negative = int(np.count_nonzero(data < 0))
    noninteger = too_large = 0
    if kind == "counts":
        finite = data[np.isfinite(data)]
        noninteger = int(np.count_nonzero(finite != np.round(finite)))
    else:
        too_large = int(np.count_nonzero(data[np.isfinite(data)] > LOG1P_MAX))
    counts = {"nonfinite": nonfinite, "negative": negative, "noninteger": noninteger,
              "too_large": too_large}
    first = {key: block_index for key, count in counts.items() if count}
    return ValueCheck(nonfinite, negative, noninteger, too_large, first or None)


def group_sums(
    values: np.ndarray,
    indices: np.ndarray,
    indptr: np.ndarray,
    codes: np.ndarray,
    n_groups: int,
    n_genes: int,
) -> sp.csr_array:
    """Sum the rows of a CSR block by group: ``indicator @ block``.

    Rows with a negative code belong to no group and are skipped.
    """
    block = sp.csr_array((values, indices, indptr), shape=(len(codes), n_genes))
    member = codes >= 0
    rows = np.flatnonzero(member)
    indicator = sp.csr_array(
        (np.ones(rows.size, dtype=values.dtype), (codes[member], rows)),
        shape=(n_groups, len(codes)),
    )
    return (indicator @ block).tocsr()


def block_stats(
    block: sp.csr_array | sp.csr_matrix,
    codes: np.ndarray,
    n_groups: int,
    *,
    kind: InputKind = "counts",
    target_sum: float = 1e4,
    with_group_sumsq: bool = False,
    with_raw_moments: bool = False,
    block_index: int = 0,
) -> PassStats:
    """The *chunk* step of the pass: statistics of one row block.

    Parameters
    ----------
    block
        Cells × genes, CSR (counts or ``log1p`` values, see ``kind``).
    codes
        Group of each row, ``-1`` for cells in no group.
    n_groups
        Number of groups (perturbations and the control).
    kind
        ``"counts"`` normalizes and logs; ``"log1p"`` takes the values as they are.
    target_sum
        Total count per cell after normalization.
    with_group_sumsq
        Also sum squared ``log1p`` values per group (for per-group variances).
    with_raw_moments
        Also sum the raw values and their squares per gene.
    block_index
        Position of the block, reported by :class:`ValueCheck`.
    """
    block = sp.csr_array(block)
    n_genes = block.shape[1]
    check = check_values(block.data, kind, block_index)
    if kind == "counts":
        normalized, logged = normalize_log1p(block, target_sum)
    else:
        logged = block.data.astype(np.float64, copy=False)
        normalized = np.expm1(logged)

    def per_gene(values: np.ndarray) -> np.ndarray:
        return np.bincount(block.indices, weights=values, minlength=n_genes)

    sums = group_sums(
        to_fixed(logged, SUM_BITS), block.indices, block.indptr, codes, n_groups, n_genes
    )
    raw = block.data.astype(np.float64, copy=False)
    sumsq = None
    if with_group_sumsq:
        sumsq = group_sums(
            to_fixed(logged * logged, SQUARE_BITS), block.indices, block.indptr, codes,
            n_groups, n_genes,
        )
    return PassStats(
        n_cells=block.shape[0],
        group_n=np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.int64),
        gene_sum=per_gene(normalized),
        gene_sumsq=per_gene(normalized * normalized),
        gene_log_sum=per_gene(logged),
        gene_log_sumsq=per_gene(logged * logged),
        group_sum=sums,
        group_sumsq=sumsq,
        gene_raw_sum=per_gene(raw) if with_raw_moments else None,
        gene_raw_sumsq=per_gene(raw * raw) if with_raw_moments else None,
        check=check,
    )


def clipped_moments(
    block: sp.csr_array | sp.csr_matrix, clip: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene sum and sum of squares of ``min(x, clip[gene])`` over one block.

    The second pass of the ``seurat_v3`` flavor (Seurat's clipped variance).
    """
    block = sp.csr_array(block)
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


def combine_stats(parts: list[PassStats]) -> PassStats:
    """The *combine* step: add partial statistics left to right."""
    total = parts[0]
    for part in parts[1:]:
        total = total.combine(part)
    return total
