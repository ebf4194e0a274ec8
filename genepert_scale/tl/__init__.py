"""Models and evaluation: gene embeddings, ridge, fit/predict, splits, metrics;
the cell model (:mod:`.cells`, the optional ``cells`` extra: torch and POT),
imported on first use."""

from __future__ import annotations

from .._lazy import attach

# ``evaluate`` is the name of a function and of the module holding it: the
# function is bound here, so that importing the module later cannot replace it
from .evaluate import evaluate as evaluate

__getattr__, __dir__, __all__ = attach(__name__, {
    "fit": (".model", "fit"),
    "predict": (".model", "predict"),
    "load_embeddings": (".embeddings", "load_embeddings"),
    "cells_fit": (".cells", "cells_fit"),
    "cells_predict": (".cells", "cells_predict"),
    "cells_evaluate": (".cells", "cells_evaluate"),
    "save_cells_model": (".cells", "save_cells_model"),
    "load_cells_model": (".cells", "load_cells_model"),
    "CellsConfig": (".cells", "CellsConfig"),
}, eager=("evaluate",))
