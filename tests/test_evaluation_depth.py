"""Evaluation on a small pair screen: simulation and custom splits end to
end, the pca:K embedding without test leakage, report.html, compare, and
the GEARS condition column of exported predictions."""

from __future__ import annotations

import base64
import io
import json
import pickle
from html.parser import HTMLParser

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from matplotlib.image import imread
from sklearn.decomposition import PCA

from genepert_scale.cli.commands import main
from genepert_scale.pl.compare import FILES as COMPARE_FILES
from genepert_scale.tl.data_embedding import EmbeddingPlan, pca_gene_embedding
from genepert_scale.errors import ParameterError
from genepert_scale.tl.evaluate import evaluate, feature_sets, make_split
from genepert_scale.tl.metrics import METRICS
from genepert_scale.tl.model import fit, predict, training_data, write_predictions
from genepert_scale.io.encodings import PSEUDOBULK
from genepert_scale.pp.aggregate import write_pseudobulk
from genepert_scale.pl.report import FILES, write_report

N_SINGLES, N_GENES = 24, 40


def pair_screen(delta_shift: dict[str, float] | None = None) -> xr.Dataset:
    """24 singles G0..G23 (measured genes G0..G39) and 12 pairs; each delta is
    linear in a hidden gene vector (sum of the pair's), plus noise."""
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(N_GENES)]
    hidden = rng.normal(size=(N_GENES, 5))
    pairs = [f"G{i}+G{i + 1}" for i in range(0, 24, 2)]
    names = genes[:N_SINGLES] + pairs
    code = np.vstack([hidden[[int(g[1:]) for g in p.split("+")]].sum(0) for p in names])
    delta = code @ rng.normal(size=(5, N_GENES)) + 0.1 * rng.normal(size=(len(names), N_GENES))
    for name, shift in (delta_shift or {}).items():
        delta[names.index(name)] += shift
    return xr.Dataset(
        {"delta": (("perturbation", "gene"), delta), "mean": (("perturbation", "gene"), delta + 1),
         "n_cells": ("perturbation", np.full(len(names), 40)), "control_mean": ("gene", np.ones(N_GENES))},
        coords={"perturbation": np.array(names, dtype=object), "gene": np.array(genes, dtype=object)},
        attrs=PSEUDOBULK.attrs(),
    )


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    pb = write_pseudobulk(pair_screen(), str(root / "pb.zarr"))
    rng = np.random.default_rng(1)
    emb = root / "emb.pkl"
    emb.write_bytes(pickle.dumps({f"G{i}": list(rng.normal(size=8)) for i in range(N_GENES)}))
    return pb, str(emb), root


def test_simulation_split_end_to_end(screen):
    pb, emb, _ = screen
    result = evaluate(pb, emb, split="simulation", n_folds=3, seed=2, knn_k=(1,), progress=False)
    folds = result.folds
    test = folds[folds.fold == 0]
    assert result.parameters["split"] == "simulation" and len(result.fold_fits) == 1
    assert set(folds.fold) == {-1, 0} and (folds.loc[folds.fold == -1, "group"] >= 1).all()
    assert set(test.subgroup) <= {"unseen_single", "combo_seen0", "combo_seen1", "combo_seen2"}
    assert (folds.loc[folds.fold == -1, "subgroup"] == "").all() and test.novelty.between(0, 2).all()
    per = result.per_perturbation
    assert set(per.perturbation) == set(test.perturbation) and set(METRICS) <= set(per.columns)
    assert set(result.subgroups) == set(test.subgroup)
    sizes = result.parameters["subgroup_sizes"]
    for name, models in result.subgroups.items():
        assert models["genepert_ridge"]["pearson_delta"]["n"] == sizes[name]
    assert list(result.predictions["perturbation"].values) == list(test.perturbation)


def test_custom_split_end_to_end(screen, tmp_path):
    pb, emb, _ = screen
    split_file = tmp_path / "split.json"
    names = list(pair_screen()["perturbation"].values)
    tested = ["G2+ctrl", "G3+ctrl", "G0+G1", "G20+G21"]
    split_file.write_text(json.dumps({"test": tested,
                                      "train": [n for n in names if n not in ("G2", "G3", "G0+G1", "G20+G21")]}))
    result = evaluate(pb, emb, split="custom", split_file=str(split_file), n_folds=2, alphas=1.0,
                      knn_k=(1,), progress=False)
    ridge = result.per_perturbation.query("model == 'genepert_ridge'").set_index("perturbation")
    assert sorted(ridge.index) == ["G0+G1", "G2", "G20+G21", "G3"]
    assert ridge.loc["G2", "subgroup"] == "unseen_single"
    assert ridge.loc["G0+G1", "subgroup"] == "combo_seen2" and ridge.loc["G20+G21", "subgroup"] == "combo_seen2"


