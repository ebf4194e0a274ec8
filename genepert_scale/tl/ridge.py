"""Ridge regression from feature rows ``G`` (perturbations × d) to targets ``X``
(perturbations × q), with an intercept, from streamed sufficient statistics.

Small pure solver functions in the manner of scikit-learn's ``_ridge.py``:
:func:`gram_stats` (chunk), :func:`sum_stats` (combine) and a
:class:`RidgePath` (finalize: one eigendecomposition, then a solution for
every alpha); :func:`accumulate` builds the dask reduction over perturbation
blocks; :func:`inner_cv` and :func:`cross_validate` get every fold's model
from per-fold statistics; :class:`RidgeModel` is the fitted model and its
zarr encoding.

Notes
-----
With ``n`` rows, column means ``ḡ = Σg/n``, ``x̄ = Σx/n``, the centred normal
equations only need ``S = (GᵀG, GᵀX, Σg, Σx, Σ‖x‖², n)``::

    A = GᵀG − n ḡḡᵀ          (= G_cᵀG_c, d × d)
    B = GᵀX − n ḡx̄ᵀ          (= G_cᵀX_c, d × q)
    θ_α = (A + αI)⁻¹ B,      b = x̄ − θ_αᵀ ḡ

which is ``sklearn.linear_model.Ridge(alpha, fit_intercept=True)`` (the
intercept is not penalised). ``S`` is a sum over rows, so it is accumulated
block by block (memory O(d² + dq) whatever the number of rows) and the
statistics of a training set are the total minus those of the held-out fold.

*Primal* (``n ≥ d``): ``A = V diag(s) Vᵀ`` once, then for every alpha
``θ_α = V diag(1/(s+α)) VᵀB``. *Dual* (``n < d``, needs the rows):
``K = G_cG_cᵀ = U diag(s) Uᵀ`` (n × n) and, since
``(G_cᵀG_c + αI)⁻¹G_cᵀ = G_cᵀ(G_cG_cᵀ + αI)⁻¹``,
``θ_α = G_cᵀU diag(1/(s+α)) UᵀX_c`` — the same θ. Both are ``basis ·
diag(1/(s+α)) · projected`` (:class:`RidgePath`).

The squared error of ``(θ, b)`` on any row set with statistics ``S'`` is,
without its rows::

    ‖X − Gθ − 1bᵀ‖² = Σ‖x‖² − 2⟨θ, GᵀX⟩ − 2 bᵀΣx + ⟨θ, GᵀGθ⟩ + 2 bᵀθᵀΣg + n‖b‖²

so train and validation errors along the alpha path come from statistics.

The Pearson correlation of a row's prediction with its target (over genes,
GenePert's ``pearson_delta``) is not a sum over rows, so choosing alpha by it
needs the held-out rows themselves — but still no refit: with ``a = (g − ḡ)E``
(the row in the eigenbasis), ``w_α = 1/(s+α)`` and ``C`` the projected
targets, the prediction is ``x̄ + (a∘w_α)C`` for every alpha
(:meth:`RidgePath.row_pearson`). Their mean is a sum of per-row values over
a count, so the held-out rows are read a block at a time (:class:`Rows`).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr
from dask import delayed
from dask.delayed import Delayed

from .. import __version__
from .. import validate
from ..errors import ParameterError
from ..pp.reduce import SPLIT_EVERY, tree_reduce
from .blocks import BLOCK_SIZE, position_blocks, read_rows
from ..io.encodings import MODEL, open_checked
from ..io.store import write_dataset

log = logging.getLogger(__name__)

#: The alpha grid searched by default: 13 points, log-spaced from 1e-3 to 1e3.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(f"{a:.3g}") for a in np.logspace(-3, 3, 13))
Solver = Literal["auto", "primal", "dual"]
#: What the inner CV chooses alpha by: the mean per-perturbation Pearson of
#: predicted vs true delta (the metric the report leads with), or the MSE.
SelectBy = Literal["pearson_delta", "mse"]
SELECT_BY: tuple[str, ...] = ("pearson_delta", "mse")
DEFAULT_SELECT_BY: SelectBy = "pearson_delta"
#: Whether a larger value of a selection metric is better.
GREATER_IS_BETTER = {"pearson_delta": True, "mse": False}
#: Validation sums of one scored row set, per metric: (sum, count) per alpha;
#: pooled over row sets, the metric is ``Σ sum / Σ count`` (:func:`pool`).
Sums = dict[str, tuple[np.ndarray, np.ndarray]]
#: :data:`Sums` kept between :func:`inner_cv` calls, by (held-out folds, scored fold).
FoldScores = dict[tuple[frozenset[int], int], Sums]


@dataclass(frozen=True)
class GramStats:
    """Sufficient statistics of a row set: ``GᵀG``, ``GᵀX``, ``Σg``, ``Σx``, ``Σ‖x‖²``, ``n``."""

    gtg: np.ndarray
    gtx: np.ndarray
    g_sum: np.ndarray
    x_sum: np.ndarray
    x_sq: float
    n: int

    def __add__(self, other: GramStats) -> GramStats:
        return GramStats(*(a + b for a, b in zip(self._fields(), other._fields())))

    def __sub__(self, other: GramStats) -> GramStats:
        return GramStats(*(a - b for a, b in zip(self._fields(), other._fields())))

    def _fields(self) -> tuple:
        return self.gtg, self.gtx, self.g_sum, self.x_sum, self.x_sq, self.n

    def centred(self) -> tuple[np.ndarray, np.ndarray]:
        """``GᵀG`` and ``GᵀX`` of the rows centred on their own means:
        ``GᵀG − nḡḡᵀ`` and ``GᵀX − nḡx̄ᵀ``."""
        g_mean, x_mean = self.g_sum / self.n, self.x_sum / self.n
        return (self.gtg - self.n * np.outer(g_mean, g_mean),
                self.gtx - self.n * np.outer(g_mean, x_mean))


def gram_stats(G: np.ndarray, X: np.ndarray) -> GramStats:
    """The *chunk* step: statistics of one block of rows."""
    G = np.asarray(G, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    # vdot: the sum of squares without an X-sized temporary (0.9 s for 10k × 5k)
    return GramStats(G.T @ G, G.T @ X, G.sum(axis=0), X.sum(axis=0), float(np.vdot(X, X)), G.shape[0])


def sum_stats(parts: Sequence[GramStats]) -> GramStats:
    """The *combine* step: statistics of the union of row sets."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def accumulate(
    g_blocks: Sequence[Any],
    x_blocks: Sequence[Any],
    block_group: Sequence[int],
    n_groups: int,
    *,
    split_every: int = SPLIT_EVERY,
) -> Delayed:
    """Lazy statistics of every group (fold) of perturbation blocks.

    Parameters
    ----------
    g_blocks, x_blocks
        Feature rows and target rows of each block (arrays, dask arrays or
        delayed objects); every block belongs to one group.
    block_group
        Group of each block, ``0 .. n_groups-1``.
    n_groups
        Number of groups; each needs at least one block.
    split_every
        Inputs per combine task.

    Returns
    -------
    Delayed
        A tuple of :class:`GramStats`, one per group.
    """
    block_group = np.asarray(block_group)
    chunk = delayed(gram_stats, pure=True, name="gram-chunk")
    parts = [chunk(g, x) for g, x in zip(g_blocks, x_blocks)]
    per_group = []
    for group in range(n_groups):
        members = [parts[i] for i in np.flatnonzero(block_group == group)]
        if not members:
            raise ValueError(f"group {group} has no block")
        per_group.append(tree_reduce(members, sum_stats, split_every=split_every, name="gram-combine"))
    return delayed(tuple, pure=True, name="gram-finalize")(per_group)


