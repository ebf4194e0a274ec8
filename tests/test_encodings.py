"""Every store the project writes carries anndata's encoding attributes and
is read back through the one registry."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from genepert_scale.errors import StoreError
from genepert_scale.io.encodings import (
    CELLS_MODEL,
    MODEL,
    PREDICTIONS,
    PSEUDOBULK,
    REGISTRY,
    open_store,
)
from genepert_scale.pp.aggregate import pseudobulk, write_pseudobulk
from genepert_scale.tl.model import write_predictions
from genepert_scale.tl.ridge import RidgeModel, save_model


def written_stores(tmp_path, small_screen) -> dict[str, str]:
    pb = write_pseudobulk(pseudobulk(small_screen[0], n_top_genes=50, as_xarray=True),
                          str(tmp_path / "pb.zarr"))
    rng = np.random.default_rng(0)
    model = RidgeModel(rng.normal(size=(4, 3)), rng.normal(size=3), 1.0, pd.Index(["a", "b", "c"]),
                       rng.normal(size=3), pd.Index(["P1", "P2"]), {})
    predictions = xr.Dataset({"delta": (("perturbation", "gene"), rng.normal(size=(2, 3))),
                              "control_mean": ("gene", rng.normal(size=3))},
                             coords={"perturbation": ["X", "Y"], "gene": ["a", "b", "c"]})
    stores = {PSEUDOBULK.type: pb, MODEL.type: save_model(model, str(tmp_path / "m.zarr")),
              PREDICTIONS.type: write_predictions(predictions, str(tmp_path / "p.zarr"))}
    if importlib.util.find_spec("torch") and importlib.util.find_spec("ot"):
        stores[CELLS_MODEL.type] = cells_model(str(tmp_path / "cells.zarr"))
    return stores


def cells_model(path: str) -> str:
    """A small cell model (untrained networks), saved."""
    from genepert_scale.tl.cells import CellsConfig, CellsModel, save_cells_model
    from genepert_scale.tl.cells.networks import ShiftHead, Vae

    rng = np.random.default_rng(1)
    config = CellsConfig(latent_dim=2, hidden=4, device="cpu")
    model = CellsModel(Vae(3, 2, 4), ShiftHead(2, 5, hidden=4), pd.Index(["a", "b", "c"]), None,
                       rng.random((4, 3)), rng.normal(size=(4, 2)), np.arange(4), ["P1"],
                       {"P1": np.zeros(2)}, {"P1": "P1"}, "ctrl", "perturbation", config,
                       np.zeros(4, dtype=np.int64))
    return save_cells_model(model, path)


def test_every_store_is_read_back_through_the_registry(tmp_path, small_screen):
    stores = written_stores(tmp_path, small_screen)
    assert set(stores) == set(REGISTRY) - ({CELLS_MODEL.type} if len(stores) < len(REGISTRY) else set())
    for kind, path in stores.items():
        attrs = zarr.open_group(path, mode="r").attrs
        assert (attrs["encoding-type"], attrs["encoding-version"]) == (kind, REGISTRY[kind].version)
        opened = open_store(path)
        assert opened is not None
    assert isinstance(open_store(stores[MODEL.type]), RidgeModel)
    assert "mean" in open_store(stores[PSEUDOBULK.type])
    if CELLS_MODEL.type in stores:
        assert open_store(stores[CELLS_MODEL.type]).perturbation_key == "perturbation"


def test_a_store_of_another_kind_is_named(tmp_path, small_screen):
    stores = written_stores(tmp_path, small_screen)
    with pytest.raises(StoreError, match="is not a model store .encoding-type 'genepert_scale.pseudobulk'"):
        MODEL.open(stores[PSEUDOBULK.type])
