"""A fitted cell model saved as a zarr store, and read back.

The store (encoding ``genepert_scale.cells_model``) holds every tensor of the
VAE's and the shift head's state dicts as an array (``vae.NAME``,
``head.NAME``), the kept control cells (``control_x``, ``control_z``,
``control_rows``, ``control_context``), the genes, and in ``attrs`` the
metadata as JSON: the parameters, latent width, embedding width and
sources, labels, contexts, the normalisation of the cells and the
training perturbations. :func:`load_cells_model` rebuilds the networks from
them; a loaded model predicts exactly as the one saved, given the same
embedding table (it does not carry the table: give it to
:func:`.model.cells_predict`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ... import __version__
from ...io.encodings import CELLS_MODEL, open_checked
from ...io.store import write_dataset
from .model import CellsConfig, CellsModel
from .networks import ShiftHead, Vae, resolve_device

log = logging.getLogger(__name__)

NETWORKS = ("vae", "head")


def save_cells_model(
    model: CellsModel,
    path: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write a fitted cell model as a zarr store at ``path`` (atomically)."""
    arrays = {"control_x": (("control_cell", "gene"), model.control_x),
              "control_z": (("control_cell", "latent"), model.control_z),
              "control_rows": ("control_cell", model.control_rows),
              "control_context": ("control_cell", model.control_context)}
    for network in NETWORKS:
        for name, tensor in getattr(model, network).state_dict().items():
            value = tensor.detach().cpu().numpy()
            key = f"{network}.{name}"
            arrays[key] = (tuple(f"{key}_{i}" for i in range(value.ndim)), value)
    metadata = {
        "config": asdict(model.config), "embedding_dim": model.head.condition.in_features,
        "embedding_sources": list(model.embedding_sources), "trained_on": model.trained_on,
        "latent_delta": {k: v.tolist() for k, v in model.latent_delta.items()},
        "labels": model.labels, "control": model.control, "perturbation_key": model.perturbation_key,
        "contexts": list(model.contexts), "context_key": model.context_key,
        "normalisation": model.normalisation, "history": model.history, "seconds": model.seconds,
    }
    ds = xr.Dataset(arrays, coords={"gene": np.asarray(model.genes, dtype=object)},
                    attrs={**CELLS_MODEL.attrs(), "genepert_scale_version": __version__,
                           "metadata": json.dumps(metadata)})
    write_dataset(ds, path, overwrite=overwrite, storage_options=storage_options)
    log.info("wrote cell model %s (%d genes, latent %d, %d control cells)", path,
             len(model.genes), model.config.latent_dim, len(model.control_x))
    return path


def load_cells_model(
    path: str,
    storage_options: dict[str, Any] | None = None,
    *,
    device: str | None = None,
) -> CellsModel:
    """Read a model written by :func:`save_cells_model`, checking its
    encoding; its networks on ``device`` (default: the saved config's)."""
    ds = open_checked(CELLS_MODEL, path, storage_options).load()
    meta = json.loads(ds.attrs["metadata"])
    config = CellsConfig(**meta["config"])
    where = resolve_device(device or config.device)
    vae = Vae(ds.sizes["gene"], config.latent_dim, config.hidden)
    head = ShiftHead(config.latent_dim, meta["embedding_dim"], hidden=config.hidden,
                     condition_dim=config.condition_dim, injection=config.injection)
    for network, module in zip(NETWORKS, (vae, head)):
        prefix = f"{network}."
        module.load_state_dict({name[len(prefix):]: torch.from_numpy(np.asarray(ds[name].values))
                                for name in ds.data_vars if name.startswith(prefix)})
        module.to(where).eval()
    return CellsModel(
        vae, head, pd.Index([str(g) for g in ds["gene"].values]), None,
        ds["control_x"].values, ds["control_z"].values, ds["control_rows"].values,
        meta["trained_on"], {k: np.asarray(v, dtype=np.float32) for k, v in meta["latent_delta"].items()},
        meta["labels"], meta["control"], meta["perturbation_key"], config,
        ds["control_context"].values, tuple(meta["contexts"]), meta["context_key"],
        meta["normalisation"], tuple(meta["embedding_sources"]), meta["history"], meta["seconds"],
    )
