"""The pseudo-bulk Dataset: per-perturbation means of log-normalised expression
over the highly-variable genes, the control mean, and ``delta``.

:func:`pseudobulk` runs the one streamed pass (:mod:`.reduce`) and
:func:`finalize` turns its statistics into an :class:`xarray.Dataset`; the
zarr encoding carries a type and version, checked by :func:`open_pseudobulk`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import dask.utils
import numpy as np
import pandas as pd
import scipy.sparse as sp
import xarray as xr

from . import __version__, kernels
from .cluster import cluster_threads, compute
from .errors import LabelError, ParameterError, StoreError
from .hvg import Flavor, highly_variable_genes, mean_var
from .labels import assign_groups
from .reduce import SPLIT_EVERY, pass_stats
from .screen import Screen, open_screen
from .store import atomic_output, compressors, quiet_zarr_warnings, zarr_store

log = logging.getLogger(__name__)

ENCODING_TYPE = "genepert_scale.pseudobulk"
ENCODING_VERSION = "0.1.0"

InputKindOption = Literal["auto", "counts", "log1p"]


@dataclass(frozen=True)
class PseudobulkParams:
    """Parameters of a pseudo-bulk run, recorded in the output's attrs."""

    perturbation_key: str = "perturbation"
    control: str = "non-targeting"
    n_top_genes: int | None = 5000
    flavor: Flavor = "seurat"
    target_sum: float = 1e4
    input: InputKindOption = "auto"
    min_cells: int = 1
    group_variance: bool = False


def detect_input_kind(screen: Screen, sample_rows: int = 2000) -> kernels.InputKind:
    """Tell raw counts from ``log1p`` data by the first ``sample_rows`` cells.

    Reads one small slice of ``X``. Integer values mean counts; non-integer
    values no larger than 30 mean log1p-normalised data.

    Raises
    ------
    ParameterError
        If the values look like neither (normalised but not logged, say).
    """
    x_group = screen.group["X"]
    rows = min(sample_rows, screen.n_obs)
    if x_group.attrs.get("encoding-type") == "csr_matrix":  # read the first rows' values, not a whole block
        data = np.asarray(x_group["data"][: int(x_group["indptr"][rows])])
    else:
        data = np.asarray(screen.X[:rows].compute()).ravel()
    data = data[np.isfinite(data)]
    if data.size == 0 or np.all(data == np.round(data)):
        return "counts"
    if data.max() <= 30 and data.min() >= 0:
        return "log1p"
    raise ParameterError(
        f"{screen.source}: X holds non-integer values up to {data.max():.3g}, "
        "neither raw counts nor log1p data; pass --input counts or --input log1p "
        "if you know which it is"
    )


