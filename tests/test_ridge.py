"""Ridge solvers against scikit-learn, statistics by blocks, CV by fold statistics."""

from __future__ import annotations

import dask
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import Ridge

from genepert_scale.errors import ParameterError, StoreError
from genepert_scale.tl.ridge import (
    RidgeModel,
    Rows,
    accumulate,
    check_alphas,
    cross_validate,
    cv_error,
    dual_path,
    gram_stats,
    load_model,
    primal_path,
    ridge_path,
    save_model,
    squared_error,
)

ALPHAS = (0.1, 1.0, 10.0, 100.0)


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


def problem(n, d, q, seed=0):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(n, d)) + rng.normal(size=d)  # off-centre, so the intercept matters
    X = G @ rng.normal(size=(d, q)) + rng.normal(size=(n, q)) + 3.0
    return G, X


def sklearn_fit(G, X, alpha):
    model = Ridge(alpha=alpha, fit_intercept=True).fit(G, X)
    return model.coef_.T, model.intercept_


def blocked_stats(G, X, block, n_groups=1, group_of_row=None):
    group_of_row = np.zeros(len(G), int) if group_of_row is None else group_of_row
    order = np.argsort(group_of_row, kind="stable")
    g_blocks, x_blocks, groups = [], [], []
    for k in range(n_groups):
        rows = order[group_of_row[order] == k]
        for start in range(0, len(rows), block):
            idx = rows[start : start + block]
            g_blocks.append(G[idx])
            x_blocks.append(X[idx])
            groups.append(k)
    with dask.config.set(scheduler="sync"):
        (stats,) = dask.compute(accumulate(g_blocks, x_blocks, groups, n_groups, split_every=3))
    return stats


@pytest.mark.parametrize("n,d", [(60, 12), (15, 40)], ids=["P>d", "P<d"])
@pytest.mark.parametrize("block", [None, 4, 7])
def test_matches_sklearn(n, d, block):
    G, X = problem(n, d, q=9, seed=n + d)
    stats = gram_stats(G, X) if block is None else blocked_stats(G, X, block)[0]
    paths = [primal_path(stats), dual_path(G, X), ridge_path(stats, Rows(G, X, np.zeros(len(G))))]
    assert paths[2].solver == ("dual" if n < d else "primal")
    for alpha in ALPHAS:
        theta_ref, b_ref = sklearn_fit(G, X, alpha)
        for path in paths:
            theta, b = path.coef(alpha)
            assert rel(theta, theta_ref) < 1e-8, (path.solver, alpha)
            assert rel(b, b_ref) < 1e-8, (path.solver, alpha)


def test_blocked_statistics_equal_one_block():
    G, X = problem(50, 6, 5)
    whole = gram_stats(G, X)
    blocked = blocked_stats(G, X, 6)[0]
    for a, b in zip(whole._fields(), blocked._fields()):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert blocked.n == 50


def test_squared_error_from_statistics():
    G, X = problem(40, 5, 4)
    theta, b = np.random.default_rng(1).normal(size=(5, 4)), np.arange(4.0)
    direct = np.sum((X - G @ theta - b) ** 2)
    assert squared_error(gram_stats(G, X), theta, b) == pytest.approx(direct, rel=1e-10)


@pytest.mark.parametrize("n,d", [(80, 10), (12, 30)], ids=["primal", "dual"])
def test_path_errors_of_every_alpha_equal_those_of_explicit_coefficients(n, d):
    G, X = problem(n + 25, d, 7, seed=5)
    train, held_out = gram_stats(G[:n], X[:n]), gram_stats(G[n:], X[n:])
    path = primal_path(train) if n >= d else dual_path(G[:n], X[:n])
    for stats in (train, held_out):
        explicit = [squared_error(stats, *path.coef(a)) for a in ALPHAS]
        direct = [np.sum((X_ - G_ @ path.coef(a)[0] - path.coef(a)[1]) ** 2) for a in ALPHAS
                  for G_, X_ in [(G[:n], X[:n]) if stats is train else (G[n:], X[n:])]]
        np.testing.assert_allclose(path.squared_errors(stats, ALPHAS), explicit, rtol=1e-8)
        np.testing.assert_allclose(path.squared_errors(stats, ALPHAS), direct, rtol=1e-8)


