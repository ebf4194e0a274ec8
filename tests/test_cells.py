"""The cell model (the ``cells`` extra): streamed cells, the OT step, the shift
head, determinism, held-out cells kept out of training, the predicted AnnData
and the ``cells`` command. Skipped when torch or POT is missing; trainings are
a few epochs of tiny networks."""

from __future__ import annotations

import dataclasses
import json
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

pytest.importorskip("torch")
pytest.importorskip("ot")

from scipy.optimize import linear_sum_assignment  # noqa: E402

from factories import counts, log1p_of, write_screen  # noqa: E402
from genepert_scale.cli.commands import main  # noqa: E402
from genepert_scale.datasets.synth import synth_screen  # noqa: E402
from genepert_scale.errors import EmbeddingError, LabelError, ParameterError  # noqa: E402
from genepert_scale.pl.cells_report import write_cells_report  # noqa: E402
from genepert_scale.pp.aggregate import pseudobulk  # noqa: E402
from genepert_scale.tl import cells as cells_package  # noqa: E402
from genepert_scale.tl.cells import (  # noqa: E402
    CellsConfig,
    cells_evaluate,
    cells_fit,
    cells_predict,
    load_cells_model,
    save_cells_model,
)
from genepert_scale.tl.cells.distances import Pca, energy_distance, mmd_rbf  # noqa: E402
from genepert_scale.tl.cells.model import fit_on, ot_pairs, prepare  # noqa: E402
from genepert_scale.tl.cells.output import CellsWriter  # noqa: E402
from genepert_scale.tl.cells.networks import ShiftHead, apply_head, deterministic_torch, train_head  # noqa: E402
from genepert_scale.tl.cells.stream import CONTROL, CellSource, open_cells  # noqa: E402
from genepert_scale.tl.cells.transport import barycentric_map, sinkhorn_plan  # noqa: E402
from genepert_scale.tl.evaluate import evaluate  # noqa: E402

#: A fit of seconds: tiny networks, few epochs, few cells.
TINY = CellsConfig(latent_dim=8, hidden=32, epochs=2, batch_size=64, ot_cells=40, head_epochs=3,
                   head_batch_size=128, control_cells=80, threads=1, device="cpu")


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> tuple[str, str]:
    """A 1,500-cell × 80-gene synthetic screen with a responder subpopulation."""
    out = tmp_path_factory.mktemp("cells") / "screen.zarr"
    return synth_screen(str(out), cells=1500, genes=80, perturbations=12, seed=5, chunk_rows=500,
                        control_share=0.15, responder_share=0.5, threads=1)


@pytest.fixture(scope="module")
def prepared(screen):
    path, embedding = screen
    return prepare(path, embedding, block_rows=256)


# ------------------------------------------------------------------ streamed cells


def test_streamed_cells_are_the_pass_normalisation_of_the_selected_genes(tmp_path):
    x = counts(n_obs=300, n_vars=12, seed=3)
    path = write_screen(tmp_path / "s.zarr", x)
    ds = pseudobulk(path, control="non-targeting", n_top_genes=6, progress=False, as_xarray=True)
    source = open_cells(path, ds, ["A", "B", "C"], perturbation_key="perturbation",
                        control="non-targeting", block_rows=64)
    rows = np.array([0, 5, 63, 64, 200, 299])
    got = source.gather({"some": rows})["some"]
    genes = [int(g[1:]) for g in ds.gene.values]
    np.testing.assert_allclose(got, log1p_of(x)[rows][:, genes], rtol=1e-5)
    seen = np.concatenate(list(source.minibatches(np.ones(300, bool), 50, np.random.default_rng(0))))
    assert seen.shape == (300, 6)
    np.testing.assert_allclose(np.sort(seen.sum(1)), np.sort(log1p_of(x)[:, genes].sum(1)), rtol=1e-5)


def test_cells_of_dropped_or_unlabelled_perturbations_are_in_no_group(tmp_path):
    labels = ["non-targeting", "A", "B+ctrl", "C"] * 20
    path = write_screen(tmp_path / "s.zarr", counts(n_obs=80), labels=labels)
    ds = pseudobulk(path, control="non-targeting", progress=False, as_xarray=True)
    source = open_cells(path, ds, ["A", "B"], perturbation_key="perturbation", control="non-targeting")
    assert set(source.group[1::4]) == {0} and set(source.group[2::4]) == {1}
    assert set(source.group[3::4]) == {-2} and set(source.group[::4]) == {CONTROL}
    assert source.labels["B"] == "B+ctrl"  # the screen's own label


