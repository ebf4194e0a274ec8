"""The programs the benchmark times, each run as its own process by ``run.py``.

    python benchmarks/tasks.py floor SCREEN
    python benchmarks/tasks.py zarr-floor SCREEN
    python benchmarks/tasks.py group-sum-floor SCREEN --block-rows R
    python benchmarks/tasks.py scanpy-memory SCREEN --n-top-genes 5000
    python benchmarks/tasks.py scanpy-dask SCREEN --n-top-genes 5000 --block-rows R
    python benchmarks/tasks.py ridge-eigen --p 10000 --d 3072 --q 5000 --workload every
    python benchmarks/tasks.py ridge-cholesky --p 10000 --d 3072 --q 5000 --workload select
    python benchmarks/tasks.py ridge-parts --p 10000 --d 3072 --q 5000

Each prints one JSON line (a small summary, to check that the peers computed
the same thing); ``run.py`` measures wall time, CPU time and peak RSS from
outside (``os.wait4``). ``genepert-scale pseudobulk`` itself is run through
its command line, not from here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import metadata

import numpy as np

CONTROL = "non-targeting"
KEY = "perturbation"
#: Chunks decoded per task of the read floors.
FLOOR_CHUNKS_PER_READ = 16


def read_floor(screen: str, threads: int) -> dict:
    """Decode every chunk of ``X/data`` and ``X/indices`` once, the way ours reads them.

    The reader is ours' (``genepert_scale.io.screen.CsrRows``): zarr's
    ``get_basic_selection`` straight into reused buffers, through zarrs' codec
    pipeline where ours uses it (``genepert_scale.io.codecs``);
    ``threads`` threads each decode chunk-aligned slabs of
    :data:`FLOOR_CHUNKS_PER_READ` chunks into their own buffer, so each chunk
    is decoded exactly once and nothing is done with the values.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    data, indices, indptr = _x_arrays(screen, ("data", "indices", "indptr"))
    slabs = []
    for array in (indices, data):
        step = array.chunks[0] * FLOOR_CHUNKS_PER_READ
        slabs += [(array, start, min(start + step, array.shape[0]))
                  for start in range(0, array.shape[0], step)]

    local = threading.local()  # each thread's buffers, reused as in ours

    def decode(slab) -> int:
        array, start, stop = slab
        return _read_into(array, start, stop, local.__dict__).size

    with ThreadPoolExecutor(threads) as pool:
        n_values = sum(pool.map(decode, slabs))
    n_values += np.asarray(indptr[:]).size
    return {"values": int(n_values), "threads": threads}


def _x_arrays(screen: str, names: tuple[str, ...]) -> list:
    """``X``'s arrays ``names`` as ours opens them: for zarrs' pipeline where
    ours uses it, for zarr's own otherwise."""
    import zarr

    from genepert_scale.io.codecs import zarrs_arrays

    x = zarr.open_group(screen, mode="r")["X"]
    return zarrs_arrays(screen, "X", names) or [x[name] for name in names]


def _read_into(array, start: int, stop: int, buffers: dict) -> np.ndarray:
    """``array[start:stop]`` decoded into ``buffers[array.path]`` (grown when too small), as ours."""
    from zarr.buffer.cpu import NDBuffer

    buffer = buffers.get(array.path)
    if buffer is None or buffer.size < stop - start:
        buffer = buffers[array.path] = np.empty(stop - start, array.dtype)
    out = buffer[: stop - start]
    array.get_basic_selection(slice(start, stop), out=NDBuffer.from_numpy_array(out))
    return out