@pytest.mark.parametrize("n,d", [(80, 10), (30, 40)], ids=["primal", "dual"])
def test_cross_validation_equals_refitting_every_fold(n, d):
    G, X = problem(n, d, 6, seed=3)
    k = 4
    fold = np.arange(n) % k
    fold_stats = blocked_stats(G, X, 5, n_groups=k, group_of_row=fold)
    rows = Rows(G, X, fold)
    fits = cross_validate(fold_stats, ALPHAS, rows=rows)
    for fit in fits:
        train, test = fold != fit.fold, fold == fit.fold
        # inner CV: every other fold held out from the remaining ones, pooled
        inner = []
        for alpha in ALPHAS:
            sse = 0.0
            for j in set(range(k)) - {fit.fold}:
                t = train & (fold != j)
                theta, b = sklearn_fit(G[t], X[t], alpha)
                sse += np.sum((X[fold == j] - G[fold == j] @ theta - b) ** 2)
            inner.append(sse / (train.sum() * X.shape[1]))
        np.testing.assert_allclose(fit.path["inner_cv_mse"], inner, rtol=1e-8)
        assert fit.alpha == ALPHAS[int(np.argmin(inner))]
        theta, b = sklearn_fit(G[train], X[train], fit.alpha)
        assert rel(fit.coef, theta) < 1e-8 and rel(fit.intercept, b) < 1e-8
        for alpha, row in zip(ALPHAS, fit.path.itertuples()):
            theta, b = sklearn_fit(G[train], X[train], alpha)
            assert row.train_mse == pytest.approx(np.mean((X[train] - G[train] @ theta - b) ** 2), rel=1e-8)
            assert row.val_mse == pytest.approx(np.mean((X[test] - G[test] @ theta - b) ** 2), rel=1e-8)


def test_fixed_alpha_skips_inner_cv():
    G, X = problem(40, 5, 3)
    fold = np.arange(40) % 2
    fits = cross_validate(blocked_stats(G, X, 8, 2, fold), 3.0)
    assert [f.alpha for f in fits] == [3.0, 3.0]
    assert fits[0].path["inner_cv_mse"].isna().all()
    theta, _ = sklearn_fit(G[fold == 1], X[fold == 1], 3.0)
    assert rel(fits[0].coef, theta) < 1e-8


def test_inner_cv_needs_two_training_folds():
    G, X = problem(20, 3, 2)
    stats = blocked_stats(G, X, 5, 2, np.arange(20) % 2)
    with pytest.raises(ParameterError, match="at least 2 folds"):
        cv_error(stats, ALPHAS, exclude=(0,))


@pytest.mark.parametrize("bad", [0, -1, [1, float("nan")], []])
def test_bad_alphas(bad):
    with pytest.raises(ParameterError):
        check_alphas(bad)


def test_model_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    model = RidgeModel(
        rng.normal(size=(4, 3)), rng.normal(size=3), 10.0, pd.Index(["a", "b", "c"]),
        rng.normal(size=3), pd.Index(["P1", "P1+P2"]), {"embedding": [{"path": "e.pkl", "dim": 4}]},
    )
    path = save_model(model, str(tmp_path / "m.zarr"))
    back = load_model(path)
    np.testing.assert_array_equal(back.coef, model.coef)
    np.testing.assert_array_equal(back.intercept, model.intercept)
    assert back.alpha == 10.0 and list(back.genes) == ["a", "b", "c"]
    assert list(back.train_perturbations) == ["P1", "P1+P2"] and back.metadata == model.metadata
    with pytest.raises(StoreError, match="already exists"):
        save_model(model, path)


def test_load_model_rejects_other_stores(tmp_path):
    import xarray as xr

    xr.Dataset({"a": ("x", [1.0])}).to_zarr(tmp_path / "other.zarr", consolidated=False)
    with pytest.raises(StoreError, match="not a genepert_scale model"):
        load_model(str(tmp_path / "other.zarr"))