def test_cells_are_read_from_the_pseudobulk_layer_and_filter(tmp_path):
    x = counts(n_obs=120, n_vars=10, seed=4)
    labels = ["non-targeting", "A", "B"] * 40
    keep = np.arange(120) % 5 != 0
    adata = ad.AnnData(np.zeros_like(x), obs=pd.DataFrame(
        {"perturbation": pd.Categorical(labels), "keep": keep}, index=[f"c{i}" for i in range(120)]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(10)]), layers={"counts": sp.csr_matrix(x)})
    path = str(tmp_path / "layered.zarr")
    adata.write_zarr(path)
    ds = pseudobulk(path, layer="counts", obs_filter="keep", target_sum=100, n_top_genes="all",
                    progress=False, as_xarray=True)
    source = open_cells(path, ds, ["A", "B"], perturbation_key="perturbation",
                        control="non-targeting", block_rows=32)
    assert set(source.group[~keep]) == {-2} and set(source.group[keep]) == {CONTROL, 0, 1}
    rows = np.flatnonzero(keep)
    expected = np.log1p(x / x.sum(1, keepdims=True) * 100)[rows]
    np.testing.assert_allclose(source.gather({"all": rows})["all"], expected, rtol=1e-5)


def test_cells_command_takes_the_pseudobulk_options_of_params():
    from genepert_scale.cli.commands import build_parser, pseudobulk_params
    from genepert_scale.pp.params import PARAMETERS

    args = build_parser().parse_args(["cells", "s.zarr", "--embeddings", "e.pkl", "--out", "o",
                                      "--layer", "counts", "--obs-filter", "~doublet",
                                      "--context-key", "line", "--target-sum", "100"])
    params = pseudobulk_params(args)
    assert set(params) == set(PARAMETERS)
    assert (params["layer"], params["obs_filter"], params["context_key"], params["target_sum"]) == (
        "counts", "~doublet", "line", 100.0)
    with pytest.raises(ParameterError, match="pseudobulk_options perturbation_key: not accepted"):
        prepare("s.zarr", "e.pkl", pseudobulk_options={"perturbation_key": "gene"})


# ------------------------------------------------------------------ OT and distances


def test_entropic_ot_with_small_epsilon_is_the_optimal_assignment():
    rng = np.random.default_rng(0)
    for _ in range(5):
        source, target = rng.normal(size=(7, 3)), rng.normal(size=(7, 3)) + 0.3
        cost = ((source[:, None] - target[None]) ** 2).sum(-1)
        rows, cols = linear_sum_assignment(cost)
        plan = sinkhorn_plan(source, target, epsilon=1e-3)
        np.testing.assert_allclose(plan.sum(1), 1 / 7, atol=1e-6)
        assert np.array_equal(plan.argmax(1)[rows], cols)
        np.testing.assert_allclose(barycentric_map(plan, target)[rows], target[cols], atol=1e-3)


def test_ot_plan_has_uniform_marginals_for_unequal_sizes():
    rng = np.random.default_rng(1)
    plan = sinkhorn_plan(rng.normal(size=(30, 4)), rng.normal(size=(12, 4)), epsilon=0.05)
    np.testing.assert_allclose(plan.sum(1), 1 / 30, atol=1e-6)
    np.testing.assert_allclose(plan.sum(0), 1 / 12, atol=1e-6)


def test_energy_distance_and_mmd_against_their_definitions():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=(15, 3)) + 1.0
    d = lambda a, b: np.linalg.norm(a[:, None] - b[None], axis=-1)  # noqa: E731
    within = lambda a: d(a, a).sum() / (len(a) * (len(a) - 1))  # noqa: E731
    assert energy_distance(x, y) == pytest.approx(2 * d(x, y).mean() - within(x) - within(y))
    assert energy_distance(x, y) > energy_distance(x, rng.normal(size=(15, 3))) > -0.1
    k = lambda a, b: np.exp(-d(a, b) ** 2 / 2)  # noqa: E731
    expected = ((k(x, x).sum() - 20) / 380 + (k(y, y).sum() - 15) / 210 - 2 * k(x, y).mean())
    assert mmd_rbf(x, y, bandwidth=1.0) == pytest.approx(expected)
    pca = Pca.fit(np.vstack([x, y]), 2)
    assert pca.transform(x).shape == (20, 2)


