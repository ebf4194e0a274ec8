"""Models and evaluation: gene embeddings, ridge, fit/predict, splits, metrics."""

from __future__ import annotations

import importlib

# ``evaluate`` is the name of a function and of the module holding it: the
# function is bound here, so that importing the module later cannot replace it
from .evaluate import evaluate as evaluate


_PUBLIC = {
    "fit": (".model", "fit"),
    "predict": (".model", "predict"),
    "load_embeddings": (".embeddings", "load_embeddings"),
}

__all__ = sorted({*_PUBLIC, "evaluate"})


def __getattr__(name: str):
    """The public names, imported on first use (so that ``import genepert_scale`` stays light)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    return getattr(importlib.import_module(module, __name__), attribute)


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
