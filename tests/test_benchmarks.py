"""Smoke test of the benchmark harness on a tiny screen (speed itself is never
asserted here; see benchmarks/run.py)."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


def benchmark_module(name: str):
    """Import ``benchmarks/<name>.py`` (its own imports of ``run`` resolve there)."""
    sys.path.insert(0, str(RUN.parent))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def load_harness():
    return benchmark_module("run")


def test_harness_runs_every_tool_and_writes_json_and_markdown(tmp_path):
    harness = load_harness()
    code = harness.main([
        "--cells", "1500", "--genes", "200", "--perturbations", "12", "--n-top-genes", "50",
        "--wide-perturbations", "0", "--repeats", "1", "--ridge", "120,16,30",
        "--cache", str(tmp_path / "cache"), "--results", str(tmp_path / "results"), "--tag", "smoke",
    ])
    assert code == 0
    report = json.loads((tmp_path / "results" / "smoke.json").read_text())
    assert {"date", "command", "machine", "versions", "summary", "runs"} <= set(report)
    assert {"cpu", "cores", "ram_gib"} <= set(report["machine"])
    main = report["summary"]["screen_1500_200g_12p"]
    assert set(main) == {"floor", "zarr_floor", "group_sum_floor", "ours", "scanpy_dask",
                         "scanpy_memory"}
    for row in main.values():
        assert row["wall_s"] > 0 and row["cpu_s"] > 0 and row["peak_rss_mib"] > 0
    assert main["ours"]["ours_over_floor"] > 0 and main["scanpy_memory"]["peer_over_ours"] > 0
    assert main["ours"]["ours_over_group_sum_floor"] > 0 and main["group_sum_floor"]["over_floor"] > 0
    # both scanpy peers compute the same group means (scanpy 1.12's aggregate on dask, or blocks)
    sums = {r["tool"]: r["summary"]["checksum"] for r in report["runs"] if r["tool"].startswith("scanpy")}
    assert sums["scanpy_dask"] == pytest.approx(sums["scanpy_memory"], rel=1e-6)
    # the group-sum floor did its work: every stored count, added once
    import numpy as np
    import zarr

    stored = zarr.open_group(str(tmp_path / "cache" / "screen_1500_200g_12p.zarr"), mode="r")
    total = int(np.asarray(stored["X"]["data"][:]).astype(np.int64).sum())
    (floor_run,) = [r for r in report["runs"] if r["tool"] == "group_sum_floor"]
    assert floor_run["summary"]["checksum"] == total > 0
    # both read floors decoded every stored value (data, indices and indptr)
    values = sum(stored["X"][name].shape[0] for name in ("data", "indices", "indptr"))
    for tool in ("floor", "zarr_floor"):
        (run,) = [r for r in report["runs"] if r["tool"] == tool]
        assert run["summary"]["values"] == values, tool
    # the peers computed the same groups and genes as each other
    assert main["scanpy_memory"]["runs"] == 1
    for workload in ("every", "select"):
        ridge = report["summary"][f"ridge_P120_d16_q30_{workload}"]
        assert ridge["ridge-eigen"]["cholesky_over_eigen"] > 0
    assert main["scanpy_memory"]["peer_over_ours_by_round"] == [
        main["scanpy_memory"]["wall_s"] / main["ours"]["wall_s"]]  # one round: its median
    assert all(row["cores"] == row["cpu_s"] / row["wall_s"] for row in main.values())
    table_path = tmp_path / "results" / "smoke.md"
    table = table_path.read_text()
    assert "| screen | tool |" in table and "ours / group-sum floor" in table
    assert "cholesky / eigen" in table
    # --render summarizes the stored runs again into the same report
    table_path.unlink()
    assert harness.main(["--render", str(tmp_path / "results" / "smoke.json")]) == 0
    assert table_path.read_text() == table
    assert json.loads((tmp_path / "results" / "smoke.json").read_text()) == report


def test_peer_ratios_are_paired_by_round_and_a_failed_run_leaves_a_gap(tmp_path):
    harness = load_harness()
    runs = [  # (tool, round, wall s, exit code); the VM was slow in round 1
        ("ours", 0, 10.0, 0), ("scanpy_memory", 0, 80.0, 0),
        ("ours", 1, 20.0, 0), ("scanpy_memory", 1, 100.0, 0),
        ("ours", 2, 10.0, 0), ("scanpy_memory", 2, 90.0, 1),
    ]
    results = [harness.Measurement(tool, "s", r, wall, wall * 1.5, 100.0, code)
               for tool, r, wall, code in runs]
    summary = harness.summarize(results)["s"]
    assert summary["scanpy_memory"]["peer_over_ours_by_round"] == [8.0, 5.0, None]
    assert summary["scanpy_memory"]["runs"] == 2 and summary["ours"]["cores"] == 1.5
    report = {"date": "d", "command": "c", "machine": harness.machine(), "versions": {},
              "repeats": 3, "n_top_genes": 5, "summary": harness.summarize(results),
              "runs": [vars(m) for m in results]}
    assert "| 9.0 (8.0, 5.0, –) |" in harness.markdown(report)  # medians 90 s / 10 s
    assert "page cache" not in harness.markdown(report)  # not claimed unless recorded
    path = tmp_path / "old.json"
    path.write_text(json.dumps(report))
    assert harness.main(["--render", str(path)]) == 1  # a run had failed
    (tmp_path / "ab.json").write_text(json.dumps({"runs": {"base": []}}))
    with pytest.raises(SystemExit, match="not a results file of run.py"):
        harness.main(["--render", str(tmp_path / "ab.json")])


def test_default_results_name_never_overwrites_an_earlier_run(tmp_path):
    harness = load_harness()
    assert harness.free_path(tmp_path, "2026-12-01-vm") == tmp_path / "2026-12-01-vm.json"
    (tmp_path / "2026-12-01-vm.json").write_text("{}")
    (tmp_path / "2026-12-01-vm-2.json").write_text("{}")
    assert harness.free_path(tmp_path, "2026-12-01-vm") == tmp_path / "2026-12-01-vm-3.json"
    # a tag names the file as given; either way the folder is made
    assert harness.results_path(tmp_path / "new", "smoke", "x") == tmp_path / "new" / "smoke.json"
    assert (tmp_path / "new").is_dir()
    assert harness.results_path(tmp_path, None, "2026-12-01-vm") == tmp_path / "2026-12-01-vm-3.json"


def test_ridge_stand_ins_agree():
    tasks = benchmark_module("tasks")
    import numpy as np

    G, X = tasks.ridge_problem(80, 10, 7)
    for workload in tasks.WORKLOADS:
        eigen, cholesky = tasks.ridge_eigen(G, X, workload), tasks.ridge_cholesky(G, X, workload)
        assert len(eigen) == len(cholesky) == (len(tasks.ALPHAS) if workload == "every" else 1)
        for a, b in zip(eigen, cholesky):
            np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
    parts = tasks.ridge_parts(G, X)
    assert parts.pop("largest coefficient difference") < 1e-8  # the timed steps agree
    assert set(parts) == {"statistics", "eigen: decomposition + projection",
                          "eigen: coefficients of every alpha", "cholesky: factorisations",
                          "cholesky: solves"}


def test_profile_summary_sums_seconds_per_thread_and_frame():
    profile_pass = benchmark_module("profile_pass")
    speedscope = {
        "shared": {"frames": [{"name": "main", "file": "/x/cli.py", "line": 3},
                              {"name": "fold_rows", "file": "/x/_numba_kernels.py", "line": 153}]},
        "profiles": [{"name": 'Thread 1 "worker"', "unit": "seconds",
                      "samples": [[0, 1], [0, 1], [0], []], "weights": [0.01, 0.01, 0.01, 0.01]}],
    }
    lines = profile_pass.summary(speedscope, top=2).splitlines()
    assert lines == ['Thread 1 "worker": 0.04 s', "      0.02 s  fold_rows (_numba_kernels.py:153)",
                     "      0.01 s  main (cli.py:3)"]


def test_ab_times_two_revisions_and_compares_their_outputs(tmp_path):
    ab = benchmark_module("ab")
    code = ab.main([
        "--base", "HEAD", "--head", "HEAD", "--cells", "1500", "--genes", "200", "--perturbations", "12",
        "--repeats", "1", "--cache", str(tmp_path / "cache"), "--results", str(tmp_path / "results"),
        "--tag", "smoke-ab",
    ])
    assert code == 0
    report = json.loads((tmp_path / "results" / "smoke-ab.json").read_text())
    assert report["sides"]["base"] and report["sides"]["head"]
    for side in ("base", "head"):
        (run,) = report["runs"][side]
        assert run["returncode"] == 0 and run["wall_s"] > 0 and run["peak_rss_mib"] > 0
    # the same code computes the same: every variable compared, all bit-identical
    assert report["identical_outputs"] and all(report["identical_outputs"].values())
    assert report["base_over_head"] > 0 and len(report["round_ratios"]) == 1
    assert report["base_over_head_by_round"] == report["round_ratios"][0] > 0
    assert "base / head wall time" in (tmp_path / "results" / "smoke-ab.md").read_text()


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux-only")
def test_fold_ab_times_two_revisions_on_one_block_and_gives_the_cpus_back(tmp_path):
    fold_ab = benchmark_module("fold_ab")
    cpus = os.sched_getaffinity(0)
    with pytest.raises(SystemExit, match="--cpu 4096 is not one of the CPUs"):
        fold_ab.main(["--base", "HEAD", "--cpu", "4096"])
    code = fold_ab.main([
        "--base", "HEAD", "--head", "HEAD", "--cells", "1500", "--genes", "200", "--perturbations", "12",
        "--repeats", "2", "--cache", str(tmp_path / "cache"), "--results", str(tmp_path / "results"),
        "--tag", "smoke-fold",
    ])
    assert code == 0 and os.sched_getaffinity(0) == cpus
    report = json.loads((tmp_path / "results" / "smoke-fold.json").read_text())
    assert report["values"] > 0 and report["groups"] == 13  # 12 perturbations + control
    for side in ("base", "head"):
        assert len(report["seconds"][side]) == 2 and report["summary"][side]["min_ns"] > 0
    assert report["identical"]  # the same fold twice agrees bit for bit
    assert "base / head median" in (tmp_path / "results" / "smoke-fold.md").read_text()
    # and a difference would show: the same fold of other values is not identical
    block, codes, n_groups, moments = fold_ab.first_block(
        tmp_path / "cache" / "screen_1500_200g_12p.zarr")
    module = fold_ab.load_kernels(None, tmp_path, "fold_check")
    first = fold_ab.fold(module, block, codes, n_groups, moments)
    block.data[0] += 1
    assert not fold_ab.identical(first, fold_ab.fold(module, block, codes, n_groups, moments))


def test_anndata_defaults_store_holds_the_same_screen(tmp_path):
    import anndata as ad
    import numpy as np

    harness = load_harness()
    from genepert_scale.datasets.synth import synth_screen

    screen, _ = synth_screen(str(tmp_path / "s.zarr"), cells=300, genes=40, perturbations=6)
    out = harness.anndata_defaults_store(Path(screen))
    assert out != Path(screen) and out.name.startswith("s-anndata-")
    ours, theirs = ad.read_zarr(screen), ad.read_zarr(out)
    assert (ours.X != theirs.X).nnz == 0 and ours.obs.equals(theirs.obs)
    assert harness.anndata_defaults_store(Path(screen)) == out  # cached
    assert np.array_equal(ours.var_names, theirs.var_names)


def test_budget_runs_on_the_screen_and_its_sorted_copy_with_equal_results(tmp_path, monkeypatch):
    from genepert_scale.datasets.synth import synth_screen

    budget = benchmark_module("budget")
    screen, _ = synth_screen(str(tmp_path / "s.zarr"), cells=2000, genes=300, perturbations=30)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert budget.main([screen, "--limits", "default,3GiB", "--n-top-genes", "100", "--sorted",
                        "--results", str(tmp_path / "results")]) == 0
    (report,) = (tmp_path / "results").glob("*-memory-budget-s.json")
    runs = json.loads(report.read_text())
    assert [r["run"] for r in runs["runs"]] == ["default", "sort (3GiB)", "3GiB"]
    assert all(r["returncode"] == 0 for r in runs["runs"]) and runs["runs"][2]["same_as_first"]
    assert runs["read_floor_s"] > 0 and runs["write_floor_s"] > 0


def test_each_ab_side_runs_the_package_on_its_pythonpath(tmp_path, monkeypatch):
    # run from the checkout's root, whose own genepert_scale must not shadow the side's
    ab, harness = benchmark_module("ab"), load_harness()
    side = tmp_path / "side" / "genepert_scale"
    side.mkdir(parents=True)
    (side / "__init__.py").write_text("")
    (side / "__main__.py").write_text("print('the side package')\n")
    monkeypatch.chdir(RUN.parents[1])
    *_, code, stdout = harness.measure(ab.pseudobulk_argv(tmp_path / "s.zarr", tmp_path / "o.zarr"),
                                       dict(os.environ, PYTHONPATH=str(side.parent)))
    assert code == 0 and stdout.strip() == "the side package"
