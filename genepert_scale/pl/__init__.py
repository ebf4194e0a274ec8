"""Reports, figures and comparisons of evaluations."""

from __future__ import annotations

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "pearson": (".report", "plot_pearson"),
    "best_worst": (".report", "plot_best_worst"),
    "alpha_path": (".report", "plot_alpha_path"),
    "novelty": (".report", "plot_novelty"),
    "write_report": (".report", "write_report"),
    "compare_runs": (".compare", "compare_runs"),
})