# ------------------------------------------------------------------ shift head


def test_shift_head_reduces_energy_distance_on_a_planted_shift():
    """Latents shifted by a linear function of the embedding: the head,
    trained on OT pairs of training perturbations, moves control latents of
    held-out perturbations closer to their true latents."""
    rng = np.random.default_rng(3)
    dim, n_perturbations = 4, 12
    embeddings = rng.normal(size=(n_perturbations, 6))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    shifts = 2.0 * embeddings @ rng.normal(size=(6, dim)) / np.sqrt(6)
    control = rng.normal(size=(200, dim)).astype(np.float32)
    cells = {f"p{p}": (rng.normal(size=(150, dim)) + shifts[p]).astype(np.float32)
             for p in range(n_perturbations)}
    train, held_out = list(range(9)), [9, 10, 11]
    config = CellsConfig(ot_cells=150)
    z, shift, condition = ot_pairs({f"p{p}": control for p in train},
                                   {f"p{p}": cells[f"p{p}"] for p in train}, config, rng)
    assert set(condition) == set(train)
    with deterministic_torch(0, threads=1):
        head = ShiftHead(dim, 6, hidden=32)
        train_head(head, z, shift, condition, embeddings.astype(np.float32), epochs=60, batch_size=256,
                   learning_rate=3e-3, weight_decay=0.0, rng=rng, device="cpu")
    for p in held_out:
        moved = control + apply_head(head, control, embeddings[p], "cpu")
        before, after = energy_distance(control, cells[f"p{p}"]), energy_distance(moved, cells[f"p{p}"])
        assert after < 0.5 * before


@pytest.mark.parametrize("injection", ["additive", "film", "concat"])
def test_every_injection_starts_at_no_shift(injection):
    head = ShiftHead(5, 7, hidden=16, condition_dim=4, injection=injection)
    out = apply_head(head, np.ones((3, 5), np.float32), np.ones(7, np.float32), "cpu")
    assert out.shape == (3, 5) and np.all(out == 0)


def test_onehot_head_learns_every_seen_shift_that_an_unrelated_embedding_cannot():
    """A learned vector per perturbation reproduces each perturbation's
    planted shift (it is trained on all of them: the seen upper bound)."""
    rng = np.random.default_rng(4)
    dim, n_perturbations = 4, 6
    shifts = 2.0 * rng.normal(size=(n_perturbations, dim))
    control = rng.normal(size=(200, dim)).astype(np.float32)
    cells = {f"p{p}": (rng.normal(size=(150, dim)) + shifts[p]).astype(np.float32)
             for p in range(n_perturbations)}
    z, shift, condition = ot_pairs({name: control for name in cells}, cells, CellsConfig(ot_cells=150), rng)
    with deterministic_torch(0, threads=1):
        head = ShiftHead(dim, 0, hidden=32, n_conditions=n_perturbations)
        train_head(head, z, shift, condition, None, epochs=60, batch_size=256, learning_rate=3e-3,
                   weight_decay=0.0, rng=rng, device="cpu")
    for p in range(n_perturbations):
        moved = control + apply_head(head, control, p, "cpu")
        before, after = energy_distance(control, cells[f"p{p}"]), energy_distance(moved, cells[f"p{p}"])
        assert after < 0.2 * before


# ------------------------------------------------------------------ fit and predict


def test_fit_is_deterministic_for_a_seed(screen):
    path, embedding = screen
    models = [cells_fit(path, embedding, config=TINY, seed=s, block_rows=256) for s in (0, 0, 1)]
    predicted = [cells_predict(m, ["GENE00001", m.trained_on[0]], n_cells=30, seed=0).X for m in models]
    np.testing.assert_array_equal(predicted[0], predicted[1])
    assert not np.array_equal(predicted[0], predicted[2])
    assert models[0].history == models[1].history


def test_no_held_out_perturbation_cell_is_read_in_training(prepared, monkeypatch):
    read_rows: list[np.ndarray] = []
    original = CellSource.read

    def spy(self, block, rows=None):
        local = np.arange(self.bounds[block + 1] - self.bounds[block]) if rows is None else rows
        read_rows.append(self.bounds[block] + np.asarray(local))
        return original(self, block, rows)

    monkeypatch.setattr(CellSource, "read", spy)
    train = np.arange(0, len(prepared.perturbations), 2)
    model = fit_on(prepared, train, TINY, seed=0)
    groups = set(prepared.source.group[np.concatenate(read_rows)].tolist())
    assert groups <= {CONTROL, *train.tolist()} and groups >= set(train.tolist())
    assert model.trained_on == [prepared.perturbations[p] for p in train]


