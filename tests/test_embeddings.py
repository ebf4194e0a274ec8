"""Embedding readers, concatenation, pairs, symbol matching and missing-gene policies."""

from __future__ import annotations

import logging
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from genepert_scale.tl.embeddings import (
    featurize,
    load_embeddings,
    normalize_rows,
    read_gene_map,
    read_table,
)
from genepert_scale.errors import EmbeddingError

GENES = ["KLF1", "GATA1", "TP53", "MYC", "CEBPA"]


@pytest.fixture
def raw():
    return np.random.default_rng(0).normal(size=(len(GENES), 6))


def write(kind: str, path, genes, values) -> str:
    frame = pd.DataFrame(values, index=genes, columns=[f"d{i}" for i in range(values.shape[1])])
    if kind == "pickle-dict":
        path = path / "emb.pickle"
        path.write_bytes(pickle.dumps({g: list(v) for g, v in zip(genes, values)}))
    elif kind == "pickle-frame":
        path = path / "emb.pkl"
        frame.to_pickle(path)
    elif kind == "csv":
        path = path / "emb.csv"
        frame.to_csv(path)
    elif kind == "tsv-no-header":
        path = path / "emb.tsv"
        frame.to_csv(path, sep="\t", header=False)
    elif kind == "parquet":
        path = path / "emb.parquet"
        frame.rename_axis("gene").reset_index().to_parquet(path)
    elif kind == "npz":
        path = path / "emb.npz"
        np.savez(path, genes=np.array(genes), vectors=values)
    elif kind == "h5ad":
        path = path / "emb.h5ad"
        ad.AnnData(values, obs=pd.DataFrame(index=genes)).write_h5ad(path)
    elif kind == "zarr":
        path = path / "emb.zarr"
        with ad.settings.override(zarr_write_format=3):
            ad.AnnData(values, obs=pd.DataFrame(index=genes)).write_zarr(path)
    return str(path)


KINDS = ["pickle-dict", "pickle-frame", "csv", "tsv-no-header", "parquet", "npz", "h5ad", "zarr"]


@pytest.mark.parametrize("kind", KINDS)
def test_formats_round_trip(kind, tmp_path, raw):
    genes, values = read_table(write(kind, tmp_path, GENES, raw))
    assert list(genes) == GENES
    np.testing.assert_allclose(values, raw, rtol=1e-6 if kind in ("h5ad", "zarr") else 1e-12)


def test_fsspec_url(tmp_path, raw):
    path = write("npz", tmp_path, GENES, raw)
    genes, values = read_table(f"file://{path}")
    assert list(genes) == GENES and np.allclose(values, raw)


def test_rows_are_normalised(tmp_path, raw):
    table = load_embeddings(write("csv", tmp_path, GENES, raw))
    np.testing.assert_allclose(np.linalg.norm(table.vectors, axis=1), 1.0)
    np.testing.assert_allclose(table.vectors, raw / np.linalg.norm(raw, axis=1, keepdims=True))
    assert table.sources[0]["dim"] == 6 and len(table.sources[0]["sha256"]) == 64


def test_concatenation_on_shared_genes(tmp_path, raw):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    other = np.random.default_rng(1).normal(size=(4, 3))
    first = write("csv", tmp_path / "a", GENES, raw)
    second = write("npz", tmp_path / "b", ["MYC", "TP53", "NEW", "KLF1"], other)
    table = load_embeddings([first, second])
    assert list(table.genes) == ["KLF1", "TP53", "MYC"]
    a = normalize_rows(raw[[0, 2, 3]])
    b = normalize_rows(other[[3, 1, 0]])
    np.testing.assert_allclose(table.vectors, np.hstack([a, b]) / np.sqrt(2))
    assert table.dim == 9 and len(table.sources) == 2


def test_pairs_are_normalised_sums(tmp_path, raw):
    table = load_embeddings(write("npz", tmp_path, GENES, raw))
    features = featurize(table, ["KLF1", "KLF1+GATA1", "TP53+ctrl"])
    rows = features.rows()
    unit = normalize_rows(raw)
    expected = unit[0] + unit[1]
    np.testing.assert_allclose(rows[1], expected / np.linalg.norm(expected))
    np.testing.assert_allclose(rows[0], unit[0])
    np.testing.assert_allclose(rows[2], unit[2])
    np.testing.assert_allclose(features.rows([1]), rows[[1]])


