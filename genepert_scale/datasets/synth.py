"""Streamed synthetic Perturb-seq screens with planted, learnable structure.

Every gene has an embedding vector. A perturbation of gene ``p`` shifts the
log-rate of every gene by ``tanh(e_p W)`` (a smooth function of ``p``'s
embedding) and knocks ``p`` itself down; a pair adds the shifts of its two
genes. Counts are Poisson draws around a cell-specific library size and
cell-specific program activity (Gamma), which makes them overdispersed
(negative-binomial-like). With a responder share below 1, only perturbed
cells whose activity of program :data:`RESPONDER_PROGRAM` is in the top share
respond (the others look like controls): a distributional effect, set by a
cell state that control cells share, which a mean shift cannot reproduce. Cells are generated and written tile by tile, so a
million cells never sit in memory, and the result depends only on the seed,
not on the chunking.
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass

import fsspec
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from dask.system import CPU_COUNT

from ..io.integrity import complete_chunks, mark_complete
from ..errors import ParameterError
from ..io.ordered import threaded_in_order
from ..io.store import (
    ANNDATA_ATTRS,
    CsrAppender,
    atomic_output,
    check_output_free,
    quiet_zarr_warnings,
    write_element,
    zarr_store,
)
from ..validate import check_positive

log = logging.getLogger(__name__)

CONTROL_LABEL = "non-targeting"
#: Cells generated from one random stream; fixed so chunking does not change data.
TILE_ROWS = 1000
N_PROGRAMS = 16
#: The program whose activity decides which perturbed cells respond.
RESPONDER_PROGRAM = 0
#: Shape and scale of the Gamma distribution of program activities.
PROGRAM_SHAPE, PROGRAM_SCALE = 4.0, 0.25
#: Default threads drawing tiles, at most: each holds about ``TILE_ROWS ×
#: genes × 24`` bytes while it draws (160 MB at 8,000 genes).
MAX_DEFAULT_THREADS = 8


@dataclass(frozen=True)
class SynthModel:
    """The planted ground truth of a synthetic screen.

    A single-gene perturbation's effect on the log rates is
    ``tanh(embedding[target] @ weights)``, minus 2 at its target; a pair's
    is the sum of its two singles'. Effects are made for the perturbations
    asked (:meth:`log_effects`), so that no ``(perturbations × genes)``
    matrix is held (26 GB for 100,000 perturbations of 33,000 genes).
    """

    genes: pd.Index
    embedding: np.ndarray
    base_log_rate: np.ndarray
    program_of_gene: np.ndarray
    labels: list[str]
    weights: np.ndarray
    targets: np.ndarray
    pairs: np.ndarray

    def log_effects(self, rows: np.ndarray) -> np.ndarray:
        """The effects of the perturbations at positions ``rows`` (0-based,
        in :attr:`labels` order), a fresh ``(rows × genes)`` array."""
        rows = np.asarray(rows)
        single = rows < self.targets.size
        out = np.empty((rows.size, self.genes.size))
        out[single] = self._singles(rows[single])
        pair = self.pairs[rows[~single] - self.targets.size]
        out[~single] = self._singles(pair[:, 0]) + self._singles(pair[:, 1])
        return out

    def _singles(self, positions: np.ndarray) -> np.ndarray:
        targets = self.targets[positions]
        effects = np.tanh(self.embedding[targets] @ self.weights)
        effects[np.arange(targets.size), targets] -= 2.0
        return effects


def embedding_path_for(out: str) -> str:
    """Where the embedding table of the screen at ``out`` (a path or URL) is
    written: beside it, ``<name>_embedding.pkl``."""
    base = out.rstrip("/")
    stem = base[: -len(".zarr")] if base.endswith(".zarr") else base
    return stem + "_embedding.pkl"


def make_model(
    n_genes: int, n_perturbations: int, *, seed: int, dim: int = 32, pair_share: float = 0.1
) -> SynthModel:
    """Draw genes, embeddings, perturbations and their effects."""
    if n_perturbations > n_genes * (n_genes + 1) // 2:
        raise ParameterError(
            f"--perturbations {n_perturbations} is more than the genes and pairs of --genes "
            f"{n_genes}; ask for fewer perturbations or more genes"
        )
    rng = np.random.default_rng([seed, 0])
    genes = pd.Index([f"GENE{i:05d}" for i in range(n_genes)])
    embedding = rng.normal(size=(n_genes, dim))
    embedding /= np.linalg.norm(embedding, axis=1, keepdims=True)
    base = rng.normal(0.0, 2.5, size=n_genes)
    weights = rng.normal(size=(dim, n_genes)) * (rng.random((dim, n_genes)) < 0.3) * 1.2
    n_pairs = int(round(n_perturbations * pair_share)) if n_perturbations >= 10 else 0
    # more perturbations than genes (genome-wide scale on few genes): the rest are pairs
    n_pairs = max(n_pairs, n_perturbations - n_genes)
    targets = rng.choice(n_genes, size=n_perturbations - n_pairs, replace=False)
    pairs = _distinct_pairs(rng, targets.size, n_pairs)
    labels = [genes[t] for t in targets] + [f"{genes[targets[a]]}+{genes[targets[b]]}" for a, b in pairs]
    return SynthModel(genes, embedding, base, rng.integers(0, N_PROGRAMS, n_genes), labels,
                      weights, targets, pairs)


def _distinct_pairs(rng: np.random.Generator, n_singles: int, n_pairs: int) -> np.ndarray:
    """``n_pairs`` pairs of distinct singles, no pair twice (in either order):
    drawn one by one, and a pair drawn again is drawn anew."""
    pairs = np.array([rng.choice(n_singles, size=2, replace=False) for _ in range(n_pairs)],
                     dtype=np.int64).reshape(-1, 2)
    seen: set[tuple[int, int]] = set()
    for i, (a, b) in enumerate(pairs.tolist()):
        while (min(a, b), max(a, b)) in seen:
            a, b = rng.choice(n_singles, size=2, replace=False).tolist()
        seen.add((min(a, b), max(a, b)))
        pairs[i] = a, b
    return pairs


def assign_cells(n_cells: int, n_perturbations: int, *, seed: int, control_share: float) -> np.ndarray:
    """Group of each cell: ``0`` control, ``1..P`` the perturbations."""
    rng = np.random.default_rng([seed, 1])
    control = rng.random(n_cells) < control_share
    return np.where(control, 0, rng.integers(1, n_perturbations + 1, n_cells)).astype(np.int32)


def responders(programs: np.ndarray, share: float) -> np.ndarray:
    """Cells whose activity of :data:`RESPONDER_PROGRAM` is in the top
    ``share`` of its Gamma distribution."""
    import scipy.stats  # here: importing it would slow every command's start-up

    threshold = scipy.stats.gamma.ppf(1.0 - share, PROGRAM_SHAPE, scale=PROGRAM_SCALE)
    return programs[:, RESPONDER_PROGRAM] >= threshold


def tile_counts(model: SynthModel, groups: np.ndarray, *, seed: int, tile: int,
                mean_umis: float, responder_share: float = 1.0) -> sp.csr_array:
    """Counts of one tile of cells (dense draw, sparse result); with
    ``responder_share < 1`` only :func:`responders` among perturbed cells
    get their perturbation's effect."""
    rng = np.random.default_rng([seed, 2, tile])
    n = groups.size
    programs = rng.gamma(PROGRAM_SHAPE, PROGRAM_SCALE, size=(n, N_PROGRAMS))
    rate = model.log_effects(np.maximum(groups - 1, 0))  # a fresh array, then in place
    rate[groups == 0] = 0.0  # controls: no effect
    if responder_share < 1.0:
        rate[~responders(programs, responder_share)] = 0.0
    rate += model.base_log_rate
    np.exp(rate, out=rate)
    rate *= programs[:, model.program_of_gene]
    library = rng.lognormal(np.log(mean_umis), 0.4, size=n)
    rate *= (library / rate.sum(axis=1))[:, None]
    return sp.csr_array(rng.poisson(rate).astype(np.float32))


