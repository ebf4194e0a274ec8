"""The pseudo-bulk Dataset: per-perturbation means of log-normalised expression
over the highly-variable genes, the control mean, and ``delta``.

:func:`pseudobulk` runs the one streamed pass (:mod:`.reduce`) and
:func:`finalize` turns its statistics into an :class:`xarray.Dataset`; the
zarr encoding carries a type and version, checked by :func:`open_pseudobulk`.
"""

from __future__ import annotations

import json
import logging
import operator
import time
from dataclasses import asdict
from typing import Any, get_args

import anndata as ad
import dask.array as da
import dask.utils
from dask import delayed
import numpy as np
import pandas as pd
import scipy.sparse as sp
import xarray as xr

from .. import __version__

from . import kernels
from ..cluster import accumulator_rooms, cluster_threads, compute
from ..errors import ParameterError, StoreError, listing
from .hvg import (
    FLAVORS,
    Flavor,
    highly_variable_genes,
    mean_var,
    require_loess,
    seurat_v3_clip,
    seurat_v3_select,
)
from .groups import GroupTable, group_cells
from .knockdown import knockdown as knockdown_of, targets_of
from .labels import assign_groups
from .params import InputKindOption, PseudobulkParams
from .budget import PassPlan, plan_pass
from .reduce import SPLIT_EVERY, clipped_moments, pass_stats, slab_block_reads, slab_means
from ..io.interop import anndata_to_pseudobulk, pseudobulk_to_anndata
from ..io.screen import Screen, open_data
from ..io.encodings import PSEUDOBULK, open_checked
from ..io.store import wave_rows, write_dataset
from ..validate import (
    check_choice,
    NTopGenes,
    check_declared_input,
    check_exact_sum_range,
    check_min_cells,
    check_positive,
    resolve_n_top_genes,
)

log = logging.getLogger(__name__)

#: The per-gene moments of the pass (:data:`.kernels.MOMENTS`) each HVG flavor needs.
HVG_MOMENTS = {"seurat": ("normalized",), "cell_ranger": ("log1p",), "seurat_v3": ("raw",)}






def _sample_values(screen: Screen, sample_rows: int = 2000) -> np.ndarray:
    """The finite stored values of the first ``sample_rows`` cells (one small read)."""
    rows = min(sample_rows, screen.n_obs)
    with screen.naming_bad_chunks():
        block = screen.csr.read(0, rows) if screen.csr else screen.X[:rows].compute()
    data = block.data if sp.issparse(block) else np.asarray(block).ravel()
    return data[np.isfinite(data)]


def resolve_input_kind(screen: Screen, input: InputKindOption) -> kernels.InputKind:
    """The input kind: detected for ``"auto"``, else the declared one checked on a sample.

    Raises
    ------
    ParameterError
        If the sample contradicts the declared kind (counts given as log1p, or
        log1p data given as counts), or looks like neither.
    """
    if input == "auto":
        return detect_input_kind(screen)
    check_declared_input(input, _sample_values(screen), screen.source)
    return input


def detect_input_kind(screen: Screen, sample_rows: int = 2000) -> kernels.InputKind:
    """Tell raw counts from ``log1p`` data by the first ``sample_rows`` cells.

    Reads one small slice of ``X``. Integer values mean counts; non-integer
    values no larger than :data:`~.kernels.LOG1P_MAX` mean log1p-normalised data.

    Raises
    ------
    ParameterError
        If the values look like neither (normalised but not logged, say).
    """
    data = _sample_values(screen, sample_rows)
    if data.size == 0 or np.all(data == np.round(data)):
        return "counts"
    if data.max() <= kernels.LOG1P_MAX and data.min() >= 0:
        return "log1p"
    raise ParameterError(
        f"{screen.source}: X holds non-integer values up to {data.max():.3g}, "
        "neither raw counts nor log1p data; pass --input counts or --input log1p "
        "if you know which it is"
    )


