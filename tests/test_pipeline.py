"""Batch runs: stage fingerprints, skipping current stages, redoing stale ones,
resuming a killed run; and ``genepert-scale run`` end to end on the
pseudo-bulk stage."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cloud_helpers import (
    assert_same_pseudobulk,
    make_screen,
    subprocess_env,
    write_config,
)

from genepert_scale.cli.commands import main
from genepert_scale.cli.config import load_config
from genepert_scale.errors import ParameterError
from genepert_scale.cli.pipeline import (
    STAGES,
    Stage,
    StageRun,
    default_until,
    read_record,
    run_stages,
    select,
)
from genepert_scale.pp.aggregate import open_pseudobulk, pseudobulk
from genepert_scale.tl.scoring import target_genes


class Recorder:
    """Toy stage runners that write their output file and log their calls."""

    def __init__(self):
        self.calls: list[str] = []
        self.fail: str | None = None

    def runner(self, name: str):
        def run(job: StageRun) -> None:
            self.calls.append(name)
            if self.fail == name:
                raise KeyboardInterrupt(f"killed in {name}")
            Path(job.output).parent.mkdir(parents=True, exist_ok=True)
            Path(job.output).write_text(f"{name} from {sorted(job.inputs)}")

        return run


@pytest.fixture
def toy(tmp_path):
    source = tmp_path / "input.txt"
    source.write_text("cells")
    recorder = Recorder()
    stages = [
        Stage("first", "first.txt", ("screen",),
              lambda c: {"n_top_genes": c.pseudobulk.n_top_genes}, recorder.runner("first")),
        Stage("second", "second.txt", ("first",),
              lambda c: {"folds": c.evaluate.folds}, recorder.runner("second")),
    ]

    def run(folds: int = 5, **options):
        config_path = write_config(tmp_path / "run.toml", screen=str(source),
                                   out=str(tmp_path / "out"),
                                   extra=f"[evaluate]\nfolds = {folds}\n")
        recorder.calls.clear()
        outcome = run_stages(load_config(str(config_path)), stages, **options)
        return {p.stage.name: what for p, what in outcome}

    return run, recorder, source, tmp_path / "out"


def test_rerun_skips_current_stages(toy):
    run, recorder, _, _ = toy
    assert run() == {"first": "ran", "second": "ran"}
    assert run() == {"first": "skipped", "second": "skipped"}
    assert recorder.calls == []


def test_changed_parameter_redoes_that_stage_only(toy):
    run, recorder, _, _ = toy
    run()
    assert run(folds=3) == {"first": "skipped", "second": "ran"}


def test_changed_input_redoes_every_stage(toy):
    run, _, source, _ = toy
    run()
    source.write_text("other cells")
    assert run() == {"first": "ran", "second": "ran"}


def test_killed_run_resumes_at_the_interrupted_stage(toy):
    run, recorder, _, out = toy
    recorder.fail = "second"
    with pytest.raises(KeyboardInterrupt):
        run()
    assert (out / "_stages" / "first.json").exists()
    assert not (out / "_stages" / "second.json").exists()
    recorder.fail = None
    assert run() == {"first": "skipped", "second": "ran"}


def test_missing_output_is_redone(toy):
    run, _, _, out = toy
    run()
    (out / "first.txt").unlink()
    # second's inputs are unchanged (same fingerprint of first), so it stays current
    assert run() == {"first": "ran", "second": "skipped"}


def test_force_and_dry_run(toy):
    run, recorder, _, _ = toy
    assert run(dry_run=True) == {"first": "would run", "second": "would run"}
    assert recorder.calls == []
    run()
    assert run(force=True) == {"first": "ran", "second": "ran"}


def test_default_until_follows_the_config(tmp_path):
    screen = make_screen(tmp_path, cells=1000)
    base = dict(screen=screen, out=str(tmp_path / "out"))
    bare = load_config(str(write_config(tmp_path / "a.toml", **base)))
    emb = '[embeddings]\npaths = ["emb.pkl"]\n'
    fit_only = load_config(str(write_config(tmp_path / "b.toml", **base, extra=emb)))
    full = load_config(str(write_config(
        tmp_path / "c.toml", **base, extra=emb + '[predict]\nperturbations = ["A"]\n')))
    assert [default_until(c) for c in (bare, fit_only, full)] == ["pseudobulk", "fit", "predict"]


def test_select():
    assert [s.name for s in select(STAGES, "pseudobulk")] == ["pseudobulk"]
    assert [s.name for s in select(STAGES, None)] == [s.name for s in STAGES]
    with pytest.raises(ParameterError, match="unknown stage 'fitt'"):
        select(STAGES, "fitt")


def _run(config: Path, capsys) -> str:
    assert main(["run", str(config), "--until", "pseudobulk", "--no-progress"]) == 0
    return capsys.readouterr().out


def test_run_command_pseudobulk_stage(tmp_path, capsys):
    screen = make_screen(tmp_path / "data")
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", screen=screen, out=str(out))
    assert "pseudobulk   ran" in _run(config, capsys)
    expected = pseudobulk(screen, n_top_genes=100, block_rows=500, group_variance=True, progress=False, as_xarray=True)
    assert_same_pseudobulk(open_pseudobulk(str(out / "pseudobulk.zarr")), expected)
    assert "pseudobulk   skipped" in _run(config, capsys)

    write_config(config, screen=screen, out=str(out), n_top_genes=50)
    assert "pseudobulk   ran" in _run(config, capsys)
    assert open_pseudobulk(str(out / "pseudobulk.zarr")).sizes["gene"] == 50

    make_screen(tmp_path / "data", seed=1)  # the input changes in place
    assert "pseudobulk   ran" in _run(config, capsys)
    expected = pseudobulk(screen, n_top_genes=50, block_rows=500, group_variance=True, progress=False, as_xarray=True)
    assert_same_pseudobulk(open_pseudobulk(str(out / "pseudobulk.zarr")), expected)


def test_run_killed_during_pseudobulk_resumes(tmp_path, capsys):
    screen = make_screen(tmp_path / "data", cells=20_000)
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", screen=screen, out=str(out), block_rows=100)
    proc = subprocess.Popen(
        [sys.executable, "-m", "genepert_scale", "run", str(config), "--until", "pseudobulk",
         "--no-progress"],
        env=subprocess_env(), stderr=subprocess.PIPE, text=True,
    )
    for line in proc.stderr:
        if "genepert_scale.pp.aggregate: pseudobulk" in line:  # the pass is starting
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert read_record(str(out), "pseudobulk", {}) is None
    assert not (out / "pseudobulk.zarr").exists()

    assert "pseudobulk   ran" in _run(config, capsys)
    assert "pseudobulk   skipped" in _run(config, capsys)
    expected = pseudobulk(screen, n_top_genes=100, block_rows=100, group_variance=True, progress=False, as_xarray=True)
    assert_same_pseudobulk(open_pseudobulk(str(out / "pseudobulk.zarr")), expected)


def test_run_exclude_targets_reaches_the_evaluate_stage_only(tmp_path, capsys):
    """``[evaluate] exclude_targets``: the evaluation leaves each perturbation's
    measured target genes out of its metrics; changing it redoes the evaluate
    stage and neither the pseudo-bulk nor the fit."""
    screen = make_screen(tmp_path / "data")
    embedding = screen.replace("screen.zarr", "screen_embedding.pkl")
    out = tmp_path / "out"

    def run(exclude: bool) -> tuple[str, pd.DataFrame, dict]:
        extra = (f'[embeddings]\npaths = ["{embedding}"]\n\n[evaluate]\nfolds = 3\nalphas = [1.0]\n'
                 f"exclude_targets = {str(exclude).lower()}\n")
        config = write_config(tmp_path / "run.toml", screen=screen, out=str(out), extra=extra)
        assert main(["run", str(config), "--until", "fit", "--no-progress"]) == 0
        report = out / "evaluate"
        return (capsys.readouterr().out, pd.read_csv(report / "per_perturbation.csv"),
                json.loads((report / "metrics.json").read_text()))

    printed, excluded, doc = run(True)
    assert re.search(r"evaluate\s+ran", printed) and doc["parameters"]["exclude_targets"] is True
    printed, plain, doc = run(False)
    assert doc["parameters"]["exclude_targets"] is False
    assert re.search(r"evaluate\s+ran", printed)
    assert re.search(r"pseudobulk\s+skipped", printed) and re.search(r"fit\s+skipped", printed)
    excluded, plain = (t.query("model == 'genepert_ridge'").set_index("perturbation") for t in (excluded, plain))
    names = list(plain.index)
    genes = [str(g) for g in open_pseudobulk(str(out / "pseudobulk.zarr"))["gene"].values]
    measured = target_genes(names, genes).any(axis=1)
    assert 0 < measured.sum() < len(names)
    same = np.isclose(excluded.loc[names, "pearson_delta"], plain.loc[names, "pearson_delta"])
    np.testing.assert_array_equal(same, ~measured)