def synth_screen(
    out: str,
    *,
    cells: int,
    genes: int,
    perturbations: int,
    seed: int = 0,
    chunk_rows: int = 10_000,
    control_share: float = 0.05,
    mean_umis: float | None = None,
    embedding_dim: int = 32,
    overwrite: bool = False,
    threads: int | None = None,
    responder_share: float = 1.0,
) -> tuple[str, str]:
    """Write a synthetic AnnData zarr screen and its embedding table.

    Parameters
    ----------
    out
        Path or URL of the zarr store to write.
    cells, genes, perturbations
        Size of the screen; about 10 % of the perturbations are ``A+B`` pairs.
    seed
        Seed of every random draw.
    chunk_rows
        Rows written per block (whole tiles of :data:`TILE_ROWS`, at least one).
    control_share
        Share of control cells (labelled ``non-targeting``).
    mean_umis
        Mean library size; by default a quarter of the genes (500 to 5,000),
        which gives 5-15 % non-zeros as in droplet screens.
    embedding_dim
        Dimension of the gene embedding.
    overwrite
        Replace existing outputs.
    threads
        Threads drawing tiles at once (default: the CPUs dask counts, at most
        :data:`MAX_DEFAULT_THREADS`); numpy's sampling and arithmetic release
        the GIL. Each draws a dense tile (``TILE_ROWS × genes × 24`` bytes).
        Each tile has its own seeded stream, so the screen does not depend on it.
    responder_share
        Share of perturbed cells that respond (:func:`responders`, set by
        their activity of program :data:`RESPONDER_PROGRAM`); 1: every cell.

    Returns
    -------
    tuple of str
        The store path and the embedding pickle path (``dict[symbol, list[float]]``).
    """
    start = time.perf_counter()
    if threads is not None:
        check_positive("--threads", threads, integer=True)
    threads = threads or min(CPU_COUNT, MAX_DEFAULT_THREADS)
    if not 0.0 < responder_share <= 1.0:
        raise ParameterError(f"--responder-share {responder_share} must be in (0, 1]")
    mean_umis = mean_umis or float(np.clip(genes / 4, 500, 5000))
    model = make_model(genes, perturbations, seed=seed, dim=embedding_dim)
    groups = assign_cells(cells, len(model.labels), seed=seed, control_share=control_share)
    categories = [CONTROL_LABEL, *model.labels]
    obs = pd.DataFrame(
        {"perturbation": pd.Categorical.from_codes(groups, categories=categories)},
        index=pd.Index([f"cell{i:07d}" for i in range(cells)]),
    )
    var = pd.DataFrame(index=model.genes)
    emb_path = embedding_path_for(out)
    check_output_free(emb_path, overwrite=overwrite)  # before minutes of writing the screen
    with atomic_output(out, overwrite=overwrite) as tmp, complete_chunks():
        root = zarr.open_group(zarr_store(tmp, mode="w"), mode="w", zarr_format=3)
        root.attrs.update(ANNDATA_ATTRS)
        mark_complete(root)
        write_element(root, "obs", obs)
        write_element(root, "var", var)
        appender = CsrAppender(root.create_group("X"), genes)

        def draw(tile: int) -> sp.csr_array:
            rows = slice(tile * TILE_ROWS, min((tile + 1) * TILE_ROWS, cells))
            return tile_counts(model, groups[rows], seed=seed, tile=tile, mean_umis=mean_umis,
                               responder_share=responder_share)

        n_tiles = -(-cells // TILE_ROWS)
        pending: list[sp.csr_array] = []
        with threaded_in_order(draw, range(n_tiles), threads=threads, ahead=2 * threads,
                               name="synth") as tiles:
            for tile, counts in enumerate(tiles):
                pending.append(counts)
                if sum(p.shape[0] for p in pending) >= chunk_rows or tile == n_tiles - 1:
                    appender.append(sp.vstack(pending, format="csr"))
                    pending = []
                    log.info("synth: %d/%d cells", appender.n_rows, cells)
        with quiet_zarr_warnings():
            zarr.consolidate_metadata(root.store)
    with atomic_output(emb_path, overwrite=overwrite) as tmp:
        with fsspec.open(tmp, "wb") as fh:
            pickle.dump({g: v.tolist() for g, v in zip(model.genes, model.embedding)}, fh)
    log.info("synth: %d cells x %d genes in %.1f s", cells, genes, time.perf_counter() - start)
    return out, emb_path
