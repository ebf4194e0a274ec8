"""Differentially expressed genes of each perturbation vs control, from the
group moments of the pseudo-bulk pass, and the metrics restricted to them.

:func:`welch_t` is scanpy's ``rank_genes_groups(method="t-test",
reference=control)`` score computed from ``mean``/``var``/``n_cells`` instead
of from the cells; :func:`top_de_genes` ranks genes by it as scanpy does, with
GEARS' ``top_non_dropout_de_20`` filter as an option. :func:`welch_pvalue`
is that test's two-sided p-value, :func:`bh_fdr` the Benjamini–Hochberg
adjustment within each perturbation and :func:`fdr_de_genes` the DE genes at
an FDR (the Virtual Cell Challenge's DE genes, there from a Wilcoxon test).
All stay lazy on a dask-backed Dataset (blocks over perturbations).
:func:`pearson_delta_de` and :func:`mse_de` are plain numpy metrics on given
DE gene indices.
"""

from __future__ import annotations

import logging

import numpy as np
import xarray as xr
from scipy.special import stdtr

from ..errors import ParameterError, listing

log = logging.getLogger(__name__)

#: Marks "no gene" in a row of DE gene indices (fewer eligible genes than k).
NO_GENE = -1

#: FDR below which a gene is DE (:func:`fdr_de_genes`; cell-eval's default).
DE_FDR = 0.05

_MOMENTS = ("mean", "var", "n_cells", "control_mean", "control_var", "n_control_cells")


def welch_t(ds: xr.Dataset) -> xr.DataArray:
    """Welch's t statistic of every perturbation vs control, per gene.

    Parameters
    ----------
    ds
        Pseudo-bulk Dataset made with ``group_variance=True`` (variables
        ``mean``, ``var``, ``n_cells``, ``control_mean``, ``control_var``,
        ``n_control_cells``).

    Returns
    -------
    xarray.DataArray
        Dims ``(perturbation, gene)``, lazy if ``ds`` is. Rows of perturbations
        with fewer than 2 cells are NaN (scanpy refuses such groups).

    Raises
    ------
    ParameterError
        If the variances are missing or the control has fewer than 2 cells.

    Notes
    -----
    With group mean :math:`\\bar x_p`, unbiased variance :math:`s_p^2`
    (ddof 1) and :math:`n_p` cells, against the control's
    :math:`\\bar x_c, s_c^2, n_c`,

    .. math:: t_{pg} = \\frac{\\bar x_{pg} - \\bar x_{cg}}
              {\\sqrt{s_{pg}^2 / n_p + s_{cg}^2 / n_c}},

    which is ``scipy.stats.ttest_ind_from_stats(..., equal_var=False)`` as
    scanpy calls it. As in scanpy, :math:`0/0` (equal means, both variances
    zero) is set to 0, while a nonzero difference over a zero denominator
    stays :math:`\\pm\\infty`.
    """
    missing = [name for name in _MOMENTS if name not in ds]
    if missing:
        raise ParameterError(
            f"the pseudo-bulk Dataset lacks {', '.join(missing)}; DE genes need group "
            "variances: rerun 'genepert-scale pseudobulk' with --group-variance"
        )
    n_control = int(ds["n_control_cells"])
    if n_control < 2:
        raise ParameterError(
            f"the control has {n_control} cell(s); a t-test needs at least 2: "
            "pseudo-bulk with a --control label that has more cells"
        )
    n = ds["n_cells"].astype(np.float64)
    diff = ds["mean"] - ds["control_mean"]
    denom = np.sqrt(ds["var"] / n + ds["control_var"] / n_control)
    degenerate = xr.where(diff == 0, 0.0, np.copysign(np.inf, diff))
    t = xr.where(denom > 0, diff / denom.where(denom > 0, 1.0), degenerate)
    return t.where(n >= 2).rename("welch_t").transpose("perturbation", "gene")


def welch_pvalue(ds: xr.Dataset) -> xr.DataArray:
    """Two-sided p-value of Welch's t-test of every perturbation vs control, per gene.

    Parameters
    ----------
    ds
        Pseudo-bulk Dataset with group variances (see :func:`welch_t`).

    Returns
    -------
    xarray.DataArray
        Dims ``(perturbation, gene)``, lazy if ``ds`` is; NaN rows where
        :func:`welch_t` is NaN (fewer than 2 cells).

    Notes
    -----
    With :math:`a = s_p^2 / n_p` and :math:`b = s_c^2 / n_c`, the
    Welch–Satterthwaite degrees of freedom are

    .. math:: \\nu = \\frac{(a + b)^2}{a^2 / (n_p - 1) + b^2 / (n_c - 1)},

    and :math:`p = 2\\,F_\\nu(-|t|)` with :math:`F_\\nu` the CDF of Student's
    t: ``scipy.stats.ttest_ind_from_stats(..., equal_var=False).pvalue``,
    whose conventions for zero variances this keeps (:math:`\\nu = 1` where
    it is :math:`0/0`): equal means give :math:`p = 1` (scanpy's value),
    different means over no spread :math:`p = 0`.
    """
    t = welch_t(ds)
    n_control = int(ds["n_control_cells"])
    n = ds["n_cells"].astype(np.float64)
    p = xr.apply_ufunc(
        _two_sided_p, t, ds["var"] / n, ds["control_var"] / n_control, n, n_control,
        dask="parallelized", output_dtypes=[np.float64],
    )
    return p.where(t.notnull()).rename("welch_pvalue").transpose("perturbation", "gene")