def pseudobulk(
    data: Screen | str | ad.AnnData,
    *,
    perturbation_key: str = "perturbation",
    control: str = "non-targeting",
    n_top_genes: NTopGenes = "default",
    flavor: Flavor = "seurat",
    target_sum: float = 1e4,
    input: InputKindOption = "auto",
    min_cells: int = 1,
    group_variance: bool = True,
    obs_filter: str | None = None,
    layer: str | None = None,
    context_key: str | None = None,
    batch_key: str | None = None,
    knockdown: bool = True,
    min_knockdown: float | None = None,
    target_key: str | None = None,
    storage_options: dict[str, Any] | None = None,
    block_rows: int | None = None,
    memory_limit: int | str | None = None,
    split_every: int = SPLIT_EVERY,
    chains: int | None = None,
    as_xarray: bool = False,
    progress: bool = False,
) -> ad.AnnData | xr.Dataset:
    """Pseudo-bulk a screen: normalize + log1p, the HVGs scanpy selects, and
    the mean of every perturbation and of the control cells, in streamed passes.

    Parameters
    ----------
    data
        The screen: an AnnData (in memory with dense or sparse ``X``, backed,
        lazy or dask-backed), the path or URL of an AnnData zarr store or
        ``.h5ad``, or an opened :class:`Screen`. Every form is read in row
        blocks through the same kernels.
    perturbation_key
        ``obs`` column with the perturbation labels.
    control
        Label of control cells (they are not a row of the result).
    n_top_genes
        Highly-variable genes to keep; ``"all"`` (or ``None``) keeps all;
        ``"default"`` keeps :data:`~.validate.DEFAULT_N_TOP_GENES`, or all
        genes (with a warning) when there are fewer. An explicit number above
        the genes is an error.
    flavor
        scanpy HVG flavor: ``seurat``, ``cell_ranger`` or ``seurat_v3`` (raw
        counts only; a second pass, needs the ``seurat-v3`` extra).
    target_sum
        Counts per cell after normalization (ignored for ``log1p`` input).
    input
        ``counts`` (normalize + log1p), ``log1p`` (already log-normalised) or ``auto``.
    min_cells
        Perturbations with fewer cells are dropped (and listed in the log and attrs).
    group_variance
        Also compute per-perturbation variances (``var``, ``control_var``),
        which the t-test DE genes of the metrics need.
    obs_filter
        A boolean ``obs`` column: only its ``True`` cells count (``~COLUMN``:
        only its ``False`` ones), inside the same pass.
    layer
        Read ``layers[layer]`` (raw counts, say) instead of ``X``.
    context_key
        ``obs`` column of each cell's context (cell line, cell type): groups
        are (context, perturbation) pairs, each compared with the control
        cells of its own context; the genes are still selected over all cells.
    batch_key
        ``obs`` column of each cell's batch (GEM group, lane, replicate):
        controls are matched by batch (:mod:`.groups`).
    knockdown
        Measure each perturbation's knockdown of its target gene(s) (from its
        label, or ``target_key``), where they are measured (:mod:`.knockdown`);
        stored per row.
    min_knockdown
        Drop perturbations whose knockdown is below this (listed in the log
        and attrs; those without a measured target are kept).
    target_key
        ``obs`` column of each cell's target gene(s) (``A`` or ``A+B``), for
        the knockdown where the perturbation labels are guide names; every
        cell of a perturbation must name the same (:func:`group_targets`).
    storage_options
        fsspec options for URLs.
    block_rows
        Rows per block; by default sized from the store's chunking and ``memory_limit``.
    memory_limit
        Memory the pass may use (bytes or a string such as ``"2GiB"``); caps
        the default block size.
    split_every
        Inputs per combine task.
    chains
        Running group-sum accumulators at once (see :func:`.reduce.pass_stats`);
        default from :func:`.budget.plan_pass` (one per thread, as memory allows).
    as_xarray
        Return the :class:`xarray.Dataset` that the store holds instead of an AnnData.
    progress
        Show a progress bar (the command line does).

    Returns
    -------
    anndata.AnnData
        One row per perturbation and the control row (:func:`.io.interop.pseudobulk_to_anndata`):
        ``obs`` with the screen's labels (also the index), ``n_cells`` and
        ``is_control``; ``X`` the mean log-normalised expression over the
        selected genes; ``layers["delta"]``; ``var`` the selected genes with
        scanpy's HVG columns; ``uns["genepert_scale"]`` the parameters and input.
    xarray.Dataset
        With ``as_xarray``: dims ``perturbation`` and ``gene``; variables
        ``mean``, ``delta``, ``n_cells``, ``control_mean`` (and
        ``var``/``control_var``), plus the HVG table over all screen genes
        (dim ``screen_gene``: ``highly_variable`` and scanpy's columns
        prefixed ``hvg_``). Large outputs stay dask arrays until written.
    """
    check_choice("--flavor", flavor, FLAVORS)
    check_choice("--input", input, get_args(InputKindOption))
    if flavor == "seurat_v3":
        require_loess()  # before the pass, not after it
    threads = cluster_threads()
    if isinstance(memory_limit, str):
        try:
            memory_limit = dask.utils.parse_bytes(memory_limit)
        except ValueError as err:
            raise ParameterError(
                f"--memory-limit {memory_limit!r} is not a size; use e.g. 2GiB or 500MB"
            ) from err
    check_positive("--min-cells", min_cells, integer=True)
    check_positive("--target-sum", target_sum)
    screen = open_data(data, storage_options=storage_options, block_rows=block_rows,
                       memory_limit=memory_limit, threads=threads, layer=layer)
    params = PseudobulkParams(
        perturbation_key=perturbation_key, control=control,
        n_top_genes=resolve_n_top_genes(n_top_genes, screen.n_vars, screen.source),
        flavor=flavor, target_sum=target_sum, input=input, min_cells=min_cells,
        group_variance=group_variance, obs_filter=obs_filter, layer=layer,
        context_key=context_key, batch_key=batch_key, knockdown=knockdown,
        min_knockdown=min_knockdown, target_key=target_key,
    )
    kind = resolve_input_kind(screen, input)
    if flavor == "seurat_v3" and kind != "counts":
        raise ParameterError(
            f"{screen.source}: flavor seurat_v3 needs raw counts but the input is {kind}; "
            "use --flavor seurat or cell_ranger"
        )
    check_exact_sum_range(
        screen.n_obs, np.log1p(target_sum) if kind == "counts" else kernels.LOG1P_MAX, screen.source
    )
    codes, groups, left_out = groups_of(screen, params)
    log.info(
        "pseudobulk %s: %d cells x %d genes, %d groups, input %s, %d blocks of %d rows",
        screen.source, screen.n_obs, screen.n_vars, len(groups), kind,
        screen.X.numblocks[0], screen.X.chunks[0][0],
    )
    plan = plan_pass(len(groups), screen.n_vars, params.n_top_genes or screen.n_vars,
                     group_variance, accumulator_rooms(memory_limit, block_bytes=screen.block_bytes()))
    if chains:
        plan = PassPlan(chains, plan.slabs)
    log.info("pass plan: %s", plan.describe())
    one_pass = not plan.genes_first
    targets = targets_of(groups, list(screen.var_names), control,
                         group_targets(screen, codes, groups, target_key)) if knockdown else None
    graph = pass_stats(
        screen, codes if one_pass else np.minimum(codes, -1), len(groups) if one_pass else 1,
        kind=kind, target_sum=target_sum, with_group_sumsq=group_variance and one_pass,
        moments=HVG_MOMENTS[flavor], split_every=split_every,
        chains=plan.chains if one_pass else cluster_threads(),
        targets=targets, target_codes=codes,
    )
    stats = _timed_pass(graph, screen, "streamed pass" if one_pass else "moments pass", progress)
    _raise_on_bad_values(stats.check, screen, kind)
    n_cells = np.bincount(codes[codes >= 0], minlength=len(groups))
    perturbed = np.flatnonzero(~groups.is_control)
    check_min_cells(dict(zip(_row_names(groups, perturbed), n_cells[perturbed].tolist())),
                    min_cells, screen.source)
    hvg = select_genes(stats, screen, params, codes != kernels.NOT_COUNTED,
                       split_every=split_every, progress=progress)
    keep = hvg["highly_variable"].to_numpy()
    if one_pass:
        means, squares = kernels.slab_means(_selected_sums(stats, keep))
    else:
        means, squares = _group_means(screen, codes, plan, kernels.gene_columns(keep), kind,
                                      target_sum, group_variance, progress,
                                      n_controls=int(groups.is_control.sum()))
    knocked = None if targets is None else knockdown_of(stats.target_sums, targets, groups,
                                                         n_cells)
    ds = finalize(means, squares, n_cells, groups, hvg, params, kind=kind, left_out=left_out,
                  knockdown=knocked)
    ds.attrs["source"] = screen.source
    ds.attrs["n_obs"] = screen.n_obs
    ds.attrs["n_vars"] = screen.n_vars
    return ds if as_xarray else pseudobulk_to_anndata(ds, perturbation_key=perturbation_key)


