"""Fuzzing a small store: bytes flipped, chunks removed, files truncated. Every
outcome is a clean input error or the correct result, never a raw exception or
a wrong answer."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import genepert_scale.io.store as store_module
from genepert_scale.errors import GenePertInputError
from genepert_scale.pp.aggregate import pseudobulk
from genepert_scale.datasets.synth import synth_screen

ARRAYS = ("mean", "delta", "n_cells", "control_mean")


@pytest.fixture(scope="module")
def store_and_reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "screen.zarr"
    store_module.CSR_CHUNK, saved = 1024, store_module.CSR_CHUNK
    try:
        synth_screen(str(path), cells=300, genes=40, perturbations=6, seed=3, chunk_rows=100)
    finally:
        store_module.CSR_CHUNK = saved
    return path, pseudobulk(str(path), n_top_genes=None, block_rows=128, progress=False, as_xarray=True)


def corrupt(root: Path, data) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    target = data.draw(st.sampled_from(files), label="file")
    action = data.draw(st.sampled_from(["flip", "remove", "truncate"]), label="action")
    if action == "remove":
        target.unlink()
    else:
        content = bytearray(target.read_bytes())
        if action == "truncate":
            content = content[: data.draw(st.integers(0, max(len(content) - 1, 0)), label="keep")]
        else:
            for _ in range(data.draw(st.integers(1, 4), label="flips")):
                at = data.draw(st.integers(0, len(content) - 1), label="at")
                content[at] ^= data.draw(st.integers(1, 255), label="mask")
        target.write_bytes(bytes(content))
    return f"{action} {target.relative_to(root)}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_store_gives_a_clean_error_or_the_right_answer(store_and_reference, data):
    source, reference = store_and_reference
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "screen.zarr"
        shutil.copytree(source, root)
        what = corrupt(root, data)
        try:
            result = pseudobulk(str(root), n_top_genes=None, block_rows=128, progress=False, as_xarray=True)
        except GenePertInputError as err:
            assert str(root) in str(err), (what, err)
            return
        for name in ARRAYS:
            assert np.array_equal(result[name].values, reference[name].values), what
        assert list(result.perturbation.values) == list(reference.perturbation.values), what
