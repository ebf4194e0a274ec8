"""A writer killed (SIGKILL) in the middle of an output leaves the old output readable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from genepert_scale.pp.aggregate import open_pseudobulk, pseudobulk, write_pseudobulk

WRITER = textwrap.dedent(
    """
    import sys, time
    import xarray as xr
    from genepert_scale.pp.aggregate import pseudobulk, write_pseudobulk

    screen, out = sys.argv[1:]
    ds = pseudobulk(screen, n_top_genes=100, progress=False, as_xarray=True)
    original = xr.Dataset.to_zarr

    def half_then_hang(self, store, **kwargs):
        kwargs.pop("encoding", None)
        original(self[["mean"]], store, **kwargs)   # part of the output is on disk
        print("half written", flush=True)
        time.sleep(120)

    xr.Dataset.to_zarr = half_then_hang
    write_pseudobulk(ds, out, overwrite=True)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_during_write_leaves_old_output_intact(small_screen, tmp_path):
    path, _ = small_screen
    out = tmp_path / "pb.zarr"
    old = pseudobulk(path, n_top_genes=50, progress=False, as_xarray=True)
    write_pseudobulk(old, str(out))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, path, str(out)],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert writer.stdout.readline().strip() == "half written"
        leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".pb.zarr.tmp-")]
        assert leftovers, "the new output is being built beside the target"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    kept = open_pseudobulk(str(out))
    assert kept.sizes["gene"] == 50
    np.testing.assert_array_equal(kept["mean"].values, old["mean"].values)
    # the next run replaces it despite the leftover temporary
    write_pseudobulk(pseudobulk(path, n_top_genes=100, progress=False, as_xarray=True), str(out), overwrite=True)
    assert open_pseudobulk(str(out)).sizes["gene"] == 100
