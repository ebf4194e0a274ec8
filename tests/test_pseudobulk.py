"""The pseudo-bulk engine against scanpy, across chunkings and input kinds."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import xarray as xr
import zarr

from conftest import scanpy_pseudobulk
from genepert_scale.errors import LabelError, ParameterError
from factories import read_for_scanpy
from genepert_scale.io.convert import convert_h5ad
from genepert_scale.pp.aggregate import open_pseudobulk, pseudobulk, write_pseudobulk
from genepert_scale.pp.reduce import pass_stats
from genepert_scale.io.screen import BLOCK_BUFFERS, BlockBuffers, BufferPool, open_screen, screen_from_group

RTOL = 1e-5


def assert_matches_scanpy(ds, adata, *, key, control, n_top_genes, flavor="seurat", log1p_input=False):
    hvg, means = scanpy_pseudobulk(
        adata, key=key, control=control, n_top_genes=n_top_genes, flavor=flavor,
        log1p_input=log1p_input,
    )
    if hvg is not None:
        expected = set(hvg.index[hvg["highly_variable"]])
        assert set(ds.gene.values) == expected
        np.testing.assert_array_equal(ds.highly_variable.values, hvg["highly_variable"].to_numpy())
        score = "variances_norm" if flavor == "seurat_v3" else "dispersions_norm"
        np.testing.assert_allclose(ds[f"hvg_{score}"].values, hvg[score], rtol=1e-4, atol=1e-6)
    genes = list(ds.gene.values)
    np.testing.assert_allclose(ds.control_mean.values, means.loc[control, genes], rtol=RTOL, atol=1e-7)
    for name in ds.perturbation.values:
        np.testing.assert_allclose(ds["mean"].sel(perturbation=name).values,
                                   means.loc[name, genes], rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(ds.delta.values, ds["mean"].values - ds.control_mean.values[None])
    counts = adata.obs[key].value_counts()
    np.testing.assert_array_equal(ds.n_cells.values, counts.loc[list(ds.perturbation.values)])


@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger", "seurat_v3"])
@pytest.mark.parametrize("n_top_genes", [50, 200])
def test_synthetic_matches_scanpy(small_screen, flavor, n_top_genes):
    path, _ = small_screen
    ds = pseudobulk(path, control="non-targeting", n_top_genes=n_top_genes, flavor=flavor,
                    progress=False, as_xarray=True)
    assert ds.sizes["gene"] == n_top_genes
    assert "non-targeting" not in ds.perturbation.values
    assert_matches_scanpy(ds, ad.read_zarr(path), key="perturbation", control="non-targeting",
                          n_top_genes=n_top_genes, flavor=flavor)


@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger", "seurat_v3"])
def test_papalexi_matches_scanpy(papalexi_path, flavor):
    ds = pseudobulk(str(papalexi_path), control="control", n_top_genes=100, flavor=flavor,
                    progress=False, block_rows=4096, as_xarray=True)
    assert ds.sizes["perturbation"] == 25
    assert_matches_scanpy(ds, ad.read_h5ad(papalexi_path), key="perturbation", control="control",
                          n_top_genes=100, flavor=flavor)


def test_converted_papalexi_equals_h5ad(papalexi_path, tmp_path):
    out = convert_h5ad(str(papalexi_path), str(tmp_path / "p.zarr"), block_rows=5000)
    back = ad.read_zarr(out)
    original = ad.read_h5ad(papalexi_path)
    assert (back.X != original.X).nnz == 0
    assert back.obs.equals(original.obs)
    from_zarr = pseudobulk(out, control="control", n_top_genes=None, progress=False, as_xarray=True)
    from_h5ad = pseudobulk(str(papalexi_path), control="control", n_top_genes=None, progress=False, as_xarray=True)
    xr.testing.assert_equal(from_zarr.drop_attrs(), from_h5ad.drop_attrs())


@pytest.mark.parametrize("block_rows", [97, 1000, 3000])
def test_result_does_not_depend_on_chunking(small_screen, block_rows):
    path, _ = small_screen
    reference = pseudobulk(path, n_top_genes=100, block_rows=512, progress=False, as_xarray=True)
    other = pseudobulk(path, n_top_genes=100, block_rows=block_rows, progress=False, as_xarray=True)
    assert list(other.gene.values) == list(reference.gene.values)
    np.testing.assert_allclose(other["mean"], reference["mean"], rtol=1e-12, atol=1e-15)


def test_building_the_graph_reads_no_chunk_of_x(small_screen):
    path, _ = small_screen
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    store = zarr.storage.LoggingStore(zarr.storage.LocalStore(path, read_only=True), log_level="INFO")
    store.logger.addHandler(Collect())
    screen = screen_from_group(zarr.open_group(store, mode="r"), path, block_rows=500)
    codes = np.zeros(screen.n_obs, dtype=np.int32)
    graph = pass_stats(screen, codes, 1, kind="counts")
    reads = [r for r in records if "X/data/c" in r or "X/indices/c" in r]
    assert reads == []
    graph.compute(scheduler="sync")
    assert any("X/data/c" in r for r in records), records


def test_log1p_input_detected_and_not_normalized_again(small_screen, tmp_path):
    import scanpy as sc

    path, _ = small_screen
    adata = read_for_scanpy(path)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.obs["condition"] = [
        "ctrl" if p == "non-targeting" else (p if "+" in p else f"{p}+ctrl")
        for p in adata.obs["perturbation"]
    ]
    gears = tmp_path / "gears.h5ad"
    adata.write_h5ad(gears)
    ds = pseudobulk(str(gears), perturbation_key="condition", control="ctrl",
                    n_top_genes=None, progress=False, as_xarray=True)
    assert ds.attrs["input_kind"] == "log1p"
    reference = pseudobulk(path, n_top_genes=None, progress=False, as_xarray=True)
    np.testing.assert_allclose(ds["mean"].values, reference["mean"].values, rtol=1e-5, atol=1e-7)
    assert list(ds.perturbation.values) == list(reference.perturbation.values)


def test_min_cells_drops_and_reports(small_screen, caplog):
    path, _ = small_screen
    full = pseudobulk(path, n_top_genes=None, progress=False, as_xarray=True)
    threshold = int(np.median(full.n_cells)) + 1
    with caplog.at_level(logging.WARNING):
        ds = pseudobulk(path, n_top_genes=None, min_cells=threshold, progress=False, as_xarray=True)
    dropped = set(full.perturbation.values[full.n_cells.values < threshold])
    assert dropped and set(ds.perturbation.values) == set(full.perturbation.values) - dropped
    assert f"dropping {len(dropped)} perturbations" in caplog.text


def test_group_variance_matches_numpy(small_screen):
    import scanpy as sc

    path, _ = small_screen
    ds = pseudobulk(path, n_top_genes=30, group_variance=True, progress=False, as_xarray=True)
    adata = read_for_scanpy(path)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    x = adata[:, list(ds.gene.values)].X.toarray()
    name = ds.perturbation.values[0]
    mask = (adata.obs["perturbation"] == name).to_numpy()
    np.testing.assert_allclose(ds["var"].sel(perturbation=name), x[mask].var(0, ddof=1), rtol=1e-5, atol=1e-8)
    control = (adata.obs["perturbation"] == "non-targeting").to_numpy()
    np.testing.assert_allclose(ds["control_var"], x[control].var(0, ddof=1), rtol=1e-5, atol=1e-8)


def test_written_store_opens_with_xarray(small_screen, tmp_path):
    path, _ = small_screen
    ds = pseudobulk(path, n_top_genes=50, progress=False, as_xarray=True)
    out = write_pseudobulk(ds, str(tmp_path / "pb.zarr"))
    opened = xr.open_zarr(out)
    assert set(opened.dims) >= {"perturbation", "gene"}
    for name in ("mean", "delta", "n_cells", "control_mean"):
        assert name in opened
    assert opened["mean"].dims == ("perturbation", "gene")
    xr.testing.assert_allclose(open_pseudobulk(out).load().drop_attrs(), ds.drop_attrs())


def test_dense_x_is_read_in_row_blocks(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.poisson(1.0, size=(300, 40)).astype(np.float32)
    obs = {"perturbation": np.where(np.arange(300) % 3 == 0, "non-targeting", np.where(np.arange(300) % 3 == 1, "A", "B"))}
    dense = ad.AnnData(x, obs=obs)
    dense.obs_names = [f"c{i}" for i in range(300)]
    dense.write_h5ad(tmp_path / "dense.h5ad")
    sparse = dense.copy()
    sparse.X = sp.csr_matrix(x)
    sparse.write_h5ad(tmp_path / "sparse.h5ad")
    a = pseudobulk(str(tmp_path / "dense.h5ad"), n_top_genes=None, block_rows=64, progress=False, as_xarray=True)
    b = pseudobulk(str(tmp_path / "sparse.h5ad"), n_top_genes=None, block_rows=64, progress=False, as_xarray=True)
    np.testing.assert_allclose(a["mean"].values, b["mean"].values, rtol=1e-12)
    # default block sizing counts a dense X's entries (it once tested `"indptr" in X`)
    for name in ("dense.h5ad", "sparse.h5ad"):
        whole = open_screen(str(tmp_path / name))
        assert whole.X.chunks[0] == (300,) and (whole.csr is None)


def test_blocks_are_read_into_reused_buffers(small_screen):
    rows = open_screen(small_screen[0]).csr
    buffers = BlockBuffers()
    first = rows.read(0, 400, buffers)
    kept = first.data.copy(), first.indices.copy()
    second = rows.read(400, 700, buffers)  # the same stored chunks: the same memory
    assert first.data.base is second.data.base and first.indices.base is second.indices.base
    for start, stop in ((400, 700), (0, 400)):
        block, plain = rows.read(start, stop, buffers), rows.read(start, stop)
        assert plain.data.size > 0 and (block != plain).nnz == 0
        np.testing.assert_array_equal(block.indptr, plain.indptr)
    np.testing.assert_array_equal(block.data, kept[0])
    np.testing.assert_array_equal(block.indices, kept[1])
    grown, plain = rows.read(0, 1000, buffers), rows.read(0, 1000)
    assert (grown != plain).nnz == 0
    # a pass leases buffers and frees them at its end
    pseudobulk(small_screen[0], n_top_genes=100, block_rows=300, progress=False, as_xarray=True)
    assert len(BLOCK_BUFFERS) == 0


def test_block_buffers_are_reused_and_grow_with_head_room():
    buffers = BlockBuffers()
    first = buffers.get("X/data", 100, np.dtype("float32"))
    assert np.shares_memory(buffers.get("X/data", 80, np.dtype("float32")), first)
    grown = buffers.get("X/data", 120, np.dtype("float32"))
    assert not np.shares_memory(grown, first) and grown.size == 120
    assert grown.base.size == int(120 * BlockBuffers.GROWTH)
    assert buffers.get("X/data", 140, np.dtype("float32")).base is grown.base
    assert buffers.get("X/data", 10, np.dtype("int64")).dtype == np.int64  # another dtype: new


def test_buffer_pool_leases_one_set_per_task_and_frees_idle_ones():
    pool = BufferPool()
    with pool.lease() as a, pool.lease() as b:
        assert a is not b
    with pool.lease() as again:
        assert again in (a, b)  # reused, not new
    pool.clear()
    with pool.lease() as fresh:
        assert fresh is not a and fresh is not b
    with pytest.raises(OSError), pool.lease() as failed:  # a read failed: zarr may still write
        raise OSError("chunk 3 cannot be decoded")
    assert failed is fresh and len(pool) == 0  # dropped, not leased again


@pytest.mark.parametrize("chains", [2, 3])
def test_result_does_not_depend_on_the_number_of_fold_chains(small_screen, chains):
    path, _ = small_screen
    reference = pseudobulk(path, n_top_genes=100, block_rows=300, progress=False, chains=1, as_xarray=True)
    other = pseudobulk(path, n_top_genes=100, block_rows=300, progress=False, chains=chains, as_xarray=True)
    np.testing.assert_allclose(other["mean"].values, reference["mean"].values, rtol=1e-12)
    assert list(other.gene.values) == list(reference.gene.values)


def test_default_blocks_follow_store_chunks_and_memory_limit():
    from genepert_scale.io.screen import (
        BLOCK_MEMORY_SHARE, BYTES_PER_VALUE, block_rows_for,
    )

    # 1M cells x 560 values: the 12M-value target, rounded to whole 262,144-value chunks
    rows = block_rows_for(1_000_000, 560_000_000, chunk_values=262_144)
    assert rows == int(46 * 262_144 / 560)
    # a 200 MiB limit on 2 threads caps blocks so that those in flight fit in its share
    capped = block_rows_for(1_000_000, 560_000_000, memory_limit=2**20 * 200, threads=2)
    in_flight = capped * 560 * BYTES_PER_VALUE * 2
    assert 0.9 * BLOCK_MEMORY_SHARE * 2**20 * 200 <= in_flight <= BLOCK_MEMORY_SHARE * 2**20 * 200 * 1.01
    # never less than one chunk
    assert block_rows_for(1000, 10_000_000, chunk_values=262_144, memory_limit=1) * 10_000 >= 262_144


def test_convert_streams_layers_and_raw(tmp_path):
    rng = np.random.default_rng(4)
    counts = sp.random(500, 30, density=0.2, format="csr", random_state=rng, dtype=np.float32)
    counts.data = np.ceil(counts.data * 10)
    adata = ad.AnnData(counts.copy(), obs={"perturbation": ["non-targeting", "A"] * 250})
    adata.obs_names = [f"c{i}" for i in range(500)]
    adata.layers["counts"] = counts.copy()
    adata.layers["dense"] = counts.toarray() * 2
    adata.raw = adata.copy()
    adata.write_h5ad(tmp_path / "in.h5ad")
    out = convert_h5ad(str(tmp_path / "in.h5ad"), str(tmp_path / "out.zarr"), block_rows=128)
    back = ad.read_zarr(out)
    assert (back.layers["counts"] != counts).nnz == 0
    np.testing.assert_array_equal(back.layers["dense"].toarray(), counts.toarray() * 2)
    assert (back.raw.X != counts).nnz == 0 and list(back.raw.var_names) == list(adata.var_names)


def test_accumulator_rooms_one_per_thread_as_memory_allows():
    import dask

    from genepert_scale.cluster import ACCUMULATOR_MEMORY_SHARE, Room, accumulator_rooms
    from genepert_scale.pp.budget import plan_pass

    limit = 2**30
    fits = int(limit * ACCUMULATOR_MEMORY_SHARE)
    with dask.config.set(num_workers=4):
        assert accumulator_rooms(limit, held=0) == [Room(4, fits)]
        rooms = accumulator_rooms(limit, held=0)
    per_group = 8 * 1000  # one group's int64 sums over 1,000 genes
    assert plan_pass(fits // per_group // 8, 1000, 1000, False, rooms).chains == 4
    assert plan_pass(fits // per_group // 3, 1000, 1000, False, rooms).chains == 3


def test_accumulator_rooms_follow_a_container_memory_limit(tmp_path, monkeypatch):
    # a pod limited to 1 GiB on a larger machine: room for one 300 MB accumulator, not four
    import dask

    from genepert_scale import cluster
    from genepert_scale.pp.budget import plan_pass

    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("max\n")  # cgroup v2 without a limit
    monkeypatch.setattr(cluster, "CGROUP_MEMORY_LIMITS", (str(v2), str(tmp_path / "none")))
    machine = cluster._local_memory()
    assert machine > 2**30  # this machine's memory (the test needs more than 1 GiB)
    v1.write_text(f"{2**30}\n")
    monkeypatch.setattr(cluster, "CGROUP_MEMORY_LIMITS", (str(v2), str(v1)))
    assert cluster._local_memory() == 2**30
    with dask.config.set(num_workers=4):
        rooms = cluster.accumulator_rooms(held=0)
    assert plan_pass(300 * 2**20 // 8000, 1000, 1000, False, rooms).chains == 1
    v1.write_text(f"{2**62}\n")  # cgroup v1 without a limit: a huge number
    assert cluster._local_memory() == machine


def test_genes_are_selected_only_from_the_moments_the_flavor_needs(small_screen):
    from genepert_scale.pp.aggregate import PseudobulkParams, select_genes

    screen = open_screen(small_screen[0], block_rows=1000)
    codes = np.zeros(screen.n_obs, dtype=np.int32)
    stats = pass_stats(screen, codes, 1, kind="counts", moments=("raw",)).compute(scheduler="sync")
    with pytest.raises(ValueError, match="flavor seurat selects genes from the 'normalized' moments"):
        select_genes(stats, screen, PseudobulkParams(n_top_genes=50, flavor="seurat"),
                     np.ones(screen.n_obs, bool), progress=False)


@pytest.mark.parametrize("flavor", ["seurat", "seurat_v3"])
def test_obs_filter_equals_scanpy_on_the_kept_cells(papalexi_path, flavor, caplog):
    import json
    import logging

    with caplog.at_level(logging.WARNING, logger="genepert_scale"):
        ds = pseudobulk(str(papalexi_path), control="control", n_top_genes=100, flavor=flavor,
                        obs_filter="confident", progress=False, block_rows=4096, as_xarray=True)
    adata = ad.read_h5ad(papalexi_path)
    confident = adata.obs["confident"].to_numpy(bool)
    assert_matches_scanpy(ds, adata[confident].copy(), key="perturbation", control="control",
                          n_top_genes=100, flavor=flavor)
    left_out = json.loads(ds.attrs["left_out_cells"])
    assert left_out == {"no_label": 0, "filtered": int((~confident).sum()),
                        "dropped_perturbations": 0}
    assert f"{(~confident).sum()} of 20729 cells are rejected by --obs-filter" in caplog.text


def test_a_negated_obs_filter_keeps_the_other_cells(papalexi_path):
    ds = pseudobulk(str(papalexi_path), control="control", n_top_genes=50,
                    obs_filter="~confident", progress=False, block_rows=4096, as_xarray=True)
    adata = ad.read_h5ad(papalexi_path)
    rejected = ~adata.obs["confident"].to_numpy(bool)
    counts = adata.obs["perturbation"][rejected].value_counts()
    np.testing.assert_array_equal(ds.n_cells.values, counts.loc[list(ds.perturbation.values)])


def test_an_obs_filter_must_be_a_boolean_column(papalexi_path):
    with pytest.raises(ParameterError, match=r"obs\['bio_rep'\] holds category values"):
        pseudobulk(str(papalexi_path), control="control", obs_filter="bio_rep", progress=False, as_xarray=True)
    with pytest.raises(LabelError, match="obs has no column 'confidant'.*--obs-filter"):
        pseudobulk(str(papalexi_path), control="control", obs_filter="confidant", progress=False, as_xarray=True)


def test_cells_without_a_label_are_counted_and_reported(tmp_path, caplog):
    import json
    import logging

    from factories import LABELS, counts, write_screen

    x = counts()
    labels = [None if i % 7 == 0 else LABELS[i % len(LABELS)] for i in range(x.shape[0])]
    path = write_screen(tmp_path / "s.zarr", x, labels=labels)
    with caplog.at_level(logging.WARNING, logger="genepert_scale"):
        ds = pseudobulk(path, control=LABELS[0], n_top_genes=None, min_cells=1, progress=False, as_xarray=True)
    missing = sum(label is None for label in labels)
    assert json.loads(ds.attrs["left_out_cells"])["no_label"] == missing
    assert f"{missing} of {x.shape[0]} cells have no label in obs['perturbation']" in caplog.text
