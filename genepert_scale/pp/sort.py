"""A screen in the order of its groups: the store on which a pass in group
slabs reads the screen about once.

When ``(groups × selected genes)`` outgrows the memory limit, the group sums
are taken slab by slab (:mod:`.budget`), and each slab reads the row blocks
holding its cells (:func:`.reduce.blocks_with_groups`): every block, in a
screen whose cells are in random order. :func:`sort_screen` writes the
screen once with each group's cells together, in the order the pass numbers
the groups (controls first, then the perturbations by context and name:
:func:`.groups.group_cells`), so that each slab is a run of rows.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..io.reorder import write_reordered
from ..io.screen import open_screen
from .aggregate import groups_of
from .params import PseudobulkParams

log = logging.getLogger(__name__)


def sort_screen(
    source: str,
    out: str,
    *,
    perturbation_key: str = "perturbation",
    control: str = "non-targeting",
    context_key: str | None = None,
    batch_key: str | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    memory_limit: int | str | None = None,
) -> str:
    """Write the screen at ``source`` to the zarr store ``out`` with its cells
    in group order (:func:`group_order`), within ``memory_limit``
    (:func:`.io.reorder.write_reordered`).

    The groups are those of :func:`.aggregate.pseudobulk` with the same
    ``perturbation_key``, ``control``, ``context_key`` and ``batch_key``;
    pseudo-bulk the sorted store with the same options. Its results equal
    those of the source: the group sums are exact, and only the gene moments'
    float rounding (their block order) can differ.

    Returns
    -------
    str
        ``out``.
    """
    screen = open_screen(source, storage_options=storage_options)
    params = PseudobulkParams(perturbation_key=perturbation_key, control=control,
                              context_key=context_key, batch_key=batch_key)
    codes, groups, _ = groups_of(screen, params)
    order = group_order(codes)
    log.info("sort %s: %d cells into %d groups (by %s)", source, codes.size, len(groups),
             ", ".join(key for key in (context_key, perturbation_key, batch_key) if key))
    return write_reordered(source, order, out, overwrite=overwrite,
                           storage_options=storage_options, memory_limit=memory_limit)


def group_order(codes: np.ndarray) -> np.ndarray:
    """The cells by group code, each group's in their order (a stable sort);
    the cells in no group (negative codes) last."""
    last = np.iinfo(np.int64).max
    return np.argsort(np.where(codes >= 0, codes.astype(np.int64), last), kind="stable")
