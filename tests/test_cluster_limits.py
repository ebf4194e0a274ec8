"""A LocalCluster with a small memory limit: it completes a pass over more data
than the limit, and gives bit-identical results to the local schedulers."""

from __future__ import annotations

import os

import anndata as ad
import dask
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from genepert_scale.pp import kernels
from genepert_scale.cluster import compute
from genepert_scale.pp.labels import assign_groups
from genepert_scale.pp.aggregate import pseudobulk
from genepert_scale.pp.reduce import pass_stats
from genepert_scale.io.screen import open_screen
from genepert_scale.io.store import CsrAppender, quiet_zarr_warnings, zarr_store

pytestmark = pytest.mark.cluster

#: A worker's own baseline (dask, zarr, anndata, numba) is 250-370 MiB depending on the
#: environment, and distributed pauses a worker at 80 % of its limit: 768 MiB leaves
#: room for the blocks in flight and is still smaller than the data.
MEMORY_LIMIT = 768 * 2**20
BLOCK_ROWS, GENES, PER_ROW = 10_000, 400, 100


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    # compile (and cache on disk) the numba kernels here: a JIT compile inside a
    # memory-limited worker takes ~200 MiB and could pause it — that is not what is tested
    block, _ = repeated_block()
    kernels.block_stats(block[:10], np.zeros(10, np.int32), 1, with_group_sumsq=True)
    with (
        distributed.LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=MEMORY_LIMIT,
                                 processes=True, dashboard_address=":0") as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def repeated_block() -> tuple[sp.csr_array, list[str]]:
    """One block of counts (``PER_ROW`` non-zeros a row) and its labels."""
    rng = np.random.default_rng(0)
    columns = np.sort(rng.permuted(np.tile(np.arange(GENES), (BLOCK_ROWS, 1)), axis=1)[:, :PER_ROW], axis=1)
    data = rng.integers(1, 30, BLOCK_ROWS * PER_ROW).astype(np.float32)
    indptr = np.arange(0, BLOCK_ROWS * PER_ROW + 1, PER_ROW)
    block = sp.csr_array((data, columns.ravel(), indptr), shape=(BLOCK_ROWS, GENES))
    labels = [("non-targeting", "A", "B", "C+D")[i % 4] for i in range(BLOCK_ROWS)]
    return block, labels


def write_repeated_screen(path, repeats: int) -> str:
    block, labels = repeated_block()
    obs = pd.DataFrame({"perturbation": pd.Categorical(labels * repeats)},
                       index=pd.RangeIndex(BLOCK_ROWS * repeats).astype(str))
    var = pd.DataFrame(index=[f"G{i}" for i in range(GENES)])
    with quiet_zarr_warnings(), ad.settings.override(zarr_write_format=3):
        ad.AnnData(obs=obs, var=var).write_zarr(zarr_store(str(path), mode="w"))
        root = zarr.open_group(zarr_store(str(path), mode="a"), mode="a")
        if "X" in root:  # anndata 0.12.0 writes an empty X where there is none
            del root["X"]
        appender = CsrAppender(root.create_group("X"), GENES)
        for _ in range(repeats):
            appender.append(block)
        zarr.consolidate_metadata(root.store)
    return str(path)


def test_pass_larger_than_the_memory_limit_completes_exactly(client, tmp_path):
    repeats = 110  # 110 M stored values: 880 MB of data and indices, above the 768 MiB limit
    path = write_repeated_screen(tmp_path / "big.zarr", repeats)
    screen = open_screen(path, block_rows=BLOCK_ROWS)
    assert screen.X.nbytes > MEMORY_LIMIT  # dense size; the CSR payload too:
    assert repeats * BLOCK_ROWS * PER_ROW * 8 > MEMORY_LIMIT
    codes, groups = assign_groups(screen.obs_column("perturbation").array, "non-targeting")
    workers_before = client.run(os.getpid)
    stats = compute(pass_stats(screen, codes, len(groups), kind="counts"),
                    label="big pass", progress=False)
    block, _ = repeated_block()
    one = kernels.block_stats(block, codes[:BLOCK_ROWS], len(groups))
    dense = lambda m: m.toarray() if sp.issparse(m) else m  # noqa: E731
    np.testing.assert_array_equal(dense(stats.group_sum), repeats * dense(one.group_sum))
    np.testing.assert_array_equal(stats.group_n, repeats * one.group_n)
    assert stats.n_cells == repeats * BLOCK_ROWS
    assert client.run(os.getpid) == workers_before, "the worker was restarted"


def test_cluster_result_is_bit_identical_to_local_schedulers(client, small_screen):
    path, _ = small_screen
    on_cluster = pseudobulk(path, n_top_genes=100, block_rows=700, progress=False, as_xarray=True)
    with dask.config.set(scheduler="sync"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("genepert_scale.cluster._current_client", lambda: None)
            local = pseudobulk(path, n_top_genes=100, block_rows=300, progress=False, as_xarray=True)
    assert list(on_cluster.gene.values) == list(local.gene.values)
    for name in ("mean", "delta", "control_mean", "n_cells"):
        np.testing.assert_array_equal(on_cluster[name].values, local[name].values)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_local_threads_are_the_cpus_this_process_may_use():
    # a container's CPU set (here: an affinity mask of one CPU) narrows the
    # threads and hence the blocks and chains, as it narrows dask's own pool
    import subprocess
    import sys

    code = """
import os
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import dask
from genepert_scale.cluster import cluster_threads
print(cluster_threads())
with dask.config.set(num_workers=3):
    print(cluster_threads())
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    assert out == ["1", "3"]
