"""Knockdown of each perturbation's target genes, from the same pass.

``knockdown`` of a perturbation = 1 − (mean normalised expression of its
target in its cells) / (the same in the control cells it is compared with:
its context's, matched by batch), on the ``target_sum``-normalised scale
before ``log1p``; for a pair, the mean over its measured targets; NaN when no
target is measured. It is a *record* of the pass (chunk, combine, finalize
as in flox): :func:`block_target_sums` per block, added by :func:`add`,
turned into the knockdown by :func:`knockdown`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from . import _numba_kernels
from .groups import GroupTable
from .labels import parse_label

#: Targets per perturbation that are followed (a pair's two genes).
MAX_TARGETS = 2

#: A block's (or a pass's) target sums: each group's of its own targets,
#: ``(groups, MAX_TARGETS)``, and each control group's of every followed gene,
#: ``(control groups, slots)``.
Sums = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Targets:
    """Which genes each group's knockdown follows.

    Attributes
    ----------
    slot_of_gene
        For each screen gene, its slot among the followed genes, or -1.
    group_genes, group_slots
        ``(groups, MAX_TARGETS)`` genes (screen columns) of each group's
        targets and their slots (-1: none); control groups follow every slot.
    control_index
        Each group's position among the control groups, -1 for the others.
    """

    slot_of_gene: np.ndarray
    group_genes: np.ndarray
    group_slots: np.ndarray
    control_index: np.ndarray

    @property
    def n_slots(self) -> int:
        return int(self.slot_of_gene.max(initial=-1)) + 1


def targets_of(groups: GroupTable, genes: list[str], control: str,
               labels: np.ndarray | None = None) -> Targets | None:
    """The measured targets of every group, from its label (``A``, ``A+B``)
    or its entry of ``labels`` (``""``: none); ``None`` when no group's
    target is measured."""
    index = {gene: i for i, gene in enumerate(genes)}
    wanted = [[index[g] for g in (parse_label(name, control) if name else ()) if g in index][:MAX_TARGETS]
              for name in (groups.perturbation if labels is None else labels)]
    followed = sorted({gene for row in wanted for gene in row})
    if not followed:
        return None
    slot_of_gene = np.full(len(genes), -1, np.int32)
    slot_of_gene[followed] = np.arange(len(followed), dtype=np.int32)
    group_genes = np.full((len(groups), MAX_TARGETS), -1, np.int32)
    for g, row in enumerate(wanted):
        group_genes[g, : len(row)] = row
    group_slots = np.where(group_genes >= 0, slot_of_gene[np.maximum(group_genes, 0)], -1)
    control_index = np.where(groups.is_control, np.cumsum(groups.is_control) - 1, -1)
    return Targets(slot_of_gene, group_genes, group_slots, control_index)


def block_target_sums(block: sp.csr_array, codes: np.ndarray, targets: Targets,
                      scales: np.ndarray, normalize: bool, use_numba: bool) -> Sums:
    """The *chunk*: over one CSR row block, the normalised expression of the
    followed genes summed by group (:data:`Sums`), each value a count times
    its row's ``scales`` entry (the fold's), or ``expm1`` of log1p data.

    Perturbed cells add their own targets' values only (a scan of their
    rows); control cells add every followed gene's.
    """
    own = np.zeros((targets.group_slots.shape[0], MAX_TARGETS))
    of_controls = np.zeros((int(targets.control_index.max()) + 1, targets.n_slots))
    args = (block.data, block.indices, block.indptr, codes, scales)
    if use_numba:
        _numba_kernels.target_sums(*args, normalize, targets.group_genes,
                                   targets.control_index, targets.slot_of_gene, own, of_controls)
    else:
        _target_sums_numpy(*args, normalize, targets, own, of_controls)
    return own, of_controls


def _target_sums_numpy(data, indices, indptr, codes, scales, normalize: bool,
                       targets: Targets, own: np.ndarray, of_controls: np.ndarray) -> None:
    """The numpy twin of :func:`._numba_kernels.target_sums` (the fallback and
    the tests' oracle)."""
    rows = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
    group = codes[rows]
    values = data.astype(np.float64) * scales[rows] if normalize else np.expm1(data)
    counted = group >= 0
    for k in range(MAX_TARGETS):
        mine = counted & (targets.group_genes[np.maximum(group, 0), k] == indices)
        np.add.at(own[:, k], group[mine], values[mine])
    control = np.where(counted, targets.control_index[np.maximum(group, 0)], -1)
    slot = targets.slot_of_gene[indices]
    kept = (control >= 0) & (slot >= 0)
    np.add.at(of_controls, (control[kept], slot[kept]), values[kept])


def row_scales(data: np.ndarray, indptr: np.ndarray, target_sum: float) -> np.ndarray:
    """Each row's normalisation scale, ``target_sum`` over its total counts
    (exact in float64; an empty row's total taken as 1), as the fold's."""
    if not data.size:
        return np.full(indptr.size - 1, float(target_sum))
    totals = np.add.reduceat(data, np.minimum(indptr[:-1], data.size - 1), dtype=np.float64)
    totals[np.diff(indptr) == 0] = 0.0
    totals[totals == 0] = 1.0
    return target_sum / totals


def add_into(total: Sums | None, part: Sums | None) -> Sums | None:
    """The *combine*: add ``part``'s target sums into ``total`` (in place; the
    folds' own sums, which nothing else holds)."""
    if total is None or part is None:
        return part if total is None else total
    for mine, theirs in zip(total, part):
        mine += theirs
    return total


def knockdown(sums: tuple[np.ndarray, np.ndarray], targets: Targets, groups: GroupTable,
              n_cells: np.ndarray) -> np.ndarray:
    """The *finalize*: every group's knockdown (NaN: no measured target, or
    its controls do not express it)."""
    own, of_controls = sums
    n = np.maximum(n_cells, 1)[:, None]
    controls = np.flatnonzero(targets.control_index >= 0)
    slots = targets.group_slots
    ref = _control_reference(groups.reference[:, controls], of_controls / n[controls], slots)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = 1 - (own / n) / ref
    ratio[(slots < 0) | ~(ref > 0)] = np.nan
    measured = (~np.isnan(ratio)).sum(axis=1)
    with np.errstate(invalid="ignore"):
        return np.where(measured > 0, np.nansum(ratio, axis=1) / np.maximum(measured, 1), np.nan)


def _control_reference(weights: sp.csr_matrix, control_means: np.ndarray,
                       slots: np.ndarray) -> np.ndarray:
    """Each group's batch-matched control mean of its own followed genes,
    ``(groups, MAX_TARGETS)``: ``weights @ control_means`` (groups × control
    groups times control groups × slots) at the slots of each group only, so
    that no ``(groups × followed genes)`` matrix is made (it would be 2.6 GB
    for 18,000 single-gene perturbations)."""
    pairs = weights.tocoo()
    out = np.zeros(slots.shape)
    for k in range(slots.shape[1]):
        slot = np.maximum(slots[pairs.row, k], 0)
        out[:, k] = np.bincount(pairs.row, weights=pairs.data * control_means[pairs.col, slot],
                                minlength=slots.shape[0])
    return out
