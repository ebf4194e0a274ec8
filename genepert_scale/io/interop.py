"""AnnData exports that other tools read: the pseudo-bulk (like decoupler's and
pertpy's pseudo-bulk outputs) and predicted deltas (for scanpy, cell-eval,
GEARS-style evaluation).

Both put one row per perturbation, the control first, with a GEARS-style
``condition`` column (``A+ctrl``, ``A+B``, ``ctrl``); ``X`` holds expression
means (log-normalised) and the layer ``delta`` the change vs control.
Predictions keep the screen's labels (``obs[perturbation_key]`` and the
index, the control row named by the screen's control label) and never hold
negative expression.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import xarray as xr

from .. import __version__
from ..errors import ParameterError
from ..pp.labels import GEARS_CONTROL, gears_condition
from .store import atomic_output, filesystem, is_url

log = logging.getLogger(__name__)

def pseudobulk_to_anndata(ds: xr.Dataset, *, perturbation_key: str | None = None) -> ad.AnnData:
    """The pseudo-bulk Dataset as AnnData, one row per perturbation and the control.

    Parameters
    ----------
    ds
        A pseudo-bulk Dataset (:func:`genepert_scale.pp.aggregate.pseudobulk` or
        :func:`~genepert_scale.pp.aggregate.open_pseudobulk`).
    perturbation_key
        The ``obs`` column of the labels (the index too); default: the
        screen's, from the run's parameters.

    Returns
    -------
    anndata.AnnData
        ``obs``: the labels (``perturbation_key``), ``condition``, ``n_cells``,
        ``is_control`` (and ``context``, with one control row per context and
        names ``CONTEXT/LABEL``, for a store with contexts); ``var``: genes with
        their HVG statistics; ``X``: group means; layers ``delta`` (and ``var``
        when the Dataset has group variances); ``uns["genepert_scale"]``: the
        control label, control mean, parameters and source. Built in memory
        (perturbations x genes).
    """
    from ..pp.aggregate import CONTROL_CONTEXT, one_context

    key = perturbation_key or json.loads(ds.attrs.get("parameters", "{}")).get(
        "perturbation_key", "perturbation")
    if CONTROL_CONTEXT in ds.dims:  # one control row per context, names CONTEXT/LABEL
        contexts = [str(c) for c in ds[CONTROL_CONTEXT].values]
        parts = [_context_rows(pseudobulk_to_anndata(one_context(ds, c), perturbation_key=key), c)
                 for c in contexts]
        adata = ad.concat(parts, merge="same", uns_merge="first")
        adata.obs["context"] = pd.Categorical(adata.obs["context"], categories=contexts)
        adata.uns["genepert_scale"]["control_mean"] = {c: p.uns["genepert_scale"]["control_mean"]
                                                       for c, p in zip(contexts, parts)}
        return adata
    ds = ds.compute()
    control = str(ds.attrs.get("control", GEARS_CONTROL))
    layers = {"delta": ds["delta"].values}
    control_layers = {"delta": np.zeros(ds.sizes["gene"])}
    if "var" in ds:
        layers["var"] = ds["var"].values
        control_layers["var"] = ds["control_var"].values
    uns = {
        key: ds.attrs[key]
        for key in ("parameters", "source", "input_kind", "encoding-version")
        if key in ds.attrs
    }
    uns["n_control_cells"] = int(ds["n_control_cells"])
    adata = _with_control_row(
        ds["mean"].values, ds["control_mean"].values,
        perturbations=ds.perturbation.values, genes=ds.gene.values, control=control,
        obs={"n_cells": ds["n_cells"].values,
             **({"knockdown": ds["knockdown"].values} if "knockdown" in ds else {})},
        control_obs={"n_cells": uns["n_control_cells"]},
        layers=layers, control_layers=control_layers, uns=uns,
    )
    if key not in adata.obs:
        adata.obs.insert(0, key, pd.Categorical(adata.obs_names))
    hvg = [name for name in ds.data_vars if str(name).startswith("hvg_")]
    if hvg:
        table = ds[hvg].to_dataframe().loc[list(ds.gene.values)]
        adata.var = table.rename(columns=lambda c: c.removeprefix("hvg_")).set_axis(adata.var_names)
    return adata


def _context_rows(adata: ad.AnnData, context: str) -> ad.AnnData:
    """``adata``'s rows as one context's: ``obs["context"]``, names ``CONTEXT/LABEL``."""
    adata.obs.insert(1, "context", context)
    adata.obs_names = [f"{context}/{name}" for name in adata.obs_names]
    return adata


def anndata_to_pseudobulk(adata: ad.AnnData) -> xr.Dataset:
    """The Dataset of a pseudo-bulk in its AnnData form (:func:`pseudobulk_to_anndata`,
    one context), so that models take either form.

    Raises
    ------
    ParameterError
        If ``adata`` is not of that form (no ``is_control`` or ``delta``), or
        holds several contexts (take the Dataset with ``as_xarray=True`` and
        choose one with ``one_context``).
    """
    meta = adata.uns.get("genepert_scale", {})
    if "is_control" not in adata.obs or "delta" not in adata.layers:
        raise ParameterError("this AnnData is not a pseudo-bulk of genepert_scale (no "
                             "obs['is_control'] or layers['delta']); make one with "
                             "gps.pp.pseudobulk")
    if "context" in adata.obs and adata.obs["context"].nunique() > 1:
        raise ParameterError("this pseudo-bulk holds several contexts; model one at a time: "
                             "gps.pp.pseudobulk(..., as_xarray=True) and one_context(ds, NAME)")
    control = adata.obs["is_control"].to_numpy()
    rows = ~control
    key = json.loads(meta.get("parameters", "{}")).get("perturbation_key", "perturbation")
    names = adata.obs[key] if key in adata.obs else adata.obs_names
    data = {"mean": (("perturbation", "gene"), np.asarray(adata.X[rows], np.float64)),
            "delta": (("perturbation", "gene"),
                      np.asarray(adata.layers["delta"][rows], np.float64)),
            "n_cells": ("perturbation", adata.obs["n_cells"].to_numpy()[rows]),
            "control_mean": ("gene", np.asarray(adata.X[control][0], np.float64)),
            "n_control_cells": ((), int(adata.obs["n_cells"].to_numpy()[control][0]))}
    if "var" in adata.layers:
        data["var"] = (("perturbation", "gene"), np.asarray(adata.layers["var"][rows], np.float64))
        data["control_var"] = ("gene", np.asarray(adata.layers["var"][control][0], np.float64))
    attrs = {k: meta[k] for k in ("parameters", "source", "input_kind") if k in meta}
    return xr.Dataset(data, coords={"perturbation": np.asarray(names[rows], dtype=object),
                                    "gene": np.asarray(adata.var_names, dtype=object)},
                      attrs={**attrs, "control": meta.get("control", "")})


def predictions_to_anndata(
    pred_delta: xr.DataArray,
    control_mean: xr.DataArray | np.ndarray,
    *,
    control: str = GEARS_CONTROL,
    perturbation_key: str = "perturbation",
    uns: dict[str, Any] | None = None,
) -> ad.AnnData:
    """Predicted deltas as AnnData: predicted expression and delta per perturbation.

    Parameters
    ----------
    pred_delta
        Predicted delta, dims ``(perturbation, gene)``; other coordinates along
        ``perturbation`` (a ``fold``, say) become ``obs`` columns.
    control_mean
        Control mean per gene; a DataArray is aligned on ``gene``.
    control
        The screen's control label: the name of the control row.
    perturbation_key
        The screen's label column: ``obs[perturbation_key]`` holds the labels
        (the index too), so that tools comparing with the screen's cells
        (cell-eval) find the same labels. When it is ``condition``, GEARS'
        column is named ``gears_condition``.
    uns
        Extra entries for ``uns["genepert_scale"]`` (model, alpha, ...).

    Returns
    -------
    anndata.AnnData
        ``X`` = control mean + predicted delta, clipped at zero (log-expression
        is never negative; ``uns["genepert_scale"]["clipped"]`` counts the
        values raised to zero and gives the lowest one before), the control row
        first (the control mean); layer ``delta`` the model's delta as
        predicted; ``obs`` with the labels, GEARS' ``condition`` and
        ``is_control``.
    """
    if set(pred_delta.dims) != {"perturbation", "gene"}:
        raise ParameterError(
            f"predicted delta must have dims (perturbation, gene), got {pred_delta.dims}"
        )
    pred_delta = pred_delta.transpose("perturbation", "gene")
    genes = pred_delta.gene.values
    base = _aligned_control_mean(control_mean, genes)
    delta = np.asarray(pred_delta.values, dtype=np.float64)
    expression, clipped = clip_at_zero(base + delta)
    obs = {
        str(name): coord.values
        for name, coord in pred_delta.coords.items()
        if coord.dims == ("perturbation",) and name != "perturbation"
    }
    adata = _with_control_row(
        expression, base, perturbations=pred_delta.perturbation.values, genes=genes,
        control=control, obs=obs, control_obs={},
        layers={"delta": delta}, control_layers={"delta": np.zeros(len(genes))},
        uns={**(uns or {}), "perturbation_key": perturbation_key, "clipped": clipped},
    )
    if perturbation_key == "condition":
        adata.obs = adata.obs.rename(columns={"condition": "gears_condition"})
    adata.obs.insert(0, perturbation_key, pd.Categorical(adata.obs_names))
    return adata


def _aligned_control_mean(control_mean: xr.DataArray | np.ndarray, genes: np.ndarray) -> np.ndarray:
    """The control mean of ``genes``, float64; a DataArray is aligned on ``gene``."""
    if isinstance(control_mean, xr.DataArray):
        missing = np.setdiff1d(genes, control_mean.gene.values)
        if missing.size:
            raise ParameterError(
                f"control mean lacks {missing.size} predicted genes, e.g. {list(missing[:5])}"
            )
        control_mean = control_mean.sel(gene=genes)
    base = np.asarray(control_mean, dtype=np.float64)
    if base.shape != (len(genes),):
        raise ParameterError(f"control mean has shape {base.shape}, expected ({len(genes)},)")
    return base


def clip_at_zero(expression: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Predicted log-expression clipped at zero, and what was clipped.

    Returns
    -------
    clipped
        ``max(expression, 0)``, a new array.
    record
        ``n_values`` (values raised to zero), ``of`` (all values) and
        ``min_before`` (the lowest value before, ``None`` when nothing was clipped).
    """
    negative = expression < 0
    n = int(np.count_nonzero(negative))
    record = {"n_values": n, "of": int(expression.size),
              "min_before": float(expression[negative].min()) if n else None}
    return np.maximum(expression, 0.0), record


