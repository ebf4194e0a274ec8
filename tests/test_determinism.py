"""Determinism: pseudo-bulk sums are bit-identical across chunkings, combine
trees and schedulers, and agree with a plain numpy oracle."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from genepert_scale.pp import kernels
from genepert_scale.pp.aggregate import pseudobulk
from genepert_scale.pp.reduce import tree_reduce


@st.composite
def screens(draw):
    """A random sparse count matrix, a group layout and a chunking of its rows."""
    n = draw(st.integers(1, 150))
    g = draw(st.integers(1, 10))
    n_groups = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    x = sp.random(n, g, density=density, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 1000, k)).astype(np.float32)
    layout = draw(st.sampled_from(["random", "sorted", "one group", "with ungrouped"]))
    low = -1 if layout == "with ungrouped" else 0
    codes = rng.integers(low, n_groups, n).astype(np.int32)
    if layout == "sorted":
        codes.sort()
    elif layout == "one group":
        codes[:] = n_groups - 1
    cuts = sorted(draw(st.sets(st.integers(1, max(n - 1, 1)), max_size=6)) - {n})
    return x, codes, n_groups, [0, *cuts, n], draw(st.integers(2, 5))


def reduce_in_blocks(x, codes, n_groups, bounds, split_every, scheduler="sync"):
    parts = [
        dask.delayed(kernels.fold_block)(None, x[a:b], codes[a:b], n_groups,
                                         with_group_sumsq=True, block_index=i)
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]
    total = tree_reduce(parts, kernels.combine_into, split_every=split_every)
    return dask.delayed(kernels.finish)(total).compute(scheduler=scheduler)


def dense(matrix):
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


@settings(max_examples=60, deadline=None)
@given(screens())
def test_group_sums_are_bit_identical_across_chunkings_and_match_numpy(screen):
    x, codes, n_groups, bounds, split_every = screen
    n = x.shape[0]
    one_block = reduce_in_blocks(x, codes, n_groups, [0, n], 2)
    blocked = reduce_in_blocks(x, codes, n_groups, bounds, split_every)
    np.testing.assert_array_equal(dense(blocked.group_sum), dense(one_block.group_sum))
    np.testing.assert_array_equal(dense(blocked.group_sumsq), dense(one_block.group_sumsq))
    np.testing.assert_array_equal(blocked.group_n, one_block.group_n)
    # oracle: plain numpy on the dense matrix
    xd = x.toarray().astype(np.float64)
    totals = xd.sum(1, keepdims=True)
    totals[totals == 0] = 1
    logged = np.log1p(xd / totals * 1e4)
    sums = np.stack([logged[codes == k].sum(0) for k in range(n_groups)])
    got = kernels.from_fixed(dense(blocked.group_sum), kernels.SUM_BITS)
    np.testing.assert_allclose(got, sums, rtol=0, atol=n * 2.0 ** -(kernels.SUM_BITS + 1))
    np.testing.assert_array_equal(blocked.group_n, np.bincount(codes[codes >= 0], minlength=n_groups))
    np.testing.assert_allclose(blocked.gene_log_sum, logged.sum(0), rtol=1e-12, atol=1e-12)
    assert blocked.n_cells == n


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
@pytest.mark.parametrize(("block_rows", "split_every"), [(97, 2), (500, 8), (3000, 3)])
def test_pseudobulk_is_bit_identical_across_chunkings_and_schedulers(
    small_screen, block_rows, split_every, scheduler
):
    path, _ = small_screen
    with dask.config.set(scheduler="sync"):
        reference = pseudobulk(path, n_top_genes=100, block_rows=1000, progress=False, as_xarray=True)
    with dask.config.set(scheduler=scheduler):
        other = pseudobulk(path, n_top_genes=100, block_rows=block_rows,
                           split_every=split_every, progress=False, as_xarray=True)
    assert list(other.gene.values) == list(reference.gene.values)
    for name in ("mean", "delta", "control_mean", "n_cells"):
        np.testing.assert_array_equal(other[name].values, reference[name].values)
