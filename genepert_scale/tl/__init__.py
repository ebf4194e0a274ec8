"""Models and evaluation: gene embeddings, ridge, fit/predict, splits, metrics."""

from __future__ import annotations

from .._lazy import attach

# ``evaluate`` is the name of a function and of the module holding it: the
# function is bound here, so that importing the module later cannot replace it
from .evaluate import evaluate as evaluate

__getattr__, __dir__, __all__ = attach(__name__, {
    "fit": (".model", "fit"),
    "predict": (".model", "predict"),
    "load_embeddings": (".embeddings", "load_embeddings"),
}, eager=("evaluate",))
