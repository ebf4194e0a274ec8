"""Which cells form which groups, and which control cells each group is
compared with.

A group is a perturbation in a context (a cell line, say): its delta is
taken against the control cells of the same context. With a batch key (GEM
group, lane, replicate), controls are kept apart by batch, and a
perturbation's reference is the mean of its batches' controls weighted by
its own cells in each batch: ``delta_p = Σ_b (n_pb / n_p)(mean_pb − control_b)``,
so batch effects cancel (as Replogle et al. match controls by GEM group).

Groups are ordered with every control group first (by context, then batch),
then the perturbations by context and name: a pass that holds only some
groups at a time (group slabs) finds all the controls in its first slab.
Without contexts or batches there is one control group, first, as in a
screen of one population.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import LabelError, listing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupTable:
    """The groups of a pass.

    Attributes
    ----------
    perturbation
        Each group's perturbation (the control label for a control group).
    context
        Each group's context (``""`` without contexts).
    batch
        Each control group's batch (``""`` otherwise, and without batches).
    is_control
        Whether each group holds control cells.
    reference
        ``(groups × groups)`` weights: row ``g`` weighs the control groups
        that ``g`` is compared with (rows sum to 1); a control group's row
        weighs its context's control groups by their cells (the context's
        pooled control).
    contexts
        The contexts, in order.
    unmatched
        ``(context, batch)`` pairs with perturbed cells but no control
        cells; their perturbed cells are compared with the controls of their
        other batches, or the context's pooled control when none has any.
    """

    perturbation: np.ndarray
    context: np.ndarray
    batch: np.ndarray
    is_control: np.ndarray
    reference: sp.csr_matrix
    contexts: tuple[str, ...]
    unmatched: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return self.perturbation.size


def group_cells(
    codes: np.ndarray,
    names: list[str],
    context: pd.Series | None = None,
    batch: pd.Series | None = None,
) -> tuple[np.ndarray, GroupTable]:
    """Group the cells by (context, perturbation), controls by (context, batch).

    Parameters
    ----------
    codes
        Each cell's perturbation code (:func:`.labels.assign_groups`: ``0``
        the control ``names[0]``, negative: in no group).
    names
        The perturbations' names, by code.
    context, batch
        Each cell's context and batch (``None``: one of each); a cell
        without one is in no group.

    Returns
    -------
    codes
        Each cell's group (negative codes kept as they are).
    GroupTable
        The groups.

    Raises
    ------
    LabelError
        If a context has perturbed cells but no control cells.
    """
    context_codes, contexts = _factorize(context, codes.size)
    batch_codes, batches = _factorize(batch, codes.size)
    counted = (codes >= 0) & (context_codes >= 0) & (batch_codes >= 0)
    control = codes == 0
    n_names, n_batches = len(names), len(batches)
    n_contexts = len(contexts)
    key = (((~control).astype(np.int64) * n_contexts + context_codes) * n_names + codes)
    key = key * n_batches + np.where(control, batch_codes, 0)
    unique, inverse = np.unique(key[counted], return_inverse=True)
    grouped = np.where(codes < 0, codes, -1).astype(np.int32)
    grouped[counted] = inverse
    rest, group_batch = np.divmod(unique, n_batches)
    rest, perturbation = np.divmod(rest, n_names)
    perturbed, group_context = np.divmod(rest, n_contexts)
    table = GroupTable(
        perturbation=np.array([names[p] for p in perturbation], dtype=object),
        context=np.array([contexts[c] for c in group_context], dtype=object),
        batch=np.where(perturbed == 0, np.array(batches, dtype=object)[group_batch], ""),
        is_control=perturbed == 0,
        reference=sp.csr_matrix((unique.size, unique.size)),
        contexts=tuple(contexts[c] for c in np.unique(group_context)),
    )
    _check_controls(table, names[0])
    reference, unmatched = _reference(grouped, batch_codes, table, batches)
    return grouped, replace(table, reference=reference, unmatched=unmatched)


def _factorize(values: pd.Series | None, n: int) -> tuple[np.ndarray, list[str]]:
    """Integer codes (``-1``: missing) and the sorted names of ``values``."""
    if values is None:
        return np.zeros(n, np.int64), [""]
    categorical = pd.Categorical(values.astype("string").astype(object))
    order = np.argsort(np.asarray(categorical.categories, dtype=str))
    categorical = categorical.reorder_categories(categorical.categories[order])
    return np.asarray(categorical.codes, np.int64), [str(c) for c in categorical.categories]


def _check_controls(table: GroupTable, control: str) -> None:
    """Raise if a context has no control group."""
    with_controls = set(table.context[table.is_control])
    missing = [c for c in table.contexts if c not in with_controls]
    if missing == [""]:
        raise LabelError(f"no control cells ({control!r}) in the screen; "
                         "pass the control label with --control")
    if missing:
        raise LabelError(f"contexts without control cells ({control!r}): {listing(missing, 10)}; "
                         "each context needs its own controls (drop those cells, e.g. with "
                         "--obs-filter, or check the control label)")


def _reference(grouped: np.ndarray, batch_codes: np.ndarray, table: GroupTable,
               batches: list[str]) -> tuple[sp.csr_matrix, tuple[tuple[str, str], ...]]:
    """The reference weights of every group (see :class:`GroupTable`)."""
    n_groups = len(table)
    cells = grouped >= 0
    by_batch = sp.csr_matrix((np.ones(int(cells.sum())), (grouped[cells], batch_codes[cells])),
                             shape=(n_groups, len(batches)))
    controls = {(c, b): g for g, (c, b, is_control) in
                enumerate(zip(table.context, table.batch, table.is_control)) if is_control}
    n_cells = np.asarray(by_batch.sum(axis=1)).ravel()
    rows, cols, weights, unmatched = [], [], [], set()
    for g in range(n_groups):
        start, stop = by_batch.indptr[g], by_batch.indptr[g + 1]
        pairs = [(controls.get((table.context[g], batches[b])), n) for b, n in
                 zip(by_batch.indices[start:stop], by_batch.data[start:stop])]
        unmatched |= {(table.context[g], batches[b]) for (found, _), b in
                      zip(pairs, by_batch.indices[start:stop]) if found is None}
        matched = [(c, n) for c, n in pairs if c is not None]
        if table.is_control[g] or not matched:  # the context's pooled control
            matched = [(c, n_cells[c]) for (ctx, _), c in controls.items()
                       if ctx == table.context[g]]
        total = sum(n for _, n in matched)
        rows += [g] * len(matched)
        cols += [c for c, _ in matched]
        weights += [n / total for _, n in matched]
    reference = sp.csr_matrix((weights, (rows, cols)), shape=(n_groups, n_groups))
    if unmatched:
        log.warning("batches with perturbed cells but no control cells: %s; their cells are "
                    "compared with the controls of their other batches (or the context's)",
                    listing(sorted(f"{c}/{b}" if c else b for c, b in unmatched), 20))
    return reference, tuple(sorted(unmatched))