def _two_sided_p(t: np.ndarray, a: np.ndarray, b: np.ndarray, n: np.ndarray,
                 n_control: int) -> np.ndarray:
    """Welch's two-sided p-value from ``t``, the squared standard errors and the counts."""
    with np.errstate(divide="ignore", invalid="ignore"):
        df = (a + b) ** 2 / (a**2 / (n - 1) + b**2 / (n_control - 1))
    df = np.where(np.isnan(df), 1.0, df)
    return np.minimum(2.0 * stdtr(df, -np.abs(t)), 1.0)


def bh_fdr(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values within each row (the last axis).

    Parameters
    ----------
    pvalues
        p-values, one row per perturbation; a row with a NaN is left NaN.

    Returns
    -------
    numpy.ndarray
        The adjusted p-values (q-values), shape of ``pvalues``.

    Notes
    -----
    With the :math:`m` p-values of a row in ascending order
    :math:`p_{(1)} \\le \\dots \\le p_{(m)}`,
    :math:`q_{(i)} = \\min\\big(1, \\min_{j \\ge i} m\\,p_{(j)} / j\\big)`:
    ``scipy.stats.false_discovery_control(p, method="bh")`` of each row, and
    scanpy's ``pvals_adj`` (``corr_method="benjamini-hochberg"``).
    """
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    scaled = np.take_along_axis(p, order, axis=-1) * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(scaled[..., ::-1], axis=-1)[..., ::-1]
    out = np.empty_like(p)
    np.put_along_axis(out, order, np.minimum(q, 1.0), axis=-1)
    return np.where(np.isnan(p).any(axis=-1, keepdims=True), np.nan, out)


def welch_fdr(ds: xr.Dataset) -> xr.DataArray:
    """Benjamini–Hochberg FDR of :func:`welch_pvalue` within each perturbation.

    Returns
    -------
    xarray.DataArray
        Dims ``(perturbation, gene)``, lazy if ``ds`` is (whole rows per
        block); NaN rows where the test is undefined.
    """
    p = welch_pvalue(ds)
    if p.chunks is not None:  # every gene of a row in one block: the adjustment needs them all
        p = p.chunk(gene=-1)
    q = xr.apply_ufunc(bh_fdr, p, input_core_dims=[["gene"]], output_core_dims=[["gene"]],
                       dask="parallelized", output_dtypes=[np.float64])
    return q.rename("welch_fdr").transpose("perturbation", "gene")


def fdr_de_genes(ds: xr.Dataset, fdr: float = DE_FDR) -> xr.DataArray:
    """Each perturbation's DE genes: Welch t-test against the control at FDR < ``fdr``.

    Parameters
    ----------
    ds
        Pseudo-bulk Dataset with group variances (see :func:`welch_t`).
    fdr
        Benjamini–Hochberg FDR threshold, within each perturbation.

    Returns
    -------
    xarray.DataArray
        Boolean, dims ``(perturbation, gene)``, lazy if ``ds`` is; all False
        for perturbations with fewer than 2 cells (they are logged).

    Raises
    ------
    ParameterError
        If ``fdr`` is not in (0, 1], or as :func:`welch_t`.
    """
    if not 0 < fdr <= 1:
        raise ParameterError(f"fdr must be in (0, 1], got {fdr}")
    de = welch_fdr(ds) < fdr
    _log_undefined(ds)
    return de.rename("de_genes")


def top_de_genes(
    ds: xr.Dataset,
    k: int = 20,
    *,
    rankby_abs: bool = True,
    non_dropout: bool = True,
) -> xr.DataArray:
    """Indices of each perturbation's top-``k`` DE genes, best first.

    Parameters
    ----------
    ds
        Pseudo-bulk Dataset with group variances (see :func:`welch_t`).
    k
        Genes per perturbation.
    rankby_abs
        Rank by :math:`|t|` (GEARS) instead of :math:`t` (scanpy's default,
        which keeps only up-regulated genes on top).
    non_dropout
        GEARS' ``top_non_dropout_de_20`` filter: skip genes whose mean is 0 in
        the perturbation but not in the control.

    Returns
    -------
    xarray.DataArray
        ``int64`` gene positions (into ``ds.gene``), dims ``(perturbation,
        de_rank)``. A row ends in :data:`NO_GENE` where fewer than ``k`` genes
        are eligible, and is all :data:`NO_GENE` for perturbations with fewer
        than 2 cells (they are logged).

    Notes
    -----
    The order equals ``scanpy.tl.rank_genes_groups(adata, groupby,
    method="t-test", reference=control, rankby_abs=...)`` on the same
    log-normalised cells and genes, then (``non_dropout``) GEARS' filter of
    that ranking. Exact ties in the score are broken by gene position
    (scanpy's order among exact ties is that of an unstable sort).
    """
    if k < 1:
        raise ParameterError(f"k must be at least 1, got {k}")
    t = welch_t(ds)
    eligible = t.notnull()
    if non_dropout:
        eligible = eligible & ((ds["mean"] != 0) | (ds["control_mean"] == 0))
    score = (abs(t) if rankby_abs else t).fillna(0)
    if score.chunks is not None:  # whole rows per block: ranking needs every gene
        score, eligible = score.chunk(gene=-1), eligible.chunk(gene=-1)
    k = min(k, ds.sizes["gene"])
    top = xr.apply_ufunc(
        _top_k, score, eligible, kwargs={"k": k},
        input_core_dims=[["gene"], ["gene"]], output_core_dims=[["de_rank"]],
        dask="parallelized", output_dtypes=[np.int64],
        dask_gufunc_kwargs={"output_sizes": {"de_rank": k}},
    )
    _log_undefined(ds)
    return top.rename("de_genes")


def _top_k(score: np.ndarray, eligible: np.ndarray, k: int) -> np.ndarray:
    """Per row: eligible genes by descending score, ties by position; NO_GENE after."""
    order = np.lexsort((-score, ~eligible), axis=-1)[..., :k]
    return np.where(np.take_along_axis(eligible, order, axis=-1), order, NO_GENE)


def _log_undefined(ds: xr.Dataset) -> None:
    few = ds["n_cells"].values < 2
    if few.any():
        names = ds["perturbation"].values[few]
        log.warning(
            "%d perturbations have fewer than 2 cells and no DE genes: %s",
            len(names), listing(names, 20),
        )


def pearson_delta_de(pred: np.ndarray, true: np.ndarray, de_idx: np.ndarray) -> np.ndarray:
    """Pearson correlation of predicted and true delta on each row's DE genes.

    Parameters
    ----------
    pred, true
        Deltas, shape ``(n_perturbations, n_genes)``.
    de_idx
        Gene positions per row, shape ``(n_perturbations, k)``, as from
        :func:`top_de_genes`; :data:`NO_GENE` entries are skipped.

    Returns
    -------
    numpy.ndarray
        One value per row; NaN where fewer than 2 genes or a constant vector.
        With ``k = 20`` this is GEARS' ``pearson_de_delta`` (our
        ``pearson_delta_de20_ttest``; ``pearson_delta_de20`` uses the top true ``|delta|``).

    Notes
    -----
    On the row's gene set :math:`D`,
    :math:`r = \\sum_{g \\in D} \\tilde p_g \\tilde y_g /
    \\sqrt{\\sum \\tilde p_g^2 \\sum \\tilde y_g^2}` with
    :math:`\\tilde p = p - \\bar p_D`, :math:`\\tilde y = y - \\bar y_D`.
    """
    p, y, valid = _on_de_genes(pred, true, de_idx)
    n = valid.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        pc = np.where(valid, p - (p * valid).sum(axis=1, keepdims=True) / n[:, None], 0.0)
        yc = np.where(valid, y - (y * valid).sum(axis=1, keepdims=True) / n[:, None], 0.0)
        denom = np.sqrt((pc**2).sum(axis=1) * (yc**2).sum(axis=1))
        r = (pc * yc).sum(axis=1) / denom
    return np.where((n >= 2) & (denom > 0), r, np.nan)


def mse_de(pred: np.ndarray, true: np.ndarray, de_idx: np.ndarray) -> np.ndarray:
    """Mean squared error of predicted vs true delta on each row's DE genes.

    Same arguments as :func:`pearson_delta_de`; NaN for rows without genes.
    With ``k = 20`` this is GEARS' ``mse_de`` (our ``mse_de20``).

    Notes
    -----
    :math:`\\mathrm{MSE}_D = |D|^{-1} \\sum_{g \\in D} (p_g - y_g)^2`.
    """
    p, y, valid = _on_de_genes(pred, true, de_idx)
    n = valid.sum(axis=1)
    sq = np.where(valid, (p - y) ** 2, 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, sq / n, np.nan)


def _on_de_genes(
    pred: np.ndarray, true: np.ndarray, de_idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    de_idx = np.asarray(de_idx)
    if pred.ndim != 2 or pred.shape != true.shape:
        raise ParameterError(
            f"predicted and true delta must be 2-D of one shape, got {pred.shape} and {true.shape}"
        )
    if de_idx.ndim != 2 or de_idx.shape[0] != pred.shape[0]:
        raise ParameterError(
            f"DE gene indices must have shape ({pred.shape[0]}, k), got {de_idx.shape}"
        )
    if de_idx.size and (de_idx.max() >= pred.shape[1] or de_idx.min() < NO_GENE):
        raise ParameterError(f"DE gene indices out of range for {pred.shape[1]} genes")
    valid = de_idx != NO_GENE
    safe = np.where(valid, de_idx, 0)
    return (np.take_along_axis(pred, safe, axis=1), np.take_along_axis(true, safe, axis=1),
            valid)