def zarr_read_floor(screen: str) -> dict:
    """Decompress every chunk of ``X/data``, ``X/indices`` and ``X/indptr`` once
    through zarr-python's own reads.

    Reads chunk-aligned slabs of :data:`FLOOR_CHUNKS_PER_READ` chunks, so each
    chunk is decoded exactly once and zarr decodes a slab's chunks in parallel;
    nothing is done with the values but a checksum-free ``size`` count.
    """
    import zarr

    root = zarr.open_group(screen, mode="r")
    n_values = 0
    n_chunks = 0
    for name in ("indptr", "indices", "data"):
        arr = root["X"][name]
        step = arr.chunks[0] * FLOOR_CHUNKS_PER_READ
        for start in range(0, arr.shape[0], step):
            n_values += arr[start : start + step].size
        n_chunks += -(-arr.shape[0] // arr.chunks[0])
    return {"values": int(n_values), "chunks": int(n_chunks)}


def group_sum_floor(screen: str, block_rows: int, threads: int) -> dict:
    """The read floor plus the least compute of a one-pass group mean into dense tables.

    Every stored value is added once, as it is, to its group's row of a dense
    ``(groups × genes)`` int64 table: no normalization, ``log1p``, gene moments,
    checks or output. Blocks of ``block_rows`` rows (ours' size, passed by
    ``run.py``) are read with the floor's reader into reused buffers (as in
    ours) and folded by
    ``threads`` threads, each into its own table, rows in group order (each
    group's values are summed in a scratch row, then added to its table row
    in one sweep, as ours does); the tables are summed at the end. This is
    ``genepert-scale pseudobulk``'s pass stripped to what cannot be removed,
    imported with numpy, zarr, numba and ``genepert_scale.io.codecs`` only. Its
    time over the read floor bounds how close to the floor a pass that sums
    groups into dense tables can get on this machine.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numba
    import zarr

    @numba.njit(nogil=True, cache=True)
    def add_rows(data, indices, indptr, codes, table):  # pragma: no cover - compiled
        # as ours: a group's values go to a scratch row in cache, which is
        # added to its table row in one sweep when the group's rows end
        first = indptr[0]
        order = np.argsort(codes, kind="mergesort")
        scratch = np.zeros(table.shape[1], np.int64)
        for i in range(order.size):
            row = order[i]
            group = codes[row]
            # unsigned indices, as ours: no wrap-around of negative ones per access
            for k in range(np.uint64(indptr[row] - first), np.uint64(indptr[row + 1] - first)):
                scratch[np.uint64(indices[k])] += np.int64(data[k])
            if i + 1 == order.size or codes[order[i + 1]] != group:
                for gene in range(scratch.size):
                    table[group, gene] += scratch[gene]
                    scratch[gene] = 0

    root = zarr.open_group(screen, mode="r")
    x = root["X"]
    n_genes = x.attrs["shape"][1]
    codes = np.asarray(root["obs"][KEY]["codes"][:]).astype(np.int64)
    n_groups = int(codes.max()) + 1
    indptr = np.asarray(x["indptr"][:])
    arrays = _x_arrays(screen, ("data", "indices"))
    local = threading.local()

    def fold(start: int) -> np.ndarray | None:
        stop = min(start + block_rows, codes.size)
        first, last = int(indptr[start]), int(indptr[stop])
        fresh = not hasattr(local, "table")
        if fresh:
            local.table = np.zeros((n_groups, n_genes), np.int64)
            local.buffers = {}
        block = [_read_into(array, first, last, local.buffers) for array in arrays]
        add_rows(*block, indptr[start : stop + 1], codes[start:stop], local.table)
        return local.table if fresh else None

    with ThreadPoolExecutor(threads) as pool:
        tables = [t for t in pool.map(fold, range(0, codes.size, block_rows)) if t is not None]
    total = tables[0]
    for table in tables[1:]:
        total += table
    return {"groups": n_groups, "blocks": -(-codes.size // block_rows), "threads": len(tables),
            "checksum": int(total.sum())}


def _labels(adata) -> np.ndarray:
    return adata.obs[KEY].astype(str).to_numpy()


def scanpy_memory(screen: str, n_top_genes: int) -> dict:
    """scanpy fully in memory: read, normalize_total, log1p, HVG (seurat), group means."""
    import anndata as ad
    import scanpy as sc

    adata = ad.read_zarr(screen)
    if adata.X.indptr.dtype != adata.X.indices.dtype:  # anndata 0.13 and scanpy 1.12 disagree
        adata.X.indices = adata.X.indices.astype(adata.X.indptr.dtype)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=n_top_genes)
    hvg = adata.var["highly_variable"].to_numpy()
    agg = sc.get.aggregate(adata[:, hvg], by=KEY, func="mean")
    means = np.asarray(agg.layers["mean"])
    return {"n_hvg": int(hvg.sum()), "groups": int(means.shape[0]), "checksum": float(means.sum())}


def scanpy_dask(screen: str, n_top_genes: int, block_rows: int) -> dict:
    """scanpy on a dask-backed AnnData: normalize_total, log1p and HVG lazily,
    then the group means of the HVGs in a second pass: ``sc.get.aggregate``
    where it takes dask arrays (scanpy 1.12), else a per-block indicator
    product."""
    import anndata as ad
    import dask
    import scanpy as sc
    import scipy.sparse as sp
    import zarr
    from anndata.experimental import read_elem_lazy

    root = zarr.open_group(screen, mode="r")
    X = read_elem_lazy(root["X"], chunks=(block_rows, root["X"].attrs["shape"][1]))
    obs = ad.io.read_elem(root["obs"])
    var = ad.io.read_elem(root["var"])
    adata = ad.AnnData(X=X, obs=obs, var=var)
    with dask.config.set(scheduler="threads"):
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=n_top_genes)
        hvg = adata.var["highly_variable"].to_numpy()
        if _aggregates_dask():
            agg = sc.get.aggregate(adata[:, hvg], by=KEY, func="mean")
            (means,) = dask.compute(agg.layers["mean"])
            means = np.asarray(means)
            return {"n_hvg": int(hvg.sum()), "groups": int(means.shape[0]),
                    "checksum": float(means.sum()), "aggregate": "sc.get.aggregate"}
        codes = adata.obs[KEY].cat.codes.to_numpy()
        n_groups = len(adata.obs[KEY].cat.categories)
        X_hvg = adata.X[:, hvg].rechunk({1: -1})
        bounds = np.cumsum((0, *X_hvg.chunks[0]))

        def block_sum(block, block_codes):
            indicator = sp.csr_array(
                (np.ones(block_codes.size), (block_codes, np.arange(block_codes.size))),
                shape=(n_groups, block_codes.size),
            )
            return (indicator @ sp.csr_array(block)).toarray()

        parts = [
            dask.delayed(block_sum)(block, codes[bounds[i] : bounds[i + 1]])
            for i, block in enumerate(X_hvg.to_delayed().ravel())
        ]
        sums = dask.delayed(sum)(parts).compute()
    counts = np.bincount(codes, minlength=n_groups)
    means = sums / np.maximum(counts, 1)[:, None]
    return {"n_hvg": int(hvg.sum()), "groups": int(means.shape[0]), "checksum": float(means.sum())}


def _aggregates_dask() -> bool:
    """Whether ``sc.get.aggregate`` takes dask arrays (scanpy 1.12 and later)."""
    version = tuple(int(part) for part in metadata.version("scanpy").split(".")[:2])
    return version >= (1, 12)


def ridge_problem(p: int, d: int, q: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random embeddings ``G`` (rows L2-normalised) and targets ``X``."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((p, d))
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    X = G[:, : min(d, 64)] @ rng.standard_normal((min(d, 64), q)) + rng.standard_normal((p, q))
    return G, X


ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0)
#: Share of the rows held out to choose alpha in the ``select`` workload.
HELD_OUT = 0.2
#: The ridge workloads: coefficients of ``every`` alpha, or ``select`` one alpha
#: by held-out error and return its coefficients (what ``genepert-scale fit`` does).
WORKLOADS = ("every", "select")


def _split(G: np.ndarray, X: np.ndarray):
    n = int(len(G) * (1 - HELD_OUT))
    return (G[:n], X[:n]), (G[n:], X[n:])


def ridge_eigen(G: np.ndarray, X: np.ndarray, workload: str, alphas=ALPHAS) -> list[np.ndarray]:
    """genepert_scale's ridge: the statistics (GᵀG, GᵀX, sums), one
    eigendecomposition of the centred Gram, then every alpha by rescaling;
    ``select`` scores every alpha in the eigenbasis and forms one θ."""
    from genepert_scale.tl.ridge import gram_stats, primal_path

    if workload == "every":
        path = primal_path(gram_stats(G, X))
        return [path.coef(alpha)[0] for alpha in alphas]
    train, held_out = _split(G, X)
    path = primal_path(gram_stats(*train))
    errors = path.squared_errors(gram_stats(*held_out), alphas)
    return [path.coef(alphas[int(np.argmin(errors))])[0]]


def ridge_cholesky(G: np.ndarray, X: np.ndarray, workload: str, alphas=ALPHAS) -> list[np.ndarray]:
    """Plain numpy/scipy: ``cho_factor`` / ``cho_solve`` of ``GᵀG + αI`` per
    alpha; ``select`` predicts the held-out rows with each and keeps the best."""
    from scipy.linalg import cho_factor, cho_solve

    if workload == "select":
        (G_fit, X_fit), (G_out, X_out) = _split(G, X)
    else:
        G_fit, X_fit = G, X
    g_mean, x_mean = G_fit.mean(axis=0), X_fit.mean(axis=0)
    Gc, Xc = G_fit - g_mean, X_fit - x_mean
    gram, cross = Gc.T @ Gc, Gc.T @ Xc
    eye = np.eye(gram.shape[0])
    thetas = [cho_solve(cho_factor(gram + alpha * eye), cross) for alpha in alphas]
    if workload == "every":
        return thetas
    errors = [np.sum((X_out - x_mean - (G_out - g_mean) @ t) ** 2) for t in thetas]
    return [thetas[int(np.argmin(errors))]]


def ridge_parts(G: np.ndarray, X: np.ndarray, alphas=ALPHAS) -> dict[str, float]:
    """Seconds of each step of both methods' ``every`` workload on the same
    matrices: what the eigen path adds (decomposition, projection) and what
    it saves per alpha (one product instead of a factorisation and two
    triangular solves); and the largest difference between their coefficients."""
    from scipy.linalg import cho_factor, cho_solve

    from genepert_scale.tl.ridge import gram_stats, primal_path

    seconds: dict[str, float] = {}

    def timed(step: str, compute):
        start = time.perf_counter()
        value = compute()
        seconds[step] = time.perf_counter() - start
        return value

    stats = timed("statistics", lambda: gram_stats(G, X))
    path = timed("eigen: decomposition + projection", lambda: primal_path(stats))
    eigen = timed("eigen: coefficients of every alpha",
                  lambda: [path.coef(alpha)[0] for alpha in alphas])
    gram, cross = stats.centred()
    eye = np.eye(gram.shape[0])
    factors = timed("cholesky: factorisations",
                    lambda: [cho_factor(gram + alpha * eye) for alpha in alphas])
    cholesky = timed("cholesky: solves", lambda: [cho_solve(factor, cross) for factor in factors])
    # not a time: how far apart the two methods' coefficients are (they must agree)
    seconds["largest coefficient difference"] = max(
        float(np.abs(a - b).max()) for a, b in zip(eigen, cholesky))
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=("floor", "zarr-floor", "group-sum-floor", "scanpy-memory",
                                         "scanpy-dask", "ridge-eigen", "ridge-cholesky",
                                         "ridge-parts"))
    parser.add_argument("screen", nargs="?")
    parser.add_argument("--n-top-genes", type=int, default=5000)
    parser.add_argument("--block-rows", type=int, default=50_000,
                        help="rows per block of scanpy-dask and group-sum-floor")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--p", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=3072)
    parser.add_argument("--q", type=int, default=5000)
    parser.add_argument("--workload", choices=WORKLOADS, default="every")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.task == "floor":
        summary = read_floor(args.screen, args.threads)
    elif args.task == "zarr-floor":
        summary = zarr_read_floor(args.screen)
    elif args.task == "group-sum-floor":
        summary = group_sum_floor(args.screen, args.block_rows, args.threads)
    elif args.task == "scanpy-memory":
        summary = scanpy_memory(args.screen, args.n_top_genes)
    elif args.task == "scanpy-dask":
        summary = scanpy_dask(args.screen, args.n_top_genes, args.block_rows)
    else:
        G, X = ridge_problem(args.p, args.d, args.q)
        if args.task == "ridge-eigen":
            import genepert_scale.tl.ridge  # noqa: F401 - its import is not part of the solve
        if args.task == "ridge-parts":
            print(json.dumps(ridge_parts(G, X)))
            return 0
        start = time.perf_counter()  # time the solve, not the random draws or imports
        solve = ridge_eigen if args.task == "ridge-eigen" else ridge_cholesky
        thetas = solve(G, X, args.workload)
        summary = {"alphas": len(thetas), "checksum": float(sum(t.sum() for t in thetas))}
    summary["inner_seconds"] = time.perf_counter() - start
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