@dataclass(frozen=True)
class RidgePath:
    """Ridge solutions for every alpha from one eigendecomposition:
    ``θ_α = basis · diag(1/(eigenvalues+α)) · projected``, ``b = x̄ − θ_αᵀḡ``."""

    basis: np.ndarray
    eigenvalues: np.ndarray
    projected: np.ndarray
    g_mean: np.ndarray
    x_mean: np.ndarray
    solver: Literal["primal", "dual"]

    def coef(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """``(θ, intercept)`` for ``alpha``; θ is d × q."""
        theta = self.basis @ (self.projected / (self.eigenvalues + alpha)[:, None])
        return theta, self.x_mean - self.g_mean @ theta

    def squared_errors(self, stats: GramStats, alphas: Sequence[float]) -> np.ndarray:
        """:func:`squared_error` of every alpha's solution on the rows of
        ``stats``, without forming any θ.

        With ``θ_α = E W_α C`` (``E`` the basis, ``W_α = diag(1/(s+α))``, ``C``
        the projected targets) and the rows' statistics centred on the
        training means (``Sgg``, ``Sgx``, ``Sxx``), the error is
        ``Sxx − 2 Σᵢ wᵢ⟨Cᵢ, (EᵀSgx)ᵢ⟩ + Σᵢⱼ wᵢwⱼ (EᵀSggE)ᵢⱼ (CCᵀ)ᵢⱼ``: three
        products once, then ``O(k²)`` per alpha (``k`` eigenvalues) instead
        of two ``d × d × q`` products per alpha.
        """
        g, x = self.g_mean, self.x_mean
        sgg = (stats.gtg - np.outer(g, stats.g_sum) - np.outer(stats.g_sum, g)
               + stats.n * np.outer(g, g))
        sgx = (stats.gtx - np.outer(g, stats.x_sum) - np.outer(stats.g_sum, x)
               + stats.n * np.outer(g, x))
        sxx = stats.x_sq - 2 * x @ stats.x_sum + stats.n * x @ x
        cross = np.einsum("ij,ij->i", self.projected, self.basis.T @ sgx)
        fit = (self.basis.T @ sgg @ self.basis) * self.projected_gram
        errors = []
        for alpha in alphas:
            w = 1.0 / (self.eigenvalues + alpha)
            errors.append(max(float(sxx - 2 * w @ cross + w @ fit @ w), 0.0))
        return np.array(errors)

    def row_pearson(self, G: np.ndarray, X: np.ndarray, alphas: Sequence[float]) -> np.ndarray:
        """Pearson correlation over genes of every row's prediction with its
        target, for every alpha (rows × alphas), without forming any θ.

        Parameters
        ----------
        G, X
            Feature and target rows (the rows scored, not the training rows).
        alphas
            The penalties.

        Returns
        -------
        numpy.ndarray
            ``r[i, j]``: the Pearson of row ``i``'s prediction under
            ``alphas[j]`` with ``X[i]``; NaN where either is constant.

        Notes
        -----
        A row's prediction is ``p = x̄ + u C`` with ``u = a∘w``, ``a = (g −
        ḡ)E`` and ``w = 1/(s+α)``. Centred over genes (``·_c``; ``C_c = C −
        C1 1ᵀ/q``), and since a centred vector is orthogonal to ``1``::

            p_c·x_c = x̄_c·x_c + u (C x_c)
            ‖p_c‖²  = ‖x̄_c‖² + 2 u (C x̄_c) + u (CCᵀ − C1(C1)ᵀ/q) uᵀ

        so ``C X_cᵀ`` is formed once and each alpha costs ``O(n k²)`` (``k``
        eigenvalues), not a prediction of ``n × q`` values.
        """
        G = np.asarray(G, dtype=np.float64)
        X = np.asarray(X, dtype=np.float64)
        q = X.shape[1]
        a = (G - self.g_mean) @ self.basis
        x_c = X - X.mean(axis=1, keepdims=True)
        m_c = self.x_mean - self.x_mean.mean()
        c_one = self.projected.sum(axis=1)
        gram_c = self.projected_gram - np.outer(c_one, c_one) / q
        c_x = x_c @ self.projected.T
        c_m = self.projected @ m_c
        m_x, m_m = x_c @ m_c, m_c @ m_c
        x_norm = np.linalg.norm(x_c, axis=1)
        out = np.empty((len(G), len(alphas)))
        for j, alpha in enumerate(alphas):
            u = a / (self.eigenvalues + alpha)
            dot = m_x + np.einsum("ij,ij->i", u, c_x)
            norm2 = m_m + 2 * u @ c_m + np.einsum("ij,ij->i", u @ gram_c, u)
            denom = np.sqrt(np.maximum(norm2, 0.0)) * x_norm
            with np.errstate(invalid="ignore", divide="ignore"):
                out[:, j] = np.where(denom > 0, dot / denom, np.nan)
        return out

    @functools.cached_property
    def projected_gram(self) -> np.ndarray:
        """``CCᵀ`` of the projected targets (shared by every row set)."""
        return self.projected @ self.projected.T


def primal_path(stats: GramStats) -> RidgePath:
    """Decompose the centred Gram matrix ``A = GᵀG − nḡḡᵀ`` (d × d)."""
    gram, cross = stats.centred()
    eigenvalues, vectors = np.linalg.eigh(gram)
    return RidgePath(vectors, eigenvalues, vectors.T @ cross, stats.g_sum / stats.n,
                     stats.x_sum / stats.n, "primal")


def dual_path(G: np.ndarray, X: np.ndarray) -> RidgePath:
    """Decompose the centred kernel ``K = G_cG_cᵀ`` (n × n) of the rows."""
    G = np.asarray(G, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    g_mean, x_mean = G.mean(axis=0), X.mean(axis=0)
    centred = G - g_mean
    eigenvalues, vectors = np.linalg.eigh(centred @ centred.T)
    return RidgePath(centred.T @ vectors, eigenvalues, vectors.T @ (X - x_mean), g_mean, x_mean, "dual")


def wants_dual(n: int, dim: int, solver: Solver) -> bool:
    """Whether ``solver`` asks for the dual path on ``n`` rows of ``dim``
    features (``auto``: fewer rows than dimensions)."""
    return solver == "dual" or (solver == "auto" and n < dim)


def ridge_path(
    stats: GramStats,
    rows: Rows | None = None,
    solver: Solver = "auto",
    *,
    held_out: Sequence[int] = (),
) -> RidgePath:
    """The path of a training set (``stats``; ``rows`` without the folds in
    ``held_out``): dual when :func:`wants_dual` and the rows are given, else
    primal from ``stats``. The training rows are copied only for the dual."""
    if wants_dual(stats.n, stats.gtg.shape[0], solver) and (rows is not None or solver == "dual"):
        if rows is None:
            raise ParameterError(
                "the dual ridge solver needs the training rows; pass rows=Rows(G, X, fold) "
                "or use solver 'auto' or 'primal'"
            )
        return dual_path(*rows.without(held_out))
    return primal_path(stats)


def squared_error(stats: GramStats, theta: np.ndarray, intercept: np.ndarray) -> float:
    """``‖X − Gθ − 1bᵀ‖²`` over the rows summarised by ``stats`` (see Notes)."""
    fitted = stats.g_sum @ theta
    value = (
        stats.x_sq
        - 2 * np.sum(theta * stats.gtx)
        - 2 * intercept @ stats.x_sum
        + np.sum(theta * (stats.gtg @ theta))
        + 2 * intercept @ fitted
        + stats.n * intercept @ intercept
    )
    return max(float(value), 0.0)


def check_alphas(alphas: float | Sequence[float]) -> tuple[float, ...]:
    """A grid (or one alpha), validated (:func:`.validate.check_alphas`), unique and sorted."""
    return tuple(sorted(set(validate.check_alphas(alphas).tolist())))


@dataclass(frozen=True)
class Rows:
    """Feature and target rows with their fold: what the dual solver and
    choosing alpha by Pearson need.

    ``G`` and ``X`` are numpy arrays, dask arrays or anything indexable by an
    array of row positions (lazily encoded features): the rows of a fold are
    read a block of ``block_size`` at a time (:meth:`of`), and only the dual
    solver, which runs with fewer rows than feature dimensions, holds its
    training rows whole (:meth:`without`). Rows of a negative fold
    (:data:`.splits.UNUSED`) take no part.
    """

    G: Any
    X: Any
    fold: np.ndarray
    block_size: int = BLOCK_SIZE

    def without(self, folds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The rows of every fold but ``folds``, whole."""
        keep = np.flatnonzero((self.fold >= 0) & ~np.isin(self.fold, list(folds)))
        return read_rows(self.G, keep), read_rows(self.X, keep)

    def of(self, fold: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The rows of ``fold``, block by block."""
        for block in position_blocks(np.flatnonzero(self.fold == fold), self.block_size):
            yield read_rows(self.G, block), read_rows(self.X, block)


def training_stats(total: GramStats, fold_stats: Sequence[GramStats], exclude: Sequence[int]) -> GramStats:
    """Statistics of every fold but ``exclude``: the total minus those folds."""
    out = total
    for k in exclude:
        out = out - fold_stats[k]
    return out


def validation_sums(
    path: RidgePath,
    stats: GramStats,
    alphas: Sequence[float],
    rows: Iterable[tuple[np.ndarray, np.ndarray]] | None = None,
) -> Sums:
    """:data:`Sums` of every alpha's solution on one row set: ``mse`` from
    its statistics (squared errors, number of values) and, when its ``rows``
    are given (blocks ``(G, X)``, :meth:`Rows.of`), ``pearson_delta``
    (per-row Pearson summed, number of rows where it is defined)."""
    q = stats.gtx.shape[1]
    sums = {"mse": (path.squared_errors(stats, alphas), np.full(len(alphas), float(stats.n * q)))}
    if rows is not None:
        total, count = np.zeros(len(alphas)), np.zeros(len(alphas))
        for G, X in rows:
            r = path.row_pearson(G, X, alphas)
            total += np.nansum(r, axis=0)
            count += np.sum(~np.isnan(r), axis=0)
        sums["pearson_delta"] = (total, count)
    return sums


def pool(parts: Sequence[Sums]) -> dict[str, np.ndarray]:
    """Each metric of several row sets pooled: ``Σ sum / Σ count`` per alpha
    (NaN where nothing was counted)."""
    out = {}
    for metric in parts[0]:
        total = np.sum([part[metric][0] for part in parts], axis=0)
        count = np.sum([part[metric][1] for part in parts], axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[metric] = np.where(count > 0, total / np.where(count > 0, count, 1), np.nan)
    return out


def inner_cv(
    fold_stats: Sequence[GramStats],
    alphas: Sequence[float],
    *,
    exclude: Sequence[int] = (),
    rows: Rows | None = None,
    solver: Solver = "auto",
    scores: FoldScores | None = None,
) -> dict[str, np.ndarray]:
    """K-fold validation metrics per alpha over the folds not in ``exclude``.

    Each remaining fold is held out in turn from a model trained on the other
    remaining folds, and scored (:func:`validation_sums`); the scores are
    pooled over all its rows (:func:`pool`): ``mse`` always,
    ``pearson_delta`` (the mean over held-out rows of the per-row Pearson)
    when ``rows`` are given.

    ``scores`` carries the sums between calls, keyed by (held-out folds,
    scored fold): the model trained without folds ``{k, j}`` scores both
    ``j`` (for ``exclude=(k,)``) and ``k`` (for ``exclude=(j,)``), so nested
    CV decomposes each pair of folds once, not twice.
    """
    folds = [k for k in range(len(fold_stats)) if k not in set(exclude)]
    if len(folds) < 2:
        raise ParameterError(
            f"choosing alpha by cross-validation needs at least 2 folds to train on, "
            f"{len(folds)} left; use more folds or give one --alpha"
        )
    total = sum_stats(list(fold_stats))
    shared = scores is not None
    scores = scores if shared else {}
    parts = []
    for j in folds:
        held_out = (*exclude, j)
        key = frozenset(held_out)
        if (key, j) not in scores:
            train = training_stats(total, fold_stats, held_out)
            path = ridge_path(train, rows, solver, held_out=held_out)
            for scored in held_out if shared else (j,):
                scored_rows = None if rows is None else rows.of(scored)
                scores[key, scored] = validation_sums(path, fold_stats[scored], alphas, scored_rows)
        parts.append(scores.pop((key, j)))
    return pool(parts)


def cv_error(
    fold_stats: Sequence[GramStats],
    alphas: Sequence[float],
    *,
    exclude: Sequence[int] = (),
    rows: Rows | None = None,
    solver: Solver = "auto",
    scores: FoldScores | None = None,
) -> np.ndarray:
    """K-fold validation MSE per alpha (:func:`inner_cv`'s ``mse``), pooled
    over all rows and targets of the folds not in ``exclude``."""
    return inner_cv(fold_stats, alphas, exclude=exclude, rows=rows, solver=solver, scores=scores)["mse"]


def check_select_by(select_by: str) -> SelectBy:
    """``select_by``, checked against :data:`SELECT_BY`."""
    if select_by not in SELECT_BY:
        raise ParameterError(f"select_by {select_by!r}: use one of {', '.join(SELECT_BY)}")
    return select_by  # type: ignore[return-value]


def best_alpha(alphas: Sequence[float], cv: dict[str, np.ndarray], select_by: SelectBy) -> float:
    """The alpha of the grid with the best ``cv[select_by]`` (ties: the
    smallest alpha); by ``mse`` where ``select_by`` is undefined everywhere
    (e.g. Pearson on one gene)."""
    values = cv[select_by]
    if np.isnan(values).all():
        log.warning("inner-CV %s is undefined for every alpha; alpha is chosen by mse", select_by)
        return best_alpha(alphas, cv, "mse")
    index = np.nanargmax(values) if GREATER_IS_BETTER[select_by] else np.nanargmin(values)
    return alphas[int(index)]


def select_alpha(
    fold_stats: Sequence[GramStats],
    alphas: Sequence[float],
    *,
    select_by: SelectBy = DEFAULT_SELECT_BY,
    exclude: Sequence[int] = (),
    rows: Rows | None = None,
    solver: Solver = "auto",
    scores: FoldScores | None = None,
) -> tuple[float, dict[str, np.ndarray]]:
    """The alpha of the grid chosen by :func:`inner_cv` (same arguments) on
    ``select_by``, and the inner-CV metrics per alpha (``mse`` and
    ``pearson_delta``, NaN where not computed); a single alpha is taken as is.

    Raises
    ------
    ParameterError
        If ``select_by`` is ``pearson_delta`` and the rows are not given.
    """
    select_by = check_select_by(select_by)
    undefined = {metric: np.full(len(alphas), np.nan) for metric in SELECT_BY}
    if len(alphas) == 1:
        return alphas[0], undefined
    if select_by == "pearson_delta" and rows is None:
        raise ParameterError(
            "choosing alpha by pearson_delta needs the feature and delta rows (rows=Rows(G, X, fold)); "
            "pass them, or choose by mse"
        )
    cv = {**undefined, **inner_cv(fold_stats, alphas, exclude=exclude, rows=rows, solver=solver,
                                  scores=scores)}
    return best_alpha(alphas, cv, select_by), cv


@dataclass(frozen=True)
class FoldFit:
    """The model of one outer fold and its alpha path.

    ``path`` has columns ``alpha``, ``train_mse`` (on the training folds),
    ``val_mse`` and ``val_pearson_delta`` (on the held-out fold; the Pearson
    needs the rows), ``inner_cv_mse`` and ``inner_cv_pearson_delta`` (what
    alpha was chosen from, by ``select_by``; NaN when alpha was fixed).
    """

    fold: int
    alpha: float
    coef: np.ndarray
    intercept: np.ndarray
    solver: str
    path: pd.DataFrame = field(repr=False)
    select_by: SelectBy = DEFAULT_SELECT_BY


def cross_validate(
    fold_stats: Sequence[GramStats],
    alphas: float | Sequence[float] = DEFAULT_ALPHAS,
    *,
    rows: Rows | None = None,
    solver: Solver = "auto",
    folds: Sequence[int] | None = None,
    select_by: SelectBy = DEFAULT_SELECT_BY,
) -> list[FoldFit]:
    """Fit the model of every outer fold (or of ``folds``) from fold statistics.

    Fold ``k`` trains on ``total − S_k``. With several alphas, the alpha is
    chosen by an inner K-fold CV on the training folds only
    (:func:`select_alpha` by ``select_by`` with ``exclude=(k,)``); the
    held-out fold never takes part. ``rows`` (needed to choose by
    ``pearson_delta``) also give the held-out Pearson of every alpha.
    """
    alphas = check_alphas(alphas)
    total = sum_stats(list(fold_stats))
    scores: FoldScores = {}  # shared by the inner CVs
    fits = []
    for k in range(len(fold_stats)) if folds is None else folds:
        best, inner = select_alpha(fold_stats, alphas, select_by=select_by, exclude=(k,), rows=rows,
                                   solver=solver, scores=scores)
        train = training_stats(total, fold_stats, (k,))
        path = ridge_path(train, rows, solver, held_out=(k,))
        held_out = pool([validation_sums(path, fold_stats[k], alphas, None if rows is None else rows.of(k))])
        table = pd.DataFrame({
            "alpha": alphas,
            "train_mse": pool([validation_sums(path, train, alphas)])["mse"],
            "val_mse": held_out["mse"],
            "val_pearson_delta": held_out.get("pearson_delta", np.full(len(alphas), np.nan)),
            "inner_cv_mse": inner["mse"],
            "inner_cv_pearson_delta": inner["pearson_delta"],
        })
        fits.append(FoldFit(k, best, *path.coef(best), path.solver, table, select_by))
        log.info("fold %d: alpha %g by inner-CV %s (%s solver, %d training rows)",
                 k, best, select_by, path.solver, train.n)
    return fits


# ------------------------------------------------------------------ model


@dataclass(frozen=True)
class RidgeModel:
    """A fitted GenePert ridge model.

    Attributes
    ----------
    coef
        θ, embedding dimensions × genes.
    intercept
        Per gene.
    alpha
        The penalty used.
    genes
        Output genes (the pseudo-bulk genes), in column order.
    control_mean
        Control pseudo-bulk per gene, so predictions can be given as means.
    train_perturbations
        Perturbations it was trained on.
    metadata
        Embedding identity, normalisation, missing-gene policy, CV path, ….
    """

    coef: np.ndarray
    intercept: np.ndarray
    alpha: float
    genes: pd.Index
    control_mean: np.ndarray
    train_perturbations: pd.Index
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.coef.shape[0]

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted delta (rows × genes) of feature rows."""
        return np.asarray(features) @ self.coef + self.intercept


def save_model(
    model: RidgeModel,
    path: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write a model as a zarr store (with an encoding type and version), atomically."""
    ds = xr.Dataset(
        {
            "coef": (("dim", "gene"), model.coef),
            "intercept": ("gene", model.intercept),
            "control_mean": ("gene", model.control_mean),
        },
        coords={
            "gene": np.asarray(model.genes, dtype=object),
            "train_perturbation": np.asarray(model.train_perturbations, dtype=object),
        },
        attrs={
            **MODEL.attrs(),
            "genepert_scale_version": __version__,
            "alpha": model.alpha,
            "metadata": json.dumps(model.metadata),
        },
    )
    write_dataset(ds, path, overwrite=overwrite, storage_options=storage_options)
    log.info("wrote model %s (d=%d, %d genes, alpha %g)", path, model.dim, len(model.genes), model.alpha)
    return path


def load_model(path: str, storage_options: dict[str, Any] | None = None) -> RidgeModel:
    """Read a model written by :func:`save_model`, checking its encoding."""
    ds = open_checked(MODEL, path, storage_options).load()
    return RidgeModel(
        coef=ds["coef"].values,
        intercept=ds["intercept"].values,
        alpha=float(ds.attrs["alpha"]),
        genes=pd.Index(ds["gene"].values.tolist(), dtype=str),
        control_mean=ds["control_mean"].values,
        train_perturbations=pd.Index(ds["train_perturbation"].values.tolist(), dtype=str),
        metadata=json.loads(ds.attrs["metadata"]),
    )
