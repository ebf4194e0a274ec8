"""Contexts and batches: each perturbation against the controls of its own
context, matched by batch, against direct numpy/scanpy computations."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from genepert_scale.errors import LabelError, ParameterError
from genepert_scale.pp.aggregate import CONTROL_CONTEXT, pseudobulk


def log_normalized(adata: ad.AnnData, genes) -> pd.DataFrame:
    """scanpy's normalize_total(1e4) + log1p over all genes, then the ``genes``."""
    import scanpy as sc

    adata = adata.copy()
    adata.X = adata.X.astype(np.float64)  # the oracle in double precision, as our sums
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    x = adata[:, list(genes)].X
    return pd.DataFrame(x.toarray() if sp.issparse(x) else x, columns=list(genes),
                        index=adata.obs_names)


@pytest.fixture(scope="module")
def two_lines(tmp_path_factory) -> tuple[str, ad.AnnData]:
    """Two cell lines with different baselines; perturbation A acts in K only."""
    rng = np.random.default_rng(3)
    n, genes = 1200, 30
    context = np.where(np.arange(n) % 2 == 0, "K562", "RPE1")
    label = rng.choice(["non-targeting", "A", "B"], n, p=[0.4, 0.3, 0.3])
    rate = np.where(context == "K562", 5.0, 2.0)[:, None] * np.ones((n, genes))
    rate[(label == "A") & (context == "K562"), :5] *= 4  # a planted K562-only effect
    x = rng.poisson(rate).astype(np.float32)
    obs = pd.DataFrame({"perturbation": pd.Categorical(label), "line": pd.Categorical(context)},
                       index=[f"c{i}" for i in range(n)])
    adata = ad.AnnData(sp.csr_matrix(x), obs=obs,
                       var=pd.DataFrame(index=[f"G{i}" for i in range(genes)]))
    path = tmp_path_factory.mktemp("ctx") / "two.zarr"
    adata.write_zarr(path)
    return str(path), adata


def test_each_context_is_compared_with_its_own_controls(two_lines):
    path, adata = two_lines
    ds = pseudobulk(path, n_top_genes="all", context_key="line", as_xarray=True)
    logged = log_normalized(adata, ds.gene.values)
    assert list(ds[CONTROL_CONTEXT].values) == ["K562", "RPE1"]
    for i, (name, line) in enumerate(zip(ds.perturbation.values, ds.context.values)):
        cells = (adata.obs["perturbation"] == name) & (adata.obs["line"] == line)
        controls = (adata.obs["perturbation"] == "non-targeting") & (adata.obs["line"] == line)
        expected = logged[cells.to_numpy()].mean() - logged[controls.to_numpy()].mean()
        np.testing.assert_allclose(ds.delta.values[i], expected, rtol=1e-5, atol=1e-6)
        assert ds.n_cells.values[i] == cells.sum()
        np.testing.assert_allclose(ds.control_mean.sel({CONTROL_CONTEXT: line}).values,
                                   logged[controls.to_numpy()].mean(), rtol=1e-5, atol=1e-6)
    effect = ds.delta.values[:, :5].mean(axis=1)
    k562_a = (ds.perturbation.values == "A") & (ds.context.values == "K562")
    assert effect[k562_a] > 1 and np.all(np.abs(effect[~k562_a]) < 0.3)  # planted, not smeared


def test_a_context_without_controls_is_named(two_lines, tmp_path):
    _, adata = two_lines
    drop = (adata.obs["line"] == "RPE1") & (adata.obs["perturbation"] == "non-targeting")
    adata[~drop.to_numpy()].copy().write_zarr(tmp_path / "s.zarr")
    with pytest.raises(LabelError, match="contexts without control cells .*RPE1"):
        pseudobulk(str(tmp_path / "s.zarr"), context_key="line", n_top_genes="all", as_xarray=True)


