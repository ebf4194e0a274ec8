"""Building the dask graphs: one fold task per row block, into a few running
accumulators (chains), then a tree of combine tasks (``split_every`` inputs
each), as in ``dask.array.reductions``.

No data is read here: functions return lazy :class:`dask.delayed.Delayed`
objects. The per-block work is in :mod:`.kernels`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from dask import delayed
from dask.delayed import Delayed

from . import kernels, knockdown
from ..io.screen import BLOCK_BUFFERS, BlockBuffers, CsrRows, Screen

#: Inputs per combine task of the tree reduction.
SPLIT_EVERY = 8


def tree_reduce(
    parts: Sequence[Any],
    combine: Callable[[list[Any]], Any],
    *,
    split_every: int = SPLIT_EVERY,
    name: str = "combine",
) -> Any:
    """Reduce ``parts`` by a balanced tree of ``combine`` calls.

    The tree's shape depends only on ``len(parts)`` and ``split_every``, so the
    order of additions, and with it every rounding, is the same on every
    scheduler.
    """
    if split_every < 2:
        raise ValueError(f"split_every must be at least 2, got {split_every}")
    level = 0
    parts = list(parts)
    while len(parts) > 1:
        parts = [
            delayed(combine, pure=True, name=f"{name}-{level}")(parts[i : i + split_every])
            if len(parts[i : i + split_every]) > 1
            else parts[i]
            for i in range(0, len(parts), split_every)
        ]
        level += 1
    return parts[0]


def pass_stats(
    screen: Screen,
    codes: np.ndarray,
    n_groups: int,
    *,
    kind: kernels.InputKind,
    chains: int = 1,
    target_sum: float = 1e4,
    with_group_sumsq: bool = False,
    moments: tuple[str, ...] = kernels.DEFAULT_MOMENTS,
    gene_map: np.ndarray | None = None,
    split_every: int = SPLIT_EVERY,
    after: Delayed | None = None,
    targets: knockdown.Targets | None = None,
    target_codes: np.ndarray | None = None,
) -> Delayed:
    """The lazy one-pass statistics of a screen (a :class:`kernels.PassStats`).

    Parameters
    ----------
    screen
        The opened screen; its ``X`` blocks are the chunks.
    codes
        Group code of every cell (``-1``: no group).
    n_groups
        Number of groups.
    kind, target_sum, with_group_sumsq, moments, gene_map
        Passed to :func:`kernels.fold_block`.
    chains
        Running accumulators the blocks are folded into (block ``i`` goes to
        chain ``i % chains``): the most blocks processed at once.
    split_every
        Inputs per combine task of the chains' results.
    after
        A task that the first fold of every chain waits for (none by default):
        it bounds how many passes hold their accumulators at once
        (:func:`slab_means`).
    targets, target_codes
        Also take the knockdown record of these targets
        (:func:`.knockdown.block_target_sums`), with the cells' group codes
        ``target_codes`` (default ``codes``).

    Notes
    -----
    Every block is one *fold* task that reads it, normalizes, logs and adds
    it into its chain's accumulator in place (one compiled loop over the
    values). A chain's folds run one after another; the chains run in
    parallel and are summed at the end, so a worker holding a chain folds
    its blocks without moving the accumulator. Memory is ``chains`` dense
    ``(n_groups, n_genes)`` int64 fixed-point sums plus one block per chain —
    never a sum per block, which at genome-wide scale (10k groups × all
    genes) would be hundreds of MB each. Group sums are exact integers, so
    they do not depend on the chunking, ``chains`` or the scheduler.
    """
    bounds, blocks = block_refs(screen)
    used = (range(len(blocks)) if moments or targets is not None
            else blocks_with_groups(codes, bounds))
    fold = delayed(_read_and_fold, pure=True, name="pass-fold")
    accs: list[Any] = [None] * max(1, min(chains, len(used)))
    for k, i in enumerate(used):
        c = k % len(accs)
        accs[c] = fold(accs[c], blocks[i], codes[bounds[i] : bounds[i + 1]], n_groups, kind=kind,
                       target_sum=target_sum, with_group_sumsq=with_group_sumsq,
                       moments=moments, gene_map=gene_map, block_index=i,
                       after=after if k < len(accs) else None,
                       targets=targets, target_codes=None if target_codes is None
                       else target_codes[bounds[i] : bounds[i + 1]])
    # each chain's end frees the idle block buffers before the chains are combined
    accs = [delayed(_free_buffers, pure=True, name="pass-free-buffers")(acc) for acc in accs]
    total = tree_reduce(accs, kernels.combine_into, split_every=split_every, name="pass-combine")
    return delayed(kernels.finish, pure=True, name="pass-finish")(total)


def blocks_with_groups(codes: np.ndarray, bounds: np.ndarray) -> list[int]:
    """The row blocks (``bounds``: their first rows, then the end) holding a
    cell of some group (``codes >= 0``); the first block when none does.

    Only these add to group sums: a pass without gene moments or knockdown
    reads no other block. On a store whose cells are in group order
    (:func:`.sort.sort_screen`) a slab of groups is a run of rows, so its
    pass reads only the blocks of that run.
    """
    found = np.unique(_block_of(np.flatnonzero(codes >= 0), bounds))
    return found.tolist() or [0]


def slab_block_reads(codes: np.ndarray, slabs: Sequence[tuple[int, int]],
                     bounds: np.ndarray) -> int:
    """The blocks that the passes of ``slabs`` (ranges of group codes) read
    together: :func:`blocks_with_groups` of each slab, counted at once."""
    rows = np.flatnonzero(codes >= 0)
    slab = np.searchsorted([stop for _, stop in slabs], codes[rows], side="right")
    return int(np.unique(slab.astype(np.int64) * len(bounds) + _block_of(rows, bounds)).size)


def _block_of(rows: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The block (of row ``bounds``) of each of ``rows``."""
    return np.searchsorted(bounds, rows, side="right") - 1


