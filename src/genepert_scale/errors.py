"""The exceptions users see.

Every error caused by input (a file, a column, a gene, a parameter) is a
:class:`GenePertInputError`: the CLI prints its message without a traceback and
exits with :data:`INPUT_ERROR_EXIT_CODE`. Messages name the thing at fault and
say what to do next.
"""

from __future__ import annotations

#: Exit code of the CLI for input errors (argparse uses 2 for usage errors).
INPUT_ERROR_EXIT_CODE = 3


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