def test_batch_matched_controls_on_the_real_screen(papalexi_path):
    adata = ad.read_h5ad(papalexi_path)
    ds = pseudobulk(str(papalexi_path), control="control", n_top_genes=100, batch_key="bio_rep",
                    block_rows=4096, as_xarray=True)
    logged = log_normalized(adata, ds.gene.values)
    rep, label = adata.obs["bio_rep"].astype(str), adata.obs["perturbation"].astype(str)
    control_of = {b: logged[((label == "control") & (rep == b)).to_numpy()].mean()
                  for b in rep.unique()}
    for i, name in enumerate(ds.perturbation.values):
        cells = (label == name).to_numpy()
        weights = rep[cells].value_counts(normalize=True)
        reference = sum(w * control_of[b] for b, w in weights.items())
        expected = logged[cells].mean() - reference
        np.testing.assert_allclose(ds.delta.values[i], expected, rtol=1e-5, atol=1e-6)
    assert json.loads(ds.attrs["batches_without_controls"]) == []
    np.testing.assert_allclose(ds.control_mean.values,
                               logged[(label == "control").to_numpy()].mean(), rtol=1e-5)


def test_a_batch_without_controls_is_reported_and_its_cells_use_the_other_batches(
        papalexi_path, tmp_path):
    adata = ad.read_h5ad(papalexi_path)
    reps = adata.obs["bio_rep"].astype(str)
    lost = reps.unique()[0]
    keep = ~((adata.obs["perturbation"] == "control") & (reps == lost)).to_numpy()
    adata[keep].copy().write_h5ad(tmp_path / "s.h5ad")
    ds = pseudobulk(str(tmp_path / "s.h5ad"), control="control", n_top_genes=50,
                    batch_key="bio_rep", as_xarray=True)
    assert json.loads(ds.attrs["batches_without_controls"]) == [["", lost]]
    sub = adata[keep]
    logged = log_normalized(sub, ds.gene.values)
    rep, label = sub.obs["bio_rep"].astype(str), sub.obs["perturbation"].astype(str)
    name = ds.perturbation.values[0]
    cells = ((label == name) & (rep != lost)).to_numpy()
    weights = rep[cells].value_counts(normalize=True)
    reference = sum(w * logged[((label == "control") & (rep == b)).to_numpy()].mean()
                    for b, w in weights.items())
    np.testing.assert_allclose(ds.delta.values[0],
                               logged[(label == name).to_numpy()].mean() - reference,
                               rtol=1e-5, atol=1e-6)


def test_contexts_and_batches_together_equal_one_context_at_a_time(two_lines, tmp_path):
    path, adata = two_lines
    adata = adata.copy()
    adata.obs["lane"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 3 == 0, "L1", "L2"))
    adata.write_zarr(tmp_path / "lanes.zarr")
    both = pseudobulk(str(tmp_path / "lanes.zarr"), n_top_genes="all", context_key="line",
                      batch_key="lane", as_xarray=True)
    for line in ("K562", "RPE1"):
        adata[(adata.obs["line"] == line).to_numpy()].copy().write_zarr(tmp_path / f"{line}.zarr")
        alone = pseudobulk(str(tmp_path / f"{line}.zarr"), n_top_genes="all", batch_key="lane",
                           as_xarray=True)
        rows = both.context.values == line
        np.testing.assert_allclose(both.delta.values[rows], alone.delta.values, rtol=1e-12)
        np.testing.assert_array_equal(both.perturbation.values[rows], alone.perturbation.values)


def test_one_context_is_modelled_at_a_time(two_lines, tmp_path):
    from genepert_scale.errors import ParameterError
    from genepert_scale.pp.aggregate import one_context, write_pseudobulk

    path, adata = two_lines
    both = pseudobulk(path, n_top_genes="all", context_key="line", as_xarray=True)
    with pytest.raises(ParameterError, match="holds the contexts K562, RPE1, none was chosen"):
        one_context(both)
    k562 = one_context(both, "K562")
    assert k562.attrs["context"] == "K562" and k562.control_mean.dims == ("gene",)
    np.testing.assert_array_equal(k562.delta.values, both.delta.values[both.context == "K562"])
    adata[(adata.obs["line"] == "K562").to_numpy()].copy().write_zarr(tmp_path / "k.zarr")
    alone = pseudobulk(str(tmp_path / "k.zarr"), n_top_genes="all", as_xarray=True)
    np.testing.assert_allclose(k562.control_mean.values, alone.control_mean.values, rtol=1e-12)
    write_pseudobulk(both, str(tmp_path / "pb.zarr"))
    from genepert_scale.pp.aggregate import open_pseudobulk

    assert open_pseudobulk(str(tmp_path / "pb.zarr")).context.dims == ("perturbation",)


