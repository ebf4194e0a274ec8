"""A batch run as a chain of stages that skip what is already done.

Each :class:`Stage` names its output (under ``[output] dir``), its inputs
(external ones — ``screen``, ``embeddings`` — or earlier stages) and its
parameters (taken from the :class:`~genepert_scale.cli.config.RunConfig`). Its
*fingerprint* is a hash of the engine version, its parameters and the
identities of its inputs: for an external input the names, sizes and
modification stamps (ETag or mtime) of its files; for an earlier stage that
stage's fingerprint. Fingerprints therefore depend only on what goes in, so the
whole plan is known before anything runs.

When a stage finishes, a record ``<dir>/_stages/<stage>.json`` with its
fingerprint is written *after* its output is in place (outputs are written
atomically). A stage is *current* when its record carries the fingerprint just
computed and its output exists; current stages are skipped, others are run. A
run killed in the middle leaves no record for the stage it was in (and no
half-written output), so the rerun redoes that stage and skips the finished
ones; changing a parameter or an input makes that stage and every stage after
it stale.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .. import __version__
from .config import RunConfig
from ..errors import ParameterError, StoreError
from ..io.store import atomic_output, exists, filesystem, hold_output, local_parent

log = logging.getLogger(__name__)

#: Folder (under the output dir) of the stage records.
RECORDS = "_stages"
#: fsspec ``info`` fields that change when a file's content changes, most specific first.
STAMP_FIELDS = ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "last_modified")


@dataclass(frozen=True)
class StageRun:
    """What a stage's runner gets: the config, its inputs, where to write."""

    config: RunConfig
    inputs: dict[str, Any]
    output: str
    progress: bool = True


@dataclass(frozen=True)
class Stage:
    """One step of a batch run.

    Attributes
    ----------
    name
        Stage name (``pseudobulk``, ``evaluate``, …).
    output
        Output path relative to ``[output] dir``.
    inputs
        Names of earlier stages or of external inputs (:data:`EXTERNAL_INPUTS`).
    params
        The parameters of the stage, from the config (JSON-serialisable).
    run
        Writes the output (replacing any there).
    """

    name: str
    output: str
    inputs: tuple[str, ...]
    params: Callable[[RunConfig], dict[str, Any]]
    run: Callable[[StageRun], None]


@dataclass(frozen=True)
class PlannedStage:
    """A stage with its resolved paths, fingerprint and state."""

    stage: Stage
    output: str
    inputs: dict[str, Any]
    fingerprint: str
    state: str  # "current", "stale" or "missing"


def external_inputs(config: RunConfig) -> dict[str, tuple[Any, dict, str]]:
    """External inputs of a run: name → (path or paths, storage options, config key)."""
    return {
        "screen": (config.input.url, config.input.storage_options, "[input] url"),
        "embeddings": (
            config.embeddings.paths, config.embeddings.storage_options, "[embeddings] paths"
        ),
    }


def join(base: str, *parts: str) -> str:
    """Join a local path or URL with relative parts."""
    return "/".join([base.rstrip("/"), *parts])


def content_identity(path: str, storage_options: dict[str, Any] | None = None) -> list:
    """Names, sizes and change stamps of the files at ``path`` (a file or a folder).

    Lists the folder (one listing request per 1000 files on object stores);
    reads no file content.

    Raises
    ------
    StoreError
        If nothing exists at ``path``.
    """
    fs, root = filesystem(path, storage_options)
    if not fs.exists(root):
        raise StoreError(f"input {path} does not exist; check [input]/[embeddings] in the config")
    entries = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)}
    prefix = root.rstrip("/")
    return sorted(
        [name.removeprefix(prefix), info.get("size"), _stamp(info)] for name, info in entries.items()
    )


def _stamp(info: dict[str, Any]) -> str:
    return next((str(info[k]) for k in STAMP_FIELDS if info.get(k) is not None), "")


