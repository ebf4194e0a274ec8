"""Pure numpy/scipy kernels on one block of cells.

Nothing here knows about dask, zarr or files: every function takes arrays of
one row block and returns arrays. The graph builders in :mod:`.reduce` call
them; tests call them directly against scanpy and numpy oracles.

The streamed pass is a *chunk → fold → combine → finalize* reduction (as in flox):

- chunk: :func:`transform_block` normalizes and logs one CSR row block and sums
  its per-gene moments (:class:`BlockPartial`, about the size of the block);
- fold: :func:`fold_block` adds a partial into a running :class:`PassStats`
  whose per-group sums are one dense ``(n_groups, n_genes)`` float64 array,
  in place — the only object that grows with the number of groups;
- combine: :meth:`PassStats.combine` adds the running statistics of the chains;
- finalize: :mod:`.pseudobulk` divides sums by counts and selects genes.

The loops over the CSR arrays are compiled with numba when it is importable
(and ``GENEPERT_SCALE_NO_NUMBA`` is unset); the numpy implementation of each
is the fallback and the test oracle: both sum in the same order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import scipy.sparse as sp

from . import _numba_kernels

InputKind = Literal["counts", "log1p"]

#: Whether the compiled loops are used (numba importable and not disabled).
USE_NUMBA = _numba_kernels.AVAILABLE and not os.environ.get("GENEPERT_SCALE_NO_NUMBA")


@dataclass
class ValueCheck:
    """Counts of suspicious values seen in the blocks combined so far.

    ``first_block`` maps each problem to the first block index where it occurred,
    so that error messages can name the chunk.
    """

    nonfinite: int = 0
    negative: int = 0
    noninteger: int = 0
    first_block: dict[str, int] | None = None

    def combine(self, other: ValueCheck) -> ValueCheck:
        first = dict(other.first_block or {})
        for key, block in (self.first_block or {}).items():
            first[key] = min(block, first.get(key, block))
        return ValueCheck(
            self.nonfinite + other.nonfinite,
            self.negative + other.negative,
            self.noninteger + other.noninteger,
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
        Per-group sums of the ``log1p`` values, dense ``(n_groups, n_genes)``
        float64, or ``None`` in a :class:`BlockPartial` (added by the fold).
    group_sumsq
        Per-group sums of squared ``log1p`` values, or ``None`` when not asked.
    check
        Counts of non-finite, negative and non-integer inputs.
    """

    n_cells: int
    group_n: np.ndarray
    gene_sum: np.ndarray
    gene_sumsq: np.ndarray
    gene_log_sum: np.ndarray
    gene_log_sumsq: np.ndarray
    group_sum: np.ndarray | None
    group_sumsq: np.ndarray | None
    check: ValueCheck

    def combine(self, other: PassStats) -> PassStats:
        """Add two partial results (associative, fixed operand order)."""
        merged = {}
        for field in fields(self):
            a, b = getattr(self, field.name), getattr(other, field.name)
            if field.name == "check":
                merged[field.name] = a.combine(b)
            elif a is None or b is None:
                merged[field.name] = a if b is None else b
            else:
                merged[field.name] = a + b
        return PassStats(**merged)


@dataclass
class BlockPartial:
    """The chunk step's output: the block's moments, and its ``log1p`` values
    with their CSR structure and row groups, for :func:`fold_block`."""

    stats: PassStats
    logged: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    codes: np.ndarray


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


def check_values(data: np.ndarray, kind: InputKind, block_index: int) -> ValueCheck:
    """Count non-finite, negative and (for counts) non-integer stored values."""
    nonfinite = int(np.count_nonzero(~np.isfinite(data)))
    negative = int(np.count_nonzero(data < 0))
    noninteger = 0
    if kind == "counts":
        finite = data[np.isfinite(data)]
        noninteger = int(np.count_nonzero(finite != np.round(finite)))
    return _value_check(nonfinite, negative, noninteger, block_index)


def _value_check(nonfinite: int, negative: int, noninteger: int, block_index: int) -> ValueCheck:
    counts = {"nonfinite": nonfinite, "negative": negative, "noninteger": noninteger}
    first = {key: block_index for key, count in counts.items() if count}
    return ValueCheck(nonfinite, negative, noninteger, first or None)


def _transform_numpy(data, indices, indptr, n_genes, kind, target_sum):
    block = sp.csr_array((data, indices, indptr), shape=(indptr.size - 1, n_genes))
    if kind == "counts":
        normalized, logged = normalize_log1p(block, target_sum)
    else:
        logged = data.astype(np.float64, copy=False)
        normalized = np.expm1(logged)

    def per_gene(values: np.ndarray) -> np.ndarray:
        return np.bincount(indices, weights=values, minlength=n_genes)

    moments = [per_gene(v) for v in (normalized, normalized * normalized, logged, logged * logged)]
    return logged, moments