def test_predicted_cells_are_anndata_that_cell_eval_accepts(screen, prepared, tmp_path):
    path, embedding = screen
    model = fit_on(prepared, np.arange(len(prepared.perturbations) - 2), TINY, seed=0)
    unseen = prepared.perturbations[-2:]
    adata = cells_predict(model, unseen, n_cells=40, seed=0)
    adata.write_h5ad(tmp_path / "pred.h5ad")
    back = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert list(back.var_names) == list(prepared.source.genes)
    assert back.X.min() >= 0 and np.isfinite(back.X).all()
    counts_by_label = back.obs["perturbation"].value_counts()
    assert counts_by_label["non-targeting"] == len(model.control_x)
    assert all(counts_by_label[prepared.source.labels[p]] == 40 for p in unseen)
    cell_eval = pytest.importorskip("cell_eval")
    real_rows = np.flatnonzero(np.isin(prepared.source.group,
                                       [CONTROL, *range(len(prepared.perturbations) - 2, len(prepared.perturbations))]))
    real_x = prepared.source.gather({"real": real_rows})["real"]
    labels = np.array(["non-targeting", *prepared.perturbations], dtype=object)[
        np.where(prepared.source.group[real_rows] == CONTROL, 0, prepared.source.group[real_rows] + 1)]
    real = ad.AnnData(real_x, obs=pd.DataFrame({"perturbation": pd.Categorical(labels)},
                                               index=[f"c{i}" for i in range(len(real_rows))]),
                      var=pd.DataFrame(index=back.var_names))
    evaluator = cell_eval.MetricsEvaluator(back, real, control_pert="non-targeting",
                                           pert_col="perturbation", skip_de=True, num_threads=1,
                                           outdir=str(tmp_path / "cell-eval"))
    results, _ = evaluator.compute(profile="anndata", write_csv=False)
    assert set(results["perturbation"].to_list()) == set(unseen)


