"""Compare evaluation runs (embedding A vs B vs their concatenation, splits,
…): one table of every run's models and metrics, as CSV and Markdown, and a
bar plot.

Runs are read from their ``metrics.json`` only, so reports written on other
machines or by other versions compare as long as that file is there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import ParameterError, StoreError
from .report import png_bytes
from ..io.store import atomic_output

log = logging.getLogger(__name__)

#: Metrics of the comparison table by default.
COMPARE_METRICS = ("pearson_delta", "pearson_delta_de20", "rmse_delta", "pearson_delta_centroid",
                   "discrimination_score", "centroid_accuracy")
FILES = ("compare.csv", "compare.md", "compare.png")


def read_run(directory: str) -> dict:
    """The ``metrics.json`` of a report directory."""
    path = Path(directory) / "metrics.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise StoreError(f"{directory} has no metrics.json; give directories written by "
                         "'genepert-scale evaluate'") from err
    except json.JSONDecodeError as err:
        raise StoreError(f"{path} is not valid JSON: {err}") from err


def comparison_table(
    directories: Sequence[str],
    labels: Sequence[str] | None = None,
    metrics: Sequence[str] = COMPARE_METRICS,
) -> pd.DataFrame:
    """One row per (run, model): ``run``, ``embedding``, ``split``, ``model``
    and ``{metric}_mean`` / ``{metric}_std`` (over folds) of every metric."""
    if len(directories) < 1:
        raise ParameterError("give at least one report directory to compare")
    labels = list(labels) if labels else [Path(d).name for d in directories]
    if len(labels) != len(directories) or len(set(labels)) != len(labels):
        raise ParameterError(f"give one distinct label per run ({len(directories)}), got {labels}")
    rows = []
    for label, directory in zip(labels, directories):
        doc = read_run(directory)
        parameters = doc.get("parameters", {})
        embedding = " + ".join(s.get("path", "?") for s in parameters.get("embedding", []))
        for model, values in doc["models"].items():
            row = {"run": label, "embedding": embedding, "split": parameters.get("split", "kfold"),
                   "model": model}
            for metric in metrics:
                summary = values.get(metric) or {}
                row[f"{metric}_mean"] = summary.get("fold_mean")
                row[f"{metric}_std"] = summary.get("fold_std")
            rows.append(row)
    return pd.DataFrame(rows).astype({f"{m}_{s}": float for m in metrics for s in ("mean", "std")})


def markdown(table: pd.DataFrame, metrics: Sequence[str] = COMPARE_METRICS) -> str:
    """The table in Markdown, ``mean ± std`` per metric."""
    columns = ["run", "embedding", "model", *metrics]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        cells = [str(row["run"]), str(row["embedding"]), str(row["model"])]
        for metric in metrics:
            mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
            cells.append("n/a" if np.isnan(mean) else f"{mean:.3f}" + ("" if np.isnan(std) else f" ± {std:.3f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(table: pd.DataFrame, metric: str = "pearson_delta") -> Figure:
    """Grouped bars: ``metric`` (mean ± std over folds) per model, one bar per run."""
    runs = list(dict.fromkeys(table["run"]))
    models = list(dict.fromkeys(table["model"]))
    width = 0.8 / len(runs)
    fig = Figure(figsize=(1.1 * len(models) + 3, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        part = table[table["run"] == run].set_index("model").reindex(models)
        ax.bar(np.arange(len(models)) + (i - (len(runs) - 1) / 2) * width, part[f"{metric}_mean"],
               width, yerr=part[f"{metric}_std"].fillna(0), label=run, capsize=2)
    ax.set_xticks(np.arange(len(models)), models, rotation=30, ha="right")
    ax.set_ylabel(f"{metric} (mean ± std over folds)")
    ax.legend(fontsize="small")
    return fig


def compare_runs(
    directories: Sequence[str],
    out: str,
    *,
    labels: Sequence[str] | None = None,
    metrics: Sequence[str] = COMPARE_METRICS,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Write ``compare.csv``, ``compare.md`` and ``compare.png`` into ``out``."""
    table = comparison_table(directories, labels, metrics)
    with atomic_output(out, overwrite=overwrite) as tmp:
        root = Path(tmp)
        root.mkdir(parents=True)
        table.to_csv(root / "compare.csv", index=False)
        (root / "compare.md").write_text(markdown(table, metrics))
        (root / "compare.png").write_bytes(png_bytes(plot_comparison(table, metrics[0])))
    log.info("compared %d runs into %s", len(directories), out)
    return table
