"""The pass within a memory budget: the plan for any number of groups and
genes, and every plan giving the result of one unbudgeted pass, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from cloud_helpers import assert_same_budgeted
from genepert_scale.cluster import Room
from genepert_scale.errors import ParameterError
from genepert_scale.pp import budget, kernels
from genepert_scale.pp.budget import plan_pass
from genepert_scale.pp.aggregate import pseudobulk

GiB = 2**30


def test_small_passes_sum_all_genes_in_one_pass():
    plan = plan_pass(2001, 8000, 5000, False, [Room(2, 12 * GiB)])
    assert plan == budget.PassPlan(2) and not plan.genes_first


def test_raw_size_screens_select_genes_first():
    # 20,000 groups x 33,000 genes: 5.3 GB a chain; over 5,000 genes 0.8 GB
    plan = plan_pass(20_001, 33_000, 5000, False, [Room(2, 12 * GiB)])
    assert plan.genes_first and plan.slabs == ((0, 20_001),) and plan.chains == 2


def test_groups_beyond_the_budget_are_cut_into_slabs():
    # 100,000 groups x 5,000 genes is 4 GB of sums, 8 GB from sums to outputs; 2 GiB of
    # accumulators on 2 threads: a third each (two slabs in flight, and the first one)
    plan = plan_pass(100_001, 33_000, 5000, False, [Room(2, 2 * GiB)])
    sizes = [stop - first for first, stop in plan.slabs]
    assert plan.chains == 2 and len(sizes) == 12 and sum(sizes) == 100_001
    assert 3 * budget.slab_bytes(max(sizes), 5000, False) <= 2 * GiB
    assert plan.slabs[0][0] == 0 and all(a[1] == b[0] for a, b in zip(plan.slabs, plan.slabs[1:]))


def test_a_slab_holds_its_sums_then_its_outputs():
    # int64 sums (and sums of squares), then float64 means (and mean squares) in
    # their place, and delta (and variances) beside them
    assert budget.slab_bytes(10, 100, False) == 10 * 100 * 8 * 2
    assert budget.slab_bytes(10, 100, True) == 10 * 100 * 8 * 4


def test_a_budget_below_one_group_is_a_clear_error():
    # three slabs of one group over 5,000 genes (80 kB each) at half the limit
    with pytest.raises(ParameterError, match=r"raise --memory-limit \(to at least 468.75 kiB"):
        plan_pass(10, 5000, 5000, False, [Room(2, 1000)])
    # a process that holds 1 GiB already needs that beside them
    with pytest.raises(ParameterError, match=r"to at least 1.00 GiB"):
        plan_pass(10, 5000, 5000, False, [Room(2, 1000, held=GiB)])


def test_rooms_leave_out_what_the_process_and_its_blocks_hold():
    import dask

    from genepert_scale.cluster import accumulator_rooms

    with dask.config.set(num_workers=2):
        assert accumulator_rooms(GiB, held=0) == [Room(2, GiB // 2, 0)]
        # 300 MiB held and two 100 MiB blocks in flight leave 524 MiB: half the limit
        assert accumulator_rooms(GiB, held=300 * 2**20, block_bytes=100 * 2**20) == [
            Room(2, GiB // 2, 500 * 2**20)]
        # 700 MiB held: 324 MiB left
        assert accumulator_rooms(GiB, held=600 * 2**20, block_bytes=50 * 2**20) == [
            Room(2, 324 * 2**20, 700 * 2**20)]
        assert accumulator_rooms(GiB, held=2 * GiB) == [Room(2, 0, 2 * GiB)]
        measured = accumulator_rooms(GiB)[0]  # this process's own memory
        assert 0 < measured.held < 8 * GiB


@pytest.mark.parametrize("use_numba", [True, False])
def test_a_gene_map_sums_the_selected_columns_only(use_numba):
    rng = np.random.default_rng(3)
    x = sp.random(200, 30, density=0.3, format="csr", random_state=4, dtype=np.float32)
    x.data = np.floor(x.data * 80)
    codes = rng.integers(-1, 5, 200).astype(np.int32)
    keep = rng.random(30) < 0.4
    whole = kernels.block_stats(x, codes, 5, with_group_sumsq=True, use_numba=use_numba)
    part = kernels.fold_block(None, x, codes, 5, with_group_sumsq=True, moments=(),
                              gene_map=kernels.gene_columns(keep), use_numba=use_numba)
    np.testing.assert_array_equal(part.group_sum, whole.group_sum[:, keep])
    np.testing.assert_array_equal(part.group_sumsq, whole.group_sumsq[:, keep])
    np.testing.assert_array_equal(part.group_n, whole.group_n)


def test_means_are_converted_in_the_memory_of_their_sums():
    sums = np.array([[3 << 32, -(5 << 31)], [7, 2**62]], np.int64)
    expected = kernels.from_fixed(sums, kernels.SUM_BITS) / np.array([[2], [1]])
    stats = kernels.new_stats(2, 2, False)
    stats.group_sum, stats.group_n = sums, np.array([2, 0])
    means, squares = kernels.slab_means(stats)
    np.testing.assert_array_equal(means, expected)
    assert squares is None and np.shares_memory(means, sums) and stats.group_sum is None


@pytest.fixture(scope="module")
def unbudgeted(small_screen):
    return pseudobulk(small_screen[0], n_top_genes=100, group_variance=True, progress=False, as_xarray=True)


@pytest.mark.usefixtures("pass_memory_only")
@pytest.mark.parametrize("scheduler", ["sync", "threads"])
@pytest.mark.parametrize("memory_limit", [None, 200_000, 60_000])
def test_every_plan_equals_one_unbudgeted_pass(small_screen, unbudgeted, monkeypatch,
                                               scheduler, memory_limit):
    import dask

    monkeypatch.setattr(budget, "ONE_PASS_BYTES", 0)  # genes first even where all would fit
    with dask.config.set(scheduler=scheduler, num_workers=2):
        ds = pseudobulk(small_screen[0], n_top_genes=100, group_variance=True, progress=False,
                        memory_limit=memory_limit, as_xarray=True)
    assert_same_budgeted(ds, unbudgeted)


@pytest.mark.usefixtures("pass_memory_only")
def test_the_log_says_which_plan_ran(small_screen, monkeypatch, caplog):
    import logging

    monkeypatch.setattr(budget, "ONE_PASS_BYTES", 0)
    with caplog.at_level(logging.INFO, logger="genepert_scale"):
        pseudobulk(small_screen[0], n_top_genes=100, progress=False, memory_limit=60_000, as_xarray=True)
    assert "slabs of up to" in caplog.text


@pytest.mark.usefixtures("pass_memory_only")
def test_slabs_stay_lazy_until_written(small_screen, unbudgeted, monkeypatch, tmp_path):
    import dask.array as da

    from genepert_scale.pp.aggregate import open_pseudobulk, write_pseudobulk

    monkeypatch.setattr(budget, "ONE_PASS_BYTES", 0)
    ds = pseudobulk(small_screen[0], n_top_genes=100, group_variance=True, progress=False,
                    memory_limit=60_000, as_xarray=True)
    assert all(isinstance(ds[name].data, da.Array) for name in ("mean", "delta", "var"))
    write_pseudobulk(ds, str(tmp_path / "pb.zarr"))
    assert_same_budgeted(open_pseudobulk(str(tmp_path / "pb.zarr")).compute(), unbudgeted)


@pytest.mark.usefixtures("pass_memory_only")
def test_slabs_written_in_waves_with_groups_dropped_between_them(tmp_path, monkeypatch):
    # rows taken around dropped groups leave the slabs' chunks off the stored chunks' grid
    import genepert_scale.io.store as store
    from factories import write_screen
    from genepert_scale.pp.aggregate import open_pseudobulk, write_pseudobulk

    rng = np.random.default_rng(4)
    labels = ["non-targeting"] * 60 + [f"P{i % 90}" for i in range(900)]
    labels += [f"RARE{i}" for i in range(10)]  # one cell each: dropped by min_cells
    x = rng.poisson(3, (len(labels), 40)).astype(np.float32)
    path = write_screen(tmp_path / "s.zarr", x, labels=list(rng.permutation(labels)))
    expected = pseudobulk(path, control="non-targeting", n_top_genes="all", min_cells=2,
                          as_xarray=True)
    monkeypatch.setattr(budget, "ONE_PASS_BYTES", 0)
    monkeypatch.setattr(store, "WAVE_CHUNK_BYTES", 40 * 8 * 7)  # stored chunks of 7 rows
    ds = pseudobulk(path, control="non-targeting", n_top_genes="all", min_cells=2,
                    memory_limit=120_000, as_xarray=True)
    write_pseudobulk(ds, str(tmp_path / "pb.zarr"))
    assert_same_budgeted(open_pseudobulk(str(tmp_path / "pb.zarr")).compute(), expected)


@pytest.mark.usefixtures("pass_memory_only")
def test_one_slabs_perturbation_chunks_are_the_stored_chunks(small_screen, monkeypatch):
    # the control rows are a chunk apart: the perturbations' chunks start on the
    # stored grid, so the writer writes each stored chunk once, never reading one back
    import genepert_scale.io.store as store

    monkeypatch.setattr(budget, "ONE_PASS_BYTES", 0)
    monkeypatch.setattr(store, "WAVE_CHUNK_BYTES", 100 * 8 * 7)  # stored chunks of 7 rows
    ds = pseudobulk(small_screen[0], n_top_genes=100, group_variance=True, progress=False,
                    as_xarray=True)
    for name in ("mean", "delta", "var"):
        rows = ds[name].data.chunks[0]
        assert len(rows) > 2 and set(rows[:-1]) == {7}, name


@pytest.mark.parametrize(("start", "stop", "stored"), [(0, 45, 7), (45, 91, 7), (3, 4, 7), (14, 28, 7)])
def test_a_regions_chunks_never_share_a_stored_chunk(start, stop, stored):
    from genepert_scale.io.store import region_chunks

    chunks = region_chunks(start, stop, stored)
    edges = np.cumsum((start, *chunks))
    assert edges[-1] == stop and all(n > 0 for n in chunks)
    assert all(edge % stored == 0 for edge in edges[1:-1])
    assert all(size <= stored for size in chunks)