def _with_control_row(
    x: np.ndarray,
    control_x: np.ndarray,
    *,
    perturbations: np.ndarray,
    genes: np.ndarray,
    control: str,
    obs: dict[str, np.ndarray],
    control_obs: dict[str, Any],
    layers: dict[str, np.ndarray],
    control_layers: dict[str, np.ndarray],
    uns: dict[str, Any],
) -> ad.AnnData:
    """AnnData with the control row first, then one row per perturbation."""
    names = [control, *map(str, perturbations)]
    if len(set(names)) != len(names):
        raise ParameterError(f"perturbation names repeat or include the control {control!r}")
    table = pd.concat([pd.DataFrame(control_obs, index=[control]),
                       pd.DataFrame(obs, index=names[1:])])
    table.insert(0, "condition", pd.Categorical([gears_condition(n, control) for n in names]))
    table.insert(1, "is_control", np.arange(len(names)) == 0)
    uns = {**uns, "control": control, "control_mean": np.asarray(control_x, dtype=np.float64),
           "genepert_scale_version": __version__}
    return ad.AnnData(
        X=np.vstack([control_x, x]).astype(np.float32),
        obs=table,
        var=pd.DataFrame(index=pd.Index(map(str, genes), name="gene")),
        layers={k: np.vstack([control_layers[k], v]).astype(np.float32) for k, v in layers.items()},
        uns={"genepert_scale": uns},
    )


def write_h5ad(
    adata: ad.AnnData,
    path: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write ``adata`` as ``.h5ad`` atomically (local path or fsspec URL)."""
    with atomic_output(path, overwrite=overwrite, storage_options=storage_options) as tmp:
        if is_url(path):
            fs, root = filesystem(tmp, storage_options)
            with tempfile.TemporaryDirectory() as local:
                file = Path(local) / "out.h5ad"
                adata.write_h5ad(file)
                fs.put(str(file), root)
        else:
            adata.write_h5ad(tmp)
    log.info("wrote %s (%d rows x %d genes)", path, adata.n_obs, adata.n_vars)
    return path


def export_pseudobulk(
    store: str,
    out: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Read a pseudo-bulk zarr store and write it as ``.h5ad``."""
    from ..pp.aggregate import open_pseudobulk

    ds = open_pseudobulk(store, storage_options)
    adata = pseudobulk_to_anndata(ds)
    adata.uns["genepert_scale"]["pseudobulk_store"] = store
    return write_h5ad(adata, out, overwrite=overwrite, storage_options=storage_options)

