"""The parameters of a pseudo-bulk run, written once.

:class:`PseudobulkParams` is the one source of every parameter's name,
default, accepted types, choices and help: the Python signature of
:func:`.aggregate.pseudobulk` carries the same defaults (a test holds them
together), the command line's options (:func:`.cli.commands.add_pseudobulk_options`)
and the TOML keys of a batch run (:data:`.cli.config.PseudobulkConfig`) are
made from it, and a run records it in the output's attrs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .hvg import FLAVORS, Flavor

InputKindOption = Literal["auto", "counts", "log1p"]
INPUT_KINDS: tuple[str, ...] = ("auto", "counts", "log1p")

#: The HVG counts that are words: every gene, or the default number.
N_TOP_WORDS = ("all", "default")


def param(default: Any, help: str, types: type | tuple[type, ...], choices: tuple = ()) -> Any:
    """A parameter: its default, its help, the (TOML) value types it takes, its choices."""
    return field(default=default, metadata={"help": help, "types": types, "choices": choices})


@dataclass(frozen=True)
class PseudobulkParams:
    """Parameters of a pseudo-bulk run (see :func:`.aggregate.pseudobulk`)."""

    perturbation_key: str = param("perturbation", "obs column of the perturbation labels", str)
    control: str = param("non-targeting", "label of the control cells", str)
    n_top_genes: int | str | None = param(
        "default", "highly-variable genes to keep: a number, 'all', or 'default' "
        "(5000, or every gene when there are fewer)", (int, str))
    flavor: Flavor = param("seurat", "scanpy HVG flavor (seurat_v3: raw counts, a second pass)",
                           str, FLAVORS)
    target_sum: float = param(1e4, "counts per cell after normalization", (int, float))
    input: InputKindOption = param("auto", "raw counts, log1p-normalised data, or detect",
                                   str, INPUT_KINDS)
    min_cells: int = param(1, "drop perturbations with fewer cells", int)
    group_variance: bool = param(
        True, "also keep per-perturbation variances (the t-test DE genes of the metrics)", bool)
    obs_filter: str | None = param(
        None, "count only the cells where this boolean obs column is True (~COLUMN: False)", str)
    layer: str | None = param(None, "read this layer instead of X (e.g. counts)", str)
    context_key: str | None = param(
        None, "obs column of the cells' context (cell line): each perturbation is compared "
        "with the controls of its own context", str)
    batch_key: str | None = param(
        None, "obs column of the cells' batch (GEM group, lane): controls matched by batch", str)
    knockdown: bool = param(
        True, "measure each perturbation's knockdown of its target gene(s), where measured", bool)
    min_knockdown: float | None = param(
        None, "drop perturbations whose knockdown is below this (0-1; NaN ones are kept)",
        (int, float))
    target_key: str | None = param(
        None, "obs column of each cell's target gene(s) (A or A+B) for the knockdown, "
        "where the perturbation labels are guide names", str)


#: The names of the parameters, in order.
PARAMETERS = tuple(f.name for f in fields(PseudobulkParams))


def recorded_run(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What a pseudo-bulk's attrs say of the run that made it, for the steps
    downstream (``fit``, ``evaluate``, ``export-cell-eval``) to carry along.

    Parameters
    ----------
    attrs
        The attrs of a pseudo-bulk Dataset or store (``parameters`` as JSON,
        ``input_kind``, ``control``, ``source``; ``context`` for one context
        of a store with contexts).

    Returns
    -------
    dict
        ``perturbation_key`` and ``control`` (the screen's label column and
        control label), ``input_kind``, ``context``, ``source`` and every
        :class:`PseudobulkParams` field under ``parameters``; a value the
        attrs lack is ``None`` (``perturbation_key``: ``"perturbation"``).
    """
    text = attrs.get("parameters")
    parameters = json.loads(text) if isinstance(text, str) else dict(text or {})
    control = attrs.get("control", parameters.get("control"))
    return {
        "perturbation_key": str(parameters.get("perturbation_key") or "perturbation"),
        "control": None if control is None else str(control),
        "input_kind": attrs.get("input_kind"),
        "context": attrs.get("context"),
        "source": attrs.get("source"),
        "parameters": parameters,
    }
