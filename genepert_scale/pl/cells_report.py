"""The cell model's report: a directory with ``metrics.json``,
``per_perturbation.csv``, ``folds.csv``, ``predicted_cells.h5ad``, two PNG
figures and ``report.html`` (tables and the figures inline).

Figures: the energy distance of every held-out perturbation by model, and a
2-D PCA view of true against predicted cells for the perturbations where
``latent_ot`` came closest and farthest.
"""

from __future__ import annotations

import html
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .. import __version__
from ..io.store import atomic_output, local_directory
from ..tl.cells.evaluate import LATENT_OT, LATENT_OT_ONEHOT, SEEN_MODELS, CellsEvaluation
from .report import png_bytes
from .report_html import STYLE, figure, mean_std, table

log = logging.getLogger(__name__)

FILES = ("metrics.json", "per_perturbation.csv", "folds.csv", "predicted_cells.h5ad",
         "energy_distance_per_perturbation.png", "pca_best_worst.png", "report.html")
#: The directory of the model fitted on every perturbation (a cell model store).
MODEL_DIR = "model"
#: Metrics of the model table in the report.
REPORT_METRICS = ("energy_distance", "mmd_rbf", "pearson_delta", "pearson_delta_de20", "rmse_delta")
COLOURS = {LATENT_OT: "tab:blue", LATENT_OT_ONEHOT: "tab:purple", "ridge_shift": "tab:orange",
           "control_cells": "tab:green"}
CAPTIONS = {
    "energy_distance_per_perturbation.png":
        "Energy distance between predicted and true cells of every held-out perturbation "
        "(PCA space of the fold's training cells; lower is closer), perturbations sorted by "
        "latent_ot's distance.",
    "pca_best_worst.png":
        "True cells (grey) and predicted cells of each model on the first two principal "
        "components, for the held-out perturbations where latent_ot came closest (top) and "
        "farthest (bottom) by energy distance.",
}


def metrics_document(evaluation: CellsEvaluation) -> dict[str, Any]:
    """The content of ``metrics.json``."""
    return {
        "genepert_scale_version": __version__,
        "parameters": evaluation.parameters,
        "missing": evaluation.missing,
        "models": evaluation.summary,
        "seen_models": {m: SEEN_MODELS[m] for m in evaluation.models if m in SEEN_MODELS},
        **({"contexts": evaluation.contexts} if evaluation.contexts else {}),
        "comparison": {"model": LATENT_OT, "against": "ridge_shift", **evaluation.comparison},
        "folds": evaluation.fold_log,
    }


