"""Metrics of predicted perturbation effects (pseudo-bulk deltas).

Two kinds:

* **per perturbation** (:func:`perturbation_metrics`): a prediction row against
  its true row only — Pearson of delta (all genes and the top DE genes, as in
  GEARS), RMSE, MAE, Systema's Pearson delta against the perturbed centroid,
  the direction (sign) accuracy on the top DE genes, and on the DE genes at
  an FDR (cell-eval's, the Virtual Cell Challenge's) the overlap of the
  predicted DE genes (:func:`de_overlap`) and the Spearman of delta;
* **set-level** (:func:`discrimination_score`, :func:`centroid_accuracy`): a
  prediction against the true effects of *every* evaluated perturbation, so a
  model that predicts the same average effect for everything scores at chance.

All functions take matrices of perturbations × genes and return one value per
row. The "top DE genes" of a perturbation are indices passed in ``de_genes``
(e.g. from a Welch t-test against the control); by default the genes with the
largest true ``|delta|`` (:func:`top_delta_genes`).

An ``exclude`` mask (perturbations × genes) leaves genes out of a row's
metrics — a perturbation's own target genes, whose knock-down gives the
answer away (the Virtual Cell Challenge's convention): every per-row metric
is then computed on the row's other genes, and its top DE genes are chosen
among them.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..pp.de import NO_GENE, mse_de, pearson_delta_de

#: Genes of the ``_de20`` metrics.
DE_TOP = 20
#: Per-perturbation metrics, in report order.
ROW_METRICS = (
    "pearson_delta", "pearson_delta_de20", "rmse_delta", "mae_delta",
    "pearson_delta_de20_ttest", "mse_de20", "overlap_de_fdr", "spearman_delta_de_fdr",
    "pearson_delta_centroid", "pearson_delta_centroid_de20", "direction_de20",
)
#: Set-level metrics (against every evaluated perturbation).
SET_METRICS = ("discrimination_score", "centroid_accuracy")
METRICS = ROW_METRICS + SET_METRICS
#: The metrics of the Virtual Cell Challenge's score, in its order: differential
#: expression, perturbation discrimination, mean absolute error.
VCC_SCORE = ("overlap_de_fdr", "discrimination_score", "mae_delta")
#: Relative spread below which a row counts as constant (float32 eps ≈ 1.2e-7).
_FLOAT32_NOISE = 1e-5
#: Elements of the largest temporary array of the blocked distance loops.
_BLOCK_ELEMENTS = 1 << 24


def pearson_rows(pred: np.ndarray, true: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Pearson correlation of each row pair, over the genes ``keep`` marks
    (rows × genes; default all); NaN where a row is constant there."""
    if keep is None:
        a = pred - pred.mean(axis=1, keepdims=True)
        b = true - true.mean(axis=1, keepdims=True)
    else:
        a, b = _centred(pred, keep), _centred(true, keep)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, np.sum(a * b, axis=1) / denom, np.nan)


