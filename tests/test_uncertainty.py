"""Bootstrap intervals and paired tests against scipy, and where an
evaluation and its metrics.json carry them."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from scipy import stats

from genepert_scale.tl.evaluate import paired_tests, summarize
from genepert_scale.tl.scoring import RIDGE
from genepert_scale.tl.uncertainty import BATCH, bootstrap_ci, paired_test


@pytest.mark.parametrize("n,n_resamples", [(37, 2000), (5, 250), (200, 999)])
def test_bootstrap_ci_equals_scipy_percentile_bootstrap(n, n_resamples):
    values = np.random.default_rng(n).normal(size=n)
    expected = stats.bootstrap((values,), np.mean, method="percentile", n_resamples=n_resamples,
                               batch=BATCH, rng=np.random.default_rng(7), vectorized=True)
    low, high = bootstrap_ci(values, n_resamples=n_resamples, seed=7)
    assert low == pytest.approx(expected.confidence_interval.low, rel=1e-12)
    assert high == pytest.approx(expected.confidence_interval.high, rel=1e-12)


def test_bootstrap_ci_leaves_nan_out_and_is_seeded():
    values = np.random.default_rng(0).normal(size=20)
    values[[2, 7]] = np.nan
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values[np.isfinite(values)], seed=3)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    assert all(np.isnan(bootstrap_ci(np.full(4, np.nan))))


def test_paired_test_equals_scipy_wilcoxon_on_the_pairs_both_score():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.3, 0.1, size=40), rng.normal(0.25, 0.1, size=40)
    b[[3, 9]] = np.nan
    got = paired_test(a, b)
    keep = np.isfinite(b)
    expected = stats.wilcoxon(a[keep], b[keep])
    assert got["n"] == 38 and got["test"] == "wilcoxon"
    assert got["statistic"] == expected.statistic and got["pvalue"] == pytest.approx(expected.pvalue, rel=1e-12)
    assert got["mean_difference"] == pytest.approx(np.mean(a[keep] - b[keep]))
    assert got["median_difference"] == pytest.approx(np.median(a[keep] - b[keep]))
    same = paired_test(a, a)
    assert same["pvalue"] is None and same["n"] == 40 and same["mean_difference"] == 0.0
    assert paired_test(a, np.full(40, np.nan))["n"] == 0


def per_perturbation_table(seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    names = [f"P{i}" for i in range(30)]
    rows = []
    for model, shift in ((RIDGE, 0.1), ("mean_baseline", 0.0), ("additive", 0.05)):
        values = rng.normal(0.3 + shift, 0.1, size=30)
        if model == "additive":
            values[::2] = np.nan  # unscored
        rows.append(pd.DataFrame({"perturbation": names, "fold": np.arange(30) % 3, "model": model,
                                  "pearson_delta": values, "rmse_delta": 1 - values}))
    table = pd.concat(rows, ignore_index=True)
    # order of the other models' rows must not matter: pairs are matched by perturbation
    return pd.concat([table[table.model == RIDGE], table[table.model != RIDGE].sample(frac=1, random_state=1)])


def test_summary_intervals_and_paired_tests_of_an_evaluation_table():
    from genepert_scale.tl.metrics import METRICS

    table = per_perturbation_table()
    for metric in METRICS:
        if metric not in table:
            table[metric] = 0.5
    summary = summarize(table, ci_seed=5, n_resamples=500)
    for model, part in table.groupby("model"):
        for metric in ("pearson_delta", "rmse_delta"):
            assert summary[model][metric]["ci95"] == list(bootstrap_ci(part[metric].to_numpy(), n_resamples=500, seed=5))
        assert "ci95" not in summary[model]["mae_delta"]
    assert "ci95" not in summarize(table)[RIDGE]["pearson_delta"]
    tests = paired_tests(table)
    assert set(tests) == {"mean_baseline", "additive"}
    wide = table.pivot(index="perturbation", columns="model", values="pearson_delta")
    for model in tests:
        keep = wide[model].notna()
        expected = stats.wilcoxon(wide.loc[keep, RIDGE], wide.loc[keep, model])
        assert tests[model]["pearson_delta"]["pvalue"] == pytest.approx(expected.pvalue, rel=1e-12)
        assert tests[model]["pearson_delta"]["n"] == int(keep.sum())
    assert tests["additive"]["pearson_delta"]["n"] == 15
