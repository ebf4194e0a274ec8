"""The cell model: fit on the cells of training perturbations, predict the
cells of unseen ones.

:func:`cells_fit` trains, on the control cells and the cells of the training
perturbations only, (1) a VAE from minibatches streamed from the screen's
row blocks, (2) per perturbation, entropic OT from control latents to its
latents, whose barycentric map gives every control cell a shift ``Δz``, and
(3) the shift head ``f(z, c_p) → Δz`` on those pairs, ``c_p`` a learned
projection of the perturbation's L2-normalised embedding (a pair:
``normalize(g1 + g2)``, as GenePert). :func:`cells_predict` moves control
cells ``z → z + f(z, c_p)`` for any perturbation with an embedding, seen or
not, and decodes them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import torch
import xarray as xr

from ...errors import LabelError, ParameterError, listing
from ...pp.aggregate import open_pseudobulk, pseudobulk as run_pseudobulk
from ...pp.params import PARAMETERS, PseudobulkParams, recorded_run
from ...validate import check_choice, check_positive
from ..embedding_checks import check_dimension
from ..embeddings import EmbeddingTable, Features, MissingPolicy, featurize
from ..model import BLOCK_SIZE, Embeddings, GeneMap, TrainingData, as_gene_map, as_table
from .networks import (
    INJECTIONS,
    Injection,
    ShiftHead,
    Vae,
    apply_head,
    decode,
    deterministic_torch,
    encode,
    resolve_device,
    train_head,
    train_vae,
)
from .stream import CELL_BLOCK_ROWS, CONTROL, SHUFFLE_BLOCKS, CellSource, open_cells, sample_rows
from .transport import DEFAULT_EPSILON, ot_shift

log = logging.getLogger(__name__)

Output = Literal["residual", "decoded"]
OUTPUTS: tuple[str, ...] = ("residual", "decoded")
OtMap = Literal["debiased", "barycentric"]
OT_MAPS: tuple[str, ...] = ("debiased", "barycentric")


@dataclass(frozen=True)
class CellsConfig:
    """Parameters of the cell model.

    Attributes
    ----------
    latent_dim, hidden
        Width of the VAE's latent and of its hidden layers (and the head's).
    epochs, batch_size, learning_rate, beta
        VAE training: passes over the training cells, cells per minibatch,
        Adam's step size, weight of the KL term.
    ot_cells
        Cells per side of each OT problem at most (subsampled with the seed).
    ot_epsilon
        Entropic regularisation, relative to the mean squared distance.
    ot_map
        ``debiased``: the barycentric map minus the map to other control
        cells; ``barycentric``: the plain map (see :mod:`.transport`).
    injection, condition_dim
        How ``c_p`` enters the head (``additive``, ``film``, ``concat``) and
        its width for ``concat``.
    head_epochs, head_batch_size, head_learning_rate, head_weight_decay
        Shift-head training (AdamW).
    control_cells
        Control cells kept with the model (latents and expression) to be moved.
    shuffle_blocks
        Row blocks whose cells are shuffled together into minibatches.
    output
        ``residual``: a predicted cell is its control cell plus the decoded
        change, ``x + dec(z + Δz) − dec(z)`` (the cell keeps its own noise);
        ``decoded``: ``dec(z + Δz)``. Both clipped at 0.
    device
        ``auto`` (a GPU when torch sees one), ``cpu``, ``cuda``, ...
    threads
        CPU threads of torch while fitting; ``None``: torch's default. One by
        default: these networks are small, and on a loaded 2-core VM a
        minibatch step ran 3.7 times faster on one thread than on two.
    """

    latent_dim: int = 32
    hidden: int = 128
    epochs: int = 30
    batch_size: int = 256
    learning_rate: float = 1e-3
    beta: float = 0.01
    ot_cells: int = 500
    ot_epsilon: float = DEFAULT_EPSILON
    ot_map: OtMap = "debiased"
    injection: Injection = "additive"
    condition_dim: int = 32
    head_epochs: int = 40
    head_batch_size: int = 512
    head_learning_rate: float = 1e-3
    head_weight_decay: float = 1e-3
    control_cells: int = 2000
    shuffle_blocks: int = SHUFFLE_BLOCKS
    output: Output = "residual"
    device: str = "auto"
    threads: int | None = 1

    def check(self) -> CellsConfig:
        """Raise :class:`.ParameterError` naming the first bad value; return self."""
        check_choice("--injection", self.injection, INJECTIONS)
        check_choice("--output", self.output, OUTPUTS)
        check_choice("--ot-map", self.ot_map, OT_MAPS)
        for name in ("latent_dim", "hidden", "epochs", "batch_size", "ot_cells", "condition_dim",
                     "head_epochs", "head_batch_size", "control_cells", "shuffle_blocks"):
            check_positive(f"--{name.replace('_', '-')}", getattr(self, name), integer=True)
        for name in ("learning_rate", "ot_epsilon", "head_learning_rate"):
            check_positive(f"--{name.replace('_', '-')}", getattr(self, name))
        if self.beta < 0 or self.head_weight_decay < 0:
            raise ParameterError("--beta and --head-weight-decay must not be negative")
        return self


@dataclass(frozen=True)
class Prepared:
    """A screen joined with its pseudo-bulk and the embeddings of its perturbations.

    A row is a (context, perturbation) of the pseudo-bulk with an embedding
    (a perturbation, without contexts): ``data.features`` and ``data.delta``
    have one row each (a perturbation's features repeat across contexts),
    ``data.control_mean`` one control mean per context (a vector without).
    """

    pseudobulk: xr.Dataset
    data: TrainingData
    source: CellSource

    @property
    def features(self) -> Features:
        return self.data.features

    @property
    def perturbations(self) -> list[str]:
        return self.data.features.perturbations

    @property
    def control_means(self) -> np.ndarray:
        """The control mean of every context (contexts × genes)."""
        return np.atleast_2d(self.data.control_mean)


@dataclass(eq=False)
class CellsModel:
    """A fitted cell model (see :func:`cells_fit`).

    Attributes
    ----------
    vae, head
        The trained networks (in eval mode).
    genes
        The genes of its cells.
    embedding
        The embedding table it was trained with.
    control_x, control_z, control_rows
        The kept control cells: expression, latent means, rows in the screen.
    trained_on
        The training perturbations.
    latent_delta
        Mean OT shift ``Δz`` of every training perturbation (the latent
        analogue of GenePert's delta).
    labels
        Canonical name → the screen's label.
    control, perturbation_key
        The control label and the ``obs`` column of labels.
    config
        The parameters.
    control_context, contexts, context_key
        The context of every kept control cell (an index into ``contexts``),
        the contexts (``(None,)`` without), and their ``obs`` column.
    normalisation
        How the cells were read: ``input_kind``, ``target_sum``, ``layer``,
        ``obs_filter``.
    embedding_sources
        The identity of the embedding table (what a saved model records of it).
    history
        Loss per epoch: ``vae`` and ``head``.
    seconds
        Seconds of every stage of the fit.
    """

    vae: Vae
    head: ShiftHead
    genes: pd.Index
    embedding: EmbeddingTable | None
    control_x: np.ndarray
    control_z: np.ndarray
    control_rows: np.ndarray
    trained_on: list[str]
    latent_delta: dict[str, np.ndarray]
    labels: dict[str, str]
    control: str
    perturbation_key: str
    config: CellsConfig
    control_context: np.ndarray
    contexts: tuple[str | None, ...] = (None,)
    context_key: str | None = None
    normalisation: dict[str, Any] = field(default_factory=dict)
    embedding_sources: tuple[dict[str, Any], ...] = ()
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def controls_in(self, context: int) -> np.ndarray:
        """Positions of the kept control cells of a context (an index into ``contexts``)."""
        return np.flatnonzero(self.control_context == context)

    def context_index(self, context: str | None) -> int:
        """The index of a context's name in ``contexts``.

        Raises
        ------
        LabelError
            If the model has no such context.
        """
        if context not in self.contexts:
            raise LabelError(f"the cell model has no context {context!r}; its contexts "
                             f"(obs[{self.context_key!r}]): {listing(map(str, self.contexts))}")
        return self.contexts.index(context)

    def move(self, embedding: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Predicted cells: the kept control cells at ``positions`` moved by
        the shift of a perturbation with L2-normalised ``embedding`` row."""
        z = self.control_z[positions]
        moved = decode(self.vae, z + apply_head(self.head, z, embedding, self.device), self.device)
        if self.config.output == "residual":
            moved += self.control_x[positions] - decode(self.vae, z, self.device)
        return np.maximum(moved, 0.0, out=moved)


def prepare(
    screen: str,
    embeddings: Embeddings,
    *,
    perturbation_key: str = "perturbation",
    control: str = "non-targeting",
    context_key: str | None = None,
    pseudobulk: xr.Dataset | str | None = None,
    pseudobulk_options: Mapping[str, Any] | None = None,
    missing: MissingPolicy = "drop",
    gene_map: GeneMap = None,
    seed: int = 0,
    block_rows: int | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> Prepared:
    """The pseudo-bulk (given, or computed by the pass), its rows' features
    and the screen's cells over its genes (see :func:`cells_fit`)."""
    params = pseudobulk_params(perturbation_key, control, context_key, pseudobulk_options)
    if pseudobulk is None:
        ds = run_pseudobulk(screen, **asdict(params), block_rows=block_rows,
                            storage_options=storage_options, progress=progress, as_xarray=True)
    else:
        ds = open_pseudobulk(pseudobulk, storage_options) if isinstance(pseudobulk, str) else pseudobulk
        check_recorded(ds, params)
    data, row_contexts = row_data(ds, as_table(embeddings, storage_options), missing=missing,
                                  gene_map=as_gene_map(gene_map, storage_options), seed=seed)
    source = open_cells(screen, ds, data.features.perturbations, perturbation_key=perturbation_key,
                        control=control, row_contexts=row_contexts,
                        block_rows=block_rows or CELL_BLOCK_ROWS, storage_options=storage_options)
    return Prepared(ds, data, source)


#: Pseudo-bulk parameters that the cell model takes as arguments of their own
#: (its cells are grouped by them too).
OWN_PARAMETERS = ("perturbation_key", "control", "context_key")


def pseudobulk_params(
    perturbation_key: str,
    control: str,
    context_key: str | None,
    options: Mapping[str, Any] | None,
) -> PseudobulkParams:
    """The pseudo-bulk parameters of the cell model's pass.

    Raises
    ------
    ParameterError
        If ``options`` names something that is not a pseudo-bulk parameter
        (or one of the three given on their own).
    """
    options = dict(options or {})
    accepted = [name for name in PARAMETERS if name not in OWN_PARAMETERS]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ParameterError(f"pseudobulk_options {', '.join(unknown)}: not accepted there; "
                             f"the pseudo-bulk parameters it takes are {', '.join(accepted)} "
                             f"({', '.join(OWN_PARAMETERS)} are arguments of their own)")
    return PseudobulkParams(perturbation_key=perturbation_key, control=control,
                            context_key=context_key, **options)


def check_recorded(ds: xr.Dataset, params: PseudobulkParams) -> None:
    """Raise :class:`.LabelError` if a given pseudo-bulk was made with another
    label column, control or context column than the cell model is asked to use."""
    run = recorded_run(ds.attrs)
    for name in OWN_PARAMETERS:
        asked = getattr(params, name)
        value = run["control"] if name == "control" else run["parameters"].get(name, asked)
        if value != asked and not (name == "control" and value is None):
            raise LabelError(f"the pseudo-bulk's {name} is {value!r}, not {asked!r}; give the "
                             f"pseudo-bulk of this screen made with {name}={asked!r}")


def row_data(
    ds: xr.Dataset,
    table: EmbeddingTable,
    *,
    missing: MissingPolicy,
    gene_map: dict[str, str],
    seed: int,
) -> tuple[TrainingData, list[str] | None]:
    """The rows of a pseudo-bulk (with or without contexts) that have an
    embedding, as :class:`.TrainingData`, and every row's context (``None``
    without contexts). A perturbation is featurized once for all its contexts."""
    names = [str(p) for p in ds["perturbation"].values]
    features = featurize(table, list(dict.fromkeys(names)), missing=missing, gene_map=gene_map,
                         seed=seed)
    member = dict(zip(features.perturbations, features.members))
    rows = np.array([i for i, name in enumerate(names) if name in member], dtype=np.int64)
    features = dataclasses.replace(features, perturbations=[names[i] for i in rows],
                                   members=[member[names[i]] for i in rows])
    delta = ds["delta"].data
    if not isinstance(delta, da.Array):
        delta = da.from_array(np.asarray(delta), chunks=(BLOCK_SIZE, -1))
    contexts = [str(c) for c in ds["context"].values[rows]] if "context" in ds.coords else None
    data = TrainingData(features, delta[rows], pd.Index([str(g) for g in ds["gene"].values]),
                        np.asarray(ds["control_mean"].values, dtype=np.float64), table,
                        recorded_run(ds.attrs))
    return data, contexts


def control_pool(source: CellSource, n_cells: int, seed: int) -> np.ndarray:
    """Rows of the control cells the model keeps (at most ``n_cells`` per
    context, seeded), sorted.

    Raises
    ------
    LabelError
        If a context has no control cells.
    """
    rng, pools = np.random.default_rng([seed, 2]), []
    for c, context in enumerate(source.contexts):
        rows = source.cells_of(CONTROL, c)
        if rows.size == 0:
            where = "" if context is None else f" in context {context!r} (obs[{source.context_key!r}])"
            raise LabelError(f"{source.screen.source}: no control cells ({source.control!r}){where}")
        pools.append(sample_rows(rows, n_cells, rng))
    return np.sort(np.concatenate(pools))


def fit_on(
    prepared: Prepared,
    train: np.ndarray,
    config: CellsConfig,
    *,
    seed: int = 0,
    pool: np.ndarray | None = None,
) -> CellsModel:
    """Fit the cell model on the control cells and the cells of the rows
    ``train`` (indices into ``prepared.perturbations``) only; every row's
    OT source is the kept control cells of its context."""
    source, device = prepared.source, resolve_device(config.device)
    pool = control_pool(source, config.control_cells, seed) if pool is None else pool
    rng = np.random.default_rng([seed, 1])
    G = prepared.features.rows().astype(np.float32)
    mask = (source.group == CONTROL) | np.isin(source.group, train)
    clock = _Clock()
    with deterministic_torch(seed, config.threads):
        vae, vae_history = fit_vae(source, mask, config, rng, seed=seed, device=device)
        clock.lap("vae")
        samples = {f"p{p}": sample_rows(source.cells_of(p), config.ot_cells, rng) for p in train}
        to_latent = functools.partial(encode, vae, device=device)
        gathered = source.gather({"control": pool, **samples}, {name: to_latent for name in samples})
        control_x = gathered.pop("control")
        control_z = encode(vae, control_x, device)
        clock.lap("encode")
        control_context = source.context[pool]
        sources = by_context(control_z, control_context, {f"p{p}": source.row_context[p] for p in train})
        z, shift, condition = ot_pairs(sources, gathered, config, rng)
        clock.lap("ot")
        head, head_history = fit_head(z, shift, condition, G, config, rng, device=device)
        clock.lap("head")
    latent_delta = {source.row_name(p): shift[condition == p].mean(axis=0) for p in train}
    log.info("cell model: %d training perturbations, %d cells, VAE loss %.3f, head loss %.4f; "
             "seconds %s", len(train), int(mask.sum()), vae_history[-1], head_history[-1], clock)
    return CellsModel(vae, head, source.genes, prepared.data.embedding, control_x, control_z, pool,
                      [source.row_name(p) for p in train], latent_delta, source.labels,
                      source.control, source.key, config, control_context, source.contexts,
                      source.context_key, normalisation(prepared),
                      prepared.data.embedding.sources, {"vae": vae_history, "head": head_history},
                      clock.seconds)


def normalisation(prepared: Prepared) -> dict[str, Any]:
    """How the cells were read, from the pseudo-bulk's recorded run."""
    run = prepared.data.run
    return {"input_kind": run["input_kind"], "target_sum": prepared.source.target_sum,
            **{key: run["parameters"].get(key) for key in ("layer", "obs_filter")}}


def by_context(control_z: np.ndarray, control_context: np.ndarray,
               row_context: Mapping[str, int]) -> dict[str, np.ndarray]:
    """The OT source of every named row: the kept control latents of its context."""
    pools = {c: control_z[control_context == c] for c in set(row_context.values())}
    return {name: pools[c] for name, c in row_context.items()}


def fit_onehot(
    prepared: Prepared,
    model: CellsModel,
    rows: np.ndarray,
    *,
    seed: int = 0,
) -> CellsModel:
    """The *seen* model ``latent_ot_onehot``: ``model`` (its VAE and kept
    control cells) with a shift head whose condition is a learned vector per
    row of ``rows`` (condition ``i`` for ``rows[i]``), trained on the OT
    pairs of every row of ``rows``.

    Unlike :func:`fit_on`, this reads the cells of every row given, held-out
    ones included: it is an upper bound of what any condition (the
    embedding's projection among them) can give through this latent and
    head, not a prediction of unseen perturbations.
    """
    source, config, device = prepared.source, model.config, model.device
    rng = np.random.default_rng([seed, 5])
    clock = _Clock()
    with deterministic_torch(seed, config.threads):
        samples = {f"p{i}": sample_rows(source.cells_of(p), config.ot_cells, rng)
                   for i, p in enumerate(rows)}
        to_latent = functools.partial(encode, model.vae, device=device)
        latents = source.gather(samples, {name: to_latent for name in samples})
        sources = by_context(model.control_z, model.control_context,
                             {f"p{i}": source.row_context[p] for i, p in enumerate(rows)})
        z, shift, condition = ot_pairs(sources, latents, config, rng)
        head, history = fit_head(z, shift, condition, None, config, rng, device=device,
                                 n_conditions=len(rows))
        clock.lap("onehot")
    return dataclasses.replace(model, head=head, embedding=None,
                               trained_on=[source.row_name(p) for p in rows],
                               history={**model.history, "onehot_head": history},
                               seconds={**model.seconds, **clock.seconds})


def fit_vae(
    source: CellSource,
    mask: np.ndarray,
    config: CellsConfig,
    rng: np.random.Generator,
    *,
    seed: int,
    device: torch.device,
) -> tuple[Vae, list[float]]:
    """A VAE trained on the cells where ``mask`` is true, streamed in
    minibatches; the loss of every epoch."""
    vae = Vae(source.n_genes, config.latent_dim, config.hidden).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)

    def epoch(_: int) -> Iterator[np.ndarray]:
        return source.minibatches(mask, config.batch_size, rng, shuffle_blocks=config.shuffle_blocks)

    history = train_vae(vae, config.epochs, epoch, learning_rate=config.learning_rate,
                        beta=config.beta, generator=generator, device=device)
    return vae, history


def fit_head(
    z: np.ndarray,
    shift: np.ndarray,
    condition: np.ndarray,
    embeddings: np.ndarray | None,
    config: CellsConfig,
    rng: np.random.Generator,
    *,
    device: torch.device,
    n_conditions: int | None = None,
) -> tuple[ShiftHead, list[float]]:
    """The shift head trained on OT pairs (:func:`ot_pairs`); the loss of
    every epoch. With ``n_conditions`` (and no ``embeddings``) a one-hot head."""
    head = ShiftHead(config.latent_dim, 0 if embeddings is None else embeddings.shape[1],
                     hidden=config.hidden, condition_dim=config.condition_dim,
                     injection=config.injection, n_conditions=n_conditions).to(device)
    history = train_head(head, z, shift, condition, embeddings, epochs=config.head_epochs,
                         batch_size=config.head_batch_size, learning_rate=config.head_learning_rate,
                         weight_decay=config.head_weight_decay, rng=rng, device=device)
    return head, history


class _Clock:
    """Seconds of the named stages of a fit."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())


def ot_pairs(
    sources: Mapping[str, np.ndarray],
    latents: Mapping[str, np.ndarray],
    config: CellsConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training pairs of the head: for every row ``p<i>`` of ``latents``,
    up to ``ot_cells`` of its control latents ``sources[p<i>]``, their OT
    shifts to its latents, and ``i`` (the condition). The debiased map's
    reference is as many other control latents (the kept ones split in two
    when too few)."""
    zs, shifts, conditions = [], [], []
    debiased = config.ot_map == "debiased"
    for name, target in latents.items():
        if len(target) == 0:
            continue
        control_z = sources[name]
        n = min(config.ot_cells, len(control_z) // 2 if debiased else len(control_z))
        if n < 1:
            raise ParameterError(f"{len(control_z)} control cells kept: too few for optimal transport")
        order = rng.permutation(len(control_z))
        source = control_z[np.sort(order[:n])]
        reference = control_z[np.sort(order[n : 2 * n])] if debiased else None
        zs.append(source)
        shifts.append(ot_shift(source, target, config.ot_epsilon, reference=reference))
        conditions.append(np.full(len(source), int(name[1:])))
    if not zs:
        raise ParameterError("no training perturbation has cells; nothing to fit the shift head on")
    return np.concatenate(zs), np.concatenate(shifts), np.concatenate(conditions)


def cells_fit(
    screen: str,
    embeddings: Embeddings,
    *,
    perturbation_key: str = "perturbation",
    control: str = "non-targeting",
    context_key: str | None = None,
    pseudobulk: xr.Dataset | str | None = None,
    pseudobulk_options: Mapping[str, Any] | None = None,
    perturbations: Sequence[str] | None = None,
    missing: MissingPolicy = "drop",
    gene_map: GeneMap = None,
    config: CellsConfig | None = None,
    seed: int = 0,
    block_rows: int | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> CellsModel:
    """Fit the cell model on a screen.

    Parameters
    ----------
    screen
        Path/URL of the AnnData screen (zarr or ``.h5ad``).
    embeddings
        Embedding path(s)/URL(s) (several are concatenated) or a table.
    perturbation_key, control
        The ``obs`` column of labels and the control label.
    context_key
        ``obs`` column of the cells' context (cell line): a perturbation's
        cells in a context are moved from the control cells of the same
        context (the OT source), and predictions start from them too. One
        VAE and one head serve every context.
    pseudobulk
        The screen's pseudo-bulk (store or Dataset), made with the same
        ``perturbation_key``, ``control`` and ``context_key``; by default
        the pass computes it. Its genes, normalisation (``input``,
        ``target_sum``), ``layer`` and ``obs_filter`` are the model's.
    pseudobulk_options
        The other parameters of the pass, by name
        (:class:`.pp.params.PseudobulkParams`: ``n_top_genes``, ``layer``,
        ``obs_filter``, ``target_sum``, ...).
    perturbations
        Train on these only (canonical names; in every context); default
        every perturbation with an embedding vector.
    missing, gene_map
        See :func:`.embeddings.featurize`.
    config
        The model's parameters (:class:`CellsConfig`).
    seed
        Seed of every random choice (minibatches, samples, initial weights).
    block_rows
        Rows per block read from the screen (default
        :data:`.stream.CELL_BLOCK_ROWS`; the pass's are sized by it).
    storage_options, progress
        fsspec options; a progress bar for the pass.
    """
    config = (config or CellsConfig()).check()
    prepared = prepare(screen, embeddings, perturbation_key=perturbation_key, control=control,
                       context_key=context_key, pseudobulk=pseudobulk,
                       pseudobulk_options=pseudobulk_options, missing=missing, gene_map=gene_map,
                       seed=seed, block_rows=block_rows, storage_options=storage_options,
                       progress=progress)
    return fit_on(prepared, training_rows(prepared.perturbations, perturbations), config, seed=seed)


def training_rows(names: Sequence[str], chosen: Sequence[str] | None) -> np.ndarray:
    """Indices of the rows of ``names`` that are ``chosen`` (all when ``None``)."""
    if chosen is None:
        return np.arange(len(names))
    absent = sorted(set(chosen) - set(names))
    if absent:
        raise LabelError(f"perturbations to train on are not in the pseudo-bulk with an embedding: "
                         f"{listing(absent)}")
    return np.flatnonzero(np.isin(np.asarray(names, dtype=object), list(chosen)))


def cells_predict(
    model: CellsModel,
    perturbations: Sequence[str],
    *,
    contexts: Sequence[str] | None = None,
    embeddings: Embeddings | None = None,
    n_cells: int = 500,
    seed: int = 0,
    include_control: bool = True,
    missing: MissingPolicy = "error",
    gene_map: GeneMap = None,
    storage_options: dict[str, Any] | None = None,
) -> ad.AnnData:
    """Predicted cells of perturbations (``A`` or ``A+B``), seen or unseen.

    In every context, every perturbation gets ``n_cells`` kept control cells
    of that context (fewer if fewer are kept), drawn with ``seed``, moved by
    its shift and decoded. :func:`predicted_parts` gives the same cells a
    perturbation at a time.

    Parameters
    ----------
    model
        A fitted model (:func:`cells_fit`, or :func:`.persist.load_cells_model`).
    perturbations
        What to predict.
    contexts
        The contexts to predict in (names of ``model.contexts``); default all.
    embeddings
        The embedding table; default the model's (a loaded model has none:
        give the table it was fitted with).
    n_cells, seed
        Cells per perturbation and context; the seed of their choice.
    include_control
        Put the kept control cells first, unchanged, labelled with the
        control label (cell-eval wants them).
    missing, gene_map, storage_options
        See :func:`.embeddings.featurize`; fsspec options.

    Returns
    -------
    anndata.AnnData
        Cells × the model's genes, non-negative log-expression; ``obs``:
        ``model.perturbation_key`` (the screen's label where it has one),
        ``control_cell`` (the screen row of the control cell it came from),
        ``is_control``, and with contexts ``model.context_key``.
    """
    features = prediction_features(model, perturbations, embeddings=embeddings, missing=missing,
                                   gene_map=gene_map, seed=seed, storage_options=storage_options)
    parts = list(predicted_parts(model, features, contexts=contexts, n_cells=n_cells, seed=seed,
                                 include_control=include_control))
    return cells_anndata(
        np.concatenate([part.x for part in parts]), [l for part in parts for l in part.labels],
        np.concatenate([part.rows for part in parts]), genes=model.genes,
        key=model.perturbation_key, control=model.control,
        obs=context_obs(model, np.concatenate([part.context for part in parts])),
        uns=model_uns(model),
    )


@dataclass(frozen=True)
class CellsPart:
    """Predicted cells of one perturbation in one context (or the kept
    control cells): expression, labels, control rows and context indices."""

    x: np.ndarray
    labels: list[str]
    rows: np.ndarray
    context: np.ndarray


def prediction_features(
    model: CellsModel,
    perturbations: Sequence[str],
    *,
    embeddings: Embeddings | None = None,
    missing: MissingPolicy = "error",
    gene_map: GeneMap = None,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> Features:
    """The features of perturbations to predict (see :func:`cells_predict`)."""
    if not perturbations:
        raise ParameterError("give at least one perturbation to predict")
    return featurize(prediction_table(model, embeddings, storage_options), list(perturbations),
                     missing=missing, gene_map=as_gene_map(gene_map, storage_options), seed=seed)


def predicted_parts(
    model: CellsModel,
    features: Features,
    *,
    contexts: Sequence[str] | None = None,
    n_cells: int = 500,
    seed: int = 0,
    include_control: bool = True,
) -> Iterator[CellsPart]:
    """The cells of :func:`cells_predict` (its arguments), a perturbation and
    context at a time, from :func:`prediction_features`."""
    check_positive("--n-cells", n_cells, integer=True)
    chosen = [model.context_index(c) for c in contexts] if contexts else range(len(model.contexts))
    rng = np.random.default_rng([seed, 3])
    if include_control:
        yield CellsPart(model.control_x, [model.control] * len(model.control_x), model.control_rows,
                        model.control_context)
    G = features.rows().astype(np.float32)
    for c in chosen:
        kept = model.controls_in(c)
        for name, g in zip(features.perturbations, G):
            picked = np.sort(rng.choice(kept, min(n_cells, len(kept)), replace=False))
            yield CellsPart(model.move(g, picked), [model.labels.get(name, name)] * len(picked),
                            model.control_rows[picked], np.full(len(picked), c))


def prediction_table(model: CellsModel, embeddings: Embeddings | None,
                     storage_options: dict[str, Any] | None) -> EmbeddingTable:
    """The embedding table to predict with, checked against the model's.

    Raises
    ------
    ParameterError
        If none is given and the model carries none (a loaded model).
    EmbeddingError
        If its dimension is not the model's.
    """
    fitted = " + ".join(str(s.get("path")) for s in model.embedding_sources) or "(unknown)"
    if embeddings is None:
        if model.embedding is None:
            raise ParameterError(f"the cell model does not carry its embedding table; give the "
                                 f"one it was fitted with ({fitted})")
        return model.embedding
    table = as_table(embeddings, storage_options)
    given = " + ".join(str(s.get("path")) for s in table.sources)
    check_dimension(model.head.condition.in_features, table.dim, f"{given} (the model's: {fitted})")
    return table


def context_obs(model: CellsModel, context: np.ndarray) -> dict[str, Any]:
    """``obs`` columns naming the cells' contexts (none without contexts)."""
    if model.context_key is None:
        return {}
    return {model.context_key: pd.Categorical.from_codes(context, categories=list(model.contexts))}


def model_uns(model: CellsModel, name: str = "latent_ot") -> dict[str, Any]:
    """What ``uns`` says of the model that predicted the cells."""
    return {"model": name, "trained_on": list(model.trained_on),
            "config": {k: v for k, v in asdict(model.config).items() if v is not None},
            **({"context_key": model.context_key} if model.context_key else {})}


def cells_anndata(
    x: np.ndarray,
    labels: Sequence[str],
    control_rows: np.ndarray,
    *,
    genes: pd.Index,
    key: str,
    control: str,
    obs: dict[str, Any] | None = None,
    uns: dict[str, Any] | None = None,
) -> ad.AnnData:
    """Predicted cells as AnnData: ``obs`` as :func:`cells_obs`; ``var`` the
    genes; ``uns["genepert_scale"]``."""
    return ad.AnnData(X=np.asarray(x, dtype=np.float32),
                      obs=cells_obs(labels, control_rows, key=key, control=control, obs=obs),
                      var=genes_var(genes), uns={"genepert_scale": {"control": control, **(uns or {})}})


def cells_obs(
    labels: Sequence[str] | pd.Categorical,
    control_rows: np.ndarray,
    *,
    key: str,
    control: str,
    obs: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """``obs`` of predicted cells: ``obs[key]`` the labels, ``control_cell``
    (the screen row each came from), ``is_control``, and ``obs``."""
    labels = pd.Categorical(labels)
    return pd.DataFrame({key: labels, "control_cell": np.asarray(control_rows, dtype=np.int64),
                         "is_control": np.asarray(labels == control), **(obs or {})},
                        index=pd.Index([f"pred{i}" for i in range(len(labels))]))


def genes_var(genes: pd.Index) -> pd.DataFrame:
    """``var`` of predicted cells: the genes."""
    return pd.DataFrame(index=pd.Index(genes.astype(str), name="gene"))