def groups_of(screen: Screen, params: PseudobulkParams
               ) -> tuple[np.ndarray, GroupTable, dict[str, int]]:
    """Each cell's group (:func:`.groups.group_cells`), the groups, and the
    cells left out of every group, by reason (see :func:`_leave_out_cells`)."""
    labels = screen.obs_column(params.perturbation_key)
    codes, names = assign_groups(labels.array, params.control, column=params.perturbation_key)
    left_out = _leave_out_cells(codes, screen, params.obs_filter, params.perturbation_key)
    context, batch = (screen.obs_column(key, option=option) if key else None for key, option in
                      ((params.context_key, "--context-key"), (params.batch_key, "--batch-key")))
    counted = codes >= 0
    codes, groups = group_cells(codes, names, context, batch)
    if context is not None or batch is not None:
        left_out["no_context_or_batch"] = missing = int(np.count_nonzero(counted & (codes < 0)))
        if missing:
            log.warning("%d of %d cells have no context or batch and are left out",
                        missing, codes.size)
    return codes, groups, left_out


def group_targets(screen: Screen, codes: np.ndarray, groups: GroupTable,
                  target_key: str | None) -> np.ndarray | None:
    """Each group's target label (``A``, ``A+B``) from the ``obs`` column
    ``target_key`` (``""`` for control groups and groups without cells or a
    value); ``None`` without a column (the targets are then read from the
    perturbation labels).

    Raises
    ------
    ParameterError
        If the cells of one group name different targets.
    """
    if target_key is None:
        return None
    values, names = pd.factorize(screen.obs_column(target_key, option="--target-key"))
    counted = np.flatnonzero(codes >= 0)
    first = np.full(len(groups), -1)
    first[codes[counted[::-1]]] = counted[::-1]  # each group's first cell
    differ = values[counted] != values[first[codes[counted]]]
    if differ.any():
        cell = counted[np.argmax(differ)]
        group, other = codes[cell], first[codes[cell]]
        named = [str(names[v]) if v >= 0 else "(missing)" for v in (values[other], values[cell])]
        raise ParameterError(
            f"{screen.source}: --target-key {target_key}: the cells of "
            f"{_row_names(groups, np.array([group]))[0]} name different targets "
            f"({named[0]!r}, {named[1]!r}); give a column with one target per perturbation"
        )
    held = (first >= 0) & ~groups.is_control
    target = np.where(held, values[np.maximum(first, 0)], -1)
    return np.array([str(names[v]) if v >= 0 else "" for v in target], dtype=object)