def _centred(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``values`` minus each row's mean over ``keep``, zero outside ``keep``."""
    return np.where(keep, values - _row_mean(values, keep)[:, None], 0.0)


def _row_mean(values: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """Each row's mean over the genes ``keep`` marks (all: ``None``); NaN for none."""
    if keep is None:
        return np.mean(values, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(keep, values, 0.0).sum(axis=1) / keep.sum(axis=1)


def top_delta_genes(true: np.ndarray, k: int = DE_TOP, exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``k`` genes with the largest true ``|delta|`` of every row
    (ties: lower gene index first), among the genes ``exclude`` does not mark;
    a row with fewer such genes ends in :data:`.de.NO_GENE`."""
    if exclude is None:
        return np.argsort(-np.abs(true), axis=1, kind="stable")[:, :k]
    order = np.argsort(np.where(exclude, np.inf, -np.abs(true)), axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(exclude, order, axis=1), NO_GENE, order)


def without_genes(genes: np.ndarray, exclude: np.ndarray | None, k: int | None = None) -> np.ndarray:
    """Rows of gene indices without the genes ``exclude`` marks (rows × genes):
    the others keep their order, :data:`.de.NO_GENE` fills the end; the first
    ``k`` columns (default all)."""
    genes = np.asarray(genes, dtype=np.intp)
    if exclude is not None:
        hit = (genes >= 0) & np.take_along_axis(exclude, np.maximum(genes, 0), axis=1)
        genes = np.where(hit, NO_GENE, genes)
    order = np.argsort(genes < 0, axis=1, kind="stable")
    return np.take_along_axis(genes, order, axis=1)[:, :k]


def _on_genes(values: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """``values[i, genes[i]]`` of every row (any value where ``genes`` is :data:`.de.NO_GENE`)."""
    return np.take_along_axis(values, np.maximum(genes, 0), axis=1)


def kept_de_genes(fdr_genes: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """The true DE genes of every row (a boolean mask, perturbations × genes,
    as :func:`.de.fdr_de_genes`) without the genes ``exclude`` marks."""
    fdr_genes = np.asarray(fdr_genes, dtype=bool)
    return fdr_genes if exclude is None else fdr_genes & ~np.asarray(exclude, dtype=bool)


def de_overlap(pred: np.ndarray, de: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """Overlap of every row's predicted and true DE genes (the Virtual Cell
    Challenge's differential expression score, from pseudo-bulk deltas).

    Parameters
    ----------
    pred
        Predicted deltas, perturbations × genes.
    de
        Boolean mask (perturbations × genes) of the true DE genes, with no
        gene that ``exclude`` marks (:func:`kept_de_genes`).
    exclude
        Boolean mask of genes that cannot be predicted DE genes.

    Returns
    -------
    numpy.ndarray
        ``|P ∩ D| / |D|`` per row; NaN where the row has no true DE gene.

    Notes
    -----
    ``D`` are the row's true DE genes (the Welch t-test against the control
    at an FDR), ``P`` the ``|D|`` genes not excluded with the largest
    predicted ``|delta|`` (ties: lower gene index first). cell-eval's
    ``overlap_at_N`` at ``N = |D|`` ranks its predicted DE genes by fold
    change among those significant in a DE test of predicted cells; a
    pseudo-bulk prediction has no cells to test, so its largest changes are
    its DE genes, as many as the truth has (precision and overlap are then
    the same).
    """
    de = np.asarray(de, dtype=bool)
    score = np.abs(pred) if exclude is None else np.where(exclude, -np.inf, np.abs(pred))
    order = np.argsort(-score, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(de.shape[1]), de.shape), axis=1)
    n = de.sum(axis=1)
    hits = np.sum((rank < n[:, None]) & de, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, hits / n, np.nan)


def spearman_rows(pred: np.ndarray, true: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row pair over the genes ``keep`` marks
    (rows × genes): :func:`pearson_rows` of their ranks there (ties: mean
    rank); NaN with fewer than two genes or a constant row (cell-eval's
    ``de_spearman_lfc_sig`` on the true DE genes)."""
    from scipy.stats import rankdata  # slow to import; every command's start-up would pay

    keep = np.asarray(keep, dtype=bool)
    ranks = [np.nan_to_num(rankdata(np.where(keep, values, np.nan), axis=1, nan_policy="omit"))
             for values in (pred, true)]
    return pearson_rows(*ranks, keep)


def perturbation_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    *,
    de_genes: np.ndarray | None = None,
    ttest_genes: np.ndarray | None = None,
    fdr_genes: np.ndarray | None = None,
    centroid: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Metrics of every row (perturbation) of a prediction.

    Parameters
    ----------
    pred, true
        Predicted and true delta (perturbation − control), perturbations × genes.
    de_genes
        Gene indices of the top DE genes of every row (perturbations × k);
        default :func:`top_delta_genes`.
    ttest_genes
        The top DE genes of every row by the Welch t-test against the control
        (:func:`.de.top_de_genes`, GEARS' definition; ``-1`` pads rows with
        fewer). Without them ``pearson_delta_de20_ttest`` and ``mse_de20`` are NaN.
    fdr_genes
        Boolean mask (perturbations × genes) of every row's true DE genes:
        the Welch t-test against the control at an FDR
        (:func:`.de.fdr_de_genes`). Without it the ``_de_fdr`` metrics are NaN.
    centroid
        Delta of the perturbed centroid (the mean of the training
        perturbations' means, minus the control), per row (perturbations ×
        genes) or one row for all. Without it the ``_centroid`` metrics are NaN.
    exclude
        Boolean mask (perturbations × genes) of genes left out of each row's
        metrics (its target genes, say): every metric is computed on the
        row's other genes, the DE genes of ``de_genes``, ``ttest_genes`` and
        ``fdr_genes`` lose the excluded ones, and the default and predicted
        DE genes are chosen among the others.

    Returns
    -------
    dict
        :data:`ROW_METRICS`, one array each.

    Notes
    -----
    With ``D`` the DE genes of a row (largest true ``|delta|`` by default),
    ``T`` its Welch t-test DE genes, ``F`` its DE genes at the FDR, ``P`` the
    ``|F|`` genes of largest predicted ``|delta|`` and ``c`` its centroid delta::

        pearson_delta               = r(pred, true)
        pearson_delta_de20          = r(pred[D], true[D])
        rmse_delta, mae_delta       = sqrt(mean((pred-true)²)), mean(|pred-true|)
        pearson_delta_de20_ttest    = r(pred[T], true[T])                 (GEARS)
        mse_de20                    = mean((pred[T]-true[T])²)            (GEARS)
        overlap_de_fdr              = |P ∩ F| / |F|                 (cell-eval, VCC)
        spearman_delta_de_fdr       = spearman(pred[F], true[F])         (cell-eval)
        pearson_delta_centroid      = r(pred - c, true - c)
        pearson_delta_centroid_de20 = r(pred[D] - c[D], true[D] - c[D])
        direction_de20              = mean(sign(pred[D]) == sign(true[D]))

    The centroid versions are Systema's PearsonΔ against the perturbed
    reference (Viñas Torné et al., "Systema: a framework for evaluating
    genetic perturbation response prediction beyond systematic variation",
    Nat. Biotechnol. 2025; ``corr_all_allpert`` / ``corr_20de_allpert``):
    since means are ``control + delta``, ``mean − centroid mean`` equals
    ``delta − c``. A prediction of the average perturbation effect (the mean
    baseline) is constant there and gets NaN — also when it equals ``c`` only
    to float32 precision (relative spread below ``1e-5``).
    """
    keep = None if exclude is None or not np.any(exclude) else ~np.asarray(exclude, dtype=bool)
    exclude = None if keep is None else ~keep
    if de_genes is None:
        de = top_delta_genes(true, exclude=exclude)
    else:
        de = without_genes(de_genes, exclude) if keep is not None else np.asarray(de_genes, dtype=np.intp)
    de_keep = None if keep is None else de >= 0
    pred_de, true_de = _on_genes(pred, de), _on_genes(true, de)
    error = pred - true
    out = {
        "pearson_delta": pearson_rows(pred, true, keep),
        "pearson_delta_de20": pearson_rows(pred_de, true_de, de_keep),
        "rmse_delta": np.sqrt(_row_mean(error**2, keep)),
        "mae_delta": _row_mean(np.abs(error), keep),
        "pearson_delta_de20_ttest": np.full(len(pred), np.nan),
        "mse_de20": np.full(len(pred), np.nan),
        "overlap_de_fdr": np.full(len(pred), np.nan),
        "spearman_delta_de_fdr": np.full(len(pred), np.nan),
        "pearson_delta_centroid": np.full(len(pred), np.nan),
        "pearson_delta_centroid_de20": np.full(len(pred), np.nan),
        "direction_de20": _row_mean(np.sign(pred_de) == np.sign(true_de), de_keep),
    }
    if ttest_genes is not None:
        ttest = without_genes(ttest_genes, exclude)
        out["pearson_delta_de20_ttest"] = pearson_delta_de(pred, true, ttest)
        out["mse_de20"] = mse_de(pred, true, ttest)
    if fdr_genes is not None:
        fdr_de = kept_de_genes(fdr_genes, exclude)
        out["overlap_de_fdr"] = de_overlap(pred, fdr_de, exclude)
        out["spearman_delta_de_fdr"] = spearman_rows(pred, true, fdr_de)
    if centroid is not None:
        c = np.broadcast_to(np.asarray(centroid, dtype=np.float64), true.shape)
        c_de = _on_genes(c, de)
        at_centroid = _flat(pred - c, c, keep)
        out["pearson_delta_centroid"] = np.where(at_centroid, np.nan, pearson_rows(pred - c, true - c, keep))
        out["pearson_delta_centroid_de20"] = np.where(
            at_centroid, np.nan, pearson_rows(pred_de - c_de, true_de - c_de, de_keep))
    return out


def _flat(shifted: np.ndarray, scale: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Rows of ``shifted`` that are constant (over the genes ``keep`` marks)
    up to float32 rounding of ``scale`` (predictions are stored as float32, so
    the mean baseline differs from its float64 centroid by rounding noise,
    not by a signal)."""
    if keep is None:
        spread = np.linalg.norm(shifted - shifted.mean(axis=1, keepdims=True), axis=1)
        return spread <= _FLOAT32_NOISE * np.linalg.norm(scale, axis=1)
    spread = np.linalg.norm(_centred(shifted, keep), axis=1)
    return spread <= _FLOAT32_NOISE * np.linalg.norm(np.where(keep, scale, 0.0), axis=1)


def discrimination_score(
    pred: np.ndarray,
    true: np.ndarray,
    *,
    exclude: np.ndarray | None = None,
    metric: Literal["l1", "l2"] = "l1",
) -> np.ndarray:
    """cell-eval's perturbation discrimination score of every row.

    Parameters
    ----------
    pred, true
        Predicted and true deltas, perturbations × genes; row ``i`` of both
        is the same perturbation. Every row of ``true`` is a candidate.
    exclude
        Boolean mask (perturbations × genes): genes left out of row ``i``'s
        distances — its own target gene(s), whose knock-down would give the
        answer away (cell-eval's ``exclude_target_gene``).
    metric
        Distance: ``l1`` (cell-eval's default) or ``l2``.

    Returns
    -------
    numpy.ndarray
        ``1 − rank / n`` per row: 1 when the true effect is the nearest of all
        ``n``, ``1/n`` when it is the farthest.

    Notes
    -----
    ``rank_i = #{j : d(pred_i, true_j) < d(pred_i, true_i)}`` (ties count in
    the prediction's favour), distances over the genes not excluded for
    ``i``. As ``discrimination_score`` in cell-eval
    (``cell_eval/metrics/_anndata.py``, Arc Institute), which also ranks the
    prediction's distance to its own true effect among the distances to all
    true effects and normalises by the number of perturbations.
    """
    distance = distances(pred, true, metric, exclude)
    nearer, _ = ranks(distance, np.diagonal(distance))
    return 1.0 - nearer / len(true)


def centroid_accuracy(pred: np.ndarray, true: np.ndarray, *,
                      exclude: np.ndarray | None = None) -> np.ndarray:
    """Systema's centroid accuracy of every row.

    Parameters
    ----------
    pred, true
        Predicted and true deltas, perturbations × genes (row ``i`` of both
        is the same perturbation).
    exclude
        Boolean mask (perturbations × genes): genes left out of row ``i``'s
        distances (default: none, as Systema).

    Returns
    -------
    numpy.ndarray
        The fraction of the other perturbations' true profiles that are
        farther (Euclidean, all genes) from the prediction than its own true
        profile; NaN with fewer than two perturbations.

    Notes
    -----
    ``score_i = #{j ≠ i : ‖pred_i − true_j‖ > ‖pred_i − true_i‖} / (n − 1)``,
    as ``calculate_centroid_accuracies`` in Systema's
    ``evaluation/centroid_accuracy.py`` (Viñas Torné et al., Nat. Biotechnol.
    2025), which compares post-perturbation profiles; adding the control mean
    to both sides does not change Euclidean distances, so deltas give the same
    score.
    """
    n = len(true)
    if n < 2:
        return np.full(n, np.nan)
    distance = distances(pred, true, "l2", exclude)
    _, farther = ranks(distance, np.diagonal(distance))
    return farther / (n - 1)


def ranks(distance: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per prediction row: how many true rows are strictly nearer than its
    own true row (``own``: its distance to it), and how many strictly
    farther. Counts over blocks of true rows add up
    (:func:`.scoring.set_metric_values` sums them block by block)."""
    own = np.asarray(own)[:, None]
    return np.sum(distance < own, axis=1), np.sum(distance > own, axis=1)


def distances(
    pred: np.ndarray, true: np.ndarray, metric: Literal["l1", "l2"], exclude: np.ndarray | None = None
) -> np.ndarray:
    """``d[i, j]`` between ``pred_i`` and ``true_j`` over the genes of row ``i``
    not in ``exclude``.

    ``l2`` expands ``Σ_g w_ig (p_ig − t_jg)² = Σ_g w_ig p_ig² − 2 (w∘p)_i·t_j +
    w_i·t_j²`` into matrix products; ``l1`` runs in row blocks bounded by
    :data:`_BLOCK_ELEMENTS`.
    """
    weight = np.ones_like(pred) if exclude is None else (~np.asarray(exclude, dtype=bool)).astype(pred.dtype)
    if metric == "l2":
        squared = (weight * pred**2).sum(axis=1)[:, None] - 2 * (weight * pred) @ true.T + weight @ (true**2).T
        return np.sqrt(np.maximum(squared, 0.0))
    if metric != "l1":
        raise ValueError(f"metric must be 'l1' or 'l2', got {metric!r}")
    n, q = true.shape
    out = np.empty((len(pred), n))
    step = max(1, _BLOCK_ELEMENTS // max(n * q, 1))
    for start in range(0, len(pred), step):
        block = slice(start, start + step)
        out[block] = (np.abs(pred[block, None, :] - true[None, :, :]) * weight[block, None, :]).sum(axis=2)
    return out