def fingerprint(stage: Stage, config: RunConfig, identities: dict[str, Any]) -> str:
    """Hash of the engine version, the stage's parameters and its inputs' identities."""
    payload = {
        "stage": stage.name,
        "version": __version__,
        "params": stage.params(config),
        "inputs": {name: identities[name] for name in stage.inputs},
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def plan(config: RunConfig, stages: Sequence[Stage]) -> list[PlannedStage]:
    """Fingerprint every stage and tell which are current."""
    externals = external_inputs(config)
    out_dir, out_options = config.output.dir, config.output.storage_options
    identities: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    planned = []
    for stage in stages:
        for name in stage.inputs:
            if name in identities:
                continue
            if name not in externals:
                raise ParameterError(f"stage {stage.name} needs {name!r}, which no earlier stage makes")
            path, options, key = externals[name]
            if not path:
                raise ParameterError(
                    f"config {config.source}: stage {stage.name} needs {name}; set {key}"
                )
            paths[name] = path
            identities[name] = (
                [content_identity(p, options) for p in path]
                if isinstance(path, tuple)
                else content_identity(path, options)
            )
        output = join(out_dir, stage.output)
        fp = fingerprint(stage, config, identities)
        record = read_record(out_dir, stage.name, out_options)
        if record is None or not exists(output, out_options):
            state = "missing"
        else:
            state = "current" if record.get("fingerprint") == fp else "stale"
        planned.append(PlannedStage(stage, output, {n: paths[n] for n in stage.inputs}, fp, state))
        identities[stage.name] = fp
        paths[stage.name] = output
    return planned


def record_path(out_dir: str, name: str) -> str:
    """Where the record of stage ``name`` lives."""
    return join(out_dir, RECORDS, f"{name}.json")


def read_record(out_dir: str, name: str, storage_options: dict[str, Any] | None) -> dict | None:
    """The record of a finished stage, or ``None``."""
    path = record_path(out_dir, name)
    fs, root = filesystem(path, storage_options)
    if not fs.exists(root):
        return None
    try:
        with fs.open(root, "r") as file:
            return json.load(file)
    except (OSError, json.JSONDecodeError) as err:
        log.warning("stage record %s unreadable (%s); the stage will be redone", path, err)
        return None


def write_record(out_dir: str, planned: PlannedStage, seconds: float,
                 storage_options: dict[str, Any] | None) -> None:
    """Record that ``planned`` finished (after its output is in place)."""
    record = {
        "stage": planned.stage.name,
        "fingerprint": planned.fingerprint,
        "output": planned.output,
        "inputs": planned.inputs,
        "genepert_scale_version": __version__,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 3),
    }
    path = record_path(out_dir, planned.stage.name)
    with atomic_output(path, overwrite=True, storage_options=storage_options) as tmp:
        fs, root = filesystem(tmp, storage_options)
        fs.pipe_file(root, json.dumps(record, indent=2, default=str).encode())


def remove_record(out_dir: str, name: str, storage_options: dict[str, Any] | None) -> None:
    """Forget that stage ``name`` finished (before it is redone)."""
    fs, root = filesystem(record_path(out_dir, name), storage_options)
    if fs.exists(root):
        fs.rm(root)


def run_stages(
    config: RunConfig,
    stages: Sequence[Stage],
    *,
    force: bool = False,
    dry_run: bool = False,
    progress: bool = True,
) -> list[tuple[PlannedStage, str]]:
    """Run the stages that are not current, in order.

    Parameters
    ----------
    config
        The run.
    stages
        The stages to consider, in order (see :func:`select`).
    force
        Redo every stage, current or not.
    dry_run
        Only plan: report what would run.
    progress
        Progress bars in stages.

    Returns
    -------
    list of (PlannedStage, str)
        Each stage and what happened: ``skipped`` (current), ``ran``, or with
        ``dry_run`` ``would run``.

    Raises
    ------
    OutputBusyError
        If another run is writing ``[output] dir`` (a run holds its lease,
        :func:`.store.hold_output`, unless ``dry_run``).
    """
    out_dir, options = config.output.dir, config.output.storage_options
    with contextlib.nullcontext() if dry_run else hold_output(out_dir, options):
        return _run_planned(config, plan(config, stages), force=force, dry_run=dry_run,
                            progress=progress)


def _run_planned(config: RunConfig, planned_stages: Sequence[PlannedStage], *, force: bool,
                 dry_run: bool, progress: bool) -> list[tuple[PlannedStage, str]]:
    out_dir, options = config.output.dir, config.output.storage_options
    outcome = []
    for planned in planned_stages:
        name = planned.stage.name
        if planned.state == "current" and not force:
            log.info("stage %s: current (fingerprint %s), skipped", name, planned.fingerprint[:12])
            outcome.append((planned, "skipped"))
            continue
        if dry_run:
            outcome.append((planned, "would run"))
            continue
        log.info("stage %s: %s, running -> %s", name, planned.state, planned.output)
        remove_record(out_dir, name, options)
        start = time.perf_counter()
        planned.stage.run(StageRun(config, planned.inputs, planned.output, progress))
        seconds = time.perf_counter() - start
        write_record(out_dir, planned, seconds, options)
        log.info("stage %s: done in %.1f s", name, seconds)
        outcome.append((planned, "ran"))
    return outcome


def select(stages: Sequence[Stage], until: str | None) -> list[Stage]:
    """The stages up to and including ``until`` (all when ``None``)."""
    names = [s.name for s in stages]
    if until is None:
        return list(stages)
    if until not in names:
        raise ParameterError(f"unknown stage {until!r}; stages are {', '.join(names)}")
    return list(stages[: names.index(until) + 1])


def _pseudobulk_params(config: RunConfig) -> dict[str, Any]:
    """The pseudo-bulk parameters of a run (:class:`.pp.params.PseudobulkParams`)
    and its block size, by name."""
    return {"perturbation_key": config.input.perturbation_key,
            "control": config.input.control, **asdict(config.pseudobulk)}


