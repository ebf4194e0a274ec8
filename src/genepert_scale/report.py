"""The evaluation report: a directory with ``metrics.json``,
``per_perturbation.csv``, ``predictions.zarr``, ``folds.csv`` and PNG plots.

Plots are drawn with matplotlib's object API (``Figure``, no pyplot), so no
display or global backend is involved. The directory is written atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from . import __version__
from .evaluate import RIDGE, Evaluation
from .store import atomic_output, local_directory, quiet_zarr_warnings, zarr_store

log = logging.getLogger(__name__)

FILES = (
    "metrics.json", "per_perturbation.csv", "predictions.zarr", "folds.csv",
    "pearson_per_model.png", "best_worst_perturbations.png", "alpha_path.png",
)


def metrics_document(evaluation: Evaluation) -> dict[str, Any]:
    """The content of ``metrics.json``: parameters, missing genes, and per
    model the metric summaries; the ridge also gets every fold's alpha and
    its alpha path (train and validation MSE, inner-CV MSE per alpha)."""
    models = {model: dict(metrics) for model, metrics in evaluation.summary.items()}
    models[RIDGE]["folds"] = [
        {
            "fold": fit.fold,
            "alpha": fit.alpha,
            "solver": fit.solver,
            "alpha_path": [
                {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
                for row in fit.path.to_dict(orient="records")
            ],
        }
        for fit in evaluation.fold_fits
    ]
    return {
        "genepert_scale_version": __version__,
        "parameters": evaluation.parameters,
        "missing": evaluation.missing,
        "models": models,
    }


def write_report(
    evaluation: Evaluation,
    out: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write every report file into the directory ``out`` (a path or URL)."""
    with (
        atomic_output(out, overwrite=overwrite, storage_options=storage_options) as tmp,
        local_directory(tmp, storage_options) as local,
    ):
        root = Path(local)
        (root / "metrics.json").write_text(json.dumps(metrics_document(evaluation), indent=2))
        evaluation.per_perturbation.to_csv(root / "per_perturbation.csv", index=False)
        evaluation.folds.to_csv(root / "folds.csv", index=False)
        with quiet_zarr_warnings():
            evaluation.predictions.to_zarr(
                zarr_store(str(root / "predictions.zarr"), mode="w"), mode="w", consolidated=True
            )
        plot_pearson(evaluation).savefig(root / "pearson_per_model.png", dpi=100)
        plot_best_worst(evaluation).savefig(root / "best_worst_perturbations.png", dpi=100)
        plot_alpha_path(evaluation).savefig(root / "alpha_path.png", dpi=100)
    log.info("wrote report %s", out)
    return out


def plot_pearson(evaluation: Evaluation) -> Figure:
    """Box plot of the per-perturbation Pearson delta of every model."""
    table = evaluation.per_perturbation
    models = [m for m in evaluation.models if table.loc[table.model == m, "pearson_delta"].notna().any()]
    values = [table.loc[table.model == m, "pearson_delta"].dropna().to_numpy() for m in models]
    fig = Figure(figsize=(1.2 * len(models) + 2, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.boxplot(values, tick_labels=models)
    ax.set_ylabel("Pearson of delta (held-out perturbations)")
    ax.tick_params(axis="x", rotation=30)
    return fig


def plot_best_worst(evaluation: Evaluation) -> Figure:
    """Predicted vs true delta of the ridge's best and worst perturbation."""
    ridge = evaluation.per_perturbation.query("model == @RIDGE").dropna(subset=["pearson_delta"])
    ranked = ridge.sort_values("pearson_delta")
    picks = {"best": ranked.iloc[-1], "worst": ranked.iloc[0]} if len(ranked) else {}
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    for ax, (which, row) in zip(fig.subplots(1, 2), picks.items()):
        true = evaluation.predictions["delta"].sel(perturbation=row.perturbation).values
        pred = evaluation.predictions["prediction"].sel(model=RIDGE, perturbation=row.perturbation).values
        ax.scatter(true, pred, s=6, alpha=0.6)
        lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set_title(f"{which}: {row.perturbation} (r = {row.pearson_delta:.2f})")
        ax.set_xlabel("true delta")
        ax.set_ylabel("predicted delta")
    return fig


def plot_alpha_path(evaluation: Evaluation) -> Figure:
    """Train and validation MSE of the ridge against alpha, per fold."""
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.add_subplot()
    for fit in evaluation.fold_fits:
        line = ax.plot(fit.path["alpha"], fit.path["val_mse"], marker="o", label=f"fold {fit.fold} validation")
        ax.plot(fit.path["alpha"], fit.path["train_mse"], ls="--", color=line[0].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("alpha")
    ax.set_ylabel("MSE of delta (dashed: training)")
    ax.legend(fontsize="small")
    return fig