def kept_by_filter(screen: Screen, obs_filter: str | None) -> np.ndarray | None:
    """The cells that ``obs_filter`` keeps (``COLUMN``: where the boolean
    ``obs`` column is True; ``~COLUMN``: False); ``None`` without a filter.

    Raises
    ------
    ParameterError
        If the column holds anything but True/False for every cell.
    """
    if not obs_filter:
        return None
    column = obs_filter.removeprefix("~")
    values = screen.obs_column(column, option="--obs-filter")
    if not (pd.api.types.is_bool_dtype(values) and not values.isna().any()):
        raise ParameterError(
            f"{screen.source}: --obs-filter {obs_filter}: obs[{column!r}] holds "
            f"{values.dtype} values, not True/False for every cell; give a boolean column"
        )
    return values.to_numpy(dtype=bool) != obs_filter.startswith("~")


def _leave_out_cells(codes: np.ndarray, screen: Screen, obs_filter: str | None,
                     perturbation_key: str) -> dict[str, int]:
    """Take the cells that the ``obs_filter`` rejects out of every group and
    every gene moment (:data:`.kernels.NOT_COUNTED`, in place); return how
    many cells were left out of the groups and why (``no_label``: no
    perturbation label, though they count in the gene moments; ``filtered``),
    each logged."""
    left_out = {"no_label": 0, "filtered": 0}
    keep = kept_by_filter(screen, obs_filter)
    if keep is not None:
        left_out["filtered"] = int(np.count_nonzero(~keep))
        codes[~keep] = kernels.NOT_COUNTED
    left_out["no_label"] = int(np.count_nonzero(codes == -1))
    for reason, what in (("no_label", f"have no label in obs[{perturbation_key!r}]"),
                         ("filtered", f"are rejected by --obs-filter {obs_filter}")):
        if left_out[reason]:
            log.warning("%d of %d cells %s and are left out", left_out[reason], codes.size, what)
    return left_out


def _selected_sums(stats: kernels.PassStats, keep: np.ndarray) -> kernels.PassStats:
    """``stats`` with its group sums restricted to the genes ``keep`` (the
    ``(groups × all genes)`` sums are released)."""
    stats.group_sum = stats.group_sum[:, keep]
    if stats.group_sumsq is not None:
        stats.group_sumsq = stats.group_sumsq[:, keep]
    return stats