def transform_block(
    block: sp.csr_array | sp.csr_matrix | np.ndarray,
    codes: np.ndarray,
    n_groups: int,
    *,
    kind: InputKind = "counts",
    target_sum: float = 1e4,
    block_index: int = 0,
    use_numba: bool | None = None,
) -> BlockPartial:
    """The *chunk* step: normalize + ``log1p`` one block and sum its gene moments.

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
    block_index
        Position of the block, reported by :class:`ValueCheck`.
    use_numba
        Force the compiled (``True``) or numpy (``False``) loops; default :data:`USE_NUMBA`.
    """
    block = block if isinstance(block, sp.csr_array | sp.csr_matrix) else sp.csr_array(block)
    n_genes = block.shape[1]
    data, indices, indptr = block.data, block.indices, block.indptr
    codes = np.asarray(codes)
    if USE_NUMBA if use_numba is None else use_numba:
        scaled, scaled_moments, counts = _numba_kernels.scale_rows(
            data, indices, indptr, n_genes, kind == "counts", float(target_sum)
        )
        check = _value_check(*counts, block_index)
        if kind == "counts":  # log in place: one float64 array per block
            norm_moments = scaled_moments
            logged = np.log1p(scaled, out=scaled)
            log_moments = _numba_kernels.moments(logged, indices, n_genes)
        else:
            log_moments, logged = scaled_moments, scaled
            norm_moments = _numba_kernels.moments(np.expm1(logged), indices, n_genes)
        moments = [*norm_moments.T, *log_moments.T]
    else:
        check = check_values(data, kind, block_index)
        logged, moments = _transform_numpy(data, indices, indptr, n_genes, kind, target_sum)
    stats = PassStats(
        n_cells=block.shape[0],
        group_n=np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.int64),
        gene_sum=moments[0],
        gene_sumsq=moments[1],
        gene_log_sum=moments[2],
        gene_log_sumsq=moments[3],
        group_sum=None,
        group_sumsq=None,
        check=check,
    )
    return BlockPartial(stats, logged, indices, indptr, codes)


def scatter_group_sums(
    out: np.ndarray,
    values: np.ndarray,
    indices: np.ndarray,
    indptr: np.ndarray,
    codes: np.ndarray,
    *,
    square: bool = False,
    use_numba: bool | None = None,
) -> None:
    """Add the CSR rows' ``values`` (or their squares) into ``out[code]``, in place.

    Rows with a negative code belong to no group and are skipped. Values are
    added in storage order, by the compiled loop or by ``np.add.at``.
    """
    if USE_NUMBA if use_numba is None else use_numba:
        _numba_kernels.scatter(out, values, indices, indptr, codes, square)
        return
    rows = np.repeat(codes, np.diff(indptr))
    member = rows >= 0
    add = values[member]
    np.add.at(out, (rows[member], indices[member]), add * add if square else add)


def fold_block(
    acc: PassStats | None,
    part: BlockPartial,
    n_groups: int,
    *,
    with_group_sumsq: bool = False,
    use_numba: bool | None = None,
) -> PassStats:
    """The *fold* step: add ``part`` into the running statistics ``acc``.

    ``acc`` is updated in place and returned (``None`` starts a new one with
    zero group sums); it must not be shared with any other computation.
    """
    n_genes = part.stats.gene_sum.size
    if acc is None:
        acc = PassStats(
            0, np.zeros(n_groups, np.int64), *(np.zeros(n_genes) for _ in range(4)),
            np.zeros((n_groups, n_genes)),
            np.zeros((n_groups, n_genes)) if with_group_sumsq else None,
            ValueCheck(),
        )
    moments = part.stats
    acc.n_cells += moments.n_cells
    acc.check = acc.check.combine(moments.check)
    for name in ("group_n", "gene_sum", "gene_sumsq", "gene_log_sum", "gene_log_sumsq"):
        np.add(getattr(acc, name), getattr(moments, name), out=getattr(acc, name))
    args = (part.logged, part.indices, part.indptr, part.codes)
    scatter_group_sums(acc.group_sum, *args, use_numba=use_numba)
    if acc.group_sumsq is not None:
        scatter_group_sums(acc.group_sumsq, *args, square=True, use_numba=use_numba)
    return acc


def fold_blocks(
    acc: PassStats | None, parts: list[BlockPartial], n_groups: int, *,
    with_group_sumsq: bool = False,
) -> PassStats:
    """Fold several partials, left to right."""
    for part in parts:
        acc = fold_block(acc, part, n_groups, with_group_sumsq=with_group_sumsq)
    return acc


def block_stats(
    block: sp.csr_array | sp.csr_matrix,
    codes: np.ndarray,
    n_groups: int,
    *,
    kind: InputKind = "counts",
    target_sum: float = 1e4,
    with_group_sumsq: bool = False,
    block_index: int = 0,
    use_numba: bool | None = None,
) -> PassStats:
    """Statistics of one row block (chunk + fold into fresh statistics).

    See :func:`transform_block` for the parameters; ``with_group_sumsq`` also
    sums squared ``log1p`` values per group (for per-group variances).
    """
    part = transform_block(block, codes, n_groups, kind=kind, target_sum=target_sum,
                           block_index=block_index, use_numba=use_numba)
    return fold_block(None, part, n_groups, with_group_sumsq=with_group_sumsq,
                      use_numba=use_numba)


def combine_into(parts: list[PassStats]) -> PassStats:
    """Add ``parts[1:]`` into ``parts[0]`` in place (the fold's own accumulators)."""
    total = parts[0]
    for part in parts[1:]:
        total.n_cells += part.n_cells
        total.check = total.check.combine(part.check)
        for name in ("group_n", "gene_sum", "gene_sumsq", "gene_log_sum", "gene_log_sumsq",
                     "group_sum", "group_sumsq"):
            mine = getattr(total, name)
            if mine is not None:
                np.add(mine, getattr(part, name), out=mine)
    return total


def combine_stats(parts: list[PassStats]) -> PassStats:
    """The *combine* step: add partial statistics left to right."""
    total = parts[0]
    for part in parts[1:]:
        total = total.combine(part)
    return total
