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

import functools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
import xarray as xr

from ...errors import LabelError, ParameterError
from ...pp.aggregate import open_pseudobulk, pseudobulk as run_pseudobulk
from ...pp.params import InputKindOption
from ...validate import NTopGenes, check_choice, check_positive
from ..embeddings import EmbeddingTable, Features, MissingPolicy, featurize
from ..model import Embeddings, GeneMap, TrainingData, as_gene_map, as_table, training_data
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
    """A screen joined with its pseudo-bulk and the embeddings of its perturbations."""

    pseudobulk: xr.Dataset
    data: TrainingData
    source: CellSource

    @property
    def features(self) -> Features:
        return self.data.features

    @property
    def perturbations(self) -> list[str]:
        return self.data.features.perturbations


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
    history
        Loss per epoch: ``vae`` and ``head``.
    seconds
        Seconds of every stage of the fit.
    """

    vae: Vae
    head: ShiftHead
    genes: pd.Index
    embedding: EmbeddingTable
    control_x: np.ndarray
    control_z: np.ndarray
    control_rows: np.ndarray
    trained_on: list[str]
    latent_delta: dict[str, np.ndarray]
    labels: dict[str, str]
    control: str
    perturbation_key: str
    config: CellsConfig
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

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
    pseudobulk: xr.Dataset | str | None = None,
    n_top_genes: NTopGenes = "default",
    input: InputKindOption = "auto",
    missing: MissingPolicy = "drop",
    gene_map: GeneMap = None,
    seed: int = 0,
    block_rows: int = CELL_BLOCK_ROWS,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> Prepared:
    """The pseudo-bulk (given, or computed by the pass), its perturbations'
    features and the screen's cells over its genes (see :func:`cells_fit`)."""
    if pseudobulk is None:
        ds = run_pseudobulk(screen, perturbation_key=perturbation_key, control=control,
                            n_top_genes=n_top_genes, input=input,
                            storage_options=storage_options, progress=progress,
                            as_xarray=True)
    elif isinstance(pseudobulk, str):
        ds = open_pseudobulk(pseudobulk, storage_options)
    else:
        ds = pseudobulk
    if ds.attrs.get("control", control) != control:
        raise LabelError(f"the pseudo-bulk's control is {ds.attrs['control']!r}, not {control!r}; "
                         "give the pseudo-bulk of this screen and control")
    data = training_data(ds, as_table(embeddings, storage_options), missing=missing,
                         gene_map=gene_map, seed=seed, storage_options=storage_options)
    source = open_cells(screen, ds, data.features.perturbations, perturbation_key=perturbation_key,
                        control=control, block_rows=block_rows, storage_options=storage_options)
    return Prepared(ds, data, source)


def control_pool(source: CellSource, n_cells: int, seed: int) -> np.ndarray:
    """Rows of the control cells the model keeps (at most ``n_cells``, seeded)."""
    rows = source.cells_of(CONTROL)
    if rows.size == 0:
        raise LabelError(f"{source.screen.source}: no control cells ({source.control!r})")
    return sample_rows(rows, n_cells, np.random.default_rng([seed, 2]))


def fit_on(
    prepared: Prepared,
    train: np.ndarray,
    config: CellsConfig,
    *,
    seed: int = 0,
    pool: np.ndarray | None = None,
) -> CellsModel:
    """Fit the cell model on the control cells and the cells of the
    perturbations ``train`` (indices into ``prepared.perturbations``) only."""
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
        z, shift, condition = ot_pairs(control_z, gathered, config, rng)
        clock.lap("ot")
        head, head_history = fit_head(z, shift, condition, G, config, rng, device=device)
        clock.lap("head")
    names = prepared.perturbations
    latent_delta = {names[p]: shift[condition == p].mean(axis=0) for p in train}
    log.info("cell model: %d training perturbations, %d cells, VAE loss %.3f, head loss %.4f; "
             "seconds %s", len(train), int(mask.sum()), vae_history[-1], head_history[-1], clock)
    return CellsModel(vae, head, source.genes, prepared.data.embedding, control_x, control_z, pool,
                      [names[p] for p in train], latent_delta, source.labels, source.control,
                      source.key, config, {"vae": vae_history, "head": head_history},
                      clock.seconds)


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
    embeddings: np.ndarray,
    config: CellsConfig,
    rng: np.random.Generator,
    *,
    device: torch.device,
) -> tuple[ShiftHead, list[float]]:
    """The shift head trained on OT pairs (:func:`ot_pairs`); the loss of every epoch."""
    head = ShiftHead(config.latent_dim, embeddings.shape[1], hidden=config.hidden,
                     condition_dim=config.condition_dim, injection=config.injection).to(device)
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
    control_z: np.ndarray,
    latents: dict[str, np.ndarray],
    config: CellsConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training pairs of the head: for every perturbation ``p<i>`` of
    ``latents``, up to ``ot_cells`` control latents, their OT shifts to its
    latents, and ``i`` (the condition). The debiased map's reference is as
    many other control latents (the kept ones split in two when too few)."""
    zs, shifts, conditions = [], [], []
    debiased = config.ot_map == "debiased"
    n = min(config.ot_cells, len(control_z) // 2 if debiased else len(control_z))
    if n < 1:
        raise ParameterError(f"{len(control_z)} control cells kept: too few for optimal transport")
    for name, target in latents.items():
        if len(target) == 0:
            continue
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
    pseudobulk: xr.Dataset | str | None = None,
    n_top_genes: NTopGenes = "default",
    input: InputKindOption = "auto",
    perturbations: Sequence[str] | None = None,
    missing: MissingPolicy = "drop",
    gene_map: GeneMap = None,
    config: CellsConfig | None = None,
    seed: int = 0,
    block_rows: int = CELL_BLOCK_ROWS,
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
    pseudobulk
        The screen's pseudo-bulk (store or Dataset); by default the pass
        computes it (``n_top_genes``, ``input`` as :func:`.pseudobulk.pseudobulk`).
        Its genes and normalisation are the model's.
    perturbations
        Train on these only (canonical names); default every perturbation
        with an embedding vector.
    missing, gene_map
        See :func:`.embeddings.featurize`.
    config
        The model's parameters (:class:`CellsConfig`).
    seed
        Seed of every random choice (minibatches, samples, initial weights).
    block_rows
        Rows per block read from the screen.
    storage_options, progress
        fsspec options; a progress bar for the pass.
    """
    config = (config or CellsConfig()).check()
    prepared = prepare(screen, embeddings, perturbation_key=perturbation_key, control=control,
                       pseudobulk=pseudobulk, n_top_genes=n_top_genes, input=input, missing=missing,
                       gene_map=gene_map, seed=seed, block_rows=block_rows,
                       storage_options=storage_options, progress=progress)
    return fit_on(prepared, training_rows(prepared.perturbations, perturbations), config, seed=seed)