def _group_means(
    screen: Screen,
    codes: np.ndarray,
    plan: PassPlan,
    gene_map: np.ndarray,
    kind: kernels.InputKind,
    target_sum: float,
    group_variance: bool,
    progress: bool,
    n_controls: int = 0,
) -> tuple[Any, Any]:
    """Group means (and mean squares) over the genes of ``gene_map``, by the
    slabs of ``plan`` (:func:`.reduce.slab_means`), as dask arrays.

    One slab is computed here, then cut into the row chunks the output is
    stored in (:func:`.io.store.wave_rows`), counted from the first
    perturbation: the ``n_controls`` control groups, which come first
    (:mod:`.groups`), are a chunk of their own. Its outputs (rows taken,
    delta) are computed from these chunks as they are written, each stored
    chunk once. Several slabs stay lazy, a chunk per slab, computed as the
    output is written, a few slabs at a time (:func:`write_pseudobulk`): the
    whole ``(groups × genes)`` output is never in memory.
    """
    one_slab = len(plan.slabs) == 1
    parts = slab_means(screen, codes, plan.slabs, gene_map, kind=kind, target_sum=target_sum,
                       with_group_sumsq=group_variance, chains=plan.chains if one_slab else 1,
                       concurrent=1 if one_slab else plan.chains)
    n_selected = int(gene_map.max()) + 1
    if one_slab:
        means, squares = _timed_pass(parts, screen, "group-sum pass", progress)[0]
        rows = wave_rows(means[0].nbytes)
        edges = [0, n_controls, *range(n_controls + rows, means.shape[0], rows), means.shape[0]]
        chunks = (tuple(int(n) for n in np.diff(edges) if n), n_selected)
        return (da.from_array(means, chunks=chunks),
                None if squares is None else da.from_array(squares, chunks=chunks))

    _log_slab_reads(screen, codes, plan)
    first = _timed_pass(parts[:1], screen, "group-sum pass of the first slab (the controls)",
                        progress)[0]

    def stacked(item: int) -> da.Array:
        slabs = [da.from_delayed(delayed(operator.getitem, pure=True)(part, item),
                                 (stop - start, n_selected), np.float64)
                 for part, (start, stop) in zip(parts[1:], plan.slabs[1:])]
        # a chunk per slab: written a few slabs at a time (write_pseudobulk)
        return da.concatenate([da.from_array(first[item], chunks=first[item].shape), *slabs])

    log.info("group sums in %d slabs: the first computed, the others as the output is written",
             len(plan.slabs))
    return stacked(0), stacked(1) if group_variance else None


def _log_slab_reads(screen: Screen, codes: np.ndarray, plan: PassPlan) -> None:
    """Log how many blocks the slabs of ``plan`` read in all; warn, with the
    remedy, where the cells are not in group order (in group order, each
    slab boundary adds at most one read of a block)."""
    n_blocks, n_slabs = screen.X.numblocks[0], len(plan.slabs)
    reads = slab_block_reads(codes, plan.slabs, np.cumsum((0, *screen.X.chunks[0])))
    log.info("the %d group slabs read %d blocks in all; the screen has %d",
             n_slabs, reads, n_blocks)
    if reads > 2 * (n_blocks + n_slabs):
        log.warning(
            "%s: the cells are not in group order, so the %d group slabs read the screen "
            "%.1f times; 'genepert-scale sort' (with this run's --perturbation-key, --control, "
            "--context-key and --batch-key) writes it in group order once, after which they "
            "read it about once", screen.source, n_slabs, reads / n_blocks)


def _timed_pass(graph: Any, screen: Screen, label: str, progress: bool) -> Any:
    """Compute a pass over ``screen``, naming any bad chunk, and log its speed."""
    start = time.perf_counter()
    with screen.naming_bad_chunks():
        result = compute(graph, label=label, progress=progress)
    seconds = max(time.perf_counter() - start, 1e-9)
    log.info("%s: %d cells in %.1f s (%.0f cells/s)", label, screen.n_obs, seconds,
             screen.n_obs / seconds)
    return result


