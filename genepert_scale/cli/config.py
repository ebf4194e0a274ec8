"""The configuration file of a batch run (``genepert-scale run CONFIG.toml``).

A TOML file with one table per concern — ``[input]``, ``[pseudobulk]``,
``[embeddings]``, ``[evaluate]``, ``[predict]``, ``[output]``, ``[cluster]`` —
read once and validated whole at the boundary: an unknown key (a typo), a value
of the wrong type or outside its choices is a
:class:`~genepert_scale.errors.ParameterError` naming the file, the table and
the key. Relative local paths are taken relative to the config file, so a
config and its data can move together. The README documents every key.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ParameterError
from ..tl.data_embedding import PCA_PREFIX
from ..pp.params import N_TOP_WORDS, PseudobulkParams
from ..io.store import is_url
from ..tl.ridge import DEFAULT_ALPHAS, DEFAULT_SELECT_BY, SELECT_BY
from ..validate import check_alphas

#: The splits of ``[evaluate] split`` (``custom`` needs a split file: the command line's).
CONFIG_SPLITS = ("kfold", "simulation", "context")
#: The pseudo-bulk parameters given in ``[input]``, beside the screen.
INPUT_PARAMETERS = ("perturbation_key", "control")


def _key(default: Any, types: type | tuple[type, ...], choices: tuple = ()) -> Any:
    """A config key: its default, the TOML value types it takes, its choices."""
    return field(default=default, metadata={"types": types, "choices": choices})


@dataclass(frozen=True)
class InputConfig:
    """``[input]``: the screen."""

    url: str = _key("", str)
    storage_options: dict | None = _key(None, dict)
    perturbation_key: str = _key(PseudobulkParams.perturbation_key, str)
    control: str = _key(PseudobulkParams.control, str)


#: ``[pseudobulk]``: the pseudo-bulk parameters (:class:`.pp.params.PseudobulkParams`,
#: their defaults and choices; the labels' column and control are in
#: ``[input]``) and the block size of the pass.
PseudobulkConfig = make_dataclass(
    "PseudobulkConfig",
    [(spec.name, spec.type, _key(spec.default, spec.metadata["types"], spec.metadata["choices"]))
     for spec in fields(PseudobulkParams) if spec.name not in INPUT_PARAMETERS]
    + [("block_rows", "int | None", _key(None, int))],
    frozen=True,
)


@dataclass(frozen=True)
class EmbeddingsConfig:
    """``[embeddings]``: gene embedding tables (needed from ``evaluate`` on)."""

    paths: tuple[str, ...] = _key((), list)
    storage_options: dict | None = _key(None, dict)
    missing: str = _key("drop", str, ("drop", "random", "zero", "error"))
    gene_map: str | None = _key(None, str)


@dataclass(frozen=True)
class EvaluateConfig:
    """``[evaluate]``: cross-validation, the ridge penalty grid, what alpha
    is chosen by (``select_by``: ``pearson_delta`` or ``mse``), whether a
    perturbation's own target genes are left out of its metrics
    (``exclude_targets``, the evaluation stage only); for a pseudo-bulk with
    contexts, the one ``context`` that evaluate and fit model, or the
    ``split`` (``context``: each held out in turn)."""

    folds: int = _key(5, int)
    seed: int = _key(0, int)
    alphas: tuple[float, ...] = _key(DEFAULT_ALPHAS, list)
    select_by: str = _key(DEFAULT_SELECT_BY, str, SELECT_BY)
    exclude_targets: bool = _key(False, bool)
    split: str = _key("kfold", str, CONFIG_SPLITS)
    context: str | None = _key(None, str)


@dataclass(frozen=True)
class PredictConfig:
    """``[predict]``: perturbations (``GENE`` or ``GENE1+GENE2``) to predict."""

    perturbations: tuple[str, ...] = _key((), list)


@dataclass(frozen=True)
class OutputConfig:
    """``[output]``: where every stage writes (a directory path or URL)."""

    dir: str = _key("", str)
    storage_options: dict | None = _key(None, dict)


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: where the work runs.

    ``kind`` is ``threads`` (this process), ``local`` (a LocalCluster of
    ``workers`` processes), ``scheduler`` (a running scheduler at ``address``
    or ``DASK_SCHEDULER_ADDRESS``) or ``slurm`` (``workers`` SLURM jobs of a
    dask-jobqueue ``SLURMCluster`` made with the ``[cluster.slurm]`` table).
    """

    kind: str = _key("threads", str, ("threads", "local", "scheduler", "slurm"))
    address: str | None = _key(None, str)
    workers: int | None = _key(None, int)
    threads_per_worker: int | None = _key(None, int)
    memory_limit: str = _key("auto", str)
    slurm: dict | None = _key(None, dict)

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`genepert_scale.cluster.dask_client`.

        Raises
        ------
        ParameterError
            For ``kind = "scheduler"`` without an address (the key or
            ``DASK_SCHEDULER_ADDRESS``): it would silently run on local threads.
        """
        if self.kind == "scheduler" and not (self.address or os.environ.get("DASK_SCHEDULER_ADDRESS")):
            raise ParameterError(
                '[cluster] kind = "scheduler" needs address = "tcp://host:8786" '
                "or the DASK_SCHEDULER_ADDRESS environment variable"
            )
        return {
            "scheduler": self.address if self.kind == "scheduler" else None,
            "workers": self.workers if self.kind in ("local", "slurm") else None,
            "threads_per_worker": self.threads_per_worker,
            "memory_limit": self.memory_limit,
            "slurm": (self.slurm or {}) if self.kind == "slurm" else None,
        }


@dataclass(frozen=True)
class RunConfig:
    """A whole batch run, as read from a config file."""

    source: str
    input: InputConfig
    pseudobulk: PseudobulkConfig
    embeddings: EmbeddingsConfig
    evaluate: EvaluateConfig
    predict: PredictConfig
    output: OutputConfig
    cluster: ClusterConfig


SECTIONS: dict[str, type] = {
    "input": InputConfig,
    "pseudobulk": PseudobulkConfig,
    "embeddings": EmbeddingsConfig,
    "evaluate": EvaluateConfig,
    "predict": PredictConfig,
    "output": OutputConfig,
    "cluster": ClusterConfig,
}


def load_config(path: str, *, storage_options: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a run config.

    Parameters
    ----------
    path
        The TOML file (local).
    storage_options
        fsspec options for ``[input]``, ``[embeddings]`` and ``[output]`` where
        the file gives none (the ``--storage-options`` of the command line).

    Raises
    ------
    ParameterError
        If the file cannot be read, or a key is unknown, of the wrong type or
        outside its choices, or a required key is missing.
    """
    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except OSError as err:
        raise ParameterError(f"cannot read config {path}: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ParameterError(f"config {path} is not valid TOML: {err}") from err
    unknown = sorted(set(table) - set(SECTIONS))
    if unknown:
        raise ParameterError(
            f"config {path}: unknown table(s) {', '.join(unknown)}; "
            f"tables are {', '.join(SECTIONS)}"
        )
    sections = {name: _section(path, name, cls, table.get(name, {})) for name, cls in SECTIONS.items()}
    config = RunConfig(source=str(path), **sections)
    _check(config)
    return _resolve(config, Path(path).resolve().parent, storage_options or {})


def _section(path: str, name: str, cls: type, table: Any) -> Any:
    """Validate one table against the keys of ``cls``."""
    if not isinstance(table, dict):
        raise ParameterError(f"config {path}: [{name}] must be a table")
    keys = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise ParameterError(
            f"config {path}: unknown key(s) {', '.join(unknown)} in [{name}]; "
            f"keys there are {', '.join(keys)}"
        )
    for key, value in table.items():
        types, choices = keys[key].metadata["types"], keys[key].metadata["choices"]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
            raise ParameterError(
                f"config {path}: [{name}] {key} = {value!r} must be of type "
                f"{' or '.join(t.__name__ for t in _tuple(types))}"
            )
        if choices and value not in choices:
            raise ParameterError(
                f"config {path}: [{name}] {key} = {value!r} must be one of {', '.join(choices)}"
            )
    return cls(**table)


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _check(config: RunConfig) -> None:
    """Checks across keys and of value ranges."""
    where = f"config {config.source}"
    if not config.input.url:
        raise ParameterError(f"{where}: [input] url is required (path or URL of the screen)")
    if not config.output.dir:
        raise ParameterError(f"{where}: [output] dir is required (directory or URL for outputs)")
    n_top = config.pseudobulk.n_top_genes
    if isinstance(n_top, str) and n_top not in N_TOP_WORDS or isinstance(n_top, int) and n_top < 1:
        raise ParameterError(
            f"{where}: [pseudobulk] n_top_genes must be a positive integer, \"all\" or \"default\""
        )
    if config.evaluate.folds < 2:
        raise ParameterError(f"{where}: [evaluate] folds must be at least 2")
    if config.evaluate.context is not None and config.evaluate.split == "context":
        raise ParameterError(f"{where}: [evaluate] split = \"context\" holds each context out in turn; "
                             "it takes no context key")
    alphas = config.evaluate.alphas
    if not all(isinstance(a, int | float) for a in alphas):
        raise ParameterError(f"{where}: [evaluate] alphas must be numbers, e.g. [0.1, 1, 10]")
    check_alphas(alphas, name=f"{where}: [evaluate] alphas")
    derived = [p for p in config.embeddings.paths if p.startswith(PCA_PREFIX)]
    if derived:
        raise ParameterError(
            f"{where}: [embeddings] paths {derived}: data-derived embeddings ({PCA_PREFIX}K) are "
            "built per fold by 'genepert-scale evaluate --embeddings pca:K'; a batch run needs "
            "embedding files (its fit and predict stages need vectors for unseen genes)"
        )
    cluster = config.cluster
    if cluster.kind in ("local", "slurm") and not cluster.workers:
        raise ParameterError(
            f"{where}: [cluster] kind = {cluster.kind!r} needs workers = N "
            "(worker processes, or SLURM jobs)"
        )


def _resolve(config: RunConfig, base: Path, storage_options: dict[str, Any]) -> RunConfig:
    """Make relative local paths absolute and fill in default storage options."""

    def where(path: str) -> str:
        return path if is_url(path) or Path(path).is_absolute() else str(base / path)

    def options(own: dict | None) -> dict:
        return dict(storage_options if own is None else own)

    emb = config.embeddings
    return RunConfig(
        source=config.source,
        input=replace(config.input, url=where(config.input.url),
                       storage_options=options(config.input.storage_options)),
        pseudobulk=config.pseudobulk,
        embeddings=replace(emb, paths=tuple(where(p) for p in emb.paths),
                            gene_map=emb.gene_map and where(emb.gene_map),
                            storage_options=options(emb.storage_options)),
        evaluate=replace(config.evaluate, alphas=tuple(float(a) for a in config.evaluate.alphas)),
        predict=replace(config.predict, perturbations=tuple(config.predict.perturbations)),
        output=replace(config.output, dir=where(config.output.dir),
                        storage_options=options(config.output.storage_options)),
        cluster=config.cluster,
    )