def test_pca_embedding_is_sklearn_pca():
    rng = np.random.default_rng(2)
    delta = rng.normal(size=(15, 30))   # 15 training perturbations x 30 genes
    source = pca_gene_embedding(delta, [f"g{j}" for j in range(30)], 4)
    scores = PCA(n_components=4, svd_solver="full").fit_transform(delta.T)  # genes as observations
    for k in range(4):
        assert abs(np.corrcoef(source.vectors[:, k], scores[:, k])[0, 1]) == pytest.approx(1.0)
        np.testing.assert_allclose(np.abs(source.vectors[:, k]), np.abs(scores[:, k]), atol=1e-10)
    with pytest.raises(ParameterError, match="at most"):
        pca_gene_embedding(delta, [f"g{j}" for j in range(30)], 16)


def test_pca_features_do_not_see_test_data(screen):
    """Changing test perturbations' data changes neither their features nor
    any prediction for them."""
    pb, _, root = screen
    split = make_split("kfold", list(pair_screen()["perturbation"].values), n_folds=3, seed=0)
    fold0 = [p for p, g in zip(pair_screen()["perturbation"].values, split.group) if g == 0]
    shifted = pair_screen({p: 5.0 * (i + 1) for i, p in enumerate(fold0)})
    plan = EmbeddingPlan(["pca:4"])
    rows = {}
    for name, ds in (("original", pair_screen()), ("shifted", shifted)):
        data = training_data(ds, plan.table(list(ds["gene"].values)))
        X = np.asarray(data.delta.compute())
        features, folds = next(feature_sets(plan, data, X, split))
        assert folds == [0]
        rows[name] = features.rows()[split.test_mask(0)]
    np.testing.assert_array_equal(rows["original"], rows["shifted"])
    results = [evaluate(ds, ["pca:4"], n_folds=3, knn_k=(1,), progress=False) for ds in (pair_screen(), shifted)]
    preds = [r.predictions["prediction"].sel(perturbation=fold0).values for r in results]
    np.testing.assert_allclose(preds[0], preds[1], rtol=1e-6, atol=1e-6)
    assert results[0].parameters["embedding"][0]["path"] == "pca:4"
    with pytest.raises(ParameterError, match="evaluate' only"):
        fit(pb, ["pca:4"], progress=False)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_report_html_and_compare(screen, tmp_path, capsys):
    pb, emb, _ = screen
    runs = []
    for label, embeddings in (("file", ["--embeddings", emb]), ("pca", ["--embeddings", "pca:4"]),
                              ("both", ["--embeddings", emb, "--embeddings", "pca:4"])):
        out = str(tmp_path / label)
        assert main(["evaluate", pb, *embeddings, "--folds", "3", "--out", out, "--no-progress"]) == 0
        runs.append(out)
    report = tmp_path / "file"
    for name in FILES:
        assert (report / name).exists(), name
    page = (report / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    parser = _Images()
    parser.feed(page)
    assert {"table", "h1"} <= parser.tags and len(parser.sources) == 4
    for src in parser.sources:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        png = base64.b64decode(src[len(prefix):], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and imread(io.BytesIO(png), format="png").ndim == 3
    doc = json.loads((report / "metrics.json").read_text())
    assert doc["parameters"]["split"] == "kfold" and doc["subgroups"] and doc["novelty"]
    folds = pd.read_csv(report / "folds.csv")
    assert list(folds.columns) == ["perturbation", "fold", "group", "subgroup", "novelty"]
    out = tmp_path / "cmp"
    assert main(["compare", *runs, "--labels", "file,pca,both", "--out", str(out)]) == 0
    for name in COMPARE_FILES:
        assert (out / name).exists(), name
    table = pd.read_csv(out / "compare.csv")
    # 7 models, plus matching_mean and additive (pairs); pca_ridge only beside a file embedding
    assert len(table) == 10 + 9 + 9 and set(table.run) == {"file", "pca", "both"}
    assert table.loc[table.run == "both", "embedding"].iloc[0].endswith("emb.pkl + pca:4")
    assert np.isfinite(table.query("model == 'genepert_ridge'")["pearson_delta_mean"]).all()
    assert (out / "compare.md").read_text().startswith("| run | embedding | model |")
    assert "genepert_ridge" in capsys.readouterr().out
    assert main(["compare", runs[0], str(tmp_path / "nothing"), "--out", str(tmp_path / "c2")]) == 3


def test_predictions_h5ad_condition(screen, tmp_path):
    pb, emb, _ = screen
    model = fit(pb, emb, alphas=1.0, progress=False)
    path = write_predictions(predict(model, emb, ["G30", "G31+G32"]), str(tmp_path / "pred.h5ad"))
    adata = ad.read_h5ad(path)
    assert adata.obs["condition"].tolist() == ["ctrl", "G30+ctrl", "G31+G32"]
    assert list(adata.obs_names) == ["ctrl", "G30", "G31+G32"] and list(adata.var_names) == [f"G{i}" for i in range(N_GENES)]


def test_write_report_is_atomic_and_complete(screen, tmp_path):
    pb, emb, _ = screen
    result = evaluate(pb, emb, split="simulation", n_folds=2, knn_k=(1,), progress=False)
    write_report(result, str(tmp_path / "r"))
    doc = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert doc["parameters"]["test_share"] == 0.25 and len(doc["models"]["genepert_ridge"]["folds"]) == 1