def select_genes(
    stats: kernels.PassStats,
    screen: Screen,
    params: PseudobulkParams,
    counted: np.ndarray,
    *,
    split_every: int = SPLIT_EVERY,
    progress: bool = True,
) -> pd.DataFrame:
    """The HVG table of the screen's genes (scanpy's ``var`` columns).

    ``seurat`` and ``cell_ranger`` use the moments of the pass; ``seurat_v3``
    runs a second pass for the clipped variance, over the ``counted`` cells.
    """
    n_top = params.n_top_genes
    (moment,) = HVG_MOMENTS[params.flavor]
    total, squares = (getattr(stats, name) for name in kernels.MOMENTS[moment])
    if total is None:
        raise ValueError(f"flavor {params.flavor} selects genes from the {moment!r} moments; "
                         f"compute the pass with moments={HVG_MOMENTS[params.flavor]}")
    mean, var = mean_var(total, squares, stats.n_cells)
    if params.flavor != "seurat_v3":
        return highly_variable_genes(mean, var, flavor=params.flavor, n_top_genes=n_top,
                                     gene_names=screen.var_names)
    reg_std, clip = seurat_v3_clip(mean, var, stats.n_cells)
    clipped = _timed_pass(clipped_moments(screen, clip, counted, split_every=split_every), screen,
                          "seurat_v3 clipped pass", progress)
    return seurat_v3_select(mean, var, reg_std, *clipped, stats.n_cells, n_top_genes=n_top,
                            gene_names=screen.var_names)


def _raise_on_bad_values(check: kernels.ValueCheck, screen: Screen, kind: str) -> None:
    rows = np.cumsum((0, *screen.X.chunks[0]))
    problems = {  # a corrupt store first: its other counts may be its symptoms
        "bad_index": (
            f"stored values or rows outside the matrix (gene indices outside 0-"
            f"{screen.n_vars - 1} in X/indices, or row offsets in X/indptr out of order "
            "or beyond X/data)",
            "the store is corrupt; write it again from its source",
        ),
        "nonfinite": ("NaN or infinite values", "remove or fix those cells"),
        "negative": ("negative values", "expression must be counts or log1p data"),
        "noninteger": (
            "non-integer values although raw counts were declared",
            "pass --input log1p if X is log-normalised",
        ),
        "too_large": (
            f"values above {kernels.LOG1P_MAX:g} although log1p data was declared",
            "pass --input counts if X holds raw counts",
        ),
    }
    for key, (what, todo) in problems.items():
        count = getattr(check, key)
        if count:
            block = (check.first_block or {})[key]
            raise StoreError(
                f"{screen.source}: X has {count} {what} (first in rows "
                f"{rows[block]}-{rows[block + 1] - 1}, block {block}, input {kind}); {todo}"
            )