def test_the_anndata_form_has_a_control_row_per_context(two_lines):
    path, _ = two_lines
    pb = pseudobulk(path, n_top_genes="all", context_key="line")  # the AnnData form
    controls = pb.obs[pb.obs["is_control"]]
    assert list(controls["context"]) == ["K562", "RPE1"]
    assert list(controls.index) == ["K562/non-targeting", "RPE1/non-targeting"]
    ds = pseudobulk(path, n_top_genes="all", context_key="line", as_xarray=True)
    rows = pb[~pb.obs["is_control"].to_numpy()]
    np.testing.assert_allclose(rows.layers["delta"], ds.delta.values.astype(np.float32))
    assert list(rows.obs["perturbation"]) == list(ds.perturbation.values)
    assert list(rows.obs["context"]) == list(ds.context.values)


def normalized(adata: ad.AnnData, gene: str) -> np.ndarray:
    """Each cell's ``gene`` on the 1e4-normalised scale, before log1p (float64)."""
    x = sp.csr_matrix(adata.X, dtype=np.float64)
    totals = np.asarray(x.sum(axis=1)).ravel()
    column = np.asarray(x[:, adata.var_names.get_loc(gene)].todense()).ravel()
    return column * 1e4 / np.where(totals == 0, 1, totals)


@pytest.mark.parametrize("batch_key", [None, "bio_rep"])
def test_knockdown_on_the_real_screen(papalexi_path, batch_key):
    adata = ad.read_h5ad(papalexi_path)
    ds = pseudobulk(str(papalexi_path), control="control", n_top_genes=100, block_rows=4096,
                    batch_key=batch_key, as_xarray=True)
    label, rep = adata.obs["perturbation"].astype(str), adata.obs["bio_rep"].astype(str)
    measured = [p for p in ds.perturbation.values if p in adata.var_names]
    assert len(measured) == 9
    for name, value in zip(ds.perturbation.values, ds.knockdown.values):
        if name not in measured:
            assert np.isnan(value)
            continue
        expression = normalized(adata, name)
        cells = (label == name).to_numpy()
        if batch_key is None:
            reference = expression[(label == "control").to_numpy()].mean()
        else:
            weights = rep[cells].value_counts(normalize=True)
            reference = sum(w * expression[((label == "control") & (rep == b)).to_numpy()].mean()
                            for b, w in weights.items())
        np.testing.assert_allclose(value, 1 - expression[cells].mean() / reference, rtol=1e-9)


def test_min_knockdown_drops_and_lists_the_weak(papalexi_path):
    full = pseudobulk(str(papalexi_path), control="control", n_top_genes=50, block_rows=4096,
                      as_xarray=True)
    weak = full.perturbation.values[full.knockdown.values < 0.5]
    assert weak.size
    ds = pseudobulk(str(papalexi_path), control="control", n_top_genes=50, block_rows=4096,
                    min_knockdown=0.5, as_xarray=True)
    assert set(full.perturbation.values) - set(ds.perturbation.values) == set(weak)
    assert sorted(json.loads(ds.attrs["low_knockdown_perturbations"])) == sorted(weak)
    assert np.isnan(ds.knockdown.values).sum() == 16  # no measured target: kept


def test_the_compiled_knockdown_record_equals_numpy():
    from genepert_scale.pp import knockdown
    from genepert_scale.pp.groups import group_cells

    rng = np.random.default_rng(2)
    x = sp.random(300, 12, density=0.4, format="csr", random_state=3, dtype=np.float32)
    x.data = np.floor(x.data * 40)
    labels = rng.choice(["ctrl", "G1", "G2+G5", "G7", "G3+NOPE"], 300)
    codes = np.array([["ctrl", "G1", "G2+G5", "G3+NOPE", "G7"].index(v) for v in labels], np.int32)
    codes[:7] = -1
    grouped, groups = group_cells(codes, ["ctrl", "G1", "G2+G5", "G3+NOPE", "G7"])
    targets = knockdown.targets_of(groups, [f"G{i}" for i in range(12)], "ctrl")
    scales = knockdown.row_scales(x.data, x.indptr, 1e4)
    compiled, numpy = (knockdown.block_target_sums(sp.csr_array(x), grouped, targets, scales,
                                                   True, use_numba=flag) for flag in (True, False))
    for a, b in zip(compiled, numpy):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert compiled[0][groups.perturbation == "G3+NOPE", 1] == 0  # an unmeasured target


