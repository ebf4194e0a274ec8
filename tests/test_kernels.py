from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from genepert_scale.pp import kernels


def random_counts(rng, n=60, g=25, density=0.2, empty_rows=(3, 17), high=50):
    x = sp.random(n, g, density=density, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, high, k)).astype(np.float32)
    x = x.tolil()
    for r in empty_rows:
        x[r, :] = 0
    return sp.csr_array(x.tocsr())


def test_normalize_log1p_matches_scanpy():
    import anndata as ad
    import scanpy as sc

    x = random_counts(np.random.default_rng(0))
    adata = ad.AnnData(sp.csr_matrix(x.astype(np.float64)))
    sc.pp.normalize_total(adata, target_sum=1e4)
    expected_norm = adata.X.toarray()
    sc.pp.log1p(adata)
    normalized, logged = kernels.normalize_log1p(x, 1e4)
    got_norm = sp.csr_array((normalized, x.indices, x.indptr), shape=x.shape).toarray()
    got_log = sp.csr_array((logged, x.indices, x.indptr), shape=x.shape).toarray()
    np.testing.assert_allclose(got_norm, expected_norm, rtol=1e-12)
    np.testing.assert_allclose(got_log, adata.X.toarray(), rtol=1e-12)
    assert np.all(got_norm[[3, 17]] == 0)


def dense_oracle(x: np.ndarray, codes: np.ndarray, n_groups: int):
    totals = x.sum(axis=1, keepdims=True)
    totals[totals == 0] = 1
    norm = x / totals * 1e4
    logged = np.log1p(norm)
    sums = np.zeros((n_groups, x.shape[1]))
    for g in range(n_groups):
        sums[g] = logged[codes == g].sum(axis=0)
    return norm, logged, sums


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 80),
    n_groups=st.integers(1, 6),
    split=st.integers(1, 79),
)
def test_block_stats_combine_equals_dense_oracle(seed, n, n_groups, split):
    rng = np.random.default_rng(seed)
    x = random_counts(rng, n=n, g=12, density=0.3, empty_rows=())
    codes = rng.integers(-1, n_groups, n).astype(np.int32)
    split = min(split, n)
    parts = [
        kernels.fold_block(None, x[a:b], codes[a:b], n_groups, with_group_sumsq=True,
                           block_index=i)
        for i, (a, b) in enumerate(((0, split), (split, n)))
        if b > a
    ]
    stats = kernels.finish(kernels.combine_into(parts))
    norm, logged, sums = dense_oracle(x.toarray().astype(np.float64), codes, n_groups)
    dense = lambda m: m.toarray() if sp.issparse(m) else m  # noqa: E731
    assert stats.n_cells == n
    np.testing.assert_array_equal(stats.group_n, np.bincount(codes[codes >= 0], minlength=n_groups))
    np.testing.assert_allclose(stats.gene_sum, norm.sum(0), rtol=1e-10)
    np.testing.assert_allclose(stats.gene_sumsq, (norm**2).sum(0), rtol=1e-10)
    np.testing.assert_allclose(stats.gene_log_sum, logged.sum(0), rtol=1e-10)
    # fixed point: at most half a unit in the last place per value
    decoded = kernels.from_fixed(dense(stats.group_sum), kernels.SUM_BITS)
    np.testing.assert_allclose(decoded, sums, rtol=0, atol=n * 2.0 ** -(kernels.SUM_BITS + 1))
    sq = np.stack([(logged[codes == g] ** 2).sum(0) for g in range(n_groups)])
    decoded_sq = kernels.from_fixed(dense(stats.group_sumsq), kernels.SQUARE_BITS)
    np.testing.assert_allclose(decoded_sq, sq, rtol=0, atol=n * 2.0 ** -(kernels.SQUARE_BITS + 1))


def test_log1p_input_is_not_normalized_again():
    x = sp.csr_array(np.array([[0.5, 0.0, 1.5], [0.0, 2.0, 0.0]]))
    stats = kernels.block_stats(x, np.array([0, 1], dtype=np.int32), 2, kind="log1p")
    np.testing.assert_allclose(stats.gene_log_sum, [0.5, 2.0, 1.5])
    np.testing.assert_allclose(stats.gene_sum, np.expm1([0.5, 2.0, 1.5]))


