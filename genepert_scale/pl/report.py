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
from ..tl.evaluate import Evaluation, novelty_table
from ..tl.scoring import RIDGE
from ..tl.ridge import FoldFit
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
    model the metric summaries (:func:`model_documents`). ``baselines`` says
    what the baselines scored or fell back on. With contexts, ``models``
    pools every context's held-out perturbations and ``contexts`` gives the
    model documents of each context (the alphas are there, not in ``models``)."""
    document = {
        "genepert_scale_version": __version__,
        "parameters": evaluation.parameters,
        "missing": evaluation.missing,
        "models": model_documents(evaluation, alphas=not evaluation.contexts),
        "baselines": evaluation.baselines,
        "subgroups": evaluation.subgroups,
        "novelty": [
            {k: _json_value(v) for k, v in row.items()}
            for row in novelty_table(evaluation.per_perturbation).to_dict(orient="records")
        ],
    }
    if evaluation.contexts:
        document["contexts"] = {context: model_documents(part) for context, part in evaluation.contexts.items()}
    return document


def model_documents(evaluation: Evaluation, *, alphas: bool = True) -> dict[str, dict[str, Any]]:
    """Per model: the metric summaries (with bootstrap ``ci95`` of
    ``pearson_delta`` and ``rmse_delta``) and, for every model but the ridge,
    its ``paired_test`` against the ridge. With ``alphas``, every fitted model
    (the ridge, ``pca_ridge``) also gets ``alpha`` (the rule, the grid and the
    alpha chosen per fold) and ``folds``: every fold's alpha and alpha path
    (train, validation and inner-CV MSE and Pearson delta per alpha)."""
    models = {model: dict(metrics) for model, metrics in evaluation.summary.items()}
    fitted = {RIDGE: evaluation.fold_fits, **evaluation.baseline_fits} if alphas else {}
    for model, fits in fitted.items():
        models[model].update(alpha_document(fits, evaluation.parameters))
    for model, tests in evaluation.paired_tests.items():
        models[model]["paired_test"] = {"reference": RIDGE, "difference": f"{RIDGE} - {model}", **tests}
    return models


def alpha_document(fits: list[FoldFit], parameters: dict[str, Any]) -> dict[str, Any]:
    """``alpha`` (``select_by``, ``grid``, ``chosen`` per fold) and ``folds``
    (every fold's alpha, solver and alpha path) of a fitted model."""
    return {
        "alpha": {
            "select_by": parameters.get("select_by"),
            "grid": parameters.get("alphas"),
            "chosen": [fit.alpha for fit in fits],
        },
        "folds": [
            {
                "fold": fit.fold,
                "alpha": fit.alpha,
                "select_by": fit.select_by,
                "solver": fit.solver,
                "alpha_path": [{k: _json_value(v) for k, v in row.items()}
                               for row in fit.path.to_dict(orient="records")],
            }
            for fit in fits
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
        at = prediction_position(evaluation.predictions, row)
        true = evaluation.predictions["delta"].isel(perturbation=at).values
        pred = evaluation.predictions["prediction"].sel(model=RIDGE).isel(perturbation=at).values
        ax.scatter(true, pred, s=6, alpha=0.6)
        lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        name = f"{row.context}/{row.perturbation}" if "context" in row else row.perturbation
        ax.set_title(f"{which}: {name} (r = {row.pearson_delta:.2f})")
        ax.set_xlabel("true delta")
        ax.set_ylabel("predicted delta")
    return fig


def prediction_position(predictions: Any, row: Any) -> int:
    """Where a row of the per-perturbation table (its ``perturbation``, and
    ``context`` with contexts) is along the predictions' ``perturbation``."""
    match = predictions["perturbation"].values == row.perturbation
    if "context" in predictions.coords:
        match &= predictions["context"].values == row.context
    return int(np.flatnonzero(match)[0])


def plot_alpha_path(evaluation: Evaluation) -> Figure:
    """The ridge's alpha path per fold: MSE (training dashed, held-out
    solid) and Pearson delta (inner CV on the training folds dashed,
    held-out solid), the chosen alpha marked."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    mse_ax, pearson_ax = fig.subplots(1, 2)
    parts = {f"{context} ": part for context, part in evaluation.contexts.items()} or {"": evaluation}
    for context, fit in ((context, fit) for context, part in parts.items() for fit in part.fold_fits):
        path = fit.path
        chosen = path["alpha"] == fit.alpha
        line = mse_ax.plot(path["alpha"], path["val_mse"], marker="o", ms=3, label=f"{context}fold {fit.fold}")
        color = line[0].get_color()
        mse_ax.plot(path["alpha"], path["train_mse"], ls="--", color=color)
        pearson_ax.plot(path["alpha"], path["val_pearson_delta"], marker="o", ms=3, color=color,
                        label=f"{context}fold {fit.fold} (alpha {fit.alpha:g})")
        pearson_ax.plot(path["alpha"], path["inner_cv_pearson_delta"], ls="--", color=color)
        for ax, column in ((mse_ax, "val_mse"), (pearson_ax, "val_pearson_delta")):
            ax.plot(path.loc[chosen, "alpha"], path.loc[chosen, column], marker="*", ms=12, color=color, ls="")
    for ax, label in ((mse_ax, "MSE of delta (dashed: training)"),
                      (pearson_ax, "Pearson delta (dashed: inner CV)")):
        ax.set_xscale("log")
        ax.set_xlabel("alpha (star: chosen)")
        ax.set_ylabel(label)
    pearson_ax.legend(fontsize="x-small")
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