# ---------------------------------------------------------------- evaluation across contexts

CONTEXTS = ("K562", "RPE1", "HEPG2")


def context_store(path, contexts=CONTEXTS, empty=("U937",), seed=5):
    """A pseudo-bulk of ``contexts`` over perturbations G0..G23 (each context
    lacks every fifth; G22 is perturbed in HEPG2 only), deltas linear in the
    embedding with a map per context; ``empty``: contexts with a control and
    no perturbation. Returns the Dataset and the unit embedding rows by gene."""
    import xarray as xr

    from genepert_scale.io.encodings import PSEUDOBULK
    from genepert_scale.tl.embeddings import normalize_rows

    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(24)]
    unit = normalize_rows(rng.normal(size=(24, 6)))
    shared = rng.normal(size=(6, 20))
    names, lines, deltas = [], [], []
    for c, line in enumerate(contexts):
        own = shared + 0.5 * rng.normal(size=(6, 20))
        for i, gene in enumerate(genes):
            if (i + c) % 5 and (gene != "G22" or line == "HEPG2"):
                names.append(gene)
                lines.append(line)
                deltas.append(unit[i] @ own + 0.05 * rng.normal(size=20))
    delta, every = np.array(deltas), [*contexts, *empty]
    ds = xr.Dataset(
        {"delta": (("perturbation", "gene"), delta), "mean": (("perturbation", "gene"), delta + 1),
         "n_cells": ("perturbation", np.full(len(names), 40)),
         "control_mean": ((CONTROL_CONTEXT, "gene"), np.repeat(1.0 + np.arange(len(every)), 20).reshape(-1, 20)),
         "n_control_cells": (CONTROL_CONTEXT, np.full(len(every), 100))},
        coords={"perturbation": np.array(names, dtype=object),
                "context": ("perturbation", np.array(lines, dtype=object)),
                "gene": np.array([f"R{j}" for j in range(20)], dtype=object),
                CONTROL_CONTEXT: np.array(every, dtype=object)},
        attrs=PSEUDOBULK.attrs(),
    )
    from genepert_scale.pp.aggregate import write_pseudobulk

    write_pseudobulk(ds, str(path), overwrite=True)
    return ds, dict(zip(genes, unit))


@pytest.fixture(scope="module")
def lines_store(tmp_path_factory):
    import pickle

    tmp = tmp_path_factory.mktemp("lines")
    ds, unit = context_store(tmp / "pb.zarr")
    vectors = np.random.default_rng(5).normal(size=(24, 6))  # unit = these, normalised
    (tmp / "emb.pkl").write_bytes(pickle.dumps({f"G{i}": list(v) for i, v in enumerate(vectors)}))
    return str(tmp / "pb.zarr"), str(tmp / "emb.pkl"), ds, unit


def predicted(result, model: str, context: str) -> pd.DataFrame:
    """One model's stored predictions of one context, by perturbation."""
    p = result.predictions
    rows = p["context"].values == context
    return pd.DataFrame(p["prediction"].sel(model=model).values[rows],
                        index=p["perturbation"].values[rows])