def write_cells_report(
    evaluation: CellsEvaluation,
    out: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write every report file into the directory ``out`` (a path or URL),
    atomically; the predicted cells are copied there from
    ``evaluation.predicted``, and the model fitted on every perturbation,
    when the evaluation has one, is saved as ``out/model``
    (:func:`.tl.cells.persist.save_cells_model`)."""
    document = metrics_document(evaluation)
    images = {"energy_distance_per_perturbation.png": png_bytes(plot_energy(evaluation)),
              "pca_best_worst.png": png_bytes(plot_best_worst(evaluation))}
    with (
        atomic_output(out, overwrite=overwrite, storage_options=storage_options) as tmp,
        local_directory(tmp, storage_options) as local,
    ):
        root = Path(local)
        (root / "metrics.json").write_text(json.dumps(document, indent=2, default=_json_default))
        evaluation.per_perturbation.to_csv(root / "per_perturbation.csv", index=False)
        evaluation.folds.to_csv(root / "folds.csv", index=False)
        shutil.copyfile(evaluation.predicted, root / "predicted_cells.h5ad")
        if evaluation.model is not None:
            from ..tl.cells.persist import save_cells_model

            save_cells_model(evaluation.model, str(root / MODEL_DIR))
        for name, data in images.items():
            (root / name).write_bytes(data)
        (root / "report.html").write_text(render_html(document, images), encoding="utf-8")
    log.info("wrote cells report %s", out)
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def plot_energy(evaluation: CellsEvaluation) -> Figure:
    """Energy distance per held-out perturbation, one marker per model."""
    table = evaluation.per_perturbation
    names = (table.context.astype(str) + "/" + table.perturbation if "context" in table
             else table.perturbation)
    wide = table.assign(name=names).pivot(index="name", columns="model", values="energy_distance")
    wide = wide.sort_values(LATENT_OT)
    fig = Figure(figsize=(max(6.0, 0.25 * len(wide) + 2), 4), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(wide))
    for model in evaluation.models:
        ax.plot(x, wide[model].to_numpy(), "o", ms=4, label=model, color=COLOURS.get(model))
    ax.set_xticks(x, wide.index, rotation=90, fontsize=6 if len(wide) > 40 else 8)
    ax.set_ylabel("energy distance to true cells")
    ax.set_title("held-out perturbations")
    ax.legend()
    return fig


def plot_best_worst(evaluation: CellsEvaluation) -> Figure:
    """PC1/PC2 of true and predicted cells of the perturbations where
    ``latent_ot`` came closest and farthest (:attr:`.CellsEvaluation.views`), × model."""
    chosen, models = list(evaluation.views), evaluation.models
    fig = Figure(figsize=(3.2 * len(models), 3.0 * max(len(chosen), 1)), layout="constrained")
    for row, name in enumerate(chosen):
        view = evaluation.views[name]
        for col, model in enumerate(models):
            ax = fig.add_subplot(len(chosen), len(models), row * len(models) + col + 1)
            ax.scatter(*view.points["true"].T, s=3, color="lightgrey", label="true")
            ax.scatter(*view.points[model].T, s=3, alpha=0.5, color=COLOURS.get(model), label=model)
            ax.set_title(f"{name}: {model}\nenergy {view.energy[model]:.3g}", fontsize=9)
            ax.set_xlabel("PC1", fontsize=8)
            ax.set_ylabel("PC2", fontsize=8)
            ax.tick_params(labelsize=7)
    return fig


def render_html(document: dict[str, Any], images: dict[str, bytes]) -> str:
    """One self-contained page: models, the paired comparison, figures, parameters."""
    parameters = document["parameters"]
    models = [{"model": model, **{metric: mean_std(values[metric]["fold_mean"], values[metric]["fold_std"])
                                  for metric in REPORT_METRICS}}
              for model, values in document["models"].items()]
    comparison = [{"metric": metric, **{k: v for k, v in values.items()}}
                  for metric, values in document["comparison"].items() if isinstance(values, dict)]
    sections = [
        "<h1>genepert-scale cell model</h1>",
        f"<p>genepert-scale {html.escape(str(document['genepert_scale_version']))}; "
        f"{parameters.get('n_folds')}-fold CV over {parameters.get('n_perturbations')} perturbations, "
        f"{parameters.get('n_genes')} genes, {parameters.get('n_cells')} cells.</p>",
        "<h2>Models</h2><p>Mean ± standard deviation over folds of the per-fold means over "
        "held-out perturbations. Distances: predicted against true cells in a PCA space of the "
        "fold's training cells; the other metrics: the pseudo-bulk of the predicted cells.</p>",
        table(models),
        *(f"<p><b>{html.escape(m)}</b> is {html.escape(note)}.</p>"
          for m, note in document["seen_models"].items()),
        "<h2>latent_ot against ridge_shift, per perturbation</h2>",
        table(comparison),
        *(figure(name, images[name], CAPTIONS[name]) for name in CAPTIONS if name in images),
        "<h2>Folds</h2>",
        table([{k: v for k, v in fold.items() if not isinstance(v, (list, dict))}
               for fold in document["folds"]]),
        "<h2>Parameters</h2>",
        table([{"parameter": k, "value": json.dumps(v, default=str)} for k, v in parameters.items()]),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>genepert-scale cell model</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(sections) + "\n</body>\n</html>\n")

