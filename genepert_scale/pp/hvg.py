"""Highly-variable genes from per-gene moments, selecting the same genes as
``scanpy.pp.highly_variable_genes``.

scanpy computes per-gene mean and variance over the cell matrix; we receive
them from the streamed pass (sums and sums of squares). ``seurat`` and
``cell_ranger`` need nothing more; ``seurat_v3`` needs a second pass for the
clipped variance (:func:`seurat_v3_clip` gives the clip values,
:func:`seurat_v3_select` ranks) and the optional ``scikit-misc`` package for
its loess fit. Binning, normalisation and cut-offs follow scanpy exactly.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from ..errors import ParameterError

Flavor = Literal["seurat", "cell_ranger", "seurat_v3"]
FLAVORS: tuple[str, ...] = get_args(Flavor)


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
    if flavor not in ("seurat", "cell_ranger"):
        raise ParameterError(f"flavor {flavor!r} is not dispersion-based; use seurat_v3_select")
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


def require_loess() -> Any:
    """scikit-misc's ``loess``, which the ``seurat_v3`` flavor needs."""
    try:
        from skmisc.loess import loess
    except ImportError as err:
        raise ParameterError(
            "flavor seurat_v3 needs scikit-misc: pip install 'genepert-scale[seurat-v3]'"
        ) from err
    return loess


def seurat_v3_clip(
    mean: np.ndarray, var: np.ndarray, n_obs: int, *, span: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """Expected SD of each gene from a loess fit of log variance on log mean,
    and Seurat's clip value ``mean + sqrt(n_obs) * SD``.

    Parameters
    ----------
    mean, var
        Per-gene mean and unbiased variance of the raw counts.
    n_obs
        Number of cells.
    span
        Loess span (scanpy's default 0.3).

    Returns
    -------
    reg_std, clip
        Both of shape ``(n_genes,)``.
    """
    loess = require_loess()
    varying = var > 0
    fitted = np.zeros(mean.size)
    model = loess(np.log10(mean[varying]), np.log10(var[varying]), span=span, degree=2)
    model.fit()
    fitted[varying] = model.outputs.fitted_values
    reg_std = np.sqrt(10**fitted)
    return reg_std, reg_std * np.sqrt(n_obs) + mean


def seurat_v3_select(
    mean: np.ndarray,
    var: np.ndarray,
    reg_std: np.ndarray,
    clipped_sum: np.ndarray,
    clipped_sumsq: np.ndarray,
    n_obs: int,
    *,
    n_top_genes: int | None = 5000,
    gene_names: pd.Index | None = None,
) -> pd.DataFrame:
    """Rank genes by Seurat v3's normalised (clipped) variance.

    Returns
    -------
    pandas.DataFrame
        Columns ``means``, ``variances``, ``variances_norm``,
        ``highly_variable_rank`` and ``highly_variable``, as scanpy writes.

    Notes
    -----
    ``variances_norm = (n m² + Σ c² − 2 m Σ c) / ((n − 1) σ̂²)`` with ``c`` the
    counts clipped at :func:`seurat_v3_clip`'s value, ``m`` the mean and
    ``σ̂`` the loess-fitted SD; the top ``n_top_genes`` are kept.
    """
    norm_var = (n_obs * mean**2 + clipped_sumsq - 2 * clipped_sum * mean) / (
        (n_obs - 1) * reg_std**2
    )
    n_top = mean.size if n_top_genes is None else min(n_top_genes, mean.size)
    rank = np.argsort(np.argsort(-norm_var)).astype(np.float64)
    rank[rank >= n_top] = np.nan
    df = pd.DataFrame(
        {
            "means": mean,
            "variances": var,
            "variances_norm": norm_var,
            "highly_variable_rank": rank,
            "highly_variable": ~np.isnan(rank),
        }
    )
    if gene_names is not None:
        df.index = gene_names
    return df
