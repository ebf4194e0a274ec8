"""Highly-variable genes from per-gene moments, selecting the same genes as
``scanpy.pp.highly_variable_genes`` (flavors ``seurat`` and ``cell_ranger``).

scanpy computes per-gene mean and variance over the cell matrix; we receive
them from the streamed pass (sums and sums of squares), so no second pass is
needed. The binning, normalisation and cut-off follow scanpy exactly.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from .errors import ParameterError

Flavor = Literal["seurat", "cell_ranger"]
FLAVORS: tuple[str, ...] = ("seurat", "cell_ranger")


def mean_var(total: np.ndarray, total_sq: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased (``ddof=1``) variance from sums over ``n`` cells."""
    mean = total / n
    var = total_sq / n - mean**2
    if n > 1:
        var *= n / (n - 1)
    return mean, var


def _mad(values: pd.Series) -> float:
    """Median absolute deviation scaled to the normal SD (as statsmodels' ``mad``)."""
    from scipy.stats import norm  # slow to import; only cell_ranger needs it

    values = values.to_numpy()
    return float(np.median(np.abs(values - np.median(values))) / norm.ppf(0.75))


def highly_variable_genes(
    mean: np.ndarray,
    var: np.ndarray,
    *,
    flavor: Flavor = "seurat",
    n_top_genes: int | None = 5000,
    n_bins: int = 20,
    gene_names: pd.Index | None = None,
) -> pd.DataFrame:
    """Rank genes by normalised dispersion and flag the top ones.

    Parameters
    ----------
    mean, var
        Per-gene mean and variance: of the normalized counts (``expm1`` of the
        log data) for ``seurat``, of the ``log1p`` values for ``cell_ranger``.
    flavor
        scanpy's flavor.
    n_top_genes
        Number of genes to keep; ``None`` keeps every gene.
    n_bins
        Number of mean bins for ``seurat``.
    gene_names
        Index of the returned frame.

    Returns
    -------
    pandas.DataFrame
        Columns ``means``, ``dispersions``, ``dispersions_norm`` and
        ``highly_variable``, as scanpy writes to ``adata.var``.

    Notes
    -----
    ``dispersion = var / mean``; for ``seurat`` it is logged and the mean
    ``log1p``-ed, genes are binned into ``n_bins`` equal-width mean bins and
    ``dispersions_norm = (dispersion - bin mean) / bin SD`` (a bin with a single
    gene gets 1). For ``cell_ranger`` the bins are the 10th…100th mean
    percentiles and the bin median and MAD are used. The top ``n_top_genes`` by
    ``dispersions_norm`` are kept, ties at the cut-off included.
    """
    if flavor not in FLAVORS:
        raise ParameterError(f"unknown HVG flavor {flavor!r}; choose one of {FLAVORS}")
    mean = np.array(mean, dtype=np.float64)
    dispersion = np.asarray(var, dtype=np.float64) / np.where(mean == 0, 1e-12, mean)
    mean[mean == 0] = 1e-12
    if flavor == "seurat":
        dispersion[dispersion == 0] = np.nan
        dispersion = np.log(dispersion)
        mean = np.log1p(mean)
        bins = n_bins
    else:
        bins = np.r_[-np.inf, np.percentile(mean, np.arange(10, 105, 5)), np.inf]
    df = pd.DataFrame({"means": mean, "dispersions": dispersion})
    df["mean_bin"] = pd.cut(df["means"], bins=bins)
    grouped = df.groupby("mean_bin", observed=True)["dispersions"]
    if flavor == "seurat":
        stats = grouped.agg(avg="mean", dev="std")
        single = stats["dev"].isnull()
        stats.loc[single, "dev"] = stats.loc[single, "avg"]
        stats.loc[single, "avg"] = 0
    else:
        stats = grouped.agg(avg="median", dev=_mad)
    per_gene = stats.loc[df["mean_bin"]].set_index(df.index)
    df["dispersions_norm"] = (df["dispersions"] - per_gene["avg"]) / per_gene["dev"]
    df["highly_variable"] = _top(df["dispersions_norm"].to_numpy(), n_top_genes)
    df = df.drop(columns="mean_bin")
    if gene_names is not None:
        df.index = gene_names
    return df


def _top(dispersion_norm: np.ndarray, n_top_genes: int | None) -> np.ndarray:
    if n_top_genes is None:
        return np.ones(dispersion_norm.size, dtype=bool)
    if n_top_genes <= 0:
        raise ParameterError(f"n_top_genes must be positive, got {n_top_genes}")
    finite = np.sort(dispersion_norm[~np.isnan(dispersion_norm)])[::-1]
    if finite.size == 0:
        return np.zeros(dispersion_norm.size, dtype=bool)
    cut_off = finite[min(n_top_genes, finite.size) - 1]
    return np.nan_to_num(dispersion_norm, nan=-np.inf) >= cut_off