def training_rows(names: Sequence[str], chosen: Sequence[str] | None) -> np.ndarray:
    """Indices of ``chosen`` in ``names`` (all when ``None``)."""
    if chosen is None:
        return np.arange(len(names))
    index = pd.Index(names).get_indexer(list(chosen))
    if np.any(index < 0):
        absent = [c for c, i in zip(chosen, index) if i < 0]
        raise LabelError(f"perturbations to train on are not in the pseudo-bulk with an embedding: "
                         f"{', '.join(absent[:10])}")
    return np.sort(index)


def cells_predict(
    model: CellsModel,
    perturbations: Sequence[str],
    *,
    embeddings: Embeddings | None = None,
    n_cells: int = 500,
    seed: int = 0,
    include_control: bool = True,
    missing: MissingPolicy = "error",
    gene_map: GeneMap = None,
    storage_options: dict[str, Any] | None = None,
) -> ad.AnnData:
    """Predicted cells of perturbations (``A`` or ``A+B``), seen or unseen.

    Every perturbation gets ``n_cells`` kept control cells (fewer if fewer
    are kept), drawn with ``seed``, moved by its shift and decoded.

    Returns
    -------
    anndata.AnnData
        Cells × the model's genes, non-negative log-expression; ``obs``:
        ``model.perturbation_key`` (the screen's label where it has one),
        ``control_cell`` (the screen row of the control cell it came from),
        ``is_control``. With ``include_control`` the kept control cells come
        first, unchanged, labelled with the control label (cell-eval wants them).
    """
    if not perturbations:
        raise ParameterError("give at least one perturbation to predict")
    check_positive("--n-cells", n_cells, integer=True)
    table = model.embedding if embeddings is None else as_table(embeddings, storage_options)
    features = featurize(table, list(perturbations), missing=missing,
                         gene_map=as_gene_map(gene_map, storage_options), seed=seed)
    rng = np.random.default_rng([seed, 3])
    blocks, names, rows = [], [], []
    if include_control:
        blocks.append(model.control_x)
        names += [model.control] * len(model.control_x)
        rows.append(model.control_rows)
    G = features.rows().astype(np.float32)
    for name, g in zip(features.perturbations, G):
        kept = len(model.control_z)
        picked = np.sort(rng.choice(kept, min(n_cells, kept), replace=False))
        blocks.append(model.move(g, picked))
        names += [model.labels.get(name, name)] * len(picked)
        rows.append(model.control_rows[picked])
    uns = {"model": "latent_ot", "trained_on": list(model.trained_on),
           "config": {k: v for k, v in asdict(model.config).items() if v is not None}}
    return cells_anndata(np.concatenate(blocks), names, np.concatenate(rows), genes=model.genes,
                         key=model.perturbation_key, control=model.control, uns=uns)


def cells_anndata(
    x: np.ndarray,
    labels: Sequence[str],
    control_rows: np.ndarray,
    *,
    genes: pd.Index,
    key: str,
    control: str,
    obs: dict[str, np.ndarray] | None = None,
    uns: dict[str, Any] | None = None,
) -> ad.AnnData:
    """Predicted cells as AnnData: ``obs[key]`` the labels, ``control_cell``,
    ``is_control`` and ``obs``; ``var`` the genes; ``uns["genepert_scale"]``."""
    table = pd.DataFrame({key: pd.Categorical(labels),
                          "control_cell": np.asarray(control_rows, dtype=np.int64),
                          "is_control": np.asarray(labels) == control, **(obs or {})},
                         index=pd.Index([f"pred{i}" for i in range(len(labels))]))
    return ad.AnnData(X=np.asarray(x, dtype=np.float32), obs=table,
                      var=pd.DataFrame(index=pd.Index(genes.astype(str), name="gene")),
                      uns={"genepert_scale": {"control": control, **(uns or {})}})
