"""Parameter errors are raised before any pass over the cells, with a remedy."""

from __future__ import annotations

import pytest

from genepert_scale.cli.config import ClusterConfig
from genepert_scale.errors import ParameterError, StoreError
from genepert_scale.tl.model import fit
from genepert_scale.pp.aggregate import pseudobulk
from genepert_scale.datasets.synth import embedding_path_for, synth_screen


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"flavor": "seurat_v4"}, "--flavor 'seurat_v4' is not one of seurat, cell_ranger"),
        ({"input": "raw"}, "--input 'raw' is not one of auto, counts, log1p"),
        ({"memory_limit": "lots"}, "--memory-limit 'lots' is not a size"),
    ],
)
def test_bad_pseudobulk_options_fail_before_opening_the_screen(options, fragment, tmp_path):
    # the screen does not exist: the option error must come first
    with pytest.raises(ParameterError, match=fragment):
        pseudobulk(str(tmp_path / "absent.zarr"), progress=False, **options, as_xarray=True)


def test_synth_refuses_an_existing_embedding_before_writing_the_screen(tmp_path):
    out = tmp_path / "s.zarr"
    with open(embedding_path_for(str(out)), "w") as fh:
        fh.write("keep me")
    with pytest.raises(StoreError, match="already exists"):
        synth_screen(str(out), cells=100, genes=20, perturbations=4)
    assert not out.exists()


def test_synth_perturbations_beyond_pairs_is_a_parameter_error(tmp_path):
    # 20 genes give 20 singles and 190 pairs
    with pytest.raises(ParameterError, match="--perturbations 211 is more than the genes and pairs"):
        synth_screen(str(tmp_path / "s.zarr"), cells=100, genes=20, perturbations=211)


def test_scheduler_kind_without_address_is_an_error(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with pytest.raises(ParameterError, match="needs address"):
        ClusterConfig(kind="scheduler").client_options()
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:8786")
    assert ClusterConfig(kind="scheduler").client_options()["scheduler"] is None  # env decides


def test_fit_with_a_grid_needs_folds(small_screen):
    path, embedding = small_screen
    ds = pseudobulk(path, n_top_genes=50, progress=False, as_xarray=True)
    with pytest.raises(ParameterError, match="--folds 1 does not fit"):
        fit(ds, embedding, alphas=(0.1, 1.0), n_folds=1, progress=False)


def test_run_config_rejects_data_derived_embeddings(tmp_path):
    from genepert_scale.cli.config import load_config

    config = tmp_path / "run.toml"
    config.write_text('[input]\nurl = "s.zarr"\n[output]\ndir = "out"\n'
                      '[embeddings]\npaths = ["pca:10"]\n')
    with pytest.raises(ParameterError, match=r"pca:K\) are built per fold"):
        load_config(str(config))
