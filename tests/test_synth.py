from __future__ import annotations

import pickle

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from genepert_scale.datasets import synth
from genepert_scale.errors import ParameterError
from genepert_scale.datasets.synth import N_PROGRAMS, assign_cells, make_model, synth_screen, tile_counts


def test_synth_is_deterministic_and_independent_of_chunking_and_threads(tmp_path):
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
        assert model.log_effects(np.array([row]))[0, target] < -0.9


def test_more_perturbations_than_twice_the_genes_are_distinct_pairs():
    # 20 genes, 150 perturbations: 20 singles and 130 of their 190 pairs, none twice
    model = make_model(20, 150, seed=3, dim=4)
    assert len(set(model.labels)) == 150 and sum("+" in label for label in model.labels) == 130
    assert len({frozenset(pair) for pair in model.pairs.tolist()}) == 130
    singles = model.log_effects(np.arange(20))
    expected = np.tanh(model.embedding[model.targets] @ model.weights)
    expected[np.arange(20), model.targets] -= 2.0
    np.testing.assert_allclose(singles, expected, rtol=1e-12, atol=1e-12)
    a, b = model.pairs[7]
    np.testing.assert_allclose(model.log_effects(np.array([27]))[0], singles[a] + singles[b],
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ParameterError, match="more than the genes and pairs"):
        make_model(20, 211, seed=3)


def test_tile_counts_draws_what_the_first_version_drew():
    # the screens cached by benchmarks/run.py were written by the first
    # version (np.tile + masked add + exp); the in-place version must draw the
    # same counts from the same streams
    model = make_model(300, 40, seed=2)
    groups = assign_cells(1500, len(model.labels), seed=2, control_share=0.05)[500:1500]
    rng = np.random.default_rng([2, 2, 7])
    log_rate = np.tile(model.base_log_rate, (groups.size, 1))
    perturbed = groups > 0
    log_rate[perturbed] += model.log_effects(groups[perturbed] - 1)
    programs = rng.gamma(4.0, 0.25, size=(groups.size, N_PROGRAMS))
    rate = np.exp(log_rate) * programs[:, model.program_of_gene]
    library = rng.lognormal(np.log(600.0), 0.4, size=groups.size)
    rate *= (library / rate.sum(axis=1))[:, None]
    expected = sp.csr_array(rng.poisson(rate).astype(np.float32))
    got = tile_counts(model, groups, seed=2, tile=7, mean_umis=600.0)
    assert (got != expected).nnz == 0


def test_a_failed_tile_fails_the_synth_and_leaves_nothing(tmp_path, monkeypatch):
    draw = synth.tile_counts

    def fail_on_tile_3(model, groups, *, tile, **kwargs):
        if tile == 3:
            raise RuntimeError("tile 3 went wrong")
        return draw(model, groups, tile=tile, **kwargs)

    monkeypatch.setattr(synth, "tile_counts", fail_on_tile_3)
    with pytest.raises(RuntimeError, match="tile 3 went wrong"):
        synth_screen(str(tmp_path / "s.zarr"), cells=8000, genes=50, perturbations=10,
                     chunk_rows=1000, threads=2)
    assert list(tmp_path.iterdir()) == []


def test_synth_threads_must_be_positive(tmp_path):
    with pytest.raises(ParameterError, match="--threads must be a positive integer, got 0"):
        synth_screen(str(tmp_path / "s.zarr"), cells=100, genes=20, perturbations=4, threads=0)
    assert list(tmp_path.iterdir()) == []


def test_responders_are_the_top_share_of_one_program_and_only_they_respond():
    programs = np.random.default_rng(0).gamma(synth.PROGRAM_SHAPE, synth.PROGRAM_SCALE,
                                              size=(40_000, N_PROGRAMS))
    assert synth.responders(programs, 0.3).mean() == pytest.approx(0.3, abs=0.01)
    model = make_model(200, 10, seed=1)
    groups = np.repeat(np.arange(1, 11, dtype=np.int32), 300)
    every = tile_counts(model, groups, seed=1, tile=0, mean_umis=4000)
    assert (every != tile_counts(model, groups, seed=1, tile=0, mean_umis=4000,
                                 responder_share=1.0)).nnz == 0
    some = tile_counts(model, groups, seed=1, tile=0, mean_umis=4000, responder_share=0.3)
    state = np.random.default_rng([1, 2, 0]).gamma(synth.PROGRAM_SHAPE, synth.PROGRAM_SCALE,
                                                   size=(groups.size, N_PROGRAMS))
    respond = synth.responders(state, 0.3)
    # the target gene, knocked down 7-fold in cells that respond, not in the others:
    # its share of each cell's counts against the same cells drawn as controls
    controls = tile_counts(model, np.zeros_like(groups), seed=1, tile=0, mean_umis=4000)
    cells, targets = np.arange(groups.size), model.genes.get_indexer(model.labels)[groups - 1]
    share = {name: (x.toarray() / x.sum(axis=1)[:, None])[cells, targets]
             for name, x in (("some", some), ("controls", controls))}
    ratio = {key: share["some"][mask].mean() / share["controls"][mask].mean()
             for key, mask in (("respond", respond), ("silent", ~respond))}
    assert ratio["respond"] < 0.4 and 0.85 < ratio["silent"] < 1.15
