"""Checks of screens, parameters and stored encodings at the public boundary.

Each function raises a :class:`~genepert_scale.errors.GenePertInputError`
subclass whose message names the file, column, gene or parameter at fault
and says what to do. Checks that touch ``X`` run inside the streamed pass
(:func:`genepert_scale.pp.kernels.check_values`); these run on metadata, small
samples and parameters only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import dask.utils
import numpy as np
import pandas as pd

from .errors import LabelError, ParameterError, StoreError, listing
from .pp.kernels import LOG1P_MAX, SQUARE_BITS, SUM_BITS

log = logging.getLogger(__name__)

#: HVGs kept when ``n_top_genes`` is not given.
DEFAULT_N_TOP_GENES = 5000

NTopGenes = int | None | Literal["all", "default"]


def check_unique_names(
    names: np.ndarray | pd.Index, element: Literal["obs", "var"], source: str
) -> None:
    """Raise if ``obs`` or ``var`` names repeat.

    Sorts a copy and compares neighbours: for numpy's string arrays this runs
    without the GIL (the compiled fold keeps loading in its background thread)
    and takes half the time of hashing a million Python strings.
    """
    values = np.asarray(names)
    ordered = np.sort(values.astype(str) if values.dtype == object else values)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size:
        duplicated = [str(name) for name in pd.unique(repeated)]
        what = "cell" if element == "obs" else "gene"
        raise LabelError(
            f"{source}: {element} has duplicate {what} names: {listing(duplicated, quote=True)}; "
            f"make them unique (anndata: adata.{element}_names_make_unique()) and write the store again"
        )


def check_case_collisions(var_names: pd.Index, source: str) -> None:
    """Raise if gene symbols differ only by case (``Sox2`` and ``SOX2``).

    Embeddings are matched to genes by symbol; such pairs cannot be told apart
    by a case-insensitive match and usually mean two naming schemes were mixed.
    """
    lower = pd.Series(var_names.str.lower(), index=var_names)
    clashes = lower[lower.duplicated(keep=False)]
    if len(clashes):
        pairs = clashes.groupby(clashes.to_numpy()).apply(lambda s: "/".join(s.index))
        raise LabelError(
            f"{source}: var has gene symbols that differ only by case: {listing(pairs, quote=True)}; "
            "rename or drop one of each (mixed naming schemes?)"
        )


def check_x_dtype(dtype: np.dtype, source: str) -> None:
    """Raise unless ``X`` holds real numbers (integers or floats)."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iuf":
        raise StoreError(
            f"{source}: X has dtype {dtype}, expected integer or floating-point "
            "expression values; write X as float32 counts or log1p data"
        )


def check_declared_input(
    declared: Literal["counts", "log1p"], sample: np.ndarray, source: str
) -> None:
    """Raise if a sample of stored ``X`` values contradicts the declared input kind.

    Parameters
    ----------
    declared
        What the user declared with ``--input``.
    sample
        Finite stored values of the first cells.
    source
        The screen, for messages.
    """
    if sample.size == 0:
        return
    integral = bool(np.all(sample == np.round(sample)))
    if declared == "log1p" and integral:
        raise ParameterError(
            f"{source}: --input log1p was given but the {sample.size} values sampled from the "
            f"first cells are all integers (max {sample.max():.6g}): X looks like raw counts. "
            "Pass --input counts (or --input auto)"
        )
    if declared == "counts" and not integral:
        example = sample[sample != np.round(sample)][0]
        hint = "looks like log1p data, pass --input log1p" if sample.max() <= LOG1P_MAX else (
            "neither counts nor log1p data; give raw counts"
        )
        raise ParameterError(
            f"{source}: --input counts was given but X holds non-integer values "
            f"(e.g. {example:.6g} in the first cells): {hint}"
        )
    if declared == "log1p" and sample.max() > LOG1P_MAX:
        raise ParameterError(
            f"{source}: --input log1p was given but X holds values up to {sample.max():.6g}, "
            f"too large for log1p-normalised data (at most {LOG1P_MAX:g}); pass --input counts "
            "for raw counts, or log-normalise X first"
        )


def resolve_n_top_genes(n_top_genes: NTopGenes, n_genes: int, source: str) -> int | None:
    """The number of HVGs to keep, or ``None`` for all genes.

    ``"default"`` means :data:`DEFAULT_N_TOP_GENES`, capped at the genes there
    are with a warning (data already reduced to HVGs must work). An explicit
    number larger than the genes is an error.
    """
    if n_top_genes is None or n_top_genes == "all":
        return None
    if n_top_genes == "default":
        if n_genes <= DEFAULT_N_TOP_GENES:
            log.warning(
                "%s has %d genes, not more than the default %d HVGs: keeping all genes",
                source, n_genes, DEFAULT_N_TOP_GENES,
            )
            return None
        return DEFAULT_N_TOP_GENES
    if not isinstance(n_top_genes, (int, np.integer)) or n_top_genes < 1:
        raise ParameterError(f"--n-top-genes must be a positive integer or 'all', got {n_top_genes!r}")
    if n_top_genes > n_genes:
        raise ParameterError(
            f"--n-top-genes {n_top_genes} is larger than the {n_genes} genes of {source}; "
            "pass a smaller number, or --n-top-genes all to keep every gene"
        )
    return int(n_top_genes)


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ParameterError(
            f"{name} {value!r} is not one of {', '.join(map(str, choices))}"
        )


