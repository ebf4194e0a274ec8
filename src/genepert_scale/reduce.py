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
    split_every: int = SPLIT_EVERY,
    chains: int = CHAINS,
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
    kind, target_sum, with_group_sumsq
        Passed to :func:`kernels.transform_block` and :func:`kernels.fold_block`.
    split_every
        Inputs per combine task of the chains' results.
    chains
        Running accumulators the blocks are folded into (block ``i`` goes to
        chain ``i % chains``).

    Notes
    -----
    Every block is one *chunk* task (read, normalize, log1p, gene moments:
    the heavy part, parallel over all workers). Its output is folded into its
    chain's accumulator by a cheap, in-place *fold* task; the chains are
    summed at the end. Memory is ``chains`` dense ``(n_groups, n_genes)``
    float64 sums plus the blocks in flight — never a sum per block, which at
    genome-wide scale (10k groups × all genes) would be hundreds of MB each.
    The order of additions depends only on the chunking and ``chains``, not
    on the scheduler.
    """
    blocks = screen.X.to_delayed().ravel()
    bounds = np.cumsum((0, *screen.X.chunks[0]))
    chunk = delayed(kernels.transform_block, pure=True, name="pass-chunk")
    fold = delayed(kernels.fold_block, pure=True, name="pass-fold")
    accs: list[Any] = [None] * min(chains, len(blocks))
    for i, block in enumerate(blocks):
        part = chunk(block, codes[bounds[i] : bounds[i + 1]], n_groups, kind=kind,
                     target_sum=target_sum, block_index=i)
        c = i % len(accs)
        accs[c] = fold(accs[c], part, n_groups, with_group_sumsq=with_group_sumsq)
    return tree_reduce(accs, kernels.combine_into, split_every=split_every, name="pass-combine")
