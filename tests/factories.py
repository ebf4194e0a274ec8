"""Small synthetic inputs for robustness tests: tiny AnnData zarr stores with
one thing wrong at a time."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

LABELS = ("non-targeting", "A", "B", "C")


def read_for_scanpy(path: str) -> ad.AnnData:
    """A zarr screen read into memory by anndata, ``X``'s row offsets in the
    dtype of its column indices: anndata 0.13 keeps the int64 ``indptr`` and
    int32 ``indices`` our stores hold, which scanpy 1.12's compiled kernels
    refuse ("indptr and indices must have the same dtype")."""
    adata = ad.read_zarr(path)
    if sp.issparse(adata.X) and adata.X.indptr.dtype != adata.X.indices.dtype:
        adata.X.indices = adata.X.indices.astype(adata.X.indptr.dtype)
    return adata


def counts(n_obs: int = 60, n_vars: int = 8, seed: int = 0) -> np.ndarray:
    """Poisson counts, every cell non-empty."""
    x = np.random.default_rng(seed).poisson(3.0, size=(n_obs, n_vars)).astype(np.float32)
    x[:, 0] += 1
    return x


def log1p_of(x: np.ndarray) -> np.ndarray:
    """scanpy's normalize_total(1e4) + log1p of dense counts."""
    return np.log1p(x / x.sum(1, keepdims=True) * 1e4).astype(np.float32)


def write_screen(
    path: Path,
    x: np.ndarray | None = None,
    *,
    labels: list[str] | pd.Categorical | None = None,
    var_names: list[str] | None = None,
    obs_names: list[str] | pd.Index | None = None,
    layout: str = "csr",
    zarr_format: int = 3,
) -> str:
    """Write a tiny AnnData screen and return its path: zarr (format
    ``zarr_format``), or h5ad where ``path`` ends with ``.h5ad``. ``obs_names``
    may be any pandas index (a ``CategoricalIndex`` is stored as a group)."""
    x = counts() if x is None else x
    n_obs, n_vars = x.shape
    labels = labels if labels is not None else [LABELS[i % len(LABELS)] for i in range(n_obs)]
    obs = pd.DataFrame(
        {"perturbation": pd.Categorical(labels)},
        index=pd.Index(obs_names if obs_names is not None else [f"cell{i}" for i in range(n_obs)]),
    )
    var = pd.DataFrame(index=pd.Index(var_names or [f"G{i}" for i in range(n_vars)]))
    matrix = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[layout](x)
    adata = ad.AnnData(matrix, obs=obs, var=var)
    if str(path).endswith(".h5ad"):
        adata.write_h5ad(path)
    else:
        with ad.settings.override(zarr_write_format=zarr_format):
            adata.write_zarr(path)
    return str(path)
