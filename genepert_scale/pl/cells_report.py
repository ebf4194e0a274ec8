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
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .. import __version__
from ..io.store import atomic_output, local_directory
from ..tl.cells.evaluate import LATENT_OT, MODELS, CellsEvaluation
from .report import png_bytes
from .report_html import STYLE, figure, mean_std, table

log = logging.getLogger(__name__)

FILES = ("metrics.json", "per_perturbation.csv", "folds.csv", "predicted_cells.h5ad",
         "energy_distance_per_perturbation.png", "pca_best_worst.png", "report.html")
#: Metrics of the model table in the report.
REPORT_METRICS = ("energy_distance", "mmd_rbf", "pearson_delta", "pearson_delta_de20", "rmse_delta")
COLOURS = {LATENT_OT: "tab:blue", "ridge_shift": "tab:orange", "control_cells": "tab:green"}
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
    """Write every report file into the directory ``out`` (a path or URL), atomically."""
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
        evaluation.predicted.write_h5ad(root / "predicted_cells.h5ad")
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
    wide = evaluation.per_perturbation.pivot(index="perturbation", columns="model",
                                             values="energy_distance")
    wide = wide.sort_values(LATENT_OT)
    fig = Figure(figsize=(max(6.0, 0.25 * len(wide) + 2), 4), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(wide))
    for model in MODELS:
        ax.plot(x, wide[model].to_numpy(), "o", ms=4, label=model, color=COLOURS.get(model))
    ax.set_xticks(x, wide.index, rotation=90, fontsize=6 if len(wide) > 40 else 8)
    ax.set_ylabel("energy distance to true cells")
    ax.set_title("held-out perturbations")
    ax.legend()
    return fig


def best_and_worst(evaluation: CellsEvaluation) -> list[str]:
    """The held-out perturbations with the smallest and largest ``latent_ot`` energy distance."""
    table = evaluation.per_perturbation
    rows = table[(table.model == LATENT_OT) & table.energy_distance.notna()]
    if rows.empty:
        return []
    ordered = rows.sort_values("energy_distance").perturbation.tolist()
    return list(dict.fromkeys([ordered[0], ordered[-1]]))


def plot_best_worst(evaluation: CellsEvaluation) -> Figure:
    """PC1/PC2 of true and predicted cells, best and worst perturbation × model."""
    chosen = best_and_worst(evaluation)
    fig = Figure(figsize=(3.2 * len(MODELS), 3.0 * max(len(chosen), 1)), layout="constrained")
    energy = evaluation.per_perturbation.set_index(["perturbation", "model"])["energy_distance"]
    for row, name in enumerate(chosen):
        view = evaluation.views[name]
        for col, model in enumerate(MODELS):
            ax = fig.add_subplot(len(chosen), len(MODELS), row * len(MODELS) + col + 1)
            ax.scatter(*view["true"].T, s=3, color="lightgrey", label="true")
            ax.scatter(*view[model].T, s=3, alpha=0.5, color=COLOURS.get(model), label=model)
            ax.set_title(f"{name}: {model}\nenergy {energy[name, model]:.3g}", fontsize=9)
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

