"""The GenePert model end to end: join a pseudo-bulk with gene embeddings,
accumulate the ridge statistics over perturbation blocks on dask, :func:`fit`
a model, :func:`predict` unseen perturbations and write the predictions.

These are the public Python entry points the CLI (and batch runs) call.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from dask import delayed

from ..cluster import compute
from .blocks import BLOCK_SIZE
from .embeddings import (
    NORMALISATION,
    EmbeddingTable,
    FeatureRows,
    Features,
    MissingPolicy,
    encode,
    featurize,
    load_embeddings,
    read_gene_map,
)
from .data_embedding import pca_dims
from .embedding_checks import check_dimension
from ..errors import ParameterError
from ..pp.aggregate import pseudobulk_dataset
from ..pp.labels import GEARS_CONTROL
from ..pp.params import recorded_run
from .splits import kfold
from ..validate import check_folds
from .ridge import (
    DEFAULT_ALPHAS,
    DEFAULT_SELECT_BY,
    GramStats,
    RidgeModel,
    Rows,
    SelectBy,
    Solver,
    accumulate,
    check_alphas,
    check_select_by,
    load_model,
    ridge_path,
    select_alpha,
    sum_stats,
    wants_dual,
)
from ..io.interop import predictions_to_anndata, write_h5ad
from ..io.encodings import PREDICTIONS
from ..io.store import atomic_output, filesystem, write_dataset

log = logging.getLogger(__name__)

Embeddings = str | Sequence[str] | EmbeddingTable
GeneMap = str | Mapping[str, str] | None


@dataclass(frozen=True)
class TrainingData:
    """A pseudo-bulk joined with the features of its perturbations.

    Attributes
    ----------
    features
        Features of the perturbations that have them (``features.perturbations``).
    delta
        Their pseudo-bulk deltas, perturbations × genes, lazy (dask).
    genes
        The pseudo-bulk genes.
    control_mean
        Control pseudo-bulk per gene.
    embedding
        The embedding table.
    run
        What the pseudo-bulk records of its run (:func:`.pp.params.recorded_run`:
        the screen's label column and control label, input kind, parameters).
    """

    features: Features
    delta: da.Array
    genes: pd.Index
    control_mean: np.ndarray
    embedding: EmbeddingTable
    run: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.features.perturbations)


def as_table(embeddings: Embeddings, storage_options: dict[str, Any] | None = None) -> EmbeddingTable:
    """An :class:`EmbeddingTable` from paths/URLs (concatenated) or a table."""
    if isinstance(embeddings, EmbeddingTable):
        return embeddings
    specs = [embeddings] if isinstance(embeddings, str) else list(embeddings)
    if any(pca_dims(s) for s in specs):
        raise ParameterError(
            "pca:K embeddings are derived from each fold's training data and are supported by "
            "'evaluate' only; fit and predict need embedding files"
        )
    return load_embeddings(specs, storage_options)


def as_gene_map(gene_map: GeneMap, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """A gene map from a table path, a mapping, or nothing."""
    if gene_map is None:
        return {}
    if isinstance(gene_map, str):
        return read_gene_map(gene_map, storage_options)
    return dict(gene_map)


def training_data(
    pseudobulk: xr.Dataset | ad.AnnData | str,
    embeddings: Embeddings,
    *,
    missing: MissingPolicy = "drop",
    gene_map: GeneMap = None,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> TrainingData:
    """Open a pseudo-bulk (store or Dataset) and featurize its perturbations."""
    ds = pseudobulk_dataset(pseudobulk, storage_options)
    table = as_table(embeddings, storage_options)
    names = [str(p) for p in ds["perturbation"].values]
    features = featurize(
        table, names, missing=missing, gene_map=as_gene_map(gene_map, storage_options), seed=seed
    )
    rows = pd.Index(names).get_indexer(features.perturbations)
    return TrainingData(
        features, lazy_delta(ds)[rows], pd.Index([str(g) for g in ds["gene"].values]),
        np.asarray(ds["control_mean"].values, dtype=np.float64), table, recorded_run(ds.attrs),
    )


def lazy_delta(ds: xr.Dataset) -> da.Array:
    """A pseudo-bulk's deltas as a dask array (blocks of :data:`.blocks.BLOCK_SIZE`
    rows where they are in memory)."""
    delta = ds["delta"].data
    return delta if isinstance(delta, da.Array) else da.from_array(np.asarray(delta), chunks=(BLOCK_SIZE, -1))


def fold_statistics(
    features: Features,
    delta: da.Array,
    fold: np.ndarray,
    n_folds: int,
    *,
    block_size: int = BLOCK_SIZE,
    progress: bool = True,
) -> tuple[GramStats, ...]:
    """Ridge statistics of every fold, accumulated over perturbation blocks.

    Blocks never straddle folds; feature rows of a block are built inside its
    task, so no task holds more than ``block_size`` rows of features or deltas.
    A fold without rows gets statistics of none (``n = 0``).
    """
    vectors = delayed(features.vectors, pure=True, name="embedding-vectors")
    members = features.members
    g_blocks, x_blocks, groups = [], [], []
    for k in range(n_folds):
        positions = np.flatnonzero(fold == k)
        for start in range(0, max(positions.size, 1), block_size):
            block = positions[start : start + block_size]
            g_blocks.append(delayed(encode, pure=True, name="features")(vectors, [members[i] for i in block]))
            x_blocks.append(delta[block])
            groups.append(k)
    graph = accumulate(g_blocks, x_blocks, groups, n_folds)
    return compute(graph, label="ridge statistics", progress=progress)


def model_rows(
    features: Features,
    delta: da.Array,
    fold: np.ndarray,
    *,
    solver: Solver,
    by_pearson: bool,
    block_size: int = BLOCK_SIZE,
) -> Rows | None:
    """Feature and delta rows, when they are needed: for the dual solver
    (fewer perturbations than dimensions, so the rows are smaller than
    ``GᵀG``), or to choose alpha by ``pearson_delta`` (``by_pearson``). They
    stay lazy: :class:`.ridge.Rows` reads them a block at a time."""
    if not (by_pearson or wants_dual(len(features.members), features.dim, solver)):
        return None
    return Rows(FeatureRows(features), delta, fold, block_size)


def fit(
    pseudobulk: xr.Dataset | ad.AnnData | str,
    embeddings: Embeddings,
    *,
    alphas: float | Sequence[float] = DEFAULT_ALPHAS,
    n_folds: int = 5,
    seed: int = 0,
    select_by: SelectBy = DEFAULT_SELECT_BY,
    missing: MissingPolicy = "drop",
    gene_map: GeneMap = None,
    solver: Solver = "auto",
    block_size: int = BLOCK_SIZE,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> RidgeModel:
    """Fit GenePert's ridge on every perturbation of a pseudo-bulk.

    Parameters
    ----------
    pseudobulk
        A pseudo-bulk: a store (path/URL), its Dataset, or its AnnData form
        (:func:`.pp.pseudobulk`); one context of it (:func:`.pp.aggregate.one_context`).
    embeddings
        Embedding path(s)/URL(s) (several are concatenated) or a table.
    alphas
        One alpha (used as is), or a grid: the alpha is chosen by
        ``n_folds``-fold CV over perturbations, from fold statistics.
    n_folds, seed
        Folds of that CV and their seed (also the seed of ``missing="random"``).
    select_by
        What that CV chooses alpha by: ``pearson_delta`` (the mean
        per-perturbation Pearson of predicted vs true delta; reads the deltas
        of every fold again, a block at a time) or ``mse``.
    missing, gene_map
        See :func:`.embeddings.featurize`.
    solver
        ``auto``: dual when there are fewer perturbations than dimensions.
    block_size
        Perturbations per block of the streamed statistics and reads.
    storage_options
        fsspec options for URLs.
    progress
        Show a progress bar.
    """
    alphas = check_alphas(alphas)
    select_by = check_select_by(select_by)
    data = training_data(pseudobulk, embeddings, missing=missing, gene_map=gene_map, seed=seed,
                         storage_options=storage_options)
    if len(alphas) > 1:  # the grid is searched by CV: it needs folds
        check_folds(n_folds, data.n, "the pseudo-bulk (choosing alpha from a grid)")
    folds = n_folds if len(alphas) > 1 else 1
    fold = kfold(data.n, folds, seed) if folds > 1 else np.zeros(data.n, dtype=np.int64)
    fold_stats = fold_statistics(data.features, data.delta, fold, folds, block_size=block_size,
                                 progress=progress)
    rows = model_rows(data.features, data.delta, fold, solver=solver, block_size=block_size,
                      by_pearson=len(alphas) > 1 and select_by == "pearson_delta")
    alpha, cv = select_alpha(fold_stats, alphas, select_by=select_by, rows=rows, solver=solver)
    path = ridge_path(sum_stats(list(fold_stats)), rows, solver)
    coef, intercept = path.coef(alpha)
    log.info("fit: %d perturbations, d=%d, %d genes, alpha %g (%s solver)",
             data.n, data.features.dim, len(data.genes), alpha, path.solver)
    metadata = {
        "embedding": list(data.embedding.sources),
        "normalisation": NORMALISATION,
        "missing": data.features.summary(),
        "seed": seed,
        "solver": path.solver,
        "alpha_grid": list(alphas),
        "select_by": select_by,
        "cv_mse": [None if np.isnan(v) else float(v) for v in cv["mse"]],
        "cv_pearson_delta": [None if np.isnan(v) else float(v) for v in cv["pearson_delta"]],
        "n_folds": folds,
        "source": pseudobulk if isinstance(pseudobulk, str) else None,
        **{key: data.run[key] for key in ("perturbation_key", "control") if data.run.get(key)},
    }
    return RidgeModel(coef, intercept, alpha, data.genes, data.control_mean,
                      pd.Index(data.features.perturbations), metadata)


def predict(
    model: RidgeModel | str,
    embeddings: Embeddings,
    perturbations: Sequence[str],
    *,
    missing: MissingPolicy = "error",
    gene_map: GeneMap = None,
    seed: int = 0,
    block_size: int = BLOCK_SIZE,
    storage_options: dict[str, Any] | None = None,
) -> xr.Dataset:
    """Predict the pseudo-bulk of perturbations (``A`` or ``A+B``) from their embeddings.

    Returns
    -------
    xarray.Dataset
        Dims ``perturbation``, ``gene``; ``delta`` (predicted change) and
        ``mean`` (control mean + delta), lazy (dask) in blocks of
        ``block_size`` perturbations, computed as they are read or written;
        attrs ``perturbation_key`` and ``control``: the screen's label column
        and control label, when the model records them.

    Raises
    ------
    EmbeddingError
        If genes have no vector (listed; ``missing="error"``), or the
        embedding's dimension differs from the model's.
    """
    if isinstance(model, str):
        model = load_model(model, storage_options)
    if not perturbations:
        raise ParameterError("give at least one perturbation to predict")
    table = as_table(embeddings, storage_options)
    trained_on = ", ".join(s["path"] for s in model.metadata.get("embedding", []))
    check_dimension(model.dim, table.dim, f"{_paths(table)} (the model's: {trained_on})")
    trained = [s.get("sha256") for s in model.metadata.get("embedding", [])]
    if trained and trained != [s["sha256"] for s in table.sources]:
        log.warning("embedding %s differs from the one the model was trained with; "
                    "predictions are only meaningful for the same vectors", _paths(table))
    features = featurize(table, list(perturbations), missing=missing,
                         gene_map=as_gene_map(gene_map, storage_options), seed=seed)
    delta = predicted_delta(model, features, block_size)
    return xr.Dataset(
        {
            "delta": (("perturbation", "gene"), delta),
            "mean": (("perturbation", "gene"), delta + model.control_mean),
            "control_mean": ("gene", model.control_mean),
        },
        coords={"perturbation": np.asarray(features.perturbations, dtype=object),
                "gene": np.asarray(model.genes, dtype=object)},
        attrs={"alpha": model.alpha, "dropped_perturbations": ",".join(features.dropped),
               **{key: model.metadata[key] for key in ("perturbation_key", "control")
                  if key in model.metadata}},
    )


def predicted_delta(model: RidgeModel, features: Features, block_size: int = BLOCK_SIZE) -> da.Array:
    """The model's prediction for the rows of ``features``, lazy: each block of
    ``block_size`` rows is encoded and predicted in its own task."""
    n = len(features.members)
    chunks = (da.core.normalize_chunks(block_size, (n,))[0], (len(model.genes),))
    starts = np.cumsum((0, *chunks[0]))

    def block(block_id: tuple[int, int]) -> np.ndarray:
        first = starts[block_id[0]]
        return model.predict(features.rows(slice(first, first + chunks[0][block_id[0]])))

    return da.map_blocks(block, chunks=chunks, dtype=np.float64, meta=np.empty((0, 0)),
                         name=f"predicted-delta-{uuid.uuid4().hex}")


def _paths(table: EmbeddingTable) -> str:
    return " + ".join(s["path"] for s in table.sources)


def write_predictions(
    predictions: xr.Dataset,
    path: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write predictions by suffix: ``.zarr`` (the Dataset, chunk by chunk),
    ``.h5ad`` (:func:`.interop.predictions_to_anndata`, built in memory: ``X``
    = predicted expression clipped at zero, layer ``delta``, the screen's
    labels in ``obs[perturbation_key]`` and the index, GEARS' ``condition``
    (``A+ctrl`` / ``A+B``) beside them, and a control row named by the
    screen's control label; var = genes) or ``.csv`` (delta, perturbations ×
    genes, a block of rows at a time); local paths or URLs. Predictions of a
    model that records no labels (fitted on a pseudo-bulk without them) use
    ``perturbation`` and ``ctrl``."""
    suffix = str(path).rstrip("/").lower().rsplit(".", 1)[-1]
    if suffix not in ("zarr", "h5ad", "csv"):
        raise ParameterError(f"prediction output {path}: use a .zarr, .h5ad or .csv name")
    if suffix == "h5ad":
        attrs = predictions.attrs
        adata = predictions_to_anndata(
            predictions["delta"], predictions["control_mean"],
            control=attrs.get("control") or GEARS_CONTROL,
            perturbation_key=attrs.get("perturbation_key") or "perturbation",
            uns={"alpha": attrs.get("alpha")},
        )
        return write_h5ad(adata, path, overwrite=overwrite, storage_options=storage_options)
    if suffix == "zarr":
        write_dataset(predictions.assign_attrs(PREDICTIONS.attrs()), path, overwrite=overwrite,
                      storage_options=storage_options)
    else:
        delta = predictions["delta"]
        with atomic_output(path, overwrite=overwrite, storage_options=storage_options) as tmp:
            fs, root = filesystem(tmp, storage_options)
            with fs.open(root, "w") as handle:
                for first in range(0, delta.sizes["perturbation"], BLOCK_SIZE):
                    block = delta.isel(perturbation=slice(first, first + BLOCK_SIZE)).to_pandas()
                    block.to_csv(handle, index_label="perturbation", header=first == 0)
    log.info("wrote predictions %s (%d perturbations)", path, predictions.sizes["perturbation"])
    return path
