"""Ridge solvers against scikit-learn, statistics by blocks, CV by fold statistics,
alpha chosen by inner-CV Pearson or MSE against refitting every alpha."""

from __future__ import annotations

import dask
import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr
from sklearn.linear_model import Ridge

from genepert_scale.errors import ParameterError, StoreError
from genepert_scale.tl.ridge import (
    RidgeModel,
    Rows,
    accumulate,
    check_alphas,
    DEFAULT_ALPHAS,
    cross_validate,
    cv_error,
    dual_path,
    gram_stats,
    load_model,
    primal_path,
    ridge_path,
    save_model,
    select_alpha,
    squared_error,
)

ALPHAS = (0.1, 1.0, 10.0, 100.0)
ALPHAS_WIDE = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


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


def row_pearson(pred, true):
    """Pearson of every row pair, one row at a time (scipy)."""
    return np.array([pearsonr(p, t).statistic for p, t in zip(pred, true)])


@pytest.mark.parametrize("n,d", [(60, 12), (15, 40)], ids=["primal", "dual"])
def test_row_pearson_of_every_alpha_equals_that_of_explicit_predictions(n, d):
    G, X = problem(n + 10, d, 30, seed=4)
    path = primal_path(gram_stats(G[:n], X[:n])) if n >= d else dual_path(G[:n], X[:n])
    got = path.row_pearson(G[n:], X[n:], DEFAULT_ALPHAS)
    for j, alpha in enumerate(DEFAULT_ALPHAS):
        theta, b = path.coef(alpha)
        np.testing.assert_allclose(got[:, j], row_pearson(G[n:] @ theta + b, X[n:]), rtol=1e-9, atol=1e-12)


def test_row_pearson_of_a_constant_row_is_nan():
    G, X = problem(30, 4, 5)
    X_test = np.vstack([X[:2], np.full((1, 5), 2.0)])
    got = primal_path(gram_stats(G, X)).row_pearson(G[:3], X_test, ALPHAS)
    assert np.isnan(got[2]).all() and np.isfinite(got[:2]).all()


def test_default_grid_is_log_spaced_from_1e_3_to_1e3():
    assert len(DEFAULT_ALPHAS) == 13 and DEFAULT_ALPHAS[0] == 1e-3 and DEFAULT_ALPHAS[-1] == 1e3
    np.testing.assert_allclose(np.diff(np.log10(DEFAULT_ALPHAS)), 0.5, atol=2e-3)


@pytest.mark.parametrize("select_by", ["pearson_delta", "mse"])
@pytest.mark.parametrize("n,d", [(80, 10), (30, 40)], ids=["primal", "dual"])
def test_cross_validation_equals_refitting_every_alpha_on_every_inner_fold(n, d, select_by):
    """The oracle: scikit-learn's Ridge refitted for every alpha on every
    inner fold; inner MSE pooled over values, inner Pearson the mean over the
    inner held-out perturbations of their per-perturbation Pearson."""
    G, X = problem(n, d, 6, seed=3)
    X[:, :3] += np.random.default_rng(8).normal(scale=4.0, size=(n, 3))  # so the two rules can differ
    k = 4
    fold = np.arange(n) % k
    fold_stats = blocked_stats(G, X, 5, n_groups=k, group_of_row=fold)
    fits = cross_validate(fold_stats, ALPHAS_WIDE, rows=Rows(G, X, fold), select_by=select_by)
    for fit in fits:
        train, test = fold != fit.fold, fold == fit.fold
        inner_mse, inner_pearson = [], []
        for alpha in ALPHAS_WIDE:
            sse, r = 0.0, []
            for j in set(range(k)) - {fit.fold}:
                t = train & (fold != j)
                pred = Ridge(alpha=alpha).fit(G[t], X[t]).predict(G[fold == j])
                sse += np.sum((X[fold == j] - pred) ** 2)
                r.extend(row_pearson(pred, X[fold == j]))
            inner_mse.append(sse / (train.sum() * X.shape[1]))
            inner_pearson.append(np.mean(r))
        np.testing.assert_allclose(fit.path["inner_cv_mse"], inner_mse, rtol=1e-8)
        np.testing.assert_allclose(fit.path["inner_cv_pearson_delta"], inner_pearson, rtol=1e-8)
        chosen = np.argmax(inner_pearson) if select_by == "pearson_delta" else np.argmin(inner_mse)
        assert fit.alpha == ALPHAS_WIDE[int(chosen)] and fit.select_by == select_by
        theta, b = sklearn_fit(G[train], X[train], fit.alpha)
        assert rel(fit.coef, theta) < 1e-8 and rel(fit.intercept, b) < 1e-8
        for alpha, row in zip(ALPHAS_WIDE, fit.path.itertuples()):
            theta, b = sklearn_fit(G[train], X[train], alpha)
            assert row.train_mse == pytest.approx(np.mean((X[train] - G[train] @ theta - b) ** 2), rel=1e-8)
            assert row.val_mse == pytest.approx(np.mean((X[test] - G[test] @ theta - b) ** 2), rel=1e-8)
            assert row.val_pearson_delta == pytest.approx(
                np.mean(row_pearson(G[test] @ theta + b, X[test])), rel=1e-8)


def test_the_two_rules_choose_differently_where_mse_rewards_shrinking():
    """Noisy targets: MSE gains by shrinking every prediction towards the
    mean (larger alpha) where the per-row pattern, which Pearson scores, is
    followed better at a smaller alpha."""
    rng = np.random.default_rng(0)
    n, d, q = 40, 8, 50
    G = rng.normal(size=(n, d))
    X = G @ rng.normal(size=(d, q)) + rng.normal(scale=3.0, size=(n, q)) + rng.normal(size=q)
    fold = np.arange(n) % 4
    fold_stats = blocked_stats(G, X, 10, n_groups=4, group_of_row=fold)
    rows = Rows(G, X, fold)
    by = {rule: select_alpha(fold_stats, ALPHAS_WIDE, select_by=rule, rows=rows)
          for rule in ("mse", "pearson_delta")}
    assert by["pearson_delta"][0] < by["mse"][0]
    for rule, (alpha, cv) in by.items():
        best = np.argmax(cv[rule]) if rule == "pearson_delta" else np.argmin(cv[rule])
        assert alpha == ALPHAS_WIDE[int(best)]


def test_pearson_selection_needs_rows_and_a_known_rule():
    G, X = problem(40, 5, 3)
    stats = blocked_stats(G, X, 8, 4, np.arange(40) % 4)
    with pytest.raises(ParameterError, match="needs the feature and delta rows"):
        select_alpha(stats, ALPHAS)
    with pytest.raises(ParameterError, match="select_by"):
        select_alpha(stats, ALPHAS, select_by="r2", rows=Rows(G, X, np.arange(40) % 4))
    assert select_alpha(stats, ALPHAS, select_by="mse")[0] in ALPHAS


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
    with pytest.raises(StoreError, match="is not a model store .encoding-type None"):
        load_model(str(tmp_path / "other.zarr"))
