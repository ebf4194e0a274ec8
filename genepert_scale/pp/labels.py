"""Perturbation labels: GEARS style (``A+ctrl``, ``A+B``, ``ctrl``) and plain
style (``A``, ``A+B``, ``non-targeting``), mapped to canonical names.

A canonical name lists the perturbed genes joined by ``+`` in the order given,
with control tokens removed: ``ctrl+KLF1`` and ``KLF1+ctrl`` are both ``KLF1``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from ..errors import LabelError, listing

#: The control's name in a GEARS ``condition`` column.
GEARS_CONTROL = "ctrl"
#: Tokens that mean "no gene" inside a GEARS-style label.
CONTROL_TOKENS = frozenset({"ctrl", "control", "non-targeting", "nontargeting"})


def parse_label(label: str, control: str) -> tuple[str, ...]:
    """Genes perturbed by ``label``; the empty tuple for a control cell.

    Raises
    ------
    LabelError
        If the label is empty or has an empty part (``"A+"``).
    """
    text = str(label).strip()
    if text == control:
        return ()
    parts = [part.strip() for part in text.split("+")]
    if not text or any(not part for part in parts):
        raise LabelError(
            f"cannot parse perturbation label {label!r}: expected 'GENE', "
            "'GENE+GENE', 'GENE+ctrl' or the control label "
            f"{control!r}; fix or drop these cells"
        )
    genes = tuple(p for p in parts if p != control and p.lower() not in CONTROL_TOKENS)
    return genes


def canonical(genes: tuple[str, ...]) -> str:
    """The canonical name of a perturbation from its genes."""
    return "+".join(genes)


def gears_condition(label: str, control: str = GEARS_CONTROL) -> str:
    """GEARS' condition of a perturbation: ``A+ctrl`` for a single, ``A+B``
    for a pair, ``ctrl`` for the control (``control``) or a label naming no gene."""
    genes = parse_label(label, control)
    if not genes:
        return GEARS_CONTROL
    return f"{genes[0]}+{GEARS_CONTROL}" if len(genes) == 1 else "+".join(genes)


def assign_groups(
    labels: pd.Categorical | Iterable[str],
    control: str,
    *,
    column: str = "perturbation",
) -> tuple[np.ndarray, list[str]]:
    """Map each cell's label to a group code.

    Parameters
    ----------
    labels
        One label per cell; missing labels (NaN) give code ``-1``.
    control
        The label of control cells.
    column
        Name of the obs column, for error messages.

    Returns
    -------
    codes
        ``int32`` group per cell: ``0`` is the control, ``-1`` no group.
    groups
        Group names: ``groups[0]`` is the control label, then the canonical
        perturbation names, sorted.
    """
    cat = pd.Categorical(labels)
    counts = pd.Series(cat).value_counts()  # per category: no string per cell
    counts.index = counts.index.astype(str)
    if counts.get(control, 0) == 0:
        frequent = listing(f"{k!r} ({v})" for k, v in counts.items())
        raise LabelError(
            f"control label {control!r} matches no cell in obs[{column!r}]; "
            f"most frequent labels: {frequent}. Pass the right one with --control"
        )
    names = [_canonical_or_control(label, control, column, counts) for label in map(str, cat.categories)]
    groups = [control, *sorted(set(names) - {control})]
    index = {name: i for i, name in enumerate(groups)}
    category_code = np.array([index[name] for name in names], dtype=np.int32)
    raw = np.asarray(cat.codes)
    codes = np.where(raw >= 0, category_code[np.maximum(raw, 0)], -1).astype(np.int32)
    return codes, groups


def _canonical_or_control(label: str, control: str, column: str, counts: pd.Series) -> str:
    try:
        return canonical(parse_label(label, control)) or control
    except LabelError as err:
        raise LabelError(f"obs[{column!r}], {counts.get(label, 0)} cells: {err}") from err
