"""Shared fixtures: small synthetic screens written with the real writer, the
real Papalexi data when ``../shared/data`` is beside the repository, and a
scanpy oracle."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from genepert_scale.datasets.synth import synth_screen

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
PAPALEXI = DATA_DIR / "papalexi2021_lowmoi_299genes.h5ad"


@pytest.fixture(scope="session")
def small_screen(tmp_path_factory) -> tuple[str, str]:
    """A 3,000-cell × 400-gene synthetic screen (store path, embedding path)."""
    out = tmp_path_factory.mktemp("screens") / "small.zarr"
    return synth_screen(str(out), cells=3000, genes=400, perturbations=40, seed=7, chunk_rows=1000)


@pytest.fixture(scope="session")
def papalexi_path() -> Path:
    if not PAPALEXI.exists():
        pytest.skip(f"real data not found at {DATA_DIR}")
    return PAPALEXI


def scanpy_pseudobulk(
    adata: ad.AnnData,
    *,
    key: str,
    control: str,
    n_top_genes: int | None,
    flavor: str = "seurat",
    log1p_input: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The oracle: scanpy's normalize_total + log1p + HVG + group means.

    Returns the HVG table (scanpy's ``var`` columns) and group means over the
    selected genes, one row per label.
    """
    import scanpy as sc

    adata = adata.copy()
    hvg = None
    if flavor == "seurat_v3" and n_top_genes:
        hvg = sc.pp.highly_variable_genes(adata, flavor=flavor, n_top_genes=n_top_genes, inplace=False)
    if not log1p_input:
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
    if flavor != "seurat_v3" and n_top_genes:
        hvg = sc.pp.highly_variable_genes(adata, flavor=flavor, n_top_genes=n_top_genes, inplace=False)
    keep = hvg["highly_variable"].to_numpy() if hvg is not None else np.ones(adata.n_vars, bool)
    agg = sc.get.aggregate(adata[:, keep], by=key, func="mean")
    means = pd.DataFrame(
        np.asarray(agg.layers["mean"]), index=agg.obs_names.astype(str),
        columns=adata.var_names[keep],
    )
    return hvg, means


@pytest.fixture
def pass_memory_only(monkeypatch):
    """Memory limits of a few kB drive the budgeted plans on small screens:
    what the process (or a worker) holds already, and its blocks in flight,
    are not counted against them."""
    from genepert_scale import cluster
    from genepert_scale.io.screen import Screen

    monkeypatch.setattr(cluster, "process_memory", lambda worker=None: 0)
    monkeypatch.setattr(Screen, "block_bytes", lambda self: 0)