@pytest.mark.parametrize("use_numba", [True, False] if kernels.USE_NUMBA else [False])
@pytest.mark.parametrize("moments", [("normalized",), ("log1p",), ("raw",), ("raw", "normalized")])
def test_a_fold_sums_only_the_moments_asked_for(moments, use_numba):
    x = sp.csr_array(np.array([[1.0, 0.0, 3.0], [0.0, 2.0, 2.0]]))
    stats = kernels.block_stats(x, np.array([0, 1], dtype=np.int32), 2, moments=moments,
                                use_numba=use_numba)
    for moment, (total, squares) in kernels.MOMENTS.items():
        if moment not in moments:
            assert getattr(stats, total) is None and getattr(stats, squares) is None
    if "raw" in moments:
        np.testing.assert_array_equal(stats.gene_raw_sum, [1.0, 2.0, 5.0])
        np.testing.assert_array_equal(stats.gene_raw_sumsq, [1.0, 4.0, 13.0])
    if "normalized" in moments:
        np.testing.assert_allclose(stats.gene_sum, [2500.0, 5000.0, 12500.0])


@pytest.mark.parametrize(
    ("values", "kind", "field"),
    [([1.0, np.nan], "counts", "nonfinite"), ([1.0, -2.0], "log1p", "negative"),
     ([1.0, 2.5], "counts", "noninteger")],
)
def test_value_check_counts_and_names_block(values, kind, field):
    x = sp.csr_array((np.array(values), np.array([0, 1]), np.array([0, 2])), shape=(1, 3))
    check = kernels.block_stats(x, np.zeros(1, np.int32), 1, kind=kind, block_index=4).check
    assert getattr(check, field) == 1
    assert check.first_block == {field: 4}


@pytest.mark.skipif(not kernels._numba_kernels.AVAILABLE, reason="numba not installed")
def test_compiled_row_totals_are_exact_for_whole_counts():
    # the compiled loop adds a row's counts in any order (vectorised): for whole
    # numbers every order gives the exact total, so the scale is the one of an
    # exactly rounded sum (a float32 sum would be off for these large rows)
    rng = np.random.default_rng(0)
    lengths = [0, 1, 3, 8, 17, 1000, 5000]
    data = np.concatenate([rng.integers(0, 10**6, n) for n in lengths]).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    checks = np.zeros(kernels._numba_kernels.N_CHECKS, np.int64)
    scales, _ = kernels._numba_kernels._row_scales(data, indptr, True, 1e4, checks)
    totals = np.array([math.fsum(data[a:b]) for a, b in zip(indptr[:-1], indptr[1:])])
    np.testing.assert_array_equal(scales, 1e4 / np.where(totals == 0, 1.0, totals))
    assert not checks.any()
    unscaled, present = kernels._numba_kernels._row_scales(data, indptr, False, 1e4, checks)
    np.testing.assert_array_equal(unscaled, 1.0)
    assert not present.any()  # log1p input has no table


@pytest.mark.skipif(not kernels._numba_kernels.AVAILABLE, reason="numba not installed")
def test_a_rows_table_is_filled_for_the_counts_it_holds():
    # bit c of a row's mask: count c (below the table's 64) is in the row;
    # a fraction sets the bit below it, values outside the table none
    rows = [[0, 3, 3, 63, 64, 2.5, 1e10, -1, np.nan, np.inf], [], [5, 40, 40],
            [7, 64, 65, 127, -1, -2, 1e10, np.nan, np.inf, -np.inf]]
    data = np.concatenate([np.array(r, np.float32) for r in rows])
    indptr = np.cumsum([0] + [len(r) for r in rows])
    checks = np.zeros(kernels._numba_kernels.N_CHECKS, np.int64)
    _, present = kernels._numba_kernels._row_scales(data, indptr, True, 1e4, checks)
    assert [[c for c in range(64) if int(bits) >> c & 1] for bits in present] == [
        [0, 2, 3, 63], [], [5, 40], [7]]


