"""Object stores for real: a moto S3 server on 127.0.0.1 reached over HTTP by
s3fs. ``genepert-scale run`` reads the screen from ``s3://`` and writes every
output and stage record to ``s3://``; results equal a local run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from cloud_helpers import assert_same_pseudobulk, make_screen, moto_s3, write_config

from genepert_scale.cli.commands import main
from genepert_scale.errors import INPUT_ERROR_EXIT_CODE
from genepert_scale.cli.pipeline import read_record
from genepert_scale.pp.aggregate import open_pseudobulk, pseudobulk

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(storage options, s3fs filesystem) of a bucket ``screens`` holding a screen."""
    import s3fs

    local = make_screen(tmp_path_factory.mktemp("screen"))
    with moto_s3() as endpoint:
        options = {"client_kwargs": {"endpoint_url": endpoint}}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("screens")
        fs.put(local, "screens/screen.zarr", recursive=True)
        yield options, fs, local


def test_run_reads_and_writes_s3(s3, tmp_path, capsys):
    options, fs, local = s3
    config = write_config(tmp_path / "run.toml", screen="s3://screens/screen.zarr",
                          out="s3://screens/runs/one")
    argv = ["run", str(config), "--until", "pseudobulk", "--no-progress",
            "--storage-options", json.dumps(options)]
    assert main(argv) == 0
    assert "pseudobulk   ran        s3://screens/runs/one/pseudobulk.zarr" in capsys.readouterr().out
    remote = open_pseudobulk("s3://screens/runs/one/pseudobulk.zarr", options).load()
    assert_same_pseudobulk(remote, pseudobulk(local, n_top_genes=100, block_rows=500, group_variance=True,
                                              progress=False, as_xarray=True))
    record = read_record("s3://screens/runs/one", "pseudobulk", options)
    assert record["inputs"] == {"screen": "s3://screens/screen.zarr"}
    assert not [p for p in fs.ls("screens/runs/one") if ".tmp-" in p]

    assert main(argv) == 0
    assert "pseudobulk   skipped" in capsys.readouterr().out
    assert main([*argv, "--overwrite"]) == 0  # replaces the output in the bucket
    assert "pseudobulk   ran" in capsys.readouterr().out
    assert_same_pseudobulk(open_pseudobulk("s3://screens/runs/one/pseudobulk.zarr", options),
                           remote)
    assert not [p for p in fs.ls("screens/runs/one") if ".tmp-" in p]


def test_full_run_on_s3_equals_local(s3, tmp_path, capsys):
    """Every stage reads from and writes to the bucket (embeddings included);
    the report, model and predictions equal a local run."""
    options, fs, local = s3
    fs.put(local.replace("screen.zarr", "screen_embedding.pkl"), "screens/emb.pkl")
    model_cfg = ('[evaluate]\nfolds = 3\n\n[predict]\nperturbations = ["GENE00001", "GENE00002"]\n\n')
    remote_cfg = write_config(tmp_path / "remote.toml", screen="s3://screens/screen.zarr",
                              out="s3://screens/runs/full",
                              extra='[embeddings]\npaths = ["s3://screens/emb.pkl"]\n\n' + model_cfg)
    local_emb = local.replace("screen.zarr", "screen_embedding.pkl")
    local_cfg = write_config(tmp_path / "local.toml", screen=local, out=str(tmp_path / "out"),
                             extra=f'[embeddings]\npaths = ["{local_emb}"]\n\n' + model_cfg)
    assert main(["run", str(remote_cfg), "--no-progress", "--storage-options", json.dumps(options)]) == 0
    assert main(["run", str(local_cfg), "--no-progress"]) == 0
    listing = {p.rsplit("/", 1)[-1] for p in fs.ls("screens/runs/full")}
    assert {"pseudobulk.zarr", "evaluate", "model.zarr", "predictions.zarr", "_stages"} <= listing
    with fs.open("screens/runs/full/evaluate/metrics.json") as fh:
        remote_metrics = json.load(fh)["models"]
    local_metrics = json.loads((tmp_path / "out" / "evaluate" / "metrics.json").read_text())["models"]
    for model in ("genepert_ridge", "mean_baseline"):
        assert remote_metrics[model]["pearson_delta"]["mean"] == pytest.approx(
            local_metrics[model]["pearson_delta"]["mean"], rel=1e-10)
    remote_pred = xr.open_zarr(fs.get_mapper("screens/runs/full/predictions.zarr"))
    local_pred = xr.open_zarr(tmp_path / "out" / "predictions.zarr")
    np.testing.assert_allclose(remote_pred.delta.values, local_pred.delta.values, rtol=1e-10)


def test_missing_s3_screen_is_a_clear_error(s3, tmp_path, capsys):
    options, _, _ = s3
    config = write_config(tmp_path / "run.toml", screen="s3://screens/nothing.zarr",
                          out="s3://screens/runs/two")
    code = main(["run", str(config), "--no-progress", "--storage-options", json.dumps(options)])
    assert code == INPUT_ERROR_EXIT_CODE
    assert "input s3://screens/nothing.zarr does not exist" in capsys.readouterr().err


def test_sort_reads_and_writes_s3(s3, tmp_path):
    import anndata as ad

    from genepert_scale.pp.sort import sort_screen

    options, fs, local = s3
    out = sort_screen("s3://screens/screen.zarr", "s3://screens/sorted.zarr",
                      storage_options=options, memory_limit=200_000)
    fs.get("screens/sorted.zarr", str(tmp_path / "sorted.zarr"), recursive=True)
    remote = ad.read_zarr(tmp_path / "sorted.zarr")
    expected = ad.read_zarr(sort_screen(local, str(tmp_path / "local.zarr")))
    assert out == "s3://screens/sorted.zarr"
    assert list(remote.obs_names) == list(expected.obs_names)
    assert (remote.X != expected.X).nnz == 0
    assert not [p for p in fs.ls("screens") if ".tmp-" in p]
