"""Models and evaluation: gene embeddings, ridge, fit/predict, splits, metrics;
the cell model (:mod:`.cells`, the optional ``cells`` extra) on first use."""

from __future__ import annotations

from typing import Any

#: Names of the cell model, imported from :mod:`.cells` when first asked for
#: (it needs torch and POT; nothing else here does).
_CELLS = frozenset({"cells_fit", "cells_predict", "cells_evaluate", "CellsConfig"})


def __getattr__(name: str) -> Any:
    if name in _CELLS:
        from . import cells

        return getattr(cells, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