def _pseudobulk_fingerprint(config: RunConfig) -> dict[str, Any]:
    from ..io.encodings import PSEUDOBULK

    return {**_pseudobulk_params(config), "encoding_version": PSEUDOBULK.version}


def _run_pseudobulk(run: StageRun) -> None:
    from ..pp.aggregate import pseudobulk, write_pseudobulk

    config = run.config
    memory_limit = config.cluster.memory_limit
    ds = pseudobulk(
        run.inputs["screen"], **_pseudobulk_params(config),
        storage_options=config.input.storage_options, progress=run.progress,
        memory_limit=None if memory_limit == "auto" else memory_limit, as_xarray=True,
    )
    write_pseudobulk(ds, run.output, overwrite=True, storage_options=config.output.storage_options)


def _evaluate_params(config: RunConfig) -> dict[str, Any]:
    """The parameters of the evaluate stage: ``[evaluate]`` and how embeddings are looked up."""
    emb = config.embeddings
    return {**asdict(config.evaluate), "missing": emb.missing, "gene_map": emb.gene_map}


def _fit_params(config: RunConfig) -> dict[str, Any]:
    """The parameters of the fit stage: the evaluate stage's but those that only
    score (``exclude_targets``) or split (``split``), which fit does not use."""
    params = _evaluate_params(config)
    del params["exclude_targets"], params["split"]
    return params


def _model_inputs(run: StageRun) -> tuple[Any, Any, dict[str, Any]]:
    """The pseudo-bulk Dataset, the embedding table and the options shared by
    the model stages."""
    from ..tl.embeddings import load_embeddings
    from ..pp.aggregate import one_context, open_pseudobulk

    config = run.config
    pseudobulk = open_pseudobulk(run.inputs["pseudobulk"], config.output.storage_options)
    if config.evaluate.context is not None:
        pseudobulk = one_context(pseudobulk, config.evaluate.context,
                                 f"{run.inputs['pseudobulk']} (config {config.source}, [evaluate] context)")
    table = load_embeddings(run.inputs["embeddings"], storage_options=config.embeddings.storage_options)
    options = {
        "alphas": config.evaluate.alphas, "n_folds": config.evaluate.folds,
        "seed": config.evaluate.seed, "select_by": config.evaluate.select_by,
        "missing": config.embeddings.missing,
        "gene_map": config.embeddings.gene_map, "progress": run.progress,
        "storage_options": config.embeddings.storage_options,  # for a gene_map URL
    }
    return pseudobulk, table, options


def _run_evaluate(run: StageRun) -> None:
    from ..tl.evaluate import evaluate
    from ..pl.report import write_report

    pseudobulk, table, options = _model_inputs(run)
    limit = run.config.cluster.memory_limit
    result = evaluate(pseudobulk, table, split=run.config.evaluate.split,
                      memory_limit=None if limit == "auto" else limit,
                      scratch=local_parent(run.output), exclude_targets=run.config.evaluate.exclude_targets,
                      **options)
    write_report(result, run.output, overwrite=True,
                 storage_options=run.config.output.storage_options)


def _run_fit(run: StageRun) -> None:
    from ..tl.model import fit
    from ..tl.ridge import save_model

    pseudobulk, table, options = _model_inputs(run)
    save_model(fit(pseudobulk, table, **options), run.output, overwrite=True,
               storage_options=run.config.output.storage_options)


def _run_predict(run: StageRun) -> None:
    from ..tl.embeddings import load_embeddings
    from ..tl.model import predict, write_predictions

    config = run.config
    out_options = config.output.storage_options
    table = load_embeddings(run.inputs["embeddings"], storage_options=config.embeddings.storage_options)
    predictions = predict(
        run.inputs["fit"], table, list(config.predict.perturbations),
        missing=config.embeddings.missing, gene_map=config.embeddings.gene_map,
        seed=config.evaluate.seed, storage_options=out_options,
    )
    write_predictions(predictions, run.output, overwrite=True, storage_options=out_options)


def default_until(config: RunConfig) -> str:
    """The last stage a config asks for: ``predict`` when it names
    perturbations to predict, else ``fit`` when it has embeddings, else
    ``pseudobulk``."""
    if not config.embeddings.paths:
        return "pseudobulk"
    return "predict" if config.predict.perturbations else "fit"


#: The stages of ``genepert-scale run``, in order.
STAGES: tuple[Stage, ...] = (
    Stage("pseudobulk", "pseudobulk.zarr", ("screen",), _pseudobulk_fingerprint, _run_pseudobulk),
    Stage("evaluate", "evaluate", ("pseudobulk", "embeddings"), _evaluate_params, _run_evaluate),
    Stage("fit", "model.zarr", ("pseudobulk", "embeddings"), _fit_params, _run_fit),
    Stage("predict", "predictions.zarr", ("fit", "embeddings"),
          lambda config: {"perturbations": list(config.predict.perturbations),
                          "missing": config.embeddings.missing}, _run_predict),
)
