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
    group_slots
        ``(groups, MAX_TARGETS)`` slots of each group's targets (-1: none);
        control groups follow every slot.
    control_index
        Each group's position among the control groups, -1 for the others.
    """

    slot_of_gene: np.ndarray
    group_slots: np.ndarray
    control_index: np.ndarray

    @property
    def n_slots(self) -> int:
        return int(self.slot_of_gene.max(initial=-1)) + 1


def targets_of(groups: GroupTable, genes: list[str], control: str) -> Targets | None:
    """The measured targets of every group, from its label (``A``, ``A+B``);
    ``None`` when no group's target is measured."""
    index = {gene: i for i, gene in enumerate(genes)}
    wanted = [[index[g] for g in parse_label(name, control) if g in index][:MAX_TARGETS]
              for name in groups.perturbation]
    followed = sorted({gene for row in wanted for gene in row})
    if not followed:
        return None
    slot_of_gene = np.full(len(genes), -1, np.int32)
    slot_of_gene[followed] = np.arange(len(followed), dtype=np.int32)
    group_slots = np.full((len(groups), MAX_TARGETS), -1, np.int32)
    for g, row in enumerate(wanted):
        group_slots[g, : len(row)] = slot_of_gene[row]
    control_index = np.where(groups.is_control, np.cumsum(groups.is_control) - 1, -1)
    return Targets(slot_of_gene, group_slots, control_index)


def block_target_sums(block: sp.csr_array, codes: np.ndarray, targets: Targets,
                      normalize: bool, target_sum: float) -> Sums:
    """The *chunk*: over one CSR row block, the normalised expression of the
    followed genes summed by group (:data:`Sums`)."""
    data, indices, indptr = block.data, block.indices, block.indptr
    n_groups = targets.group_slots.shape[0]
    own = np.zeros((n_groups, MAX_TARGETS))
    of_controls = np.zeros((int(targets.control_index.max()) + 1, targets.n_slots))
    slots = targets.slot_of_gene[indices]
    entries = np.flatnonzero(slots >= 0)
    rows = np.searchsorted(indptr, entries, side="right") - 1
    group = codes[rows]
    entries, rows, group = entries[group >= 0], rows[group >= 0], group[group >= 0]
    values = data[entries].astype(np.float64)
    if normalize:
        values *= target_sum / _row_totals(data, indptr)[rows]
    else:
        values = np.expm1(values)
    slot = slots[entries]
    for k in range(MAX_TARGETS):
        mine = targets.group_slots[group, k] == slot
        np.add.at(own[:, k], group[mine], values[mine])
    control = targets.control_index[group]
    np.add.at(of_controls, (control[control >= 0], slot[control >= 0]), values[control >= 0])
    return own, of_controls


def _row_totals(data: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Each row's summed counts, exact in float64 (1 for an empty row, as the
    normalisation takes it)."""
    if not data.size:
        return np.ones(indptr.size - 1)
    starts = np.minimum(indptr[:-1], data.size - 1)
    totals = np.add.reduceat(data, starts, dtype=np.float64)
    totals[np.diff(indptr) == 0] = 0.0
    totals[totals == 0] = 1.0
    return totals


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
    # each group's batch-matched control mean of every followed gene, (groups, slots)
    reference = groups.reference[:, controls] @ (of_controls / n[controls])
    slots = targets.group_slots
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.take_along_axis(reference, np.maximum(slots, 0), axis=1)
        ratio = 1 - (own / n) / ref
    ratio[(slots < 0) | ~(ref > 0)] = np.nan
    measured = (~np.isnan(ratio)).sum(axis=1)
    with np.errstate(invalid="ignore"):
        return np.where(measured > 0, np.nansum(ratio, axis=1) / np.maximum(measured, 1), np.nan)