def test_missing_drop_reports(tmp_path, raw, caplog):
    table = load_embeddings(write("npz", tmp_path, GENES, raw))
    with caplog.at_level(logging.WARNING):
        features = featurize(table, ["KLF1", "NOPE", "MYC+NADA", "GATA1"])
    assert features.perturbations == ["KLF1", "GATA1"]
    assert features.dropped == ["NOPE", "MYC+NADA"]
    assert features.missing_genes == ["NADA", "NOPE"]
    assert features.summary()["n_dropped_perturbations"] == 2
    assert "dropping 2 of 4 perturbations" in caplog.text and "NOPE" in caplog.text


def test_missing_error_lists_genes(tmp_path, raw):
    table = load_embeddings(write("npz", tmp_path, GENES, raw))
    with pytest.raises(EmbeddingError, match=r"2 genes have no embedding vector .*emb\.npz.*NADA, NOPE"):
        featurize(table, ["KLF1", "NOPE", "MYC+NADA"], missing="error")


def test_missing_zero_and_random(tmp_path, raw):
    table = load_embeddings(write("npz", tmp_path, GENES, raw))
    zero = featurize(table, ["NOPE", "MYC+NOPE"], missing="zero").rows()
    np.testing.assert_array_equal(zero[0], 0.0)
    np.testing.assert_allclose(zero[1], normalize_rows(raw)[3])
    first = featurize(table, ["NOPE", "NADA"], missing="random", seed=5).rows()
    again = featurize(table, ["NADA", "NOPE", "KLF1"], missing="random", seed=5).rows()
    other_seed = featurize(table, ["NOPE"], missing="random", seed=6).rows()
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0)
    np.testing.assert_array_equal(first[0], again[1])  # same gene, same vector
    assert not np.allclose(first[0], first[1]) and not np.allclose(first[0], other_seed[0])


def test_nothing_left_is_an_error(tmp_path, raw):
    table = load_embeddings(write("npz", tmp_path, GENES, raw))
    with pytest.raises(EmbeddingError, match="has none of the 1 perturbed genes"):
        featurize(table, ["NOPE"])


def test_case_insensitive_match_warns(tmp_path, raw, caplog):
    table = load_embeddings(write("npz", tmp_path, GENES, raw))
    with caplog.at_level(logging.WARNING):
        features = featurize(table, ["Klf1", "GATA1"])
    assert features.perturbations == ["Klf1", "GATA1"] and features.case_matched == {"Klf1": "KLF1"}
    assert "case-insensitively" in caplog.text and "Klf1->KLF1" in caplog.text
    np.testing.assert_allclose(features.rows()[0], normalize_rows(raw)[0])


def test_gene_map(tmp_path, raw):
    table = load_embeddings(write("npz", tmp_path, GENES, raw))
    (tmp_path / "map.csv").write_text("ensembl,symbol\nENSG01,TP53\nOLDMYC,MYC\n")
    mapping = read_gene_map(str(tmp_path / "map.csv"))
    features = featurize(table, ["ENSG01", "OLDMYC+KLF1"], gene_map=mapping, missing="error")
    unit = normalize_rows(raw)
    np.testing.assert_allclose(features.rows()[0], unit[2])
    np.testing.assert_allclose(features.rows()[1], normalize_rows((unit[3] + unit[0])[None])[0])


@pytest.mark.parametrize(
    "content,match",
    [
        ({"A": [1.0, 2.0], "B": [1.0]}, "rows have different lengths"),
        ({"A": [1.0, float("nan")]}, "NaN or infinite"),
        ([1, 2, 3], "pickle holds a list"),
    ],
)
def test_bad_pickles(tmp_path, content, match):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(EmbeddingError, match=match) as err:
        read_table(str(path))
    assert "bad.pkl" in str(err.value)


def test_bad_paths(tmp_path):
    with pytest.raises(EmbeddingError, match="does not exist"):
        read_table(str(tmp_path / "none.csv"))
    with pytest.raises(EmbeddingError, match="unknown embedding format"):
        read_table(str(tmp_path / "emb.xyz"))
    (tmp_path / "dup.csv").write_text("A,1,2\nA,3,4\n")
    with pytest.raises(EmbeddingError, match="duplicate genes: A"):
        read_table(str(tmp_path / "dup.csv"))
    (tmp_path / "text.csv").write_text("A,1,2\nB,3,x\nC,5,6\n")
    with pytest.raises(EmbeddingError, match="text.csv"):
        read_table(str(tmp_path / "text.csv"))
