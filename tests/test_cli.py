from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from genepert_scale.cli.commands import main
from genepert_scale.errors import INPUT_ERROR_EXIT_CODE


def test_synth_then_pseudobulk_from_the_command_line(tmp_path, capsys):
    screen = tmp_path / "screen.zarr"
    assert main(["synth", str(screen), "--cells", "1500", "--genes", "150",
                 "--perturbations", "15", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert "embedding:" in printed and (tmp_path / "screen_embedding.pkl").exists()
    out = tmp_path / "pb.zarr"
    assert main(["pseudobulk", str(screen), "--perturbation-key", "perturbation",
                 "--control", "non-targeting", "--out", str(out), "--n-top-genes", "40",
                 "--no-progress"]) == 0
    ds = xr.open_zarr(out)
    assert ds.sizes["gene"] == 40 and ds.sizes["perturbation"] == 15
    assert np.isfinite(ds.delta.values).all()
    # an existing output is kept unless --overwrite
    code = main(["pseudobulk", str(screen), "--out", str(out), "--no-progress"])
    assert code == INPUT_ERROR_EXIT_CODE
    assert "already exists" in capsys.readouterr().err


def test_missing_column_is_a_clean_error_in_a_subprocess(small_screen):
    path, _ = small_screen
    result = subprocess.run(
        [sys.executable, "-m", "genepert_scale", "pseudobulk", path, "--perturbation-key", "guide",
         "--out", "never-written.zarr"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == INPUT_ERROR_EXIT_CODE
    assert "obs has no column 'guide'" in result.stderr and "perturbation" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [[sys.executable, "-m", "genepert_scale"], ["genepert-scale"]],
                         ids=["python -m", "console script"])
def test_the_command_ends_with_its_exit_code_and_all_it_printed(tmp_path, command):
    """Both entry points end with the command's own exit code and everything
    it printed and logged, even block-buffered."""
    if len(command) == 1:
        script = Path(sys.executable).with_name(command[0])
        if not script.exists():
            pytest.skip(f"{command[0]} is not installed beside {sys.executable}")
        command = [str(script)]
    # block-buffered output (to a pipe, without PYTHONUNBUFFERED) is lost unless flushed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    out = tmp_path / "s.zarr"
    done = subprocess.run([*command, "synth", str(out), "--cells", "300", "--genes", "40",
                           "--perturbations", "5", "--no-progress", "-v"],
                          capture_output=True, text=True, check=False, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(f"embedding: {out.with_name('s_embedding.pkl')}\n")
    failed = subprocess.run([*command, "pseudobulk", str(out), "--perturbation-key", "guide",
                             "--out", str(tmp_path / "pb.zarr"), "--no-progress"],
                            capture_output=True, text=True, check=False, env=env)
    assert failed.returncode == INPUT_ERROR_EXIT_CODE
    assert failed.stderr.rstrip().endswith("Pass the right one with --perturbation-key")


def test_under_a_profiler_the_command_ends_the_usual_way(tmp_path):
    """cProfile (like coverage) writes its results at exit."""
    stats = tmp_path / "synth.prof"
    done = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(stats), "-m", "genepert_scale", "synth",
         str(tmp_path / "s.zarr"), "--cells", "200", "--genes", "20", "--perturbations", "3",
         "--no-progress"],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert stats.stat().st_size > 0


def test_convert_command(papalexi_path, tmp_path):
    out = tmp_path / "papalexi.zarr"
    assert main(["convert", str(papalexi_path), str(out)]) == 0
    assert main(["pseudobulk", str(out), "--control", "control", "--n-top-genes", "all",
                 "--out", str(tmp_path / "pb.zarr"), "--no-progress"]) == 0
    assert xr.open_zarr(tmp_path / "pb.zarr").sizes["perturbation"] == 25


def test_existing_output_fails_before_any_work(tmp_path, capsys):
    """An existing --out is refused up front (not after the computation): the
    input here does not even exist, yet the output is what gets reported."""
    (tmp_path / "report").mkdir()
    code = main(["evaluate", str(tmp_path / "missing.zarr"), "--embeddings", "e.pkl",
                 "--out", str(tmp_path / "report")])
    assert code == INPUT_ERROR_EXIT_CODE
    assert "already exists" in capsys.readouterr().err


class _CommandModuleProbe:
    """Stands in for ``genepert_scale.cli.commands`` while the entry point imports it:
    records the collector's state at import and at run time."""

    def __init__(self, monkeypatch, import_error: bool = False):
        import gc
        import types

        self.seen: list[tuple[str, bool, int]] = []
        probe = self

        class Module(types.ModuleType):
            def __getattr__(self, name):
                if name != "main":
                    raise AttributeError(name)
                probe.seen.append(("import", gc.isenabled(), gc.get_freeze_count()))
                if import_error:
                    raise ImportError("a library of the command is missing")

                def run():
                    probe.seen.append(("run", gc.isenabled(), gc.get_freeze_count()))
                    return 7

                return run

        monkeypatch.setitem(sys.modules, "genepert_scale.cli.commands", Module("genepert_scale.cli.commands"))


def test_entry_point_imports_with_the_collector_paused_and_runs_with_it_on(monkeypatch):
    import gc

    from genepert_scale import __main__ as entry

    probe = _CommandModuleProbe(monkeypatch)
    gc.unfreeze()
    try:
        assert entry.main() == 7
    finally:
        gc.unfreeze()  # give this test process's objects back to the collector
    (imported, ran) = probe.seen
    assert imported[:2] == ("import", False)
    assert ran[:2] == ("run", True) and ran[2] > 0  # what was imported is frozen
    assert gc.isenabled()


def test_entry_point_turns_the_collector_back_on_when_the_import_fails(monkeypatch):
    import gc

    from genepert_scale import __main__ as entry

    _CommandModuleProbe(monkeypatch, import_error=True)
    try:
        with pytest.raises(ImportError, match="missing"):
            entry.main()
    finally:
        gc.unfreeze()
    assert gc.isenabled()