@pytest.mark.parametrize("use_numba", [True, False] if kernels.USE_NUMBA else [False])
@pytest.mark.parametrize("index_type", [np.int32, np.int64])
def test_values_and_rows_outside_the_matrix_are_left_out_and_counted(use_numba, index_type):
    # a corrupt store: gene index -1 (value 2) and 5 of 5 genes (value 4), and
    # row 1's offsets out of order
    data = np.arange(1.0, 9.0)
    indices = np.array([0, -1, 2, 5, 4, 1, 3, 0], index_type)
    indptr = np.array([0, 3, 2, 6, 8], index_type)
    block = sp.csr_array((4, 5))
    block.data, block.indices, block.indptr = data, indices, indptr  # as a reader returns it
    codes = np.array([0, 1, 1, 0], np.int32)
    stats = kernels.fold_block(None, block, codes, 2, kind="log1p", moments=("log1p",),
                               block_index=3, use_numba=use_numba)
    assert stats.check.bad_index == 3 and stats.check.first_block == {"bad_index": 3}
    # what is left: row 0 (genes 0, 2), row 2 (genes 2, 4, 1), row 3 (genes 3, 0)
    expected = np.zeros((2, 5))
    np.add.at(expected, (0, [0, 2, 3, 0]), [1.0, 3.0, 7.0, 8.0])
    np.add.at(expected, (1, [2, 4, 1]), [3.0, 5.0, 6.0])
    np.testing.assert_array_equal(kernels.from_fixed(stats.group_sum, kernels.SUM_BITS), expected)
    np.testing.assert_array_equal(kernels.finish(stats).gene_log_sum, expected.sum(axis=0))
    # counts are checked alike (their normalized values may differ: see in_range)
    counts = kernels.fold_block(None, block, codes, 2, use_numba=use_numba)
    assert counts.check.bad_index == 3
    # and a block with no values, only a row beyond them
    empty = sp.csr_array((2, 5))
    empty.indptr = np.array([0, 0, 1], index_type)
    assert kernels.fold_block(None, empty, codes[:2], 2, use_numba=use_numba).check.bad_index == 1


def test_the_compiled_check_counts_are_the_value_checks():
    assert len(kernels.CHECKS) == kernels._numba_kernels.N_CHECKS
    assert kernels.CHECKS[kernels._numba_kernels.BAD_INDEX] == "bad_index"


@pytest.mark.skipif(not kernels._numba_kernels.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize(("indices", "codes", "groups"), [
    ([0], [0, 0], 2),  # fewer indices than values
    ([0, 1], [0], 2),  # one code for two rows
    ([0, 1], [0, 2], 2),  # a code beyond the groups
])
def test_the_compiled_fold_rejects_arrays_that_do_not_fit(indices, codes, groups):
    with pytest.raises(ValueError, match="does not fit"):
        kernels._numba_kernels.fold_rows(
            np.ones(2, np.float32), np.array(indices, np.int32), np.array([0, 1, 2], np.int32),
            np.array(codes, np.int32), normalize=True, target_sum=1e4, log1p_max=30.0,
            group_sum=np.zeros((groups, 3), np.int64), sum_bits=32, group_sumsq=None,
            square_bits=24, moments=())


@pytest.mark.skipif(not kernels._numba_kernels.AVAILABLE, reason="numba not installed")
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 60), kind=st.sampled_from(["counts", "log1p"]))
def test_compiled_and_numpy_loops_agree(seed, n, kind):
    rng = np.random.default_rng(seed)
    # counts below and above the compiled loop's log1p table (TABLE_SIZE)
    high = 3 * kernels._numba_kernels.TABLE_SIZE if seed % 2 else 50
    x = random_counts(rng, n=n, g=15, density=0.3, empty_rows=(0,) if n > 1 else (), high=high)
    if kind == "log1p":
        x = sp.csr_array((np.log1p(x.data.astype(np.float64)), x.indices, x.indptr), shape=x.shape)
    if seed % 3 == 0 and x.nnz:  # bad values are counted alike
        x.data[0] = [np.nan, -1.0, 0.5][seed % 9 // 3]
    codes = rng.integers(-1, 4, n).astype(np.int32)
    fast, slow = (
        kernels.block_stats(x, codes, 4, kind=kind, with_group_sumsq=True, block_index=2,
                            moments=tuple(kernels.MOMENTS), use_numba=flag)
        for flag in (True, False)
    )
    assert fast.check == slow.check
    for name in ("group_n", *(name for pair in kernels.MOMENTS.values() for name in pair)):
        np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), rtol=1e-13,
                                   atol=0, equal_nan=True, err_msg=name)
    # numba's and numpy's log1p may differ in the last place: a value's fixed-point
    # numerator may then round the other way (one unit), never more
    finite = np.isfinite(x.data).all() and (x.data >= 0).all()
    for name in ("group_sum", "group_sumsq"):
        diff = np.abs(getattr(fast, name) - getattr(slow, name))
        assert not finite or diff.max(initial=0) <= n, name