def check_positive(name: str, value: float, *, integer: bool = False) -> None:
    """Raise unless ``value`` is a positive number (an integer if asked)."""
    ok = value > 0 and (not integer or float(value).is_integer())
    if not ok or not np.isfinite(value):
        kind = "a positive integer" if integer else "a positive number"
        raise ParameterError(f"{name} must be {kind}, got {value!r}")


def memory_bytes(value: int | str | None, name: str = "--memory-limit") -> int | None:
    """A memory size in bytes from a number or a string such as ``"2GiB"``
    (``None`` and ``"auto"``: no limit given)."""
    if value is None or value == "auto":
        return None
    try:
        size = dask.utils.parse_bytes(value) if isinstance(value, str) else int(value)
    except ValueError as err:
        raise ParameterError(f"{name} {value!r} is not a size; use e.g. 2GiB or 500MB") from err
    check_positive(name, size, integer=True)
    return size


def check_min_cells(group_sizes: Mapping[str, int], min_cells: int, source: str) -> None:
    """Raise if no perturbation has at least ``min_cells`` cells."""
    if group_sizes and max(group_sizes.values()) < min_cells:
        largest = sorted(group_sizes.items(), key=lambda kv: -kv[1])
        raise ParameterError(
            f"{source}: no perturbation has at least --min-cells {min_cells} cells "
            f"(largest: {listing((f'{k} ({v})' for k, v in largest), 5)}); lower --min-cells"
        )


def check_folds(folds: int, n_perturbations: int, source: str) -> None:
    """Raise unless ``2 <= folds <= n_perturbations``."""
    check_positive("--folds", folds, integer=True)
    if folds < 2 or folds > n_perturbations:
        raise ParameterError(
            f"--folds {folds} does not fit the {n_perturbations} perturbations of {source}: "
            f"use between 2 and {n_perturbations} folds"
        )


def check_alphas(alphas: float | Sequence[float], name: str = "--alpha") -> np.ndarray:
    """The ridge penalties as a float array; raise unless all are positive and
    finite (``name`` says where they were given)."""
    values = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    bad = values[~(np.isfinite(values) & (values > 0))]
    if values.size == 0 or bad.size:
        raise ParameterError(
            f"{name} must be positive and finite (ridge needs a penalty > 0), got "
            f"{listing(bad.tolist(), quote=True) or 'no value'}"
        )
    return values


def check_same_genes(expected: Sequence[str], found: Sequence[str], *, source: str, what: str) -> None:
    """Raise unless ``found`` lists the same genes in the same order as ``expected``.

    Parameters
    ----------
    expected
        Genes the model or pseudo-bulk was built on.
    found
        Genes of the store or table now given.
    source, what
        Names for the message, e.g. the store path and ``"the model"``.
    """
    expected, found = list(expected), list(found)
    if expected == found:
        return
    missing = [g for g in expected if g not in set(found)]
    extra = [g for g in found if g not in set(expected)]
    detail = (
        f"missing {listing(missing, quote=True)}; unexpected {listing(extra, quote=True)}"
        if missing or extra
        else "same genes in another order"
    )
    raise StoreError(
        f"{source}: its {len(found)} genes differ from the {len(expected)} genes of {what} "
        f"({detail}); use outputs of the same pseudo-bulk run"
    )



def check_exact_sum_range(n_obs: int, max_value: float, source: str) -> None:
    """Raise if fixed-point group sums over ``n_obs`` cells could overflow int64.

    Parameters
    ----------
    n_obs
        Cells of the screen (a bound on the cells of any group).
    max_value
        Largest possible ``log1p`` value: ``log1p(target_sum)`` for counts,
        :data:`~.kernels.LOG1P_MAX` for log1p input.
    source
        The screen, for messages.
    """
    limit = 2.0**63
    worst = max(n_obs * max_value * 2.0**SUM_BITS, n_obs * max_value**2 * 2.0**SQUARE_BITS)
    if worst >= limit:
        cells = int(limit / max(max_value * 2.0**SUM_BITS, max_value**2 * 2.0**SQUARE_BITS))
        raise ParameterError(
            f"{source} has {n_obs} cells; exact pseudo-bulk sums hold at most {cells} cells "
            f"with log1p values up to {max_value:.3g}: split the screen by perturbation, "
            "or lower --target-sum"
        )
