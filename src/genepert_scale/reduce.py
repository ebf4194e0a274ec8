"""Building the dask graphs: one chunk task per row block, folded into a few
running accumulators, then a tree of combine tasks (``split_every`` inputs
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

from . import kernels
from .screen import Screen

#: Inputs per combine task of the tree reduction.
SPLIT_EVERY = 8
#: Running accumulators of the pass (see :func:`pass_stats`); one keeps up with
#: about 8 threads transforming blocks (a fold is a cheap in-place scatter).
CHAINS = 1
#: Blocks read but not yet folded, at most (see :func:`pass_stats`).
MAX_PENDING = 2


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
    target_sum: float = 1e4,
    with_group_sumsq: bool = False,
    with_raw_moments: bool = False,
    split_every: int = SPLIT_EVERY,
    chains: int = CHAINS,
    max_pending: int = MAX_PENDING,
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
    kind, target_sum, with_group_sumsq, with_raw_moments
        Passed to :func:`kernels.transform_block`.
    split_every
        Inputs per combine task of the chains' results.
    chains
        Running accumulators the blocks are folded into (block ``i`` goes to
        chain ``i % chains``).
    max_pending
        Per chain, a block is read (by its chunk task) only after the chain's
        block ``max_pending`` places earlier is folded, which bounds the blocks
        in memory; at least the threads per chain, so that every thread has a block.

    Notes
    -----
    Every block is one *chunk* task (read, normalize, log1p, gene moments:
    the heavy part, parallel over all threads). Its output is folded into its
    chain's accumulator by a cheap, in-place *fold* task; the chains are
    summed at the end. The chains are independent, so on a cluster each
    worker can hold one and fold the blocks it transformed, without moving
    accumulators. Memory is ``chains`` dense ``(n_groups, n_genes)``
    int64 fixed-point sums plus the blocks in flight — never a sum per block,
    which at genome-wide scale (10k groups × all genes) would be hundreds of
    MB each. Group sums are exact integers, so they do not depend on the
    chunking, ``chains`` or the scheduler.
    """
    blocks = [BlockRef(screen.X.blocks[i]) for i in range(screen.X.numblocks[0])]
    bounds = np.cumsum((0, *screen.X.chunks[0]))
    chunk = delayed(_transform_after, pure=True, name="pass-chunk")
    fold = delayed(kernels.fold_block, pure=True, name="pass-fold")
    done = delayed(_done, pure=True, name="pass-folded")
    accs: list[Any] = [None] * min(chains, len(blocks))
    folded: list[Any] = []
    for i, block in enumerate(blocks):
        earlier = i - max_pending * len(accs)  # the same chain's block, max_pending folds back
        after = folded[earlier] if earlier >= 0 else None
        part = chunk(block, codes[bounds[i] : bounds[i + 1]], n_groups, after, kind=kind,
                     target_sum=target_sum, with_group_sumsq=with_group_sumsq,
                     with_raw_moments=with_raw_moments, block_index=i)
        c = i % len(accs)
        accs[c] = fold(accs[c], part, n_groups)
        folded.append(done(accs[c]))
    total = tree_reduce(accs, kernels.combine_into, split_every=split_every, name="pass-combine")
    return delayed(kernels.finish, pure=True, name="pass-finish")(total)


class BlockRef:
    """A lazy block of ``X`` that dask does not see as a dependency: the task
    given it reads it, so a block is read only when it can be transformed."""

    def __init__(self, block):
        self.block = block

    def __dask_tokenize__(self) -> str:
        return self.block.name  # not a pickle of the whole X graph

    def read(self):
        return self.block.compute(scheduler="sync")


def _transform_after(block: BlockRef, codes, n_groups, after, **kwargs) -> kernels.BlockPartial:
    """Read a block and :func:`kernels.transform_block` it; ``after`` only
    orders the task after an earlier block's fold."""
    return kernels.transform_block(block.read(), codes, n_groups, **kwargs)


def _done(acc: Any) -> bool:
    """A small token that a fold finished (the accumulator itself stays put)."""
    return True


def clipped_moments(screen: Screen, clip: np.ndarray, *, split_every: int = SPLIT_EVERY) -> Delayed:
    """The lazy second pass of ``seurat_v3``: per-gene sums of clipped counts."""
    chunk = delayed(kernels.clipped_moments, pure=True, name="clip-chunk")
    parts = [chunk(block, clip) for block in screen.X.to_delayed().ravel()]
    return tree_reduce(parts, kernels.add_pairs, split_every=split_every, name="clip-combine")