def test_evaluate_runs_the_split_within_each_context_and_pools(lines_store):
    from genepert_scale.pp.aggregate import one_context
    from genepert_scale.tl.evaluate import evaluate

    path, emb, ds, _ = lines_store
    options = {"n_folds": 3, "seed": 1, "knn_k": (1,), "progress": False}
    result = evaluate(path, emb, **options)
    assert list(result.contexts) == list(CONTEXTS)
    assert result.parameters["contexts"] == {"mode": "within", "evaluated": list(CONTEXTS),
                                             "without_perturbations": ["U937"]}
    table = result.per_perturbation
    assert list(table.columns[:3]) == ["context", "perturbation", "fold"]
    for line in CONTEXTS:  # the same as --context LINE, one at a time
        alone = evaluate(one_context(ds, line), emb, **options)
        part = table[table.context == line].drop(columns="context").reset_index(drop=True)
        pd.testing.assert_frame_equal(part, alone.per_perturbation)
        assert result.contexts[line].summary == alone.summary
        np.testing.assert_array_equal(result.predictions["control_mean"].sel({CONTROL_CONTEXT: line}),
                                      ds.control_mean.sel({CONTROL_CONTEXT: line}))
    ridge = table[table.model == "genepert_ridge"]
    pooled = result.summary["genepert_ridge"]["pearson_delta"]
    assert pooled["n"] == len(ridge) == sum(ds.context.values != "U937")
    assert pooled["mean"] == pytest.approx(ridge.pearson_delta.mean())
    folds = ridge.groupby(["context", "fold"]).pearson_delta.mean()
    assert len(folds) == 9 and pooled["fold_mean"] == pytest.approx(folds.mean())
    assert result.baselines["matching_mean"]["n_scored"] == len(ridge)


def hand_cross_context(ds, held_out: str) -> dict[str, np.ndarray]:
    """Per perturbation of ``held_out``: its mean delta over the other
    contexts where it was perturbed, else the mean of every training row."""
    train = ds.context.values != held_out
    names, delta = ds.perturbation.values, ds.delta.values
    out = {}
    for name in names[~train]:
        rows = train & (names == name)
        out[name] = delta[rows].mean(axis=0) if rows.any() else delta[train].mean(axis=0)
    return out


