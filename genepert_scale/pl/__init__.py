"""Reports, figures and comparisons of evaluations."""

from __future__ import annotations

import importlib


_PUBLIC = {
    "pearson": (".report", "plot_pearson"),
    "best_worst": (".report", "plot_best_worst"),
    "alpha_path": (".report", "plot_alpha_path"),
    "novelty": (".report", "plot_novelty"),
    "write_report": (".report", "write_report"),
    "compare_runs": (".compare", "compare_runs"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    """The public names, imported on first use (so that ``import genepert_scale`` stays light)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    return getattr(importlib.import_module(module, __name__), attribute)


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