def test_fold_accumulates_in_place_and_combine_into_adds_chains():
    rng = np.random.default_rng(5)
    x = random_counts(rng, n=40, g=10, empty_rows=())
    codes = rng.integers(0, 3, 40).astype(np.int32)
    parts = [(x[a : a + 10], codes[a : a + 10]) for a in range(0, 40, 10)]

    def fold(acc, i):
        return kernels.fold_block(acc, *parts[i], 3, block_index=i)

    acc = fold(None, 0)
    assert fold(acc, 1) is acc
    other = fold(fold(None, 2), 3)
    total = kernels.finish(kernels.combine_into([acc, other]))
    whole = kernels.block_stats(x, codes, 3)
    assert total.n_cells == 40
    np.testing.assert_array_equal(total.group_sum, whole.group_sum)  # exact fixed point
    np.testing.assert_allclose(total.gene_sum, whole.gene_sum, rtol=1e-12)
    # chains interleaved the other way: moments summed in block order, so bit-identical
    odd_even = [fold(fold(None, i), i + 2) for i in (0, 1)]
    swapped = kernels.finish(kernels.combine_into(odd_even[::-1]))
    for name in (*kernels.MOMENTS["normalized"], *kernels.MOMENTS["log1p"], "group_sum", "group_n"):
        np.testing.assert_array_equal(getattr(swapped, name), getattr(total, name))


@pytest.mark.skipif(not kernels._numba_kernels.AVAILABLE, reason="numba not installed")
def test_the_fold_runs_interpreted_as_numba_debugging_runs_it(tmp_path):
    # NUMBA_DISABLE_JIT runs the kernels as Python; the row table's
    # trailing_zeros, an LLVM intrinsic, has a Python stand-in, and the sums are the same
    script = """
import sys
import numpy as np
from genepert_scale.pp import _numba_kernels as K
data = np.array([1, 3, 2, 70, 5, 1, 4], np.float32)
indices = np.array([0, 2, 1, 3, 0, 4, 2], np.int32)
indptr = np.array([0, 2, 4, 4, 7], np.int32)
group_sum = np.zeros((2, 5), np.int64)
moments, checks, _ = K.fold_rows(data, indices, indptr, np.array([1, 0, 1, 0], np.int32),
                              normalize=True, target_sum=1e4, log1p_max=30.0,
                              group_sum=group_sum, sum_bits=32, group_sumsq=None,
                              square_bits=24, moments=("normalized",))
np.save(sys.argv[1], np.concatenate([group_sum.ravel(), moments["normalized"].view(np.int64).ravel(), checks]))
"""
    results = []
    for disable in ("0", "1"):
        out = tmp_path / f"fold-{disable}.npy"
        env = {**os.environ, "NUMBA_DISABLE_JIT": disable}
        subprocess.run([sys.executable, "-c", script, str(out)], env=env, check=True)
        results.append(np.load(out))
    compiled, interpreted = results
    assert compiled[:10].any()
    np.testing.assert_array_equal(compiled, interpreted)


@pytest.mark.parametrize("use_numba", [True, False])
def test_rows_not_counted_are_left_out_of_everything(use_numba):
    rng = np.random.default_rng(5)
    x = sp.random(120, 20, density=0.3, format="csr", random_state=6, dtype=np.float32)
    x.data = np.floor(x.data * 50)
    codes = rng.integers(-2, 4, 120).astype(np.int32)
    kept = codes != kernels.NOT_COUNTED
    part = kernels.block_stats(x, codes, 4, with_group_sumsq=True, use_numba=use_numba)
    alone = kernels.block_stats(x[kept], codes[kept], 4, with_group_sumsq=True,
                                use_numba=use_numba)
    assert part.n_cells == alone.n_cells == kept.sum()
    for name in ("group_sum", "group_sumsq", "group_n", "gene_sum", "gene_log_sumsq"):
        np.testing.assert_array_equal(getattr(part, name), getattr(alone, name), err_msg=name)
