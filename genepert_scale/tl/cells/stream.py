"""Cells of a screen, streamed from its row blocks as log-normalised
expression of the pseudo-bulk's genes.

A :class:`CellSource` ties a lazily opened screen to a pseudo-bulk: the genes
the pass selected, its input kind and ``target_sum``, and which perturbation
(a row of the pseudo-bulk) every cell belongs to. It hands out

* :meth:`CellSource.minibatches`: shuffled minibatches of the cells in a mask
  (blocks in a seeded random order, a few blocks pooled and their cells
  shuffled), for training;
* :meth:`CellSource.gather`: chosen cells, in one pass over the blocks that
  hold them, each row set optionally transformed block by block (encoded to
  latents, say), so only what is kept is held.

The cell matrix is never held whole: at most ``shuffle_blocks`` blocks of the
selected genes, dense, are in memory at once. Normalisation is the pass's own
(:func:`.kernels.normalize_log1p` on the block's full rows, then the genes
are selected), so a cell here is a cell of the pseudo-bulk's means.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import xarray as xr

from ...errors import LabelError, ParameterError, StoreError, listing
from ...io.screen import Screen, open_screen
from ...pp import kernels
from ...pp.aggregate import CONTROL_CONTEXT, kept_by_filter
from ...pp.labels import canonical, parse_label
from ...pp.params import recorded_run
from ...pp.reduce import BlockRef, block_refs

log = logging.getLogger(__name__)

#: Group code of a control cell.
CONTROL = -1
#: Group code of a cell that is in no group used here (a dropped perturbation, no label).
NO_GROUP = -2
#: Default rows per block read by the cell model (small blocks: a minibatch
#: source, not a reduction).
CELL_BLOCK_ROWS = 2048
#: Default blocks whose cells are shuffled together.
SHUFFLE_BLOCKS = 4

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class CellSource:
    """A screen's cells as log-normalised expression of selected genes.

    Attributes
    ----------
    screen
        The lazily opened screen.
    bounds
        Row bounds of its blocks (``len(blocks) + 1``).
    blocks
        A reader of every row block.
    columns
        Screen column of every selected gene.
    genes
        The selected genes (the pseudo-bulk's).
    kind
        ``counts`` (normalised and logged here) or ``log1p`` (taken as is).
    target_sum
        Counts per cell after normalisation.
    group
        Per cell: its row (an index into ``perturbations``), :data:`CONTROL`,
        or :data:`NO_GROUP` (also for cells the pseudo-bulk's ``obs_filter``
        rejects, and cells of no context the pseudo-bulk holds).
    perturbations
        Canonical perturbation name of every row (repeated across contexts).
    labels
        Canonical name → the screen's own label (the control's too).
    control
        The control label.
    key
        The ``obs`` column of the labels.
    context
        Per cell: the index of its context in ``contexts`` (``-1``: none).
    contexts
        The contexts (``(None,)`` for a pseudo-bulk without contexts).
    row_context
        The context (index into ``contexts``) of every row.
    context_key
        The ``obs`` column of the contexts, or ``None``.
    """

    screen: Screen
    bounds: np.ndarray
    blocks: list[BlockRef]
    columns: np.ndarray
    genes: pd.Index
    kind: kernels.InputKind
    target_sum: float
    group: np.ndarray
    perturbations: list[str]
    labels: dict[str, str]
    control: str
    key: str
    context: np.ndarray
    contexts: tuple[str | None, ...]
    row_context: np.ndarray
    context_key: str | None = None

    @property
    def n_genes(self) -> int:
        return len(self.columns)

    def cells_of(self, perturbation: int, context: int | None = None) -> np.ndarray:
        """Screen rows of the cells of a row of ``perturbations`` (or of
        :data:`CONTROL`, in ``context`` when given)."""
        chosen = self.group == perturbation
        if context is not None:
            chosen &= self.context == context
        return np.flatnonzero(chosen)

    def row_name(self, row: int) -> str:
        """A row's name in messages and reports: ``CONTEXT/PERTURBATION`` with contexts."""
        context = self.contexts[self.row_context[row]]
        name = self.perturbations[row]
        return name if context is None else f"{context}/{name}"

    def read(self, block: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Dense ``float32`` log-normalised expression of a block's rows
        (``rows``: positions within the block; all by default)."""
        matrix = sp.csr_array(self.blocks[block].read())
        if rows is not None:
            matrix = matrix[rows]
        data = matrix.data
        if self.kind == "counts":
            data = kernels.normalize_log1p(matrix, self.target_sum)[1]
        logged = sp.csr_array((data.astype(np.float32), matrix.indices, matrix.indptr),
                              shape=matrix.shape)
        return logged[:, self.columns].toarray()

    def minibatches(
        self,
        mask: np.ndarray,
        batch_size: int,
        rng: np.random.Generator,
        *,
        shuffle_blocks: int = SHUFFLE_BLOCKS,
    ) -> Iterator[np.ndarray]:
        """One epoch of minibatches of the cells where ``mask`` is true.

        Blocks come in a random order; every ``shuffle_blocks`` of them are
        read, their cells pooled and shuffled, and cut into batches. Blocks
        without a cell in ``mask`` are not read.
        """
        order = [b for b in rng.permutation(len(self.blocks)) if self._rows_in(b, mask).size]
        for start in range(0, len(order), shuffle_blocks):
            pooled = np.concatenate([self.read(b, self._rows_in(b, mask))
                                     for b in order[start : start + shuffle_blocks]])
            pooled = pooled[rng.permutation(len(pooled))]
            for first in range(0, len(pooled), batch_size):
                yield pooled[first : first + batch_size]

    def gather(
        self,
        rows: Mapping[str, np.ndarray],
        transforms: Mapping[str, Transform] | None = None,
    ) -> dict[str, np.ndarray]:
        """Named sets of cells (sorted, unique row indices), read in one pass.

        Returns the expression of each set's cells in its row order, or the
        output of ``transforms[name]`` applied to them block by block.
        """
        transforms = transforms or {}
        parts: dict[str, list[np.ndarray]] = {name: [] for name in rows}
        for name, wanted in rows.items():
            if np.any(np.diff(wanted) <= 0):
                raise ValueError(f"rows of {name!r} must be sorted and unique")
        for b in range(len(self.blocks)):
            start, stop = int(self.bounds[b]), int(self.bounds[b + 1])
            spans = {name: np.searchsorted(wanted, (start, stop)) for name, wanted in rows.items()}
            local = {name: rows[name][lo:hi] - start for name, (lo, hi) in spans.items() if hi > lo}
            if not local:
                continue
            union = np.unique(np.concatenate(list(local.values())))
            x = self.read(b, union)
            for name, positions in local.items():
                part = x[np.searchsorted(union, positions)]
                parts[name].append(transforms[name](part) if name in transforms else part)
        return {name: _stack(parts[name], self.n_genes) for name in rows}

    def _rows_in(self, block: int, mask: np.ndarray) -> np.ndarray:
        start, stop = int(self.bounds[block]), int(self.bounds[block + 1])
        return np.flatnonzero(mask[start:stop])


def _stack(parts: list[np.ndarray], width: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, width), dtype=np.float32)


def open_cells(
    screen: Screen | str,
    pseudobulk: xr.Dataset,
    perturbations: Sequence[str],
    *,
    perturbation_key: str,
    control: str,
    row_contexts: Sequence[str] | None = None,
    block_rows: int = CELL_BLOCK_ROWS,
    storage_options: dict[str, Any] | None = None,
) -> CellSource:
    """A :class:`CellSource` over ``screen`` with the genes, input kind,
    normalisation, layer, cell filter and contexts of ``pseudobulk``
    (computed from this screen; its recorded parameters say which).

    Parameters
    ----------
    screen
        An opened screen or its path/URL (opened with ``block_rows`` rows
        per block, and the pseudo-bulk's ``layer``).
    pseudobulk
        The screen's pseudo-bulk (:func:`.pseudobulk.pseudobulk` or a store).
    perturbations
        The rows to use: canonical perturbation names (rows of the
        pseudo-bulk); the cells of any other perturbation are :data:`NO_GROUP`.
    perturbation_key, control
        The ``obs`` column of labels and the control label.
    row_contexts
        With a pseudo-bulk made with ``context_key``: the context of every
        row of ``perturbations``.
    """
    run = recorded_run(pseudobulk.attrs)["parameters"]
    context_key = run.get("context_key")
    if isinstance(screen, str):
        screen = open_screen(screen, storage_options=storage_options, block_rows=block_rows,
                             layer=run.get("layer"))
    genes = pd.Index([str(g) for g in pseudobulk["gene"].values])
    columns = screen.var_names.get_indexer(genes)
    if np.any(columns < 0):
        missing = list(genes[columns < 0])
        raise StoreError(
            f"{screen.source}: {len(missing)} genes of the pseudo-bulk are not in the screen's var "
            f"({listing(missing)}); give the pseudo-bulk computed from this screen"
        )
    names = list(dict.fromkeys(perturbations))
    code, labels = cell_groups(screen.obs_column(perturbation_key), control, names,
                               column=perturbation_key)
    contexts, context, row_context = _contexts(screen, pseudobulk, context_key, row_contexts,
                                               len(perturbations))
    group = _rows_of_cells(code, context, names, perturbations, row_context, len(contexts))
    keep = kept_by_filter(screen, run.get("obs_filter"))
    if keep is not None:
        group[~keep] = NO_GROUP
    bounds, refs = block_refs(screen)
    return CellSource(
        screen, bounds, refs, columns, genes, pseudobulk.attrs.get("input_kind", "counts"),
        float(run.get("target_sum") or 1e4), group, list(perturbations), labels, control,
        perturbation_key, context, contexts, row_context, context_key,
    )


def _contexts(
    screen: Screen,
    pseudobulk: xr.Dataset,
    context_key: str | None,
    row_contexts: Sequence[str] | None,
    n_rows: int,
) -> tuple[tuple[str | None, ...], np.ndarray, np.ndarray]:
    """The contexts, every cell's context and every row's (indices)."""
    if context_key is None:
        return (None,), np.zeros(screen.n_obs, dtype=np.int64), np.zeros(n_rows, dtype=np.int64)
    contexts = tuple(str(c) for c in pseudobulk[CONTROL_CONTEXT].values)
    if row_contexts is None or len(row_contexts) != n_rows:
        raise ParameterError(f"the pseudo-bulk has contexts (obs[{context_key!r}]): give the "
                             "context of every perturbation row")
    index = pd.Index(contexts)
    row_context = index.get_indexer([str(c) for c in row_contexts])
    if np.any(row_context < 0):
        raise LabelError(f"contexts {listing(sorted(set(row_contexts) - set(contexts)))} are not "
                         f"contexts of the pseudo-bulk ({listing(contexts)})")
    cat = pd.Categorical(screen.obs_column(context_key, option="--context-key"))
    of_category = np.append(index.get_indexer(cat.categories.astype(str)), -1)
    return contexts, of_category[cat.codes].astype(np.int64), row_context.astype(np.int64)


def _rows_of_cells(code: np.ndarray, context: np.ndarray, names: list[str],
                   rows: Sequence[str], row_context: np.ndarray, n_contexts: int) -> np.ndarray:
    """Every cell's row from its perturbation ``code`` (an index into
    ``names``, or :data:`CONTROL` / :data:`NO_GROUP`) and its ``context``."""
    table = np.full((n_contexts, len(names) + 2), NO_GROUP, dtype=np.int64)
    table[:, CONTROL] = CONTROL  # the last two columns: codes -1 (control) and -2 (none)
    position = {name: i for i, name in enumerate(names)}
    for row, (name, c) in enumerate(zip(rows, row_context)):
        table[c, position[name]] = row
    return np.where(context >= 0, table[np.maximum(context, 0), code], NO_GROUP)


def cell_groups(
    labels: pd.Series,
    control: str,
    perturbations: Sequence[str],
    *,
    column: str = "perturbation",
) -> tuple[np.ndarray, dict[str, str]]:
    """Every cell's group code (:class:`CellSource` ``group``) and the
    screen's label of every canonical name, from the cells' labels."""
    cat = pd.Categorical(labels)
    names = [canonical(parse_label(str(label), control)) or control for label in cat.categories]
    if control not in names:
        raise LabelError(f"control label {control!r} matches no cell in obs[{column!r}]; "
                         "pass the right one with --control")
    index = {p: i for i, p in enumerate(perturbations)}
    lookup = np.array([CONTROL if n == control else index.get(n, NO_GROUP) for n in names] + [NO_GROUP])
    codes = np.asarray(cat.codes)
    screen_label: dict[str, str] = {}
    for name, label in zip(names, map(str, cat.categories)):
        screen_label.setdefault(name, label)
    absent = [p for p in perturbations if p not in screen_label]
    if absent:
        raise LabelError(f"obs[{column!r}] has no cells of {listing(absent)}; "
                         "give the pseudo-bulk computed from this screen")
    return lookup[codes].astype(np.int64), screen_label  # code -1 (NaN) picks the last: NO_GROUP


def sample_rows(rows: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``cap`` of ``rows``, drawn without replacement, sorted."""
    if cap <= 0:
        raise ParameterError(f"a cap of cells must be positive, got {cap}")
    if rows.size <= cap:
        return np.sort(rows)
    return np.sort(rng.choice(rows, size=cap, replace=False))