def finalize(
    means: np.ndarray | da.Array,
    squares: np.ndarray | da.Array | None,
    n_cells: np.ndarray,
    groups: GroupTable,
    hvg: pd.DataFrame,
    params: PseudobulkParams,
    *,
    kind: kernels.InputKind,
    left_out: dict[str, int] | None = None,
    knockdown: np.ndarray | None = None,
) -> xr.Dataset:
    """The *finalize* step: group means over the selected genes, delta, as a Dataset.

    Parameters
    ----------
    means
        Mean ``log1p`` expression of every group over the selected genes,
        ``(groups, selected genes)`` (:func:`.kernels.slab_means`).
    squares
        Mean squares of the same, or ``None`` without group variances; they
        are turned into variances in place.
    n_cells
        Cells per group.
    groups
        The groups (:func:`.groups.group_cells`): which are controls, and
        which control groups each is compared with.
    hvg
        HVG table indexed by every screen gene, with a ``highly_variable`` column.
    params
        The run's parameters (recorded in attrs).
    kind
        The input kind that was used.
    left_out
        Cells that counted in no group, by reason; the cells of dropped
        perturbations are added (``dropped_perturbations``) and the whole
        recorded in attrs (``left_out_cells``).
    knockdown
        Each group's knockdown (:mod:`.knockdown`), stored per row; rows
        below ``params.min_knockdown`` are dropped.

    Notes
    -----
    ``delta`` of a row is its mean minus its reference, the control groups
    weighted by :attr:`.GroupTable.reference` (its context's control, per
    batch); ``control_mean`` is each context's pooled control. With one
    control group the weights are ones, and ``delta`` is ``mean - control_mean``
    exactly.
    """
    n = n_cells
    keep = hvg["highly_variable"].to_numpy()
    controls = np.flatnonzero(groups.is_control)
    perturbed = ~groups.is_control
    small = _row_names(groups, np.flatnonzero(perturbed & (n < params.min_cells)))
    if small:
        log.warning("dropping %d perturbations with fewer than %d cells: %s",
                    len(small), params.min_cells, listing(small, 20))
    left_out = {**(left_out or {}),
                "dropped_perturbations": int(n[perturbed & (n < params.min_cells)].sum())}
    rows = np.flatnonzero(perturbed & (n >= params.min_cells))
    rows, weak = _knocked_down(rows, knockdown, params.min_knockdown)
    if weak.size:
        left_out["low_knockdown"] = int(n[weak].sum())
        log.warning("dropping %d perturbations with knockdown below %g: %s", weak.size,
                    params.min_knockdown, listing(_row_names(groups, weak), 20))
    pooled = groups.reference[[controls[groups.context[controls] == c][0]
                               for c in groups.contexts]][:, controls]
    n_controls = pooled.astype(bool) @ n[controls]
    control_means = _in_memory(_take_rows(means, controls))
    context_means = pooled @ control_means
    selected = _take_rows(means, rows)
    per_context = "context" if params.context_key else None
    data_vars = {
        "mean": (("perturbation", "gene"), selected),
        "delta": (("perturbation", "gene"),
                  _minus_weighted(selected, groups.reference[rows][:, controls], control_means)),
        "n_cells": ("perturbation", n[rows]),
        **({} if knockdown is None else {"knockdown": ("perturbation", knockdown[rows])}),
        **_per_context({"control_mean": context_means,
                        "n_control_cells": n_controls}, per_context),
        "highly_variable": ("screen_gene", keep),
        **{
            f"hvg_{column}": ("screen_gene", hvg[column].to_numpy(dtype=np.float64))
            for column in hvg.columns
            if column != "highly_variable"
        },
    }
    if squares is not None:  # the controls' pooled squares first: variances are made in place
        control_var = _pooled_variance(pooled, _in_memory(_take_rows(squares, controls)),
                                       context_means, n_controls)
        data_vars["var"] = (("perturbation", "gene"),
                            _take_rows(_group_variance(squares, means, n), rows))
        data_vars.update(_per_context({"control_var": control_var}, per_context))
    attrs = {
        **PSEUDOBULK.attrs(),
        "genepert_scale_version": __version__,
        "parameters": json.dumps(asdict(params)),
        "input_kind": kind,
        "control": params.control,
        "dropped_perturbations": json.dumps(small),
        "low_knockdown_perturbations": json.dumps(_row_names(groups, weak)),
        "left_out_cells": json.dumps(left_out),
        "batches_without_controls": json.dumps([list(pair) for pair in groups.unmatched]),
    }
    coords = {
        "perturbation": groups.perturbation[rows],
        "gene": np.asarray(hvg.index[keep], dtype=object),
        "screen_gene": np.asarray(hvg.index, dtype=object),
    }
    if per_context:
        coords["context"] = ("perturbation", groups.context[rows])
        coords[CONTROL_CONTEXT] = np.asarray(groups.contexts, dtype=object)
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _knocked_down(rows: np.ndarray, knockdown: np.ndarray | None,
                  min_knockdown: float | None) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` without those whose knockdown is below ``min_knockdown``, and those."""
    if knockdown is None or min_knockdown is None:
        return rows, rows[:0]
    weak = knockdown[rows] < min_knockdown  # NaN: no measured target, kept
    return rows[~weak], rows[weak]


#: The dimension of per-context control statistics (``control_mean`` and
#: ``n_control_cells`` of a store with contexts); each row's is its ``context``.
CONTROL_CONTEXT = "control_context"


def _per_context(variables: dict[str, Any], per_context: str | None) -> dict[str, tuple]:
    """Per-context variables as the store holds them: over :data:`CONTROL_CONTEXT`
    with contexts, else the one context's (a gene vector, a count)."""
    out = {}
    for name, value in variables.items():
        extra = tuple(["gene"] if getattr(value, "ndim", 0) == 2 else [])
        out[name] = ((CONTROL_CONTEXT, *extra), value) if per_context else (
            extra, value[0] if extra else int(value[0]))
    return out


def _row_names(groups: GroupTable, rows: np.ndarray) -> list[str]:
    """Names of groups for messages: ``CONTEXT/PERTURBATION`` with contexts."""
    return [f"{groups.context[g]}/{groups.perturbation[g]}" if groups.context[g]
            else str(groups.perturbation[g]) for g in rows]


def _in_memory(rows: np.ndarray | da.Array) -> np.ndarray:
    """The control groups' rows as numpy: they are in the first slab, which
    :func:`_group_means` computes before the others (a slice of it, no pass)."""
    return rows.compute() if isinstance(rows, da.Array) else rows


def _minus_weighted(rows: np.ndarray | da.Array, weights: sp.csr_matrix,
                    values: np.ndarray) -> np.ndarray | da.Array:
    """``rows - weights @ values``, block by block for a dask ``rows``."""
    if not isinstance(rows, da.Array):
        return rows - weights @ values

    def block(part: np.ndarray, block_info=None) -> np.ndarray:
        first, last = block_info[0]["array-location"][0]
        return part - weights[first:last] @ values

    return da.map_blocks(block, rows, dtype=np.float64)


def _group_variance(squares, means, n: np.ndarray):
    """Every group's variance from its mean squares (in place for numpy)."""
    factor = (n / np.maximum(n - 1, 1))[:, None]
    if isinstance(squares, da.Array):
        return da.map_blocks(_variance_of_copy, squares, means,
                             da.from_array(factor, chunks=(squares.chunks[0], 1)),
                             dtype=np.float64)
    return _variance(squares, means, factor)


def _pooled_variance(pooled: sp.csr_matrix, control_squares: np.ndarray,
                     context_means: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Each context's control variance, from its control groups' mean squares
    pooled by cells (taken before they become variances)."""
    factor = (n / np.maximum(n - 1, 1))[:, None]
    return _variance(pooled @ control_squares, context_means, factor)


def _variance(squares: np.ndarray, means: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Group variances from mean squares, written over ``squares``:
    E[x²] − mean², clipped at 0, times ``factor`` = n/(n−1) per group."""
    squares -= np.square(means)
    np.maximum(squares, 0, out=squares)
    squares *= factor
    return squares


def _variance_of_copy(squares: np.ndarray, means: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """:func:`_variance` of a block, leaving dask's input block as it is."""
    return _variance(squares.copy(), means, factor)


def _take_rows(matrix: np.ndarray | da.Array, rows: np.ndarray) -> np.ndarray | da.Array:
    """``matrix[rows]``, as a view when ``rows`` is a contiguous range (a dask
    array keeps a chunk for each of its chunks)."""
    if rows.size and rows[-1] - rows[0] + 1 == rows.size:
        return matrix[rows[0] : rows[-1] + 1]
    return matrix[rows]


def write_pseudobulk(
    ds: xr.Dataset,
    path: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write a pseudo-bulk Dataset to a zarr store, atomically; a lazy one
    (group slabs) as many slabs at a time as there are threads, each slab's
    rows written before the next slabs are computed."""
    write_dataset(ds, path, overwrite=overwrite, storage_options=storage_options,
                  chunks_at_once=cluster_threads())
    log.info("wrote pseudo-bulk %s (%d perturbations x %d genes)",
             path, ds.sizes["perturbation"], ds.sizes["gene"])
    return path


def one_context(ds: xr.Dataset, context: str | None = None,
                source: str = "the pseudo-bulk") -> xr.Dataset:
    """The rows of one ``context`` of a store with contexts, in the layout of
    a store without (``control_mean`` over genes, ``attrs["context"]``);
    a store without contexts as it is.

    Raises
    ------
    ParameterError
        If the store has several contexts and none (or an unknown one) is
        given, or a context is given for a store without contexts.
    """
    if CONTROL_CONTEXT not in ds.dims:
        if context is not None:
            raise ParameterError(f"{source} has no contexts (it was made without "
                                 "--context-key); drop --context")
        return ds
    contexts = context_names(ds)
    if context not in contexts:
        asked = "none was chosen" if context is None else f"not {context!r}"
        raise ParameterError(f"{source} holds the contexts {listing(contexts, 20)}, {asked}; "
                             "model one context at a time with --context NAME")
    rows = np.flatnonzero(ds["context"].values == context)
    one = ds.isel(perturbation=rows).sel({CONTROL_CONTEXT: context})
    return one.drop_vars([CONTROL_CONTEXT, "context"]).assign_attrs(context=context)


def context_names(ds: xr.Dataset) -> list[str]:
    """The contexts of a store made with ``--context-key`` (those with a
    control mean, :data:`CONTROL_CONTEXT`); none for a store without."""
    return [str(c) for c in ds[CONTROL_CONTEXT].values] if CONTROL_CONTEXT in ds.dims else []


def pseudobulk_store(data: xr.Dataset | ad.AnnData | str,
                     storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """The Dataset of a pseudo-bulk, its contexts kept, from a store's path,
    a Dataset or the AnnData form (which holds one context)."""
    if isinstance(data, ad.AnnData):
        return anndata_to_pseudobulk(data)
    return open_pseudobulk(data, storage_options) if isinstance(data, str) else data


def pseudobulk_dataset(data: xr.Dataset | ad.AnnData | str,
                       storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """The one-context Dataset that models read (:func:`pseudobulk_store`,
    :func:`one_context`)."""
    return one_context(pseudobulk_store(data, storage_options))


def open_pseudobulk(path: str, storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """Open a pseudo-bulk store (lazily), checking its encoding type and version."""
    return open_checked(PSEUDOBULK, path, storage_options)
