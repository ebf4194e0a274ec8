"""``report.html``: one self-contained static page of an evaluation.

Everything is in the file — tables as HTML, plots as inline base64 PNG — so
it opens offline, from a mail attachment or an object store, with no
scripts, styles or images fetched from anywhere.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..tl.metrics import METRICS

#: Headline metrics of the subgroup table.
SUBGROUP_METRIC = "pearson_delta"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""
_CAPTIONS = {
    "pearson_per_model.png": "Pearson of delta per held-out perturbation, every model.",
    "best_worst_perturbations.png": "Predicted vs true delta (every gene) of the ridge's best, "
                                    "median and worst held-out perturbation.",
    "novelty.png": "Pearson of delta against novelty (cosine distance to the nearest training "
                   "perturbation in embedding space); lines: mean per novelty quartile.",
    "alpha_path.png": "Alpha path: training (dashed) and held-out MSE of the ridge per alpha and fold "
                      "— underfitting at large alpha, overfitting where the two part.",
}


def render_html(document: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    """The page of a ``metrics.json`` document and its PNG images (name → bytes)."""
    parameters = document["parameters"]
    sections = [
        "<h1>genepert-scale evaluation</h1>",
        f"<p>genepert-scale {_text(document.get('genepert_scale_version'))}; "
        f"split <code>{_text(parameters.get('split'))}</code>, "
        f"{_text(parameters.get('n_test_perturbations'))} test perturbations of "
        f"{_text(parameters.get('n_perturbations'))}, {_text(parameters.get('n_genes'))} genes.</p>",
        "<h2>Models</h2>",
        "<p>Mean ± standard deviation over folds of the per-fold means over held-out "
        "perturbations (one test set: the mean only).</p>",
        model_table(document["models"]),
        "<h2>Test subgroups</h2>",
        f"<p>{SUBGROUP_METRIC}: mean over the subgroup's test perturbations (GEARS' subgroups).</p>",
        subgroup_table(document.get("subgroups", {})),
        "<h2>Novelty</h2>",
        "<p>Mean Pearson of delta per quantile bin of novelty.</p>",
        table(document.get("novelty", [])),
        *(figure(name, images[name]) for name in _CAPTIONS if name in images),
        "<h2>Parameters</h2>",
        table([{"parameter": k, "value": _plain(v)} for k, v in parameters.items()]),
        "<h2>Genes without embedding vectors</h2>",
        table([{"item": k, "value": _plain(v)} for k, v in document.get("missing", {}).items()]),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<title>genepert-scale evaluation</title>\n"
        f"<style>{STYLE}</style>\n</head>\n<body>\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )


def model_table(models: Mapping[str, Mapping[str, Any]]) -> str:
    """Models × metrics: ``fold_mean ± fold_std``."""
    rows = []
    for model, metrics in models.items():
        row = {"model": model}
        for metric in METRICS:
            if metric in metrics:
                row[metric] = mean_std(metrics[metric].get("fold_mean"), metrics[metric].get("fold_std"))
        rows.append(row)
    return table(rows)


def subgroup_table(subgroups: Mapping[str, Mapping[str, Any]]) -> str:
    """Subgroups × models: the mean of :data:`SUBGROUP_METRIC` (and n)."""
    rows = []
    for name, models in subgroups.items():
        row = {"subgroup": name}
        for model, metrics in models.items():
            value = metrics[SUBGROUP_METRIC]
            row[model] = f"{mean_std(value['mean'], None)} (n={value['n']})"
        rows.append(row)
    return table(rows)


def mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """An HTML table of dict rows (columns: the union of keys, in order)."""
    if not rows:
        return "<p>(none)</p>"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(name: str, png: bytes, caption: str | None = None) -> str:
    """An inline image with its caption (by default the evaluation report's)."""
    data = base64.b64encode(png).decode("ascii")
    caption = _CAPTIONS.get(name, "") if caption is None else caption
    return (f"<h3>{html.escape(name)}</h3><p>{html.escape(caption)}</p>"
            f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _text(value: Any) -> str:
    return html.escape(_plain(value))
