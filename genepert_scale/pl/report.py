"""The evaluation report: a directory with ``metrics.json``,
``per_perturbation.csv``, ``predictions.zarr``, ``folds.csv`` (the split),
PNG plots and ``report.html`` (:mod:`.report_html`, the plots inline).

Plots are drawn with matplotlib's object API (``Figure``, no pyplot), so no
display or global backend is involved. The directory is written atomically.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .. import __version__
from ..tl.evaluate import RIDGE, Evaluation, novelty_table
from .report_html import render_html
from ..io.encodings import PREDICTIONS
from ..io.store import atomic_output, local_directory, write_dataset

log = logging.getLogger(__name__)

FILES = (
    "metrics.json", "per_perturbation.csv", "predictions.zarr", "folds.csv",
    "pearson_per_model.png", "best_worst_perturbations.png", "alpha_path.png", "novelty.png",
    "report.html",
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
        "subgroups": evaluation.subgroups,
        "novelty": [
            {k: _json_value(v) for k, v in row.items()}
            for row in novelty_table(evaluation.per_perturbation).to_dict(orient="records")
        ],
    }


def _json_value(value: Any) -> Any:
    """Numbers as JSON numbers; NaN as null."""
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    return int(value) if isinstance(value, np.integer) else value


def write_report(
    evaluation: Evaluation,
    out: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write every report file into the directory ``out`` (a path or URL)."""
    document = metrics_document(evaluation)
    images = {name: png_bytes(plot(evaluation)) for name, plot in PLOTS.items()}
    with (
        atomic_output(out, overwrite=overwrite, storage_options=storage_options) as tmp,
        local_directory(tmp, storage_options) as local,
    ):
        root = Path(local)
        (root / "metrics.json").write_text(json.dumps(document, indent=2))
        evaluation.per_perturbation.to_csv(root / "per_perturbation.csv", index=False)
        evaluation.folds.to_csv(root / "folds.csv", index=False)
        write_dataset(evaluation.predictions.assign_attrs(PREDICTIONS.attrs()),
                      str(root / "predictions.zarr"))
        for name, data in images.items():
            (root / name).write_bytes(data)
        (root / "report.html").write_text(render_html(document, images), encoding="utf-8")
    log.info("wrote report %s", out)
    return out


def png_bytes(figure: Figure) -> bytes:
    """A figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


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
    """Predicted vs true delta of the ridge's best, median and worst perturbation."""
    ridge = evaluation.per_perturbation.query("model == @RIDGE").dropna(subset=["pearson_delta"])
    ranked = ridge.sort_values("pearson_delta")
    picks = ({"best": ranked.iloc[-1], "median": ranked.iloc[len(ranked) // 2], "worst": ranked.iloc[0]}
             if len(ranked) else {})
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    for ax, (which, row) in zip(fig.subplots(1, 3), picks.items()):
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


def plot_novelty(evaluation: Evaluation) -> Figure:
    """Pearson of delta against novelty (cosine distance to the nearest
    training perturbation): the ridge's perturbations, and every model's
    mean per novelty quartile."""
    table = evaluation.per_perturbation
    ridge = table[table.model == RIDGE]
    bins = novelty_table(table)
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(ridge["novelty"], ridge["pearson_delta"], s=8, alpha=0.4, color="grey", label=f"{RIDGE} (each)")
    centres = (bins["novelty_low"] + bins["novelty_high"]) / 2
    for model in evaluation.models:
        if model in bins and bins[model].notna().any():
            ax.plot(centres, bins[model], marker="o", label=model)
    ax.set_xlabel("novelty: cosine distance to nearest training perturbation")
    ax.set_ylabel("Pearson of delta")
    ax.legend(fontsize="x-small")
    return fig


#: Report images and the functions drawing them.
PLOTS = {
    "pearson_per_model.png": plot_pearson,
    "best_worst_perturbations.png": plot_best_worst,
    "alpha_path.png": plot_alpha_path,
    "novelty.png": plot_novelty,
}
