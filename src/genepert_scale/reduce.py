"""Building the dask graphs: one chunk task per row block, then a tree of
combine tasks (``split_every`` inputs each), as in ``dask.array.reductions``.

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
        Passed to :func:`kernels.block_stats`.
    split_every
        Inputs per combine task.
    """
    blocks = screen.X.to_delayed().ravel()
    bounds = np.cumsum((0, *screen.X.chunks[0]))
    chunk = delayed(kernels.block_stats, pure=True, name="pass-chunk")
    parts = [
        chunk(
            block,
            codes[bounds[i] : bounds[i + 1]],
            n_groups,
            kind=kind,
            target_sum=target_sum,
            with_group_sumsq=with_group_sumsq,
            with_raw_moments=with_raw_moments,
            block_index=i,
        )
        for i, block in enumerate(blocks)
    ]
    return tree_reduce(parts, kernels.combine_stats, split_every=split_every, name="pass-combine")


def clipped_moments(screen: Screen, clip: np.ndarray, *, split_every: int = SPLIT_EVERY) -> Delayed:
    """The lazy second pass of ``seurat_v3``: per-gene sums of clipped counts."""
    chunk = delayed(kernels.clipped_moments, pure=True, name="clip-chunk")
    parts = [chunk(block, clip) for block in screen.X.to_delayed().ravel()]
    return tree_reduce(parts, kernels.add_pairs, split_every=split_every, name="clip-combine")
