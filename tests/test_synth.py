from __future__ import annotations

import pickle

import anndata as ad
import numpy as np

from genepert_scale.synth import make_model, synth_screen


def test_synth_is_deterministic_and_independent_of_chunking_and_threads(tmp_path):
    # and of the threads drawing tiles (each tile has its own stream)
    a, emb_a = synth_screen(str(tmp_path / "a.zarr"), cells=2500, genes=120, perturbations=20,
                            seed=3, chunk_rows=700, threads=3)
    b, _ = synth_screen(str(tmp_path / "b.zarr"), cells=2500, genes=120, perturbations=20,
                        seed=3, chunk_rows=2500, threads=1)
    c, _ = synth_screen(str(tmp_path / "c.zarr"), cells=2500, genes=120, perturbations=20, seed=4)
    x_a, x_b, x_c = (ad.read_zarr(p) for p in (a, b, c))
    assert (x_a.X != x_b.X).nnz == 0
    assert (x_a.X != x_c.X).nnz > 0
    assert x_a.obs["perturbation"].equals(x_b.obs["perturbation"])
    with open(emb_a, "rb") as fh:
        table = pickle.load(fh)
    assert set(table) == set(x_a.var_names)
    assert all(len(v) == 32 and isinstance(v[0], float) for v in table.values())


def test_synth_screen_has_controls_pairs_and_integer_counts(tmp_path):
    path, _ = synth_screen(str(tmp_path / "s.zarr"), cells=4000, genes=300, perturbations=50, seed=1)
    adata = ad.read_zarr(path)
    labels = adata.obs["perturbation"].astype(str)
    assert 0.03 < (labels == "non-targeting").mean() < 0.07
    assert labels.str.contains(r"\+").any()
    data = adata.X.data
    assert np.all(data == np.round(data)) and data.min() > 0
    density = adata.X.nnz / np.prod(adata.shape)
    assert 0.02 < density < 0.5
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    assert totals.std() / totals.mean() > 0.2  # library sizes vary per cell


def test_planted_knockdown_of_target_gene():
    model = make_model(200, 30, seed=0)
    singles = [label for label in model.labels if "+" not in label]
    for row, label in enumerate(singles):
        target = model.genes.get_loc(label)
        assert model.log_effects[row, target] < -0.9

