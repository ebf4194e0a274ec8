"""The engine on a real dask.distributed cluster: the ``dask scheduler`` and
``dask worker`` CLIs started as processes on 127.0.0.1.

Results must equal those of local threads exactly (the reduction tree does not
depend on the scheduler), also when a worker dies in the middle of the pass.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from cloud_helpers import (
    KillOnTask,
    assert_same_budgeted,
    assert_same_pseudobulk,
    dask_processes,
    make_screen,
    write_config,
)

from genepert_scale.cli.commands import main
from genepert_scale.cluster import dask_client
from genepert_scale.pp.aggregate import open_pseudobulk, pseudobulk

pytestmark = pytest.mark.cluster

PB_OPTIONS = {"n_top_genes": 100, "block_rows": 100, "progress": False}


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> str:
    return make_screen(tmp_path_factory.mktemp("screen"))


@pytest.fixture(scope="module")
def local_pb(screen):
    with dask_client():
        return pseudobulk(screen, **PB_OPTIONS, as_xarray=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with dask_processes(tmp_path_factory.mktemp("dask")) as processes:
        yield processes


def test_pseudobulk_on_cluster_equals_local_threads(cluster, screen, local_pb):
    with dask_client(cluster.address) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        ds = pseudobulk(screen, **PB_OPTIONS, as_xarray=True)
    assert_same_pseudobulk(ds, local_pb)


def test_worker_rooms_leave_out_what_each_worker_holds(cluster):
    # each worker's memory as the scheduler sees it, and its blocks, come off its share
    from genepert_scale.cluster import accumulator_rooms

    GiB = 2**30
    with dask_client(cluster.address) as client:
        rooms = accumulator_rooms(4 * GiB, block_bytes=10 * 2**20)
        limits = [w["memory_limit"] for w in client.scheduler_info()["workers"].values()]
    assert len(rooms) == 2
    for room, limit in zip(rooms, limits):
        memory = min(limit, 2 * GiB)  # the worker's own limit, or its share of the run's
        assert 10 * 2**20 < room.held < memory // 2  # a dask worker process and its block
        assert room.bytes == min(memory // 2, memory - room.held)


@pytest.mark.usefixtures("pass_memory_only")
def test_group_slabs_on_cluster_equal_one_local_pass(cluster, screen, local_pb, monkeypatch,
                                                    caplog):
    # the run's memory limit shared by the 2 workers: the groups are cut into slabs
    import logging

    from genepert_scale.pp import budget

    monkeypatch.setattr(budget, "ONE_PASS_BYTES", 0)
    with dask_client(cluster.address), caplog.at_level(logging.INFO, logger="genepert_scale"):
        ds = pseudobulk(screen, memory_limit=40_000, **PB_OPTIONS, as_xarray=True)
    assert "slabs of up to" in caplog.text
    assert_same_budgeted(ds, local_pb)


def test_full_run_on_cluster_equals_local(cluster, screen, tmp_path):
    """pseudobulk -> evaluate -> fit -> predict through the real cluster: the
    pseudo-bulk bit for bit, metrics and predictions to 1e-10."""
    embedding = screen.replace("screen.zarr", "screen_embedding.pkl")
    model_cfg = (f'[embeddings]\npaths = ["{embedding}"]\n\n[evaluate]\nfolds = 3\n\n'
                 '[predict]\nperturbations = ["GENE00001", "GENE00002+GENE00003"]\n\n')
    cluster_cfg = f'[cluster]\nkind = "scheduler"\naddress = "{cluster.address}"\n'
    for name, extra in (("cluster", model_cfg + cluster_cfg), ("local", model_cfg)):
        config = write_config(tmp_path / f"{name}.toml", screen=screen,
                              out=str(tmp_path / name), block_rows=100, extra=extra)
        assert main(["run", str(config), "--no-progress"]) == 0
    cluster_out, local_out = tmp_path / "cluster", tmp_path / "local"
    assert_same_pseudobulk(open_pseudobulk(str(cluster_out / "pseudobulk.zarr")),
                           open_pseudobulk(str(local_out / "pseudobulk.zarr")))
    metrics = [pd.read_csv(out / "evaluate" / "per_perturbation.csv") for out in (cluster_out, local_out)]
    pd.testing.assert_frame_equal(metrics[0], metrics[1], rtol=1e-10, atol=1e-12)
    predictions = [xr.open_zarr(out / "predictions.zarr") for out in (cluster_out, local_out)]
    np.testing.assert_allclose(predictions[0].delta, predictions[1].delta, rtol=1e-10, atol=1e-12)
    assert predictions[0].sizes["perturbation"] == 2


def test_worker_killed_mid_pass_same_result(tmp_path, screen, local_pb):
    with dask_processes(tmp_path, n_workers=2) as processes:
        with dask_client(processes.address) as client:
            client.register_plugin(KillOnTask("worker-0", "_read_and_fold", after=3))
            ds = pseudobulk(screen, **PB_OPTIONS, as_xarray=True)
            survivors = {w["name"] for w in client.scheduler_info()["workers"].values()}
        victim = processes.workers["worker-0"]
        assert victim.wait(timeout=30) == 1, "worker-0 should have died in the pass"
        assert survivors == {"worker-1"}
    assert_same_pseudobulk(ds, local_pb)


@pytest.mark.usefixtures("pass_memory_only")
def test_worker_killed_mid_slab_pass_same_result(tmp_path, screen, local_pb, monkeypatch):
    # genes first, then group slabs (lazy until computed): a worker dies in a slab's pass
    from genepert_scale.pp import budget

    monkeypatch.setattr(budget, "ONE_PASS_BYTES", 0)
    with dask_processes(tmp_path, n_workers=2) as processes:
        with dask_client(processes.address) as client:
            client.register_plugin(KillOnTask("worker-0", "_read_and_fold", after=3))
            ds = pseudobulk(screen, memory_limit=40_000, **PB_OPTIONS, as_xarray=True).compute()
            survivors = {w["name"] for w in client.scheduler_info()["workers"].values()}
        assert processes.workers["worker-0"].wait(timeout=30) == 1
        assert survivors == {"worker-1"}
    assert_same_budgeted(ds, local_pb)


def test_local_threads_never_import_distributed(small_screen):
    """Without a cluster, computing does not import distributed (0.1 s a run)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from genepert_scale.cluster import dask_client\n"
        "from genepert_scale.pp.aggregate import pseudobulk\n"
        "with dask_client():\n"
        f"    pseudobulk({small_screen[0]!r}, n_top_genes=50, progress=False, as_xarray=True)\n"
        "assert 'distributed' not in sys.modules, 'distributed was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
