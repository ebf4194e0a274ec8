"""How a pass fits its memory budget, for any number of groups and genes.

The pass's only object that grows with the groups is its fixed-point group
sums. :func:`plan_pass` chooses, from the memory each worker (or this
machine) gives and the threads that compute:

1. **one pass over all genes** (moments and group sums together, one running
   accumulator per thread, :func:`.reduce.pass_stats`) while the
   ``(groups × all genes)`` sums of every chain stay within
   :data:`ONE_PASS_BYTES` and the budget: the fastest plan;
2. **genes first**: a moments pass selects the genes, then the group sums
   are taken over the selected genes only, in one pass with as many chains
   as fit, while the whole output (means and delta) fits too;
3. **group slabs**: otherwise the groups are cut into slabs, one pass each,
   a slab per thread at a time (:func:`.reduce.slab_means`), and the output
   is computed as it is written. A slab is sized so that every thread's,
   and the first slab (the controls, held until it is written), fit from
   their sums to their outputs (:func:`slab_bytes`).

What the accumulators may take (:class:`.cluster.Room`) is half the memory
limit, and no more than the limit leaves beside what the process holds
before the pass (its libraries, the screen's metadata) and a block in
flight per thread.

Group sums are exact integers, so every plan gives the same result, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dask.utils

from ..cluster import ACCUMULATOR_MEMORY_SHARE, Room
from ..errors import ParameterError
from . import kernels

#: The most bytes that one-pass accumulators may take together: beyond this,
#: the genes are selected first, so that raw-size screens (tens of thousands
#: of genes) do not hold a sum for every gene of every group.
ONE_PASS_BYTES = 2**30


@dataclass(frozen=True)
class PassPlan:
    """How a pass runs.

    Attributes
    ----------
    chains
        Accumulators folding at once.
    slabs
        ``None``: one pass over all genes. Else the ``(first, stop)`` ranges
        of group codes of the group-sum passes over the selected genes (one
        range: genes first, in ``chains`` chains; several: one chain each,
        ``chains`` slabs at a time).
    """

    chains: int
    slabs: tuple[tuple[int, int], ...] | None = None

    @property
    def genes_first(self) -> bool:
        return self.slabs is not None

    def describe(self) -> str:
        if self.slabs is None:
            return f"one pass over all genes, {self.chains} chains"
        if len(self.slabs) == 1:
            return f"genes first, then group sums over the selected genes in {self.chains} chains"
        return (f"genes first, then group sums over the selected genes in {len(self.slabs)} "
                f"slabs of up to {self.slabs[0][1] - self.slabs[0][0]} groups, "
                f"{self.chains} at a time")


def plan_pass(
    n_groups: int,
    n_genes: int,
    n_selected: int,
    with_group_sumsq: bool,
    rooms: list[Room],
) -> PassPlan:
    """The plan of a pass (see the module's docstring).

    Parameters
    ----------
    n_groups
        Groups of the pass (perturbations and the control).
    n_genes, n_selected
        All genes of the screen, and the genes that will be selected.
    with_group_sumsq
        Whether group sums of squares are kept too.
    rooms
        What each worker (or this machine, alone) can hold.

    Raises
    ------
    ParameterError
        If one thread's share cannot hold the sums of even one group over the
        selected genes; the message says which memory limit would do.
    """
    def chains(n_rows: int, n_columns: int) -> int:
        size = max(kernels.accumulator_bytes(n_rows, n_columns, with_group_sumsq), 1)
        return sum(min(room.threads, room.bytes // size) for room in rooms)

    one_pass = chains(n_groups, n_genes)
    one_pass_bytes = one_pass * kernels.accumulator_bytes(n_groups, n_genes, with_group_sumsq)
    if one_pass >= 1 and (one_pass_bytes <= ONE_PASS_BYTES or n_genes <= n_selected):
        return PassPlan(one_pass)
    genes_first = chains(n_groups, n_selected)
    # the whole output in memory: means (and mean squares) in their sums' memory, and delta
    in_memory = (kernels.accumulator_bytes(n_groups, n_selected, with_group_sumsq)
                 + kernels.accumulator_bytes(n_groups, n_selected, False))
    if genes_first >= 1 and in_memory <= min(room.bytes for room in rooms):
        return PassPlan(genes_first, ((0, n_groups),))
    per_group = slab_bytes(1, n_selected, with_group_sumsq)
    # every thread's slab, and the first slab (the controls), held until it is written
    per_slab = min(room.bytes // (room.threads + 1) for room in rooms)
    if per_slab < per_group:
        raise ParameterError(
            f"the memory limit leaves {dask.utils.format_bytes(per_slab)} per slab of group "
            f"sums, less than one group over {n_selected} genes needs "
            f"({dask.utils.format_bytes(per_group)}); raise --memory-limit (to at least "
            f"{dask.utils.format_bytes(_limit_for(per_group, rooms))} per worker), "
            "or select fewer genes with --n-top-genes"
        )
    slabs = math.ceil(n_groups / (per_slab // per_group))
    size = math.ceil(n_groups / slabs)
    ranges = tuple((first, min(first + size, n_groups)) for first in range(0, n_groups, size))
    threads = sum(room.threads for room in rooms)
    return PassPlan(min(len(ranges), threads), ranges)


def slab_bytes(n_groups: int, n_selected: int, with_group_sumsq: bool) -> int:
    """Memory of a slab of groups from its pass to its write: the fixed-point
    sums, then the means (and mean squares) made in their place, and the
    delta (and variances) computed from them as they are written."""
    return 2 * kernels.accumulator_bytes(n_groups, n_selected, with_group_sumsq)


def _limit_for(per_group: int, rooms: list[Room]) -> int:
    """The memory limit at which every room holds a slab of one group per
    thread and the first slab, beside what it holds already."""
    return max(math.ceil(max((room.threads + 1) * per_group / ACCUMULATOR_MEMORY_SHARE,
                             room.held + (room.threads + 1) * per_group))
               for room in rooms)
