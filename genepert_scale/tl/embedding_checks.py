"""Checks of gene embedding tables (``gene -> vector``), for the model code.

Readers call :func:`check_embedding_table` on what they read; fitting calls
:func:`check_coverage` on the perturbed genes; predicting calls
:func:`check_dimension` against the fitted model. Each raises
:class:`~genepert_scale.errors.EmbeddingError` naming the table and the genes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import EmbeddingError, listing

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}")


def check_embedding_table(
    genes: Sequence[str], vectors: Sequence[Sequence[float]] | np.ndarray, source: str
) -> np.ndarray:
    """Validate an embedding table and return its vectors as a float64 matrix.

    Parameters
    ----------
    genes
        Gene symbol of each row.
    vectors
        One vector per gene (a 2-D array, or a list of lists as read from a
        GenePT pickle).
    source
        The file or URL it was read from, for messages.

    Raises
    ------
    EmbeddingError
        If the table is empty, gene keys repeat, rows have different lengths,
        a row holds NaN/Inf, or a row is all zeros (it cannot be L2-normalised).
    """
    genes = pd.Index([str(g) for g in genes])
    if len(genes) == 0:
        raise EmbeddingError(f"embedding table {source} is empty")
    duplicated = genes[genes.duplicated()].unique()
    if len(duplicated):
        raise EmbeddingError(
            f"embedding table {source} has duplicate genes: {listing(duplicated)}; "
            "keep one vector per gene"
        )
    if isinstance(vectors, np.ndarray) and vectors.ndim == 2:
        matrix = vectors
    else:
        lengths = pd.Series([len(v) for v in vectors], index=genes)
        if lengths.nunique() > 1:
            common = int(lengths.mode().iloc[0])
            odd = lengths[lengths != common]
            raise EmbeddingError(
                f"embedding table {source}: rows have different lengths; most have {common}, "
                f"but {listing(f'{g} ({n})' for g, n in odd.items())}; fix or drop those genes"
            )
        matrix = np.asarray(vectors)
    if len(matrix) != len(genes):
        raise EmbeddingError(
            f"embedding table {source}: {len(genes)} genes but {len(matrix)} vectors"
        )
    try:
        matrix = matrix.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise EmbeddingError(f"embedding table {source} holds non-numeric values ({err})") from err
    nonfinite = ~np.isfinite(matrix).all(axis=1)
    if nonfinite.any():
        raise EmbeddingError(
            f"embedding table {source}: NaN or infinite values in the vectors of "
            f"{listing(genes[nonfinite])}; fix or drop those genes"
        )
    zero = ~matrix.any(axis=1)
    if zero.any():
        raise EmbeddingError(
            f"embedding table {source}: all-zero vectors (cannot be L2-normalised) for "
            f"{listing(genes[zero])}; drop those genes or fill them in"
        )
    return matrix


def check_coverage(perturbed: Sequence[str], table_genes: Sequence[str], source: str) -> None:
    """Raise if none of the perturbed genes has an embedding.

    The message says whether the symbols match only up to case, or whether one
    side uses Ensembl ids while the other uses symbols.
    """
    perturbed = [str(g) for g in perturbed]
    table = {str(g) for g in table_genes}
    if any(g in table for g in perturbed):
        return
    hint = "check that both use the same gene symbols"
    lower = {g.lower() for g in table}
    ensembl_table = sum(bool(_ENSEMBL.match(g)) for g in table) > len(table) / 2
    ensembl_screen = sum(bool(_ENSEMBL.match(g)) for g in perturbed) > len(perturbed) / 2
    if any(g.lower() in lower for g in perturbed):
        hint = "they match only when case is ignored: use the same case for symbols"
    elif ensembl_table != ensembl_screen:
        which = "the table" if ensembl_table else "the screen"
        hint = f"{which} uses Ensembl ids and the other gene symbols: map one to the other"
    raise EmbeddingError(
        f"embedding table {source} has none of the {len(perturbed)} perturbed genes "
        f"(e.g. {listing(perturbed, 5)}; table has e.g. {listing(sorted(table), 5)}); {hint}"
    )


def check_dimension(fitted: int, given: int, source: str) -> None:
    """Raise if embeddings given at predict time have another dimension than at fit time."""
    if fitted != given:
        raise EmbeddingError(
            f"embedding table {source} has dimension {given} but the model was fitted on "
            f"dimension {fitted}; predict with the same embedding source(s) as the fit"
        )