def test_context_split_against_direct_computations(lines_store):
    from sklearn.linear_model import Ridge

    from genepert_scale.tl.evaluate import evaluate

    path, emb, ds, unit = lines_store
    result = evaluate(path, emb, split="context", alphas=0.5, progress=False)
    assert list(result.models) == ["genepert_ridge", "mean_baseline", "cross_context_baseline"]
    names, lines, delta = ds.perturbation.values, ds.context.values, ds.delta.values
    fell_back = {}
    for line in CONTEXTS:
        train, test = lines != line, lines == line
        G = np.array([unit[n] for n in names])
        ridge = Ridge(alpha=0.5).fit(G[train], delta[train]).predict(G[test])
        np.testing.assert_allclose(predicted(result, "genepert_ridge", line).loc[names[test]], ridge,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(predicted(result, "mean_baseline", line).loc[names[test]],
                                   np.tile(delta[train].mean(axis=0), (test.sum(), 1)), rtol=1e-5, atol=1e-6)
        hand = hand_cross_context(ds, line)
        np.testing.assert_allclose(predicted(result, "cross_context_baseline", line).loc[list(hand)],
                                   np.array(list(hand.values())), rtol=1e-5, atol=1e-6)
        fell_back[line] = int(sum(not (train & (names == n)).any() for n in names[test]))
        notes = result.baselines["cross_context_baseline"]["per_context"][line]
        assert notes["n_fell_back"] == fell_back[line] and notes["n_scored"] == test.sum()
        assert result.contexts[line].fold_fits[0].alpha == 0.5
    assert fell_back == {"K562": 0, "RPE1": 0, "HEPG2": 1}  # G22
    assert result.baselines["cross_context_baseline"]["n_fell_back"] == 1
    table = result.per_perturbation
    assert set(table.loc[table.perturbation == "G22", "subgroup"]) == {"unseen_in_training_contexts"}
    assert result.parameters["contexts"]["without_perturbations"] == ["U937"]
    for line in CONTEXTS:  # the metrics of a context: its rows of the pooled table
        own = table[(table.context == line) & (table.model == "genepert_ridge")].pearson_delta
        assert result.contexts[line].summary["genepert_ridge"]["pearson_delta"]["mean"] == pytest.approx(own.mean())


def test_no_row_of_the_held_out_context_enters_its_models(lines_store, tmp_path):
    from genepert_scale.tl.evaluate import evaluate

    path, emb, ds, _ = lines_store
    changed = ds.copy(deep=True)
    hepg2 = changed.context.values == "HEPG2"
    changed["delta"].values[hepg2] = np.random.default_rng(9).normal(scale=3, size=(hepg2.sum(), 20))
    options = {"split": "context", "alphas": [0.01, 0.1, 1.0, 10.0], "n_folds": 3, "progress": False}
    before, after = evaluate(path, emb, **options), evaluate(changed, emb, **options)
    # equal up to rounding: the training statistics are the total less the held-out context's
    for model in before.models:
        np.testing.assert_allclose(predicted(before, model, "HEPG2"), predicted(after, model, "HEPG2"),
                                   rtol=1e-6, atol=1e-7)
    fits = [f.contexts["HEPG2"].fold_fits[0] for f in (before, after)]
    assert fits[0].alpha == fits[1].alpha
    for column in ("train_mse", "inner_cv_pearson_delta", "inner_cv_mse"):
        np.testing.assert_allclose(fits[0].path[column], fits[1].path[column], rtol=1e-10)
    assert not np.allclose(fits[0].path["val_mse"], fits[1].path["val_mse"])  # the held-out rows did change
    assert not np.allclose(predicted(before, "genepert_ridge", "K562"), predicted(after, "genepert_ridge", "K562"))


def test_context_split_needs_two_contexts(lines_store, tmp_path):
    from genepert_scale.errors import ParameterError
    from genepert_scale.pp.aggregate import one_context
    from genepert_scale.tl.evaluate import evaluate

    _, emb, ds, _ = lines_store
    context_store(tmp_path / "one.zarr", contexts=("K562",), empty=())
    with pytest.raises(ParameterError, match=r"one.zarr holds one context \(K562\); --split context"):
        evaluate(str(tmp_path / "one.zarr"), emb, split="context", progress=False)
    with pytest.raises(ParameterError, match=r"one context \(RPE1\) was chosen: drop --context"):
        evaluate(one_context(ds, "RPE1"), emb, split="context", progress=False)
    context_store(tmp_path / "two.zarr", contexts=("K562", "RPE1"), empty=())
    with pytest.raises(ParameterError, match="needs two contexts with perturbations .* K562 has them"):
        evaluate(str(tmp_path / "two.zarr"), _only_k562_vectors(tmp_path), split="context", progress=False)


def _only_k562_vectors(tmp_path) -> str:
    """Vectors of the genes that only K562 perturbs (RPE1 lacks every fifth from G4)."""
    import pickle

    path = tmp_path / "k562.pkl"
    path.write_bytes(pickle.dumps({g: [1.0, float(i)] for i, g in enumerate(["G4", "G9", "G14", "G19"])}))
    return str(path)


def test_evaluate_and_report_with_contexts_from_the_command_line(lines_store, tmp_path):
    from genepert_scale.cli.commands import main

    path, emb, ds, _ = lines_store
    out = tmp_path / "held"
    assert main(["evaluate", path, "--embeddings", emb, "--split", "context", "--alpha", "1", "--folds", "3",
                 "--out", str(out), "--no-progress"]) == 0
    document = json.loads((out / "metrics.json").read_text())
    assert list(document["contexts"]) == list(CONTEXTS)
    for line in CONTEXTS:
        assert set(document["contexts"][line]) == {"genepert_ridge", "mean_baseline", "cross_context_baseline"}
        assert document["contexts"][line]["genepert_ridge"]["alpha"]["chosen"] == [1.0]
    assert document["models"]["genepert_ridge"]["pearson_delta"]["n"] == sum(ds.context.values != "U937")
    assert document["baselines"]["cross_context_baseline"]["n_fell_back"] == 1
    table = pd.read_csv(out / "per_perturbation.csv")
    assert table.columns[0] == "context" and set(table.context) == set(CONTEXTS)
    page = (out / "report.html").read_text()
    assert "<h2>Contexts</h2>" in page and "Each context held out in turn" in page and "U937" in page
    from genepert_scale.io.encodings import open_predictions

    stored = open_predictions(str(out / "predictions.zarr"))
    assert list(stored[CONTROL_CONTEXT].values) == list(CONTEXTS)
    assert main(["evaluate", path, "--embeddings", emb, "--folds", "3", "--alpha", "1",
                 "--out", str(tmp_path / "within"), "--no-progress"]) == 0
    within = json.loads((tmp_path / "within" / "metrics.json").read_text())
    assert within["parameters"]["contexts"]["mode"] == "within" and "knn_1" in within["contexts"]["RPE1"]
    assert main(["evaluate", path, "--embeddings", emb, "--folds", "3", "--alpha", "1", "--context", "RPE1",
                 "--out", str(tmp_path / "rpe1"), "--no-progress"]) == 0
    assert "contexts" not in json.loads((tmp_path / "rpe1" / "metrics.json").read_text())


def test_run_config_chooses_a_context_or_the_context_split(lines_store, tmp_path):
    from genepert_scale.cli.config import load_config
    from genepert_scale.cli.pipeline import STAGES, StageRun
    from genepert_scale.errors import ParameterError

    path, emb, ds, _ = lines_store

    def config(evaluate: str):
        text = (f'[input]\nurl = "{path}"\n[embeddings]\npaths = ["{emb}"]\n[output]\ndir = "{tmp_path}"\n'
                f"[evaluate]\nfolds = 3\nalphas = [1.0]\n{evaluate}")
        (tmp_path / "run.toml").write_text(text)
        return load_config(str(tmp_path / "run.toml"))

    stages = {stage.name: stage for stage in STAGES}
    inputs = {"pseudobulk": path, "embeddings": (emb,)}
    stages["evaluate"].run(StageRun(config('split = "context"\n'), inputs, str(tmp_path / "held"), False))
    assert json.loads((tmp_path / "held" / "metrics.json").read_text())["parameters"]["split"] == "context"
    one = config('context = "K562"\n')
    stages["evaluate"].run(StageRun(one, inputs, str(tmp_path / "k562"), False))
    assert json.loads((tmp_path / "k562" / "metrics.json").read_text())["parameters"]["n_perturbations"] == sum(
        ds.context.values == "K562")
    stages["fit"].run(StageRun(one, inputs, str(tmp_path / "model.zarr"), False))
    with pytest.raises(ParameterError, match=r"split = \"context\" .* takes no context key"):
        config('context = "K562"\nsplit = "context"\n')
    with pytest.raises(ParameterError, match="not 'HELA'"):
        stages["fit"].run(StageRun(config('context = "HELA"\n'), inputs, str(tmp_path / "m2.zarr"), False))


def test_target_key_gives_the_knockdown_of_guide_labels(papalexi_path):
    adata = ad.read_h5ad(papalexi_path)
    label = adata.obs["perturbation"].astype(str).to_numpy()
    guide = np.where(label == "control", "control",
                     np.char.add(label.astype(str), np.where(np.arange(label.size) % 2, "_g1", "_g2")))
    adata.obs["guide"], adata.obs["target"] = guide, label
    options = {"perturbation_key": "guide", "control": "control", "n_top_genes": 50,
               "block_rows": 4096, "as_xarray": True}
    assert "knockdown" not in pseudobulk(adata, **options)  # guide names are no genes
    ds = pseudobulk(adata, target_key="target", **options)
    control = (label == "control")
    checked = 0
    for name, value in zip(ds.perturbation.values, ds.knockdown.values):
        gene = name.rsplit("_", 1)[0]
        if gene not in adata.var_names:
            assert np.isnan(value)
            continue
        expression, cells = normalized(adata, gene), guide == name
        np.testing.assert_allclose(value, 1 - expression[cells].mean() / expression[control].mean(),
                                   rtol=1e-9)
        checked += 1
    assert checked == 18  # nine measured targets, two guides each
    first = ds.perturbation.values[0]
    adata.obs["target"] = np.where(np.arange(label.size) == np.flatnonzero(guide == first)[3], "OTHER", label)
    with pytest.raises(ParameterError, match=rf"--target-key target: the cells of {first} name different"):
        pseudobulk(adata, target_key="target", **options)
