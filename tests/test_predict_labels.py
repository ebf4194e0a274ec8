"""predict keeps the screen's labels and never writes negative expression."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import xarray as xr

from genepert_scale.cli.commands import main
from genepert_scale.io.encodings import PSEUDOBULK
from genepert_scale.io.interop import predictions_to_anndata
from genepert_scale.pp.aggregate import write_pseudobulk
from genepert_scale.tl.model import fit, predict, write_predictions
from genepert_scale.tl.ridge import load_model, save_model


def screen_store(root: Path, key: str, control: str) -> tuple[str, str]:
    """A pseudo-bulk made from a screen whose labels are in ``obs[key]`` and
    whose control is ``control``, with low control means (so predictions dip
    below zero), and an embedding of its genes and a few unseen ones."""
    rng = np.random.default_rng(2)
    genes = [f"G{i}" for i in range(30)]
    table = {g: list(rng.normal(size=6)) for g in genes}
    emb = root / "emb.pkl"
    emb.write_bytes(pickle.dumps(table))
    delta = np.array([table[g] for g in genes[:24]]) @ rng.normal(size=(6, 10)) * 0.3
    params = {"perturbation_key": key, "control": control, "target_sum": 1e4}
    ds = xr.Dataset(
        {"delta": (("perturbation", "gene"), delta), "control_mean": ("gene", np.full(10, 0.05))},
        coords={"perturbation": np.array(genes[:24], dtype=object),
                "gene": np.array([f"R{j}" for j in range(10)], dtype=object)},
        attrs={**PSEUDOBULK.attrs(), "parameters": json.dumps(params), "control": control,
               "input_kind": "counts"},
    )
    return write_pseudobulk(ds, str(root / "pb.zarr")), str(emb)


def test_predictions_keep_the_screens_labels(tmp_path):
    pb, emb = screen_store(tmp_path, "gene_target", "NTC")
    model = fit(pb, emb, alphas=0.1, progress=False)
    assert (model.metadata["perturbation_key"], model.metadata["control"]) == ("gene_target", "NTC")
    saved = save_model(model, str(tmp_path / "model.zarr"))
    pred = predict(load_model(saved), emb, ["G25", "G26+G27"])
    assert (pred.attrs["perturbation_key"], pred.attrs["control"]) == ("gene_target", "NTC")
    adata = ad.read_h5ad(write_predictions(pred, str(tmp_path / "pred.h5ad")))
    labels = ["NTC", "G25", "G26+G27"]
    assert list(adata.obs_names) == labels and list(adata.obs["gene_target"]) == labels
    assert list(adata.obs["condition"]) == ["ctrl", "G25+ctrl", "G26+G27"]  # GEARS', beside them
    assert list(adata.obs["is_control"]) == [True, False, False]
    means = pred["mean"].values
    assert (means < 0).any() and (adata.X >= 0).all()
    np.testing.assert_allclose(adata.X[1:], np.maximum(means, 0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(adata.layers["delta"][1:], pred["delta"].values, rtol=1e-6)  # as predicted
    clipped = adata.uns["genepert_scale"]["clipped"]
    assert clipped["n_values"] == (means < 0).sum() and clipped["of"] == means.size
    assert clipped["min_before"] == pytest.approx(means.min())


def test_a_condition_label_column_keeps_its_name(tmp_path):
    delta = xr.DataArray(np.array([[0.5, -2.0]]), dims=("perturbation", "gene"),
                         coords={"perturbation": ["KLF1+ctrl"], "gene": ["A", "B"]})
    adata = predictions_to_anndata(delta, np.ones(2), control="ctrl", perturbation_key="condition")
    assert list(adata.obs["condition"]) == ["ctrl", "KLF1+ctrl"]  # the screen's, GEARS-style already
    assert list(adata.obs["gears_condition"]) == ["ctrl", "KLF1+ctrl"]
    assert adata.uns["genepert_scale"]["clipped"] == {"n_values": 1, "of": 2, "min_before": -1.0}


def test_cli_predict_keeps_labels(tmp_path, capsys):
    pb, emb = screen_store(tmp_path, "perturbation", "non-targeting")
    model, out = str(tmp_path / "m.zarr"), str(tmp_path / "p.h5ad")
    assert main(["fit", pb, "--embeddings", emb, "--alpha", "1", "--out", model, "--no-progress"]) == 0
    assert main(["predict", model, "--embeddings", emb, "--perturbations", "G28,G29",
                 "--out", out, "--no-progress"]) == 0
    adata = ad.read_h5ad(out)
    assert list(adata.obs["perturbation"]) == ["non-targeting", "G28", "G29"]
    assert (adata.X >= 0).all()
