"""The exceptions users see.

Every error caused by input (a file, a column, a gene, a parameter) is a
:class:`GenePertInputError`: the CLI prints its message without a traceback and
exits with :data:`INPUT_ERROR_EXIT_CODE`. Messages name the thing at fault and
say what to do next.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Exit code of the CLI for input errors (argparse uses 2 for usage errors).
INPUT_ERROR_EXIT_CODE = 3


def listing(items: Iterable[object], limit: int = 10, *, quote: bool = False) -> str:
    """The first ``limit`` items for a message, with the total when there are more."""
    shown = [repr(i) if quote else str(i) for i in items]
    text = ", ".join(shown[:limit])
    return text + (f" ... ({len(shown)} in all)" if len(shown) > limit else "")


class GenePertInputError(ValueError):
    """Bad input: a file, store, column, gene, embedding or parameter."""


class StoreError(GenePertInputError):
    """A store is missing, is not what was expected, or has a bad chunk."""


class LabelError(GenePertInputError):
    """Perturbation labels or the control label do not fit the screen."""


class EmbeddingError(GenePertInputError):
    """An embedding table cannot be read or does not cover the genes."""


class ParameterError(GenePertInputError):
    """A parameter is out of range for the data at hand."""