def pseudobulk(
    screen: Screen | str,
    *,
    perturbation_key: str = "perturbation",
    control: str = "non-targeting",
    n_top_genes: int | None = 5000,
    flavor: Flavor = "seurat",
    target_sum: float = 1e4,
    input: InputKindOption = "auto",
    min_cells: int = 1,
    group_variance: bool = False,
    storage_options: dict[str, Any] | None = None,
    block_rows: int | None = None,
    memory_limit: int | str | None = None,
    split_every: int = SPLIT_EVERY,
    chains: int | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """Pseudo-bulk a screen in one streamed pass.

    Parameters
    ----------
    screen
        An opened :class:`Screen`, or the path/URL of an AnnData zarr store or ``.h5ad``.
    perturbation_key
        ``obs`` column with the perturbation labels.
    control
        Label of control cells (they are not a row of the result).
    n_top_genes
        Highly-variable genes to keep; ``None`` (or more than there are) keeps all.
    flavor
        scanpy HVG flavor, ``seurat`` or ``cell_ranger``.
    target_sum
        Counts per cell after normalization (ignored for ``log1p`` input).
    input
        ``counts`` (normalize + log1p), ``log1p`` (already log-normalised) or ``auto``.
    min_cells
        Perturbations with fewer cells are dropped (and listed in the log and attrs).
    group_variance
        Also compute per-perturbation variances (``var``, ``control_var``).
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
        Running ``(groups × genes)`` accumulators (see :func:`.reduce.pass_stats`);
        default one per 8 threads of the cluster, at least one.
    progress
        Show a progress bar.

    Returns
    -------
    xarray.Dataset
        Dims ``perturbation`` and ``gene``; variables ``mean``, ``delta``,
        ``n_cells``, ``control_mean`` (and ``var``/``control_var``), plus the
        HVG table over all screen genes (dim ``screen_gene``).
    """
    threads = cluster_threads()
    if isinstance(memory_limit, str):
        memory_limit = dask.utils.parse_bytes(memory_limit)
    if isinstance(screen, str):
        screen = open_screen(screen, storage_options=storage_options, block_rows=block_rows,
                             memory_limit=memory_limit, threads=threads)
    if min_cells < 1:
        raise ParameterError(f"min_cells must be at least 1, got {min_cells}")
    params = PseudobulkParams(
        perturbation_key, control, n_top_genes, flavor, target_sum, input, min_cells,
        group_variance,
    )
    kind = detect_input_kind(screen) if input == "auto" else input
    labels = screen.obs_column(perturbation_key)
    codes, groups = assign_groups(labels.array, control, column=perturbation_key)
    log.info(
        "pseudobulk %s: %d cells x %d genes, %d groups, input %s, %d blocks of %d rows",
        screen.source, screen.n_obs, screen.n_vars, len(groups), kind,
        screen.X.numblocks[0], screen.X.chunks[0][0],
    )
    graph = pass_stats(
        screen, codes, len(groups), kind=kind, target_sum=target_sum,
        with_group_sumsq=group_variance, split_every=split_every,
        chains=chains or max(1, threads // 8),
    )
    start = time.perf_counter()
    stats = compute(graph, label="streamed pass", progress=progress)
    seconds = time.perf_counter() - start
    log.info("streamed pass: %.0f cells/s", screen.n_obs / max(seconds, 1e-9))
    _raise_on_bad_values(stats.check, screen, kind)
    ds = finalize(stats, groups, screen.var_names, params, kind=kind)
    ds.attrs["source"] = screen.source
    ds.attrs["n_obs"] = screen.n_obs
    ds.attrs["n_vars"] = screen.n_vars
    return ds


def _raise_on_bad_values(check: kernels.ValueCheck, screen: Screen, kind: str) -> None:
    rows = np.cumsum((0, *screen.X.chunks[0]))
    problems = {
        "nonfinite": ("NaN or infinite values", "remove or fix those cells"),
        "negative": ("negative values", "expression must be counts or log1p data"),
        "noninteger": (
            "non-integer values although raw counts were declared",
            "pass --input log1p if X is log-normalised",
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
    stats: kernels.PassStats,
    groups: list[str],
    var_names: pd.Index,
    params: PseudobulkParams,
    *,
    kind: kernels.InputKind,
) -> xr.Dataset:
    """The *finalize* step: means, HVG selection, delta, as a Dataset.

    The dense group sums of ``stats`` are released (set to ``None``) once the
    selected genes are copied out, so that at genome-wide scale the full
    ``(groups, genes)`` matrix and the outputs are not held at the same time.
    """
    if stats.group_n[0] == 0:
        raise LabelError(f"no control cells ({params.control!r}) in the screen")
    moments = (
        (stats.gene_sum, stats.gene_sumsq)
        if params.flavor == "seurat"
        else (stats.gene_log_sum, stats.gene_log_sumsq)
    )
    hvg = highly_variable_genes(
        *mean_var(*moments, stats.n_cells),
        flavor=params.flavor,
        n_top_genes=params.n_top_genes,
        gene_names=var_names,
    )
    keep = hvg["highly_variable"].to_numpy()
    n = stats.group_n
    means = _dense_rows(stats.group_sum)[:, keep]
    stats.group_sum = None
    means /= np.maximum(n, 1)[:, None]
    small = [g for g, count in zip(groups[1:], n[1:]) if count < params.min_cells]
    if small:
        log.warning(
            "dropping %d perturbations with fewer than %d cells: %s%s",
            len(small), params.min_cells, ", ".join(small[:20]),
            " ..." if len(small) > 20 else "",
        )
    rows = np.flatnonzero(n >= params.min_cells)
    rows = rows[rows > 0]
    genes = var_names[keep]
    selected = _take_rows(means, rows)
    data_vars = {
        "mean": (("perturbation", "gene"), selected),
        "delta": (("perturbation", "gene"), selected - means[0]),
        "n_cells": ("perturbation", n[rows]),
        "control_mean": ("gene", means[0]),
        "n_control_cells": ((), int(n[0])),
        "highly_variable": ("screen_gene", keep),
        "hvg_means": ("screen_gene", hvg["means"].to_numpy()),
        "hvg_dispersions": ("screen_gene", hvg["dispersions"].to_numpy()),
        "hvg_dispersions_norm": ("screen_gene", hvg["dispersions_norm"].to_numpy()),
    }
    if stats.group_sumsq is not None:
        sq_mean = _dense_rows(stats.group_sumsq)[:, keep] / np.maximum(n, 1)[:, None]
        stats.group_sumsq = None
        ddof = (n / np.maximum(n - 1, 1))[:, None]
        variance = np.maximum(sq_mean - means**2, 0) * ddof
        data_vars["var"] = (("perturbation", "gene"), variance[rows])
        data_vars["control_var"] = ("gene", variance[0])
    attrs = {
        "encoding_type": ENCODING_TYPE,
        "encoding_version": ENCODING_VERSION,
        "genepert_scale_version": __version__,
        "parameters": json.dumps(asdict(params)),
        "input_kind": kind,
        "control": params.control,
        "dropped_perturbations": json.dumps(small),
    }
    return xr.Dataset(
        data_vars,
        coords={
            "perturbation": np.array([groups[i] for i in rows], dtype=object),
            "gene": np.asarray(genes, dtype=object),
            "screen_gene": np.asarray(var_names, dtype=object),
        },
        attrs=attrs,
    )


def _take_rows(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``matrix[rows]``, as a view when ``rows`` is a contiguous range."""
    if rows.size and rows[-1] - rows[0] + 1 == rows.size:
        return matrix[rows[0] : rows[-1] + 1]
    return matrix[rows]


def _dense_rows(matrix: np.ndarray | sp.csr_array) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def write_pseudobulk(
    ds: xr.Dataset,
    path: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write a pseudo-bulk Dataset to a zarr store, atomically."""
    with (
        atomic_output(path, overwrite=overwrite, storage_options=storage_options) as tmp,
        quiet_zarr_warnings(),
    ):
        encoding = {
            name: {"compressors": compressors(ds[name].dtype.itemsize)}
            for name in ds.data_vars
            if ds[name].ndim and ds[name].dtype.kind in "fiu"
        }
        ds.to_zarr(zarr_store(tmp, storage_options, mode="w"), mode="w", consolidated=True,
                   encoding=encoding)
    log.info("wrote pseudo-bulk %s (%d perturbations x %d genes)",
             path, ds.sizes["perturbation"], ds.sizes["gene"])
    return path


def open_pseudobulk(path: str, storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """Open a pseudo-bulk store and check its encoding type and version."""
    try:
        ds = xr.open_zarr(zarr_store(path, storage_options))
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise StoreError(
            f"{path} is not a pseudo-bulk store ({err}); create one with "
            "'genepert-scale pseudobulk'"
        ) from err
    if ds.attrs.get("encoding_type") != ENCODING_TYPE:
        raise StoreError(
            f"{path} is not a genepert_scale pseudo-bulk store "
            f"(encoding_type {ds.attrs.get('encoding_type')!r})"
        )
    if ds.attrs.get("encoding_version") != ENCODING_VERSION:
        raise StoreError(
            f"{path} has pseudo-bulk encoding version {ds.attrs.get('encoding_version')}, "
            f"this version reads {ENCODING_VERSION}; rerun 'genepert-scale pseudobulk'"
        )
    return ds