class BlockRef:
    """A lazy block of ``X`` that dask does not see as a dependency: the task
    given it reads it, so a block is read only when it can be used (never
    ahead, held in memory while its chain is busy).

    A CSR zarr store is read directly (:attr:`.Screen.csr`), anything else
    through the dask ``block``; either way only the block's name is tokenized
    or kept beside the direct reader, not the whole ``X`` graph.
    """

    def __init__(self, block, rows: CsrRows | None, span: tuple[int, int]):
        self.name = block.name
        self.block = block if rows is None else None
        self.rows = rows
        self.span = span

    def __dask_tokenize__(self) -> str:
        return self.name

    def read(self, buffers: BlockBuffers | None = None):
        """The block; a CSR store's is read into ``buffers`` when given."""
        if self.rows is not None:
            return self.rows.read(*self.span, buffers)
        return self.block.compute(scheduler="sync")


def block_refs(screen: Screen) -> tuple[np.ndarray, list[BlockRef]]:
    """The row bounds of ``screen.X``'s blocks and a :class:`BlockRef` to each."""
    bounds = np.cumsum((0, *screen.X.chunks[0]))
    refs = [BlockRef(screen.X.blocks[i], screen.csr, (int(bounds[i]), int(bounds[i + 1])))
            for i in range(screen.X.numblocks[0])]
    return bounds, refs


def _read_and_fold(acc, block: BlockRef, codes, n_groups, after=None,
                   **kwargs) -> kernels.PassStats:
    """Read a block (into pooled buffers) and :func:`kernels.fold_block` it
    into ``acc`` (``after``: a task it waits for, see :func:`pass_stats`)."""
    with BLOCK_BUFFERS.lease() as buffers:
        return kernels.fold_block(acc, block.read(buffers), codes, n_groups, **kwargs)


