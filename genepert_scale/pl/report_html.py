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

from ..pp.de import DE_FDR
from ..tl.metrics import METRICS, VCC_SCORE

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
    "alpha_path.png": "Alpha path of the ridge per fold. Left: training (dashed) and held-out MSE — "
                      "underfitting at large alpha, overfitting where the two part. Right: inner-CV "
                      "(dashed, what alpha is chosen from) and held-out Pearson delta; stars: the "
                      "chosen alpha.",
}
#: Metrics shown with a bootstrap interval and a paired test in the model table.
UNCERTAIN = ("pearson_delta", "rmse_delta")
#: The model table's metrics: those of the Virtual Cell Challenge's score in
#: its order, then the others.
TABLE_METRICS = VCC_SCORE + tuple(m for m in METRICS if m not in VCC_SCORE)


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
        "perturbations (one test set: the mean only). <em>mean [95% CI]</em>: the mean over held-out "
        "perturbations and its seeded percentile-bootstrap interval; <em>p vs ridge</em>: two-sided Wilcoxon "
        "signed-rank test of the ridge against the model over the perturbations both score "
        "(n pairs; the sign is that of the ridge's mean advantage, + where the ridge is better). "
        "First the metrics of the Virtual Cell Challenge's score: <code>overlap_de_fdr</code> (the "
        "differential expression score: the share of a perturbation's DE genes, Welch t-test at "
        f"FDR &lt; {DE_FDR:g}, among its as many largest predicted changes), <code>discrimination_score</code>, "
        "<code>mae_delta</code>.</p>",
        model_table(document["models"]),
        *context_section(document.get("contexts", {}), parameters.get("contexts", {})),
        "<h2>Alpha</h2>",
        *(alpha_section(models, f"<h3>{html.escape(context)}</h3>")
          for context, models in (document.get("contexts") or {"": document["models"]}).items()),
        "<h2>Baselines</h2>",
        "<p>Baselines that do not score every perturbation alike: how many they scored, fell back "
        "on, or why they are absent.</p>",
        table([{"baseline": name, **{k: _plain(v) for k, v in notes.items()}}
               for name, notes in document.get("baselines", {}).items()]),
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
    """Models × metrics (:data:`TABLE_METRICS`): ``fold_mean ± fold_std``; for
    :data:`UNCERTAIN` metrics also the bootstrap interval and the paired test
    against the ridge."""
    rows = []
    for model, metrics in models.items():
        row = {"model": model}
        for metric in TABLE_METRICS:
            if metric in metrics:
                row[metric] = mean_std(metrics[metric].get("fold_mean"), metrics[metric].get("fold_std"))
            if metric in UNCERTAIN and metric in metrics:
                row[f"{metric} mean [95% CI]"] = interval(metrics[metric].get("mean"), metrics[metric].get("ci95"))
                row[f"{metric} p vs ridge"] = p_value(metrics.get("paired_test", {}).get(metric), metric)
        rows.append(row)
    return table(rows)


def interval(mean: float | None, bounds: Sequence[float | None] | None) -> str:
    """``mean [low, high]``: the mean over perturbations and its interval."""
    if mean is None or not bounds or None in bounds:
        return "n/a"
    return f"{mean:.3f} [{bounds[0]:.3f}, {bounds[1]:.3f}]"


def p_value(test: Mapping[str, Any] | None, metric: str) -> str:
    """``p (n=…, ±)``: the Wilcoxon p-value, the pairs, and whether the ridge did better."""
    if not test:
        return ""
    if test.get("pvalue") is None:
        return f"n/a (n={test.get('n', 0)})"
    better = (test["mean_difference"] < 0) if metric.startswith("rmse") else (test["mean_difference"] > 0)
    return f"{test['pvalue']:.2g} (n={test['n']}, {'+' if better else '-'})"


def context_section(contexts: Mapping[str, Mapping[str, Any]], how: Mapping[str, Any]) -> list[str]:
    """With contexts: a heading, what was held out, and a table per headline
    metric (:data:`UNCERTAIN`) of contexts × models; nothing without."""
    if not contexts:
        return []
    held_out = how.get("mode") == "held_out"
    empty = how.get("without_perturbations") or []
    return [
        "<h2>Contexts</h2>",
        "<p>" + ("Each context held out in turn: trained on the other contexts' perturbations, tested on "
                 "every perturbation of the held-out one." if held_out else
                 "The split within each context, each context against its own control.")
        + " Mean ± standard deviation over folds; n: held-out perturbations scored. The model table "
        "above pools every context." + (f" Without perturbations (left out): {html.escape(', '.join(empty))}." if empty else "")
        + "</p>",
        *(f"<h3>{metric}</h3>" + context_table(contexts, metric) for metric in UNCERTAIN),
    ]


def context_table(contexts: Mapping[str, Mapping[str, Any]], metric: str) -> str:
    """Contexts × models: ``metric``'s ``fold_mean ± fold_std`` (n)."""
    rows = []
    for context, models in contexts.items():
        row = {"context": context}
        for model, metrics in models.items():
            value = metrics.get(metric, {})
            row[model] = f"{mean_std(value.get('fold_mean'), value.get('fold_std'))} (n={value.get('n', 0)})"
        rows.append(row)
    return table(rows)


def alpha_section(models: Mapping[str, Mapping[str, Any]], heading: str = "") -> str:
    """Per fitted model: the rule and grid, the alpha chosen per fold, and
    the path of the inner-CV metric (rows: alphas; columns: folds; ``*``:
    chosen); after ``heading`` (the context's)."""
    parts = [heading] if heading else []
    for model, metrics in models.items():
        alpha = metrics.get("alpha")
        if not alpha or not metrics.get("folds"):
            continue
        rule = alpha.get("select_by")
        parts.append(f"<h3>{html.escape(model)}</h3><p>Alpha chosen per fold by inner-CV "
                     f"<code>{_text(rule)}</code> on the training folds, over "
                     f"{len(alpha.get('grid') or [])} values; chosen: "
                     f"{html.escape(', '.join(f'{a:g}' for a in alpha.get('chosen', [])))}.</p>")
        rows: dict[float, dict[str, Any]] = {}
        for fold in metrics["folds"]:
            for step in fold["alpha_path"]:
                row = rows.setdefault(step["alpha"], {"alpha": f"{step['alpha']:g}"})
                value = step.get(f"inner_cv_{rule}")
                mark = "*" if step["alpha"] == fold["alpha"] else ""
                row[f"fold {fold['fold']} inner CV"] = "n/a" if value is None else f"{value:.4f}{mark}"
                held_out = step.get("val_pearson_delta")
                row[f"fold {fold['fold']} held-out r"] = "n/a" if held_out is None else f"{held_out:.4f}"
        parts.append(table(list(rows.values())))
    return "\n".join(parts) if len(parts) > bool(heading) else heading + "<p>(none)</p>"


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
