"""An evaluation as the two AnnData files Arc's cell-eval scores as they are.

``export_cell_eval(EVAL_DIR, SCREEN, OUT)`` writes ``OUT/real.h5ad`` — the
screen's cells of the evaluation's held-out perturbations and its control
cells, normalised and ``log1p``'d as the pseudo-bulk was, over the
evaluation's genes — and ``OUT/pred.h5ad`` — the same control cells and, for
every held-out perturbation, its predicted mean (control mean + predicted
delta, clipped at zero) repeated to its true number of cells. Both carry the
screen's labels in ``obs[perturbation_key]`` and its control label, so that::

    cell-eval run -ap OUT/pred.h5ad -ar OUT/real.h5ad \\
        --control-pert LABEL --pert-col KEY --profile anndata

runs without edits. The screen is read in its row blocks, once; ``X`` of both
files is CSR, appended block by block, so the export never holds more than a
block of cells (and one predicted perturbation's rows) at a time.

Notes
-----
cell-eval's ``pearson_delta`` of a perturbation is the Pearson correlation of
(mean predicted cell − mean predicted control cell) with (mean real cell −
mean real control cell). With the control cells shared and the predicted
cells all equal to the clipped mean, that is our ``pearson_delta`` of the
clipped prediction against the true delta of the cells written
(``uns["genepert_scale"]["pearson_delta"]["expected"]``); it differs from the
evaluation's (unclipped) value only by the clipping and float32 rounding.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import dask.utils
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import sparse_dataset, write_elem

from .. import __version__
from ..errors import LabelError, ParameterError, StoreError, listing
from .encodings import open_predictions
from .interop import clip_at_zero
from .store import atomic_output, filesystem, local_directory

log = logging.getLogger(__name__)

#: The model exported by default.
DEFAULT_MODEL = "genepert_ridge"
#: The two files of an export.
PRED, REAL = "pred.h5ad", "real.h5ad"
#: Largest difference between a held-out perturbation's delta recomputed from
#: the screen's cells and the evaluation's (stored as float32) that counts as
#: the same: float32 rounding of log1p values (< 1e-6) and the pseudo-bulk's
#: fixed-point sums are far below it; another screen, target sum or filter
#: is far above.
DELTA_TOLERANCE = 1e-4
#: Values per write of repeated predicted rows.
WRITE_VALUES = 4_000_000


@dataclass(frozen=True)
class HeldOut:
    """What an evaluation directory holds of one model's held-out predictions.

    Attributes
    ----------
    source
        The evaluation directory.
    model
        The model exported.
    names
        The held-out perturbations the model scored (the pseudo-bulk's names).
    genes
        The evaluation's genes, in order.
    prediction
        The model's predicted delta, perturbations × genes.
    delta
        The evaluation's true delta, perturbations × genes.
    run
        What the pseudo-bulk recorded of its run (:func:`.pp.params.recorded_run`).
    pearson_delta
        The evaluation's mean ``pearson_delta`` of the model (``metrics.json``).
    excludes_targets
        Whether the evaluation left target genes out of its metrics.
    not_scored
        Held-out perturbations the model did not score (left out of the export).
    """

    source: str
    model: str
    names: list[str]
    genes: pd.Index
    prediction: np.ndarray = field(repr=False)
    delta: np.ndarray = field(repr=False)
    run: dict[str, Any]
    pearson_delta: float | None
    excludes_targets: bool
    not_scored: list[str]

    @property
    def perturbation_key(self) -> str:
        return self.run["perturbation_key"]

    @property
    def control(self) -> str:
        return self.run["control"]


def read_held_out(evaluation: str, model: str = DEFAULT_MODEL,
                  storage_options: dict[str, Any] | None = None) -> HeldOut:
    """Read a model's held-out predictions from an evaluation directory
    (``genepert-scale evaluate --out``: ``metrics.json``, ``predictions.zarr``).

    Raises
    ------
    StoreError
        If a file is missing or the evaluation does not say how its
        pseudo-bulk was made.
    ParameterError
        If the model is not in the evaluation, or scored no perturbation.
    """
    document = _read_json(f"{evaluation.rstrip('/')}/metrics.json", storage_options)
    predictions = open_predictions(f"{evaluation.rstrip('/')}/predictions.zarr", storage_options)
    models = [str(m) for m in predictions["model"].values]
    if model not in models:
        raise ParameterError(f"{evaluation} has no model {model!r}; its models: {', '.join(models)}. "
                             "Pass one of them with --model")
    run = _pseudobulk_run(evaluation, predictions.attrs, document, storage_options)
    prediction = np.asarray(predictions["prediction"].sel(model=model).values, dtype=np.float64)
    scored = np.isfinite(prediction).all(axis=1)
    names = np.array([str(p) for p in predictions["perturbation"].values], dtype=object)
    if not scored.any():
        raise ParameterError(f"{evaluation}: model {model!r} scored no held-out perturbation; "
                             "export another with --model")
    summary = document.get("models", {}).get(model, {}).get("pearson_delta", {})
    return HeldOut(
        evaluation, model, list(names[scored]),
        pd.Index([str(g) for g in predictions["gene"].values]),
        prediction[scored], np.asarray(predictions["delta"].values, dtype=np.float64)[scored],
        run, summary.get("mean"), bool(document.get("parameters", {}).get("exclude_targets")),
        list(names[~scored]),
    )


def _read_json(path: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    fs, root = filesystem(path, storage_options)
    if not fs.exists(root):
        raise StoreError(f"{path} does not exist; give the directory that "
                         "'genepert-scale evaluate --out' wrote")
    with fs.open(root, "r") as handle:
        return json.load(handle)


def _pseudobulk_run(evaluation: str, attrs: dict[str, Any], document: dict[str, Any],
                    storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The pseudo-bulk's record of its run: from the predictions' attrs, or
    ``metrics.json``'s parameters, or the pseudo-bulk store they name."""
    from ..pp.aggregate import open_pseudobulk
    from ..pp.params import recorded_run

    if "pseudobulk_run" in attrs:
        run = json.loads(attrs["pseudobulk_run"])
    elif "pseudobulk_run" in document.get("parameters", {}):
        run = document["parameters"]["pseudobulk_run"]
    elif document.get("parameters", {}).get("pseudobulk"):
        run = recorded_run(open_pseudobulk(document["parameters"]["pseudobulk"], storage_options).attrs)
    else:
        run = {}
    if not run.get("control"):
        raise StoreError(f"{evaluation} does not record how its pseudo-bulk was made (its label "
                         "column, control label, target sum); run 'genepert-scale evaluate' again")
    return run


@dataclass(frozen=True)
class CellPlan:
    """Which of the screen's cells are exported, and under which label.

    Attributes
    ----------
    code
        Per cell: ``0`` a control cell, ``i + 1`` a cell of held-out
        perturbation ``i``, ``-1`` not exported.
    labels
        The label of every code: the screen's control label, then each
        held-out perturbation's label in the screen.
    n_cells
        Exported cells per code.
    relabelled
        Screen labels written as another one (two labels of one perturbation,
        ``A+ctrl`` and ``ctrl+A``; control labels other than ``control``):
        label → the label written.
    """

    code: np.ndarray = field(repr=False)
    labels: list[str]
    n_cells: np.ndarray
    relabelled: dict[str, str]


def plan_cells(screen: Any, held: HeldOut) -> CellPlan:
    """The cells of ``screen`` (:class:`.screen.Screen`) that the pseudo-bulk
    counted for the control and the held-out perturbations, and their labels.

    Cells count as the pseudo-bulk counted them: by their label's
    perturbation (:func:`.pp.labels.assign_groups`), within its ``obs_filter``
    and the evaluation's context.

    Raises
    ------
    LabelError
        If held-out perturbations, or control cells, have no cell in the screen.
    """
    from ..pp.labels import assign_groups

    key, control = held.perturbation_key, held.control
    labels = pd.Categorical(screen.obs_column(key).array)
    groups, names = assign_groups(labels, control, column=key)
    position = {name: i + 1 for i, name in enumerate(held.names)}
    of_group = np.array([0, *(position.get(n, -1) for n in names[1:])], dtype=np.int64)
    code = np.where(groups >= 0, of_group[np.maximum(groups, 0)], -1)
    code[~_counted(screen, held.run)] = -1
    n_cells = np.bincount(code[code >= 0], minlength=len(held.names) + 1)
    absent = [n for n, count in zip(held.names, n_cells[1:]) if count == 0]
    if absent or n_cells[0] == 0:
        what = f"held-out perturbations {listing(absent)}" if absent else f"control cells ({control!r})"
        raise LabelError(f"{screen.source} has no cells of the {what} of {held.source}; give the "
                         "screen its pseudo-bulk was made from")
    chosen, relabelled = _written_labels(labels, code, control, len(n_cells))
    return CellPlan(code, chosen, n_cells, relabelled)


def _counted(screen: Any, run: dict[str, Any]) -> np.ndarray:
    """Per cell: whether the pseudo-bulk's ``--obs-filter`` and the
    evaluation's context let it count."""
    parameters = run.get("parameters", {})
    keep = np.ones(screen.n_obs, dtype=bool)
    if parameters.get("obs_filter"):
        flag = parameters["obs_filter"]
        values = screen.obs_column(flag.removeprefix("~"), option="--obs-filter")
        keep &= values.to_numpy(dtype=bool) != flag.startswith("~")
    if run.get("context") is not None:
        context = screen.obs_column(parameters["context_key"], option="--context-key")
        keep &= context.astype(str).to_numpy() == str(run["context"])
    if parameters.get("batch_key"):
        log.warning("the pseudo-bulk compared perturbations with batch-matched controls; "
                    "cell-eval compares them with all control cells, so its deltas differ from ours")
    return keep


def _written_labels(labels: pd.Categorical, code: np.ndarray, control: str, n_codes: int
                    ) -> tuple[list[str], dict[str, str]]:
    """The label written for every code (the control's: ``control``; a
    perturbation's: its most frequent screen label) and the screen labels
    written as another one."""
    exported = code >= 0
    pairs = code[exported] * len(labels.categories) + np.asarray(labels.codes)[exported]
    counts = np.bincount(pairs, minlength=n_codes * len(labels.categories))
    counts = counts.reshape(n_codes, len(labels.categories))
    categories = np.asarray(labels.categories).astype(str)
    chosen = [control, *categories[counts[1:].argmax(axis=1)]]
    relabelled = {str(categories[j]): chosen[i] for i, j in zip(*np.nonzero(counts))
                  if categories[j] != chosen[i]}
    return chosen, relabelled


def exported_blocks(screen: Any, plan: CellPlan, columns: np.ndarray, kind: str,
                    target_sum: float) -> Iterator[tuple[sp.csr_matrix, np.ndarray]]:
    """The exported cells of every row block that has some, in screen order:
    their expression as the pseudo-bulk saw it (normalised to ``target_sum``
    and ``log1p``'d for ``counts``, as stored for ``log1p``) over the genes
    ``columns``, float32 CSR, and their codes."""
    from ..pp.kernels import normalize_log1p

    bounds = np.cumsum((0, *screen.X.chunks[0]))
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        keep = plan.code[start:stop] >= 0
        if not keep.any():
            continue  # no read
        with screen.naming_bad_chunks():
            block = screen.csr.read(start, stop) if screen.csr else screen.X.blocks[i].compute()
        block = sp.csr_matrix(block)
        values = (normalize_log1p(block, target_sum)[1] if kind == "counts"
                  else block.data.astype(np.float64))
        logged = sp.csr_matrix((values.astype(np.float32), block.indices, block.indptr),
                               shape=block.shape)
        yield logged[keep][:, columns], plan.code[start:stop][keep]


class GroupSums:
    """Running sums of the exported cells' expression per code (the
    pseudo-bulk of the cells written), in float64."""

    def __init__(self, n_codes: int, n_genes: int) -> None:
        self.sums = np.zeros((n_codes, n_genes))

    def add(self, block: sp.csr_matrix, codes: np.ndarray) -> None:
        """Add the rows of ``block`` to the sums of their ``codes``."""
        rows = sp.csr_matrix((np.ones(codes.size), (codes, np.arange(codes.size))),
                             shape=(self.sums.shape[0], codes.size))
        part = (rows @ block.astype(np.float64)).tocoo()
        part.sum_duplicates()
        self.sums[part.row, part.col] += part.data

    def means(self, n_cells: np.ndarray) -> np.ndarray:
        return self.sums / n_cells[:, None]


class RowAppender:
    """An ``.h5ad`` whose ``X`` (CSR) is written row block by row block.

    ``obs`` and ``var`` are written first, :meth:`append` adds rows, and
    :meth:`close` writes ``uns`` and checks that ``X`` has a row for every
    ``obs`` row.
    """

    def __init__(self, path: str, obs: pd.DataFrame, var: pd.DataFrame) -> None:
        ad.AnnData(obs=obs, var=var).write_h5ad(path)
        self.path, self.n_obs, self.n_vars = path, len(obs), len(var)
        self.file = h5py.File(path, "a")
        self.rows = 0

    def append(self, block: sp.csr_matrix) -> None:
        if block.shape[0] == 0:
            return
        block = sp.csr_matrix(block, dtype=np.float32)
        if self.rows == 0:
            write_elem(self.file, "X", block)
        else:
            sparse_dataset(self.file["X"]).append(block)
        self.rows += block.shape[0]

    def close(self, uns: dict[str, Any]) -> None:
        """Write ``uns`` and close the file.

        Raises
        ------
        StoreError
            If the rows written are not the cells of ``obs``.
        """
        if self.rows == 0:
            write_elem(self.file, "X", sp.csr_matrix((0, self.n_vars), dtype=np.float32))
        write_elem(self.file, "uns", uns)
        self.file.close()
        if self.rows != self.n_obs:
            raise StoreError(f"{self.path}: wrote {self.rows} rows for {self.n_obs} cells")


@contextmanager
def row_appenders(*files: tuple[str, pd.DataFrame, pd.DataFrame]) -> Iterator[list[RowAppender]]:
    """A :class:`RowAppender` per ``(path, obs, var)``; their files are
    closed if the block fails (it closes them itself on success)."""
    appenders: list[RowAppender] = []
    try:
        for path, obs, var in files:
            appenders.append(RowAppender(path, obs, var))
        yield appenders
    finally:
        for appender in appenders:
            if appender.file.id.valid:
                appender.file.close()


def export_cell_eval(
    evaluation: str,
    screen: Any,
    out: str,
    *,
    model: str = DEFAULT_MODEL,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    block_rows: int | None = None,
    memory_limit: int | str | None = None,
) -> str:
    """Write ``out/pred.h5ad`` and ``out/real.h5ad`` for cell-eval from an
    evaluation and the screen its pseudo-bulk was made from.

    Parameters
    ----------
    evaluation
        The directory ``genepert-scale evaluate --out`` wrote (path or URL).
    screen
        The screen: an AnnData zarr store or ``.h5ad`` (path or URL), an
        AnnData, or an opened :class:`.screen.Screen`.
    out
        The output directory (path or URL).
    model
        The evaluation's model to export.
    overwrite
        Replace an existing ``out``.
    storage_options
        fsspec options for URLs.
    block_rows, memory_limit
        Row blocks of the screen (:func:`.screen.open_screen`); the limit in
        bytes or as a string such as ``"2GiB"``.

    Returns
    -------
    str
        ``out``. Both files: ``obs[perturbation_key]`` with the screen's
        labels (a perturbation of several labels under its most frequent),
        ``var`` the evaluation's genes, ``X`` float32 CSR log-expression;
        ``uns["genepert_scale"]`` the source, labels, parameters and
        relabelled labels; ``pred.h5ad`` also ``clipped`` (predicted means
        raised to zero, :func:`.interop.clip_at_zero`) and ``pearson_delta``
        (the evaluation's and the one cell-eval should find, see the module notes).

    Raises
    ------
    ParameterError
        If the screen's cells do not give the evaluation's true deltas
        (another screen, or other parameters), or the model is unknown.
    LabelError, StoreError
        If the screen lacks held-out perturbations or genes, or a file is missing.
    """
    from ..pp.aggregate import resolve_input_kind
    from .screen import open_data

    if isinstance(memory_limit, str):
        memory_limit = dask.utils.parse_bytes(memory_limit)
    held = read_held_out(evaluation, model, storage_options)
    data = open_data(screen, storage_options=storage_options, block_rows=block_rows,
                     memory_limit=memory_limit, layer=held.run.get("parameters", {}).get("layer"))
    plan = plan_cells(data, held)
    kind = held.run.get("input_kind") or resolve_input_kind(data, "auto")
    target_sum = float(held.run.get("parameters", {}).get("target_sum") or 1e4)
    with (
        atomic_output(out, overwrite=overwrite, storage_options=storage_options) as tmp,
        local_directory(tmp, storage_options) as local,
    ):
        write_files(Path(local), data, held, plan, kind=kind, target_sum=target_sum)
    log.info("wrote %s: run cell-eval run -ap %s/%s -ar %s/%s --control-pert %s --pert-col %s "
             "--profile anndata", out, out, PRED, out, REAL, held.control, held.perturbation_key)
    return out


def gene_columns(screen: Any, held: HeldOut) -> np.ndarray:
    """The screen's columns of the evaluation's genes, in their order.

    Raises
    ------
    LabelError
        If the screen lacks some of them.
    """
    columns = pd.Index(screen.var_names).get_indexer(held.genes)
    if (columns < 0).any():
        raise LabelError(f"{screen.source} lacks {int((columns < 0).sum())} genes of {held.source}, "
                         f"e.g. {listing(held.genes[columns < 0], 5)}; give the screen its "
                         "pseudo-bulk was made from")
    return columns


def write_files(root: Path, screen: Any, held: HeldOut, plan: CellPlan, *, kind: str,
                target_sum: float) -> None:
    """Stream the exported cells of ``screen`` into ``root/real.h5ad`` (all)
    and ``root/pred.h5ad`` (the controls), then write the predicted cells."""
    from ..tl.metrics import pearson_rows

    var = pd.DataFrame(index=pd.Index(held.genes, name="gene"))
    names = np.asarray(screen.obs_names).astype(object)
    exported = plan.code >= 0
    real_obs = _obs(names[exported], plan.code[exported], plan, held.perturbation_key)
    pred_obs = _pred_obs(names[plan.code == 0], plan, held.perturbation_key)
    sums = GroupSums(len(plan.labels), len(held.genes))
    with row_appenders((str(root / REAL), real_obs, var), (str(root / PRED), pred_obs, var)) as (real, pred):
        for block, codes in exported_blocks(screen, plan, gene_columns(screen, held), kind, target_sum):
            real.append(block)
            pred.append(block[codes == 0])
            sums.add(block, codes)
        means = sums.means(plan.n_cells)
        difference = check_deltas(means, held, screen.source)
        expression, clipped = clip_at_zero(means[0] + held.prediction)
        for rows in repeated_rows(expression.astype(np.float32), plan.n_cells[1:]):
            pred.append(rows)
        uns = _uns(held, plan, screen.source, kind, target_sum, difference)
        real.close({"genepert_scale": uns})
        expected = pearson_rows(expression.astype(np.float32) - means[0], means[1:] - means[0])
        pred.close({"genepert_scale": {
            **uns, "clipped": _no_none(clipped),
            "pearson_delta": _no_none({"evaluation": held.pearson_delta,
                                       "evaluation_excludes_targets": held.excludes_targets,
                                       "expected": float(np.nanmean(expected))}),
        }})


def _obs(names: np.ndarray, codes: np.ndarray, plan: CellPlan, key: str) -> pd.DataFrame:
    """``obs`` of cells: their ``names`` and the labels of their ``codes``."""
    labels = pd.Categorical.from_codes(codes, categories=plan.labels)
    return pd.DataFrame({key: labels}, index=pd.Index(np.asarray(names, dtype=object).astype(str)))


def _pred_obs(control_names: np.ndarray, plan: CellPlan, key: str) -> pd.DataFrame:
    """``obs`` of ``pred.h5ad``: the control cells, then every held-out
    perturbation's predicted cells (``pred:LABEL:I``), as many as it has."""
    n = plan.n_cells[1:]
    codes = np.repeat(np.arange(1, len(plan.labels)), n)
    ranks = np.arange(codes.size) - np.repeat(np.cumsum(n) - n, n)
    predicted = [f"pred:{plan.labels[c]}:{r}" for c, r in zip(codes, ranks)]
    return pd.concat([_obs(control_names, np.zeros(len(control_names), dtype=int), plan, key),
                      _obs(np.asarray(predicted, dtype=str), codes, plan, key)])


def repeated_rows(expression: np.ndarray, n_cells: np.ndarray) -> Iterator[sp.csr_matrix]:
    """Row ``i`` of ``expression`` repeated ``n_cells[i]`` times, in CSR
    blocks of at most :data:`WRITE_VALUES` values (zeros are not stored)."""
    for row, n in zip(expression, n_cells):
        genes = np.flatnonzero(row)
        step = max(1, WRITE_VALUES // max(genes.size, 1))
        for start in range(0, int(n), step):
            k = min(step, int(n) - start)
            yield sp.csr_matrix((np.tile(row[genes], k), np.tile(genes, k),
                                 np.arange(k + 1) * genes.size), shape=(k, row.size))


def check_deltas(means: np.ndarray, held: HeldOut, source: str) -> float:
    """The largest difference between the held-out perturbations' deltas of
    the cells written (``means``: control first) and the evaluation's.

    Raises
    ------
    ParameterError
        If it exceeds :data:`DELTA_TOLERANCE` and the pseudo-bulk did not
        match controls by batch (whose deltas differ from the pooled control's).
    """
    difference = np.abs(means[1:] - means[0] - held.delta)
    worst = np.unravel_index(np.argmax(difference), difference.shape)
    largest = float(difference[worst])
    if largest > DELTA_TOLERANCE and not held.run.get("parameters", {}).get("batch_key"):
        raise ParameterError(
            f"{source}: the cells of {held.names[worst[0]]} give a delta of gene "
            f"{held.genes[worst[1]]} that differs from {held.source}'s by {largest:.3g}; give the "
            "screen (and layer) its pseudo-bulk was made from, with the same parameters")
    return largest


def _uns(held: HeldOut, plan: CellPlan, source: str, kind: str, target_sum: float,
         difference: float) -> dict[str, Any]:
    """What both files record in ``uns["genepert_scale"]``."""
    return _no_none({
        "genepert_scale_version": __version__,
        "evaluation": held.source,
        "model": held.model,
        "screen": source,
        "perturbation_key": held.perturbation_key,
        "control": held.control,
        "context": held.run.get("context"),
        "input_kind": kind,
        "target_sum": target_sum,
        "n_perturbations": len(held.names),
        "n_control_cells": int(plan.n_cells[0]),
        "not_scored": list(held.not_scored),
        "relabelled": {"from": list(plan.relabelled), "to": list(plan.relabelled.values())},
        "max_delta_difference": difference,
    })


def _no_none(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without its ``None`` values (``.h5ad`` cannot hold them)."""
    return {k: v for k, v in record.items() if v is not None}