def _free_buffers(result: Any) -> Any:
    """``result``, after freeing the idle block buffers of the process this
    task runs in (at the end of a fold chain, or of a pass: a buffer still
    leased by a running fold stays with it). Workers that ran no such task
    keep theirs (one set per thread, reused by their next pass)."""
    BLOCK_BUFFERS.clear()
    return result


def clipped_moments(screen: Screen, clip: np.ndarray, counted: np.ndarray, *,
                    split_every: int = SPLIT_EVERY) -> Delayed:
    """The lazy second pass of ``seurat_v3``: per-gene sums of clipped counts
    over the ``counted`` cells."""
    chunk = delayed(_read_and_clip, pure=True, name="clip-chunk")
    clip = delayed(clip, pure=True)  # one copy in the graph, not one per task
    bounds, blocks = block_refs(screen)
    parts = [chunk(block, clip, counted[bounds[i] : bounds[i + 1]])
             for i, block in enumerate(blocks)]
    total = tree_reduce(parts, kernels.add_pairs, split_every=split_every, name="clip-combine")
    return delayed(_free_buffers, pure=True, name="clip-free-buffers")(total)


def _read_and_clip(block: BlockRef, clip: np.ndarray,
                   counted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Read a block (into pooled buffers) and sum its clipped counts
    (:func:`kernels.clipped_moments`)."""
    with BLOCK_BUFFERS.lease() as buffers:
        return kernels.clipped_moments(block.read(buffers), clip, counted)


def slab_means(
    screen: Screen,
    codes: np.ndarray,
    slabs: Sequence[tuple[int, int]],
    gene_map: np.ndarray,
    *,
    chains: int = 1,
    concurrent: int = 1,
    kind: kernels.InputKind,
    target_sum: float = 1e4,
    with_group_sumsq: bool = False,
) -> list[Delayed]:
    """The lazy group means (and mean squares) of each slab of groups over the
    genes of ``gene_map``: one pass over the screen per slab.

    Parameters
    ----------
    screen
        The opened screen.
    codes
        Group code of every cell (``-1``: no group).
    slabs
        ``(first, stop)`` ranges of group codes that together cover every group.
    gene_map
        The genes summed and their columns (:func:`kernels.gene_columns`).
    chains
        Running accumulators of each slab's pass (:func:`pass_stats`).
    concurrent
        Slabs whose passes run at once: slab ``k`` starts once slab
        ``k - concurrent`` has become means, so at most ``concurrent``
        × ``chains`` fixed-point accumulators of ``(slab groups × selected
        genes)`` exist.
    kind, target_sum, with_group_sumsq
        Passed to :func:`kernels.fold_block`.

    Returns
    -------
    list of Delayed
        Per slab, :func:`kernels.slab_means` of its statistics: float64
        ``(stop - first, n_selected)`` means, and mean squares or ``None``.

    Notes
    -----
    The values of cells outside a slab are not visited by its pass, but
    every block holding one of its cells is read once per slab
    (:func:`blocks_with_groups`): on a screen in random order that is every
    block, and the slabs trade reads for memory; on one in group order
    (:func:`.sort.sort_screen`) each slab reads its own run of rows, so
    all the slabs together read the screen about once. Group sums are exact
    integers, so the means equal those of one pass over all groups, bit for bit.
    """
    finished: list[Delayed] = []
    means = delayed(kernels.slab_means, pure=True, name="slab-means")
    for k, (first, stop) in enumerate(slabs):
        local = np.where((codes >= first) & (codes < stop), codes - first, -1).astype(codes.dtype)
        after = finished[k - concurrent] if k >= concurrent else None
        stats = pass_stats(screen, local, stop - first, kind=kind, target_sum=target_sum,
                           chains=chains,
                           with_group_sumsq=with_group_sumsq, moments=(), gene_map=gene_map,
                           after=None if after is None else delayed(_done, pure=True)(after))
        finished.append(means(stats))
    return finished


def _done(result: Any) -> None:
    """Nothing: a small stand-in for ``result`` that later tasks can wait for."""
    return None