def test_missing_extra_is_named(monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ot" else find(name, *a))
    with pytest.raises(ParameterError, match=r"pot.*genepert-scale\[cells\]"):
        cells_package.require_extra()


# ------------------------------------------------------------------ evaluation and CLI


def test_evaluation_uses_the_folds_of_evaluate(screen):
    path, embedding = screen
    ds = pseudobulk(path, control="non-targeting", progress=False, as_xarray=True)
    result = cells_evaluate(path, embedding, pseudobulk=ds, n_folds=3, seed=4, config=TINY,
                            eval_cells=40, block_rows=256)
    reference = evaluate(ds, embedding, n_folds=3, seed=4, progress=False)
    assert result.folds.set_index("perturbation")["fold"].equals(
        reference.folds.set_index("perturbation")["fold"])
    ridge = reference.per_perturbation.query("model == 'genepert_ridge'").set_index("perturbation")
    control = result.per_perturbation.query("model == 'control_cells'")
    assert set(result.per_perturbation.model) == {"latent_ot", "latent_ot_onehot", "ridge_shift",
                                                  "control_cells"}
    assert control.energy_distance.notna().all() and len(control) == len(ridge)
    onehot = result.per_perturbation.query("model == 'latent_ot_onehot'")
    assert onehot.energy_distance.notna().all() and len(onehot) == len(ridge)
    assert all("onehot_head_loss" in fold for fold in result.fold_log)


def test_cells_command_end_to_end(tmp_path):
    screen = str(tmp_path / "s.zarr")
    assert main(["synth", screen, "--cells", "1200", "--genes", "60", "--perturbations", "10",
                 "--seed", "2", "--chunk-rows", "400", "--responder-share", "0.5",
                 "--threads", "1", "--no-progress"]) == 0
    out = tmp_path / "cells"
    assert main(["cells", screen, "--control", "non-targeting", "--embeddings",
                 str(tmp_path / "s_embedding.pkl"), "--folds", "3", "--seed", "1",
                 "--epochs", "2", "--head-epochs", "3", "--latent-dim", "8", "--ot-cells", "40",
                 "--eval-cells", "40", "--control-cells", "80", "--block-rows", "300",
                 "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"latent_ot", "latent_ot_onehot", "ridge_shift", "control_cells"}
    assert "upper bound" in metrics["seen_models"]["latent_ot_onehot"]
    for model in metrics["models"].values():
        assert model["energy_distance"]["n"] == 10 and model["pearson_delta"]["mean"] is not None
    assert metrics["comparison"]["energy_distance"]["n"] == 10
    predicted = ad.read_h5ad(out / "predicted_cells.h5ad")
    assert predicted.X.min() >= 0 and predicted.obs["perturbation"].nunique() == 11
    html = (out / "report.html").read_text()
    assert "energy_distance_per_perturbation.png" in html and "pca_best_worst.png" in html
    assert "latent_ot_onehot</b> is seen" in html
    # the model fitted on every perturbation, saved and used by cells-predict
    model = load_cells_model(str(out / "model"))
    assert len(model.trained_on) == 10
    pred = tmp_path / "pred.h5ad"
    assert main(["cells-predict", str(out / "model"), "--embeddings", str(tmp_path / "s_embedding.pkl"),
                 "--perturbations", "GENE00001,GENE00002+GENE00003", "--n-cells", "30",
                 "--no-progress", "--out", str(pred)]) == 0
    back = ad.read_h5ad(pred)
    expected = cells_predict(model, ["GENE00001", "GENE00002+GENE00003"], n_cells=30, seed=0,
                             embeddings=str(tmp_path / "s_embedding.pkl"))
    np.testing.assert_array_equal(back.X, expected.X)
    assert list(back.obs["perturbation"]) == list(expected.obs["perturbation"])


# ------------------------------------------------------------------ saved models


def test_saved_model_predicts_as_the_fitted_one(screen, prepared, tmp_path):
    _, embedding = screen
    model = fit_on(prepared, np.arange(len(prepared.perturbations) - 2), TINY, seed=0)
    saved = save_cells_model(model, str(tmp_path / "model"))
    back = load_cells_model(saved)
    unseen = ["GENE00001", *prepared.perturbations[-2:]]
    before = cells_predict(model, unseen, n_cells=25, seed=3)
    after = cells_predict(back, unseen, n_cells=25, seed=3, embeddings=embedding)
    np.testing.assert_array_equal(before.X, after.X)
    pd.testing.assert_frame_equal(before.obs, after.obs)
    assert back.trained_on == model.trained_on and list(back.genes) == list(model.genes)
    assert back.normalisation == model.normalisation and back.normalisation["target_sum"] == 1e4
    with pytest.raises(ParameterError, match=r"does not carry its embedding table.*screen_embedding.pkl"):
        cells_predict(back, unseen)
    small = tmp_path / "small.pkl"
    small.write_bytes(pickle.dumps({"GENE00001": [1.0, 0.0, 0.0]}))
    with pytest.raises(EmbeddingError, match="dimension 3 but the model was fitted on dimension"):
        cells_predict(back, ["GENE00001"], embeddings=str(small))


# ------------------------------------------------------------------ bounded scoring


def test_scoring_reads_true_cells_a_block_at_a_time_and_writes_each_perturbation(screen, monkeypatch):
    """Blocks of one perturbation's cells give the results of one block for
    all; the predicted cells are written a perturbation at a time."""
    path, embedding = screen
    ds = pseudobulk(path, control="non-targeting", progress=False, as_xarray=True)
    added: list[int] = []
    original = CellsWriter.add

    def spy(self, part, fold):
        added.append(len(part.x))
        return original(self, part, fold)

    monkeypatch.setattr(CellsWriter, "add", spy)
    runs = [cells_evaluate(path, embedding, pseudobulk=ds, n_folds=2, seed=1, config=TINY,
                           alphas=1.0, onehot=False, eval_cells=30, block_cells=cap, block_rows=256)
            for cap in (1, 10_000)]
    pd.testing.assert_frame_equal(runs[0].per_perturbation, runs[1].per_perturbation)
    assert set(runs[0].per_perturbation.model) == {"latent_ot", "ridge_shift", "control_cells"}
    n = len(runs[0].folds)
    assert added[0] == TINY.control_cells and max(added[1 : n + 1]) <= 30 and len(added) == 2 * (n + 1)
    assert len(runs[0].views) <= 2 and list(runs[0].views) == list(runs[1].views)
    cells = ad.read_h5ad(runs[0].predicted)
    assert cells.n_obs == sum(added[: n + 1]) and cells.obs["fold"].min() == -1


# ------------------------------------------------------------------ contexts


@pytest.fixture(scope="module")
def two_contexts(tmp_path_factory) -> tuple[str, str]:
    """Two cell lines whose controls differ (genes 0-9 four times higher in
    line "b"); perturbation A has no effect, the others raise a few genes in
    both lines."""
    rng = np.random.default_rng(7)
    n, genes = 2400, 30
    line = np.where(np.arange(n) % 2 == 0, "a", "b")
    labels = rng.choice(["non-targeting", "A", "B", "C", "D", "E", "F"], n,
                        p=[0.28, 0.12, 0.12, 0.12, 0.12, 0.12, 0.12])
    rate = np.full((n, genes), 4.0)
    rate[line == "b", :10] *= 4
    for i, name in enumerate("BCDEF"):
        rate[labels == name, 12 + 3 * i : 15 + 3 * i] *= 3
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(rate).astype(np.float32)),
                       obs=pd.DataFrame({"perturbation": pd.Categorical(labels),
                                         "line": pd.Categorical(line)},
                                        index=[f"c{i}" for i in range(n)]),
                       var=pd.DataFrame(index=[f"G{i}" for i in range(genes)]))
    root = tmp_path_factory.mktemp("contexts")
    adata.write_zarr(root / "two.zarr")
    vectors = np.random.default_rng(8).normal(size=(6, 8))
    (root / "emb.pkl").write_bytes(pickle.dumps({g: list(v) for g, v in zip("ABCDEF", vectors)}))
    return str(root / "two.zarr"), str(root / "emb.pkl")


def test_each_context_is_moved_from_its_own_control_cells(two_contexts):
    path, embedding = two_contexts
    config = dataclasses.replace(TINY, epochs=6, ot_cells=100, control_cells=200)
    model = cells_fit(path, embedding, context_key="line", config=config, block_rows=600)
    assert model.contexts == ("a", "b") and model.context_key == "line"
    line = ad.read_zarr(path).obs["line"].to_numpy()
    np.testing.assert_array_equal(line[model.control_rows],
                                  np.asarray(model.contexts)[model.control_context])
    # A does nothing: with its context's controls as OT source its shift is
    # small against the distance between the two lines' controls
    gap = np.linalg.norm(model.control_z[model.control_context == 0].mean(0)
                         - model.control_z[model.control_context == 1].mean(0))
    for name in ("a/A", "b/A"):
        assert np.linalg.norm(model.latent_delta[name]) < 0.3 * gap
    predicted = cells_predict(model, ["A", "B"], n_cells=20, contexts=["b"], include_control=False)
    assert set(predicted.obs["line"]) == {"b"} and len(predicted) == 40
    assert set(line[predicted.obs["control_cell"].to_numpy()]) == {"b"}
    both = cells_predict(model, ["B"], n_cells=20)
    assert both.obs.groupby("line", observed=True).size().to_dict() == {"a": 220, "b": 220}
    with pytest.raises(LabelError, match=r"no context 'c'.*obs\['line'\]\): a, b"):
        cells_predict(model, ["B"], contexts=["c"])


def test_contexts_are_named_in_the_evaluation(two_contexts, tmp_path):
    path, embedding = two_contexts
    ds = pseudobulk(path, context_key="line", n_top_genes="all", progress=False, as_xarray=True)
    with pytest.raises(LabelError, match="context_key is 'line', not None"):
        cells_fit(path, embedding, pseudobulk=ds, config=TINY)
    result = cells_evaluate(path, embedding, context_key="line", pseudobulk=ds, n_folds=3, seed=0,
                            config=TINY, eval_cells=40, block_rows=600)
    table = result.per_perturbation
    assert set(zip(table.context, table.perturbation)) == {(c, p) for c in "ab" for p in "ABCDEF"}
    folds = result.folds.groupby("perturbation")["fold"].nunique()
    assert (folds == 1).all()  # a perturbation is held out in both lines at once
    assert set(result.contexts) == {"a", "b"} and set(result.contexts["a"]) == set(result.models)
    assert all(set(fold["ridge_alpha"]) == {"a", "b"} for fold in result.fold_log)
    cells = ad.read_h5ad(result.predicted)
    assert set(cells.obs["line"]) == {"a", "b"}
    written = write_cells_report(result, str(tmp_path / "report"))
    assert set(json.loads((tmp_path / "report" / "metrics.json").read_text())["contexts"]) == {"a", "b"}
    assert written.endswith("report")
