"""Every bad input in one table: the exact error class and a fragment of its message."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

import genepert_scale.io.store as store_module
from factories import counts, log1p_of, write_screen
from genepert_scale.tl import embedding_checks as emb
from genepert_scale import validate
from genepert_scale.errors import (
    INPUT_ERROR_EXIT_CODE,
    EmbeddingError,
    LabelError,
    ParameterError,
    StoreError,
)
from genepert_scale.pp.aggregate import open_pseudobulk, pseudobulk, write_pseudobulk
from genepert_scale.tl.ridge import RidgeModel, load_model, save_model
from genepert_scale.datasets.synth import synth_screen

Case = Callable[[Path], Callable[[], object]]


def run(path: str, **kwargs) -> Callable[[], object]:
    kwargs.setdefault("n_top_genes", None)
    return lambda: pseudobulk(path, progress=False, **kwargs, as_xarray=True)


def with_value(value: float, row: int = 5, **kwargs) -> Case:
    def build(tmp: Path):
        x = counts()
        x[row, 2] = value
        return run(write_screen(tmp / "s.zarr", x), **kwargs)

    return build


def with_stored(array: str, position: int, value: int) -> Case:
    """A corrupt CSR ``X``: ``X/<array>[position]`` overwritten with ``value``."""

    def build(tmp: Path):
        path = write_screen(tmp / "s.zarr")
        zarr.open_group(path, mode="r+")["X"][array][position] = value
        return run(path)

    return build


def with_short_indptr(tmp: Path) -> Callable[[], object]:
    """A CSR ``X`` whose ``indptr`` lost its last offsets (a truncated write)."""
    path = write_screen(tmp / "s.zarr")
    zarr.open_group(path, mode="r+")["X"]["indptr"].resize((50,))
    zarr.consolidate_metadata(path)
    return run(path)


def late_value(value: float, *, log: bool) -> Case:
    """A bad value after the rows sampled for input detection (2000)."""

    def build(tmp: Path):
        x = counts(n_obs=2100, n_vars=4)
        x = log1p_of(x) if log else x
        x[2050, 1] = value
        return run(write_screen(tmp / "s.zarr", x), input="log1p" if log else "counts")

    return build


def screen_then(edit: Callable[[Path], None], **kwargs) -> Case:
    def build(tmp: Path):
        path = write_screen(tmp / "s.zarr", **kwargs)
        edit(Path(path))
        return run(path)

    return build


def our_screen(tmp: Path) -> str:
    """A screen written by our writer (CRC32C chunks, CSR chunks of 512 values)."""
    store_module.CSR_CHUNK, saved = 512, store_module.CSR_CHUNK
    try:
        path, _ = synth_screen(str(tmp / "ours.zarr"), cells=200, genes=30, perturbations=5,
                               seed=1, chunk_rows=100)
    finally:
        store_module.CSR_CHUNK = saved
    return path


def ours_then(edit: Callable[[Path], None]) -> Case:
    """A screen written by our writer, then edited."""

    def build(tmp: Path):
        path = our_screen(tmp)
        edit(Path(path))
        return run(path)

    return build


def reconsolidated(edit: Callable[[Path], None]) -> Callable[[Path], None]:
    """Apply ``edit`` to the store's files, then consolidate its metadata again."""

    def apply(path: Path) -> None:
        edit(path)
        zarr.consolidate_metadata(zarr.storage.LocalStore(path))

    return apply


@reconsolidated
def set_x_shape(path: Path) -> None:
    zarr.open_group(path / "X", mode="a", use_consolidated=False).attrs["shape"] = [61, 8]


@reconsolidated
def drop_indices(path: Path) -> None:
    shutil.rmtree(path / "X" / "indices")


def truncate_data(path: Path) -> None:
    """``X/data`` resized to fewer values than ``X/indptr`` points into."""
    data = zarr.open_array(path / "X" / "data", mode="r+")
    data.resize((data.shape[0] - 5,))
    zarr.consolidate_metadata(path)


def flip_bytes(path: Path, chunk_index: int = 1, array: str = "data") -> None:
    chunk = path / "X" / array / "c" / str(chunk_index)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))


def misspell_root_metadata(path: Path) -> None:
    """A damaged ``zarr.json`` that is still JSON: a key renamed (found by the fuzz test)."""
    metadata = json.loads((path / "zarr.json").read_text())
    metadata["bttributes"] = metadata.pop("attributes")
    (path / "zarr.json").write_text(json.dumps(metadata))


def pb_store(tmp: Path, nan_delta: bool = False, **attrs) -> str:
    ds = pseudobulk(write_screen(tmp / "s.zarr"), n_top_genes=None, progress=False, as_xarray=True)
    ds.attrs.update(attrs)
    if nan_delta:  # a chunk equal to the fill value: written all the same
        ds["delta"][:] = np.nan
    return write_pseudobulk(ds, str(tmp / "pb.zarr"))


def model_store(tmp: Path) -> str:
    rng = np.random.default_rng(0)
    model = RidgeModel(rng.normal(size=(4, 3)), rng.normal(size=3), 1.0, pd.Index(["a", "b", "c"]),
                       rng.normal(size=3), pd.Index(["P1", "P2"]), {})
    return save_model(model, str(tmp / "m.zarr"))


def without_chunk(path: str, array: str) -> str:
    """Delete the first chunk of ``array`` in a store we wrote (a lost object)."""
    chunks = sorted(p for p in (Path(path) / array / "c").rglob("*") if p.is_file())
    chunks[0].unlink()
    return path


TABLE: list[tuple[str, Case, type[Exception], str]] = [
    # X
    ("nan", with_value(np.nan), StoreError, "NaN or infinite values (first in rows 0-59, block 0"),
    ("inf", with_value(np.inf), StoreError, "NaN or infinite values"),
    ("gene index outside the matrix", with_stored("indices", 7, 8), StoreError,
     "X has 1 stored values or rows outside the matrix (gene indices outside 0-7 in X/indices"),
    ("negative gene index", with_stored("indices", 7, -3), StoreError,
     "outside the matrix (gene indices outside 0-7 in X/indices, or row offsets in X/indptr "
     "out of order or beyond X/data)"),
    ("indptr too short", with_short_indptr, StoreError,
     "X/indptr holds 50 offsets but X has 60 rows (61 offsets); the store is incomplete"),
    ("row offsets out of order", with_stored("indptr", 4, 10**6), StoreError,
     "(first in rows 0-59, block 0, input counts); the store is corrupt; write it again"),
    ("negative", with_value(-1.0), StoreError, "negative values"),
    ("non-integer counts", with_value(1.5, input="counts"), ParameterError,
     "--input counts was given but X holds non-integer values (e.g. 1.5"),
    ("non-integer counts beyond the sample", late_value(1.5, log=False), StoreError,
     "non-integer values although raw counts were declared (first in rows"),
    ("log data given as counts",
     lambda tmp: run(write_screen(tmp / "s.zarr", log1p_of(counts())), input="counts"),
     ParameterError, "looks like log1p data, pass --input log1p"),
    ("counts given as log1p", lambda tmp: run(write_screen(tmp / "s.zarr"), input="log1p"),
     ParameterError, "X looks like raw counts. Pass --input counts"),
    ("log1p too large", with_value(31.5, input="log1p"), ParameterError,
     "too large for log1p-normalised data"),
    ("log1p too large beyond the sample", late_value(45.0, log=True), StoreError,
     "values above 30 although log1p data was declared"),
    ("wrong dtype",
     lambda tmp: run(write_screen(tmp / "s.zarr", counts() > 2, layout="dense")),
     StoreError, "X has dtype bool"),
    ("shape mismatch", screen_then(set_x_shape), StoreError, "X has shape (61, 8) but obs has 60"),
    ("csc", lambda tmp: run(write_screen(tmp / "s.zarr", layout="csc")), StoreError, "CSC"),
    # obs / var
    ("missing column", lambda tmp: run(write_screen(tmp / "s.zarr"), perturbation_key="guide"),
     LabelError, "obs has no column 'guide'; columns there are: perturbation"),
    ("control absent", lambda tmp: run(write_screen(tmp / "s.zarr"), control="ctrl"),
     LabelError, "control label 'ctrl' matches no cell in obs['perturbation']; most frequent"),
    ("control with no cells",
     lambda tmp: run(write_screen(tmp / "s.zarr", labels=pd.Categorical(
         ["A", "B"] * 30, categories=["A", "B", "non-targeting"]))),
     LabelError, "control label 'non-targeting' matches no cell"),
    ("unparsable label",
     lambda tmp: run(write_screen(tmp / "s.zarr", labels=["non-targeting", "A+"] * 30)),
     LabelError, "obs['perturbation'], 30 cells: cannot parse perturbation label 'A+'"),
    ("duplicate var names",
     lambda tmp: run(write_screen(tmp / "s.zarr", var_names=["G0", *[f"G{i}" for i in range(7)]])),
     LabelError, "var has duplicate gene names: 'G0'"),
    ("duplicate obs names",
     lambda tmp: run(write_screen(tmp / "s.zarr", obs_names=["c0", *[f"c{i}" for i in range(59)]])),
     LabelError, "obs has duplicate cell names: 'c0'"),
    ("symbols differ only by case",
     lambda tmp: run(write_screen(tmp / "s.zarr", var_names=["Sox2", "SOX2", *[f"G{i}" for i in range(6)]])),
     LabelError, "differ only by case: 'Sox2/SOX2'"),
    # store
    ("path missing", lambda tmp: run(str(tmp / "nowhere.zarr")), StoreError, "does not exist"),
    ("not a zarr store", lambda tmp: (tmp / "x.zarr").write_text("hello") and run(str(tmp / "x.zarr")),
     StoreError, "is not a zarr group"),
    ("root metadata damaged", ours_then(misspell_root_metadata), StoreError,
     "is not a zarr group ("),  # zarr words what is wrong differently from release to release
    ("not anndata",
     lambda tmp: zarr.open_group(tmp / "g.zarr", mode="w").create_array("a", shape=(2,), dtype="f4")
     and run(str(tmp / "g.zarr")), StoreError, "has no 'X' element; is it an AnnData store"),
    ("csr parts missing", screen_then(drop_indices),
     StoreError, "X is a CSR matrix without indices"),
    ("data shorter than indptr", screen_then(truncate_data), StoreError,
     "but X/data holds"),
    ("missing chunk (foreign store)", screen_then(lambda p: (p / "X" / "data" / "c" / "0").unlink()),
     StoreError, "chunk '0' of array 'X/data' is missing"),
    ("missing chunk (our store, obs)",
     ours_then(lambda p: (p / "obs" / "perturbation" / "codes" / "c" / "0").unlink()),
     StoreError, "array 'obs/perturbation/codes' is missing"),
    ("corrupt chunk", ours_then(flip_bytes), StoreError,
     "chunk 1 of array 'X/data' (first index 512) cannot be decoded"),
    ("corrupt indptr chunk (read at open)", ours_then(lambda p: flip_bytes(p, 0, "indptr")),
     StoreError, "chunk 0 of array 'X/indptr' (first index 0) cannot be decoded"),
    # parameters
    ("n_top_genes above the genes", lambda tmp: run(write_screen(tmp / "s.zarr"), n_top_genes=9),
     ParameterError, "--n-top-genes 9 is larger than the 8 genes"),
    ("min_cells above every group", lambda tmp: run(write_screen(tmp / "s.zarr"), min_cells=100),
     ParameterError, "no perturbation has at least --min-cells 100 cells (largest: A (15)"),
    ("min_cells zero", lambda tmp: run(write_screen(tmp / "s.zarr"), min_cells=0),
     ParameterError, "--min-cells must be a positive integer"),
    ("target_sum zero", lambda tmp: run(write_screen(tmp / "s.zarr"), target_sum=0),
     ParameterError, "--target-sum must be a positive number"),
    ("folds above perturbations", lambda tmp: lambda: validate.check_folds(6, 5, "pb.zarr"),
     ParameterError, "--folds 6 does not fit the 5 perturbations of pb.zarr"),
    ("alpha zero", lambda tmp: lambda: validate.check_alphas([1.0, 0.0]),
     ParameterError, "--alpha must be positive and finite"),
    ("alpha negative", lambda tmp: lambda: validate.check_alphas(-1.0),
     ParameterError, "got -1.0"),
    # encodings, gene sets, outputs
    ("pseudo-bulk of another version",
     lambda tmp: lambda: open_pseudobulk(pb_store(tmp, **{"encoding-version": "0.0.1"})),
     StoreError, "encoding-version '0.0.1'; this version reads '0.2.0': write it again"),
    ("not a pseudo-bulk store",
     lambda tmp: lambda: open_pseudobulk(pb_store(tmp, **{"encoding-type": "something"})),
     StoreError, "is not a pseudo-bulk store (encoding-type 'something', expected "
                 "'genepert_scale.pseudobulk')"),
    ("other gene set",
     lambda tmp: lambda: validate.check_same_genes(["A", "B"], ["A", "C"], source="m.zarr",
                                                   what="the model"),
     StoreError, "missing 'B'; unexpected 'C'"),
    ("missing chunk (pseudo-bulk output)",
     lambda tmp: lambda: open_pseudobulk(without_chunk(pb_store(tmp), "mean"))["mean"].values,
     StoreError, "of array 'mean' is missing"),
    ("missing chunk (all-NaN delta of a pseudo-bulk output)",
     lambda tmp: lambda: open_pseudobulk(without_chunk(pb_store(tmp, nan_delta=True), "delta"))
     ["delta"].values,
     StoreError, "of array 'delta' is missing"),
    ("missing chunk (model)", lambda tmp: lambda: load_model(without_chunk(model_store(tmp), "coef")),
     StoreError, "of array 'coef' is missing"),
    ("output exists",
     lambda tmp: lambda: write_pseudobulk(open_pseudobulk(pb_store(tmp)).load(), str(tmp / "pb.zarr")),
     StoreError, "already exists; pass --overwrite"),
    # embeddings
    ("embedding NaN row",
     lambda tmp: lambda: emb.check_embedding_table(["A", "B"], [[1.0, 0.0], [np.nan, 1.0]], "e.pkl"),
     EmbeddingError, "NaN or infinite values in the vectors of B"),
    ("embedding rows of different lengths",
     lambda tmp: lambda: emb.check_embedding_table(["A", "B", "C"], [[1, 0], [1, 1], [1]], "e.pkl"),
     EmbeddingError, "most have 2, but C (1)"),
    ("embedding duplicate keys",
     lambda tmp: lambda: emb.check_embedding_table(["A", "A"], [[1, 0], [0, 1]], "e.csv"),
     EmbeddingError, "duplicate genes: A"),
    ("embedding all-zero vector",
     lambda tmp: lambda: emb.check_embedding_table(["A", "B"], np.array([[1.0, 0], [0, 0]]), "e.npz"),
     EmbeddingError, "all-zero vectors (cannot be L2-normalised) for B"),
    ("embedding dimension differs", lambda tmp: lambda: emb.check_dimension(1536, 3072, "e.pkl"),
     EmbeddingError, "dimension 3072 but the model was fitted on dimension 1536"),
    ("no perturbed gene embedded", lambda tmp: lambda: emb.check_coverage(["A", "B"], ["X", "Y"], "e.pkl"),
     EmbeddingError, "has none of the 2 perturbed genes"),
    ("perturbed genes match only up to case",
     lambda tmp: lambda: emb.check_coverage(["Sox2"], ["SOX2", "KLF1"], "e.pkl"),
     EmbeddingError, "match only when case is ignored"),
    ("ensembl ids against symbols",
     lambda tmp: lambda: emb.check_coverage(["SOX2"], ["ENSG00000181449"], "e.pkl"),
     EmbeddingError, "the table uses Ensembl ids"),
]


@pytest.mark.parametrize(("build", "error", "fragment"), [c[1:] for c in TABLE],
                         ids=[c[0] for c in TABLE])
def test_bad_input_raises_a_clear_error(tmp_path, build, error, fragment):
    action = build(tmp_path)
    with pytest.raises(error) as info:
        action()
    assert type(info.value) is error
    assert fragment in str(info.value), str(info.value)


def test_a_bad_chunk_is_found_within_the_failing_block(tmp_path):
    """Reading a block names its own bad chunk without scanning the rest of X
    (chunk 1 is damaged too, and a scan of all of X would name it first)."""
    from genepert_scale.io.screen import open_screen

    path = our_screen(tmp_path)
    for index in (1, 5):
        flip_bytes(Path(path), index)
    rows = open_screen(path).csr
    indptr = np.asarray(zarr.open_group(path, mode="r")["X"]["indptr"][:])
    start = int(np.searchsorted(indptr, 5 * 512, side="right"))  # first row ending in chunk 5
    with pytest.raises(StoreError, match=r"chunk 5 of array 'X/data' \(first index 2560\)"):
        rows.read(start, start + 1)
    rows.read(0, int(np.searchsorted(indptr, 512, side="right")) - 1)  # chunk 0 alone is fine


def test_default_n_top_genes_keeps_all_genes_of_a_small_screen(tmp_path, caplog):
    path = write_screen(tmp_path / "s.zarr")
    with caplog.at_level(logging.WARNING):
        ds = pseudobulk(path, progress=False, as_xarray=True)
    assert ds.sizes["gene"] == 8
    assert "not more than the default 5000 HVGs: keeping all genes" in caplog.text
    assert json.loads(ds.attrs["parameters"])["n_top_genes"] is None


def test_embedding_table_is_returned_as_float_matrix():
    matrix = emb.check_embedding_table(["A", "B"], [[1, 2], [3, 4]], "e.pkl")
    assert matrix.dtype == np.float64 and matrix.shape == (2, 2)
    emb.check_coverage(["A", "Q"], ["A", "B"], "e.pkl")
    emb.check_dimension(2, 2, "e.pkl")


def test_cli_reports_a_parameter_error_without_traceback(tmp_path):
    path = write_screen(tmp_path / "s.zarr")
    result = subprocess.run(
        [sys.executable, "-m", "genepert_scale", "pseudobulk", path, "--n-top-genes", "50",
         "--out", str(tmp_path / "pb.zarr"), "--no-progress"],
        capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == INPUT_ERROR_EXIT_CODE
    assert "--n-top-genes 50 is larger than the 8 genes" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "pb.zarr").exists()


def named_screen(path: Path, obs_names, fmt: int = 3) -> str:
    """A screen of ``len(obs_names)`` cells named ``obs_names`` (any pandas index)."""
    return write_screen(path, counts(len(obs_names), 3), obs_names=obs_names, zarr_format=fmt)


@pytest.mark.parametrize("fmt", [2, 3])
def test_opening_a_screen_finds_repeated_cell_names(tmp_path, fmt):
    from genepert_scale.io.screen import open_screen

    cells = [f"cell{i}" for i in range(500)]
    path = named_screen(tmp_path / "u.zarr", pd.Index(cells), fmt)
    assert open_screen(path).obs_names.tolist() == cells
    with pytest.raises(LabelError, match="obs has duplicate cell names: 'cell7'"):
        open_screen(named_screen(tmp_path / "r.zarr", pd.Index([*cells[:-1], "cell7"]), fmt))


@pytest.mark.parametrize("name", ["c.zarr", "c.h5ad"])
def test_a_categorical_cell_index_is_checked(tmp_path, name):
    # anndata stores a CategoricalIndex as a group, not an array of names
    from genepert_scale.io.screen import open_screen

    cells = pd.CategoricalIndex([f"cell{i}" for i in range(6)])
    assert open_screen(named_screen(tmp_path / name, cells)).n_obs == 6
    with pytest.raises(LabelError, match="obs has duplicate cell names: 'cell0'"):
        open_screen(named_screen(tmp_path / f"r-{name}", pd.CategoricalIndex(["cell0", *cells[:-1]])))


def test_a_damaged_chunk_of_cell_names_is_named(tmp_path):
    from genepert_scale.io.screen import open_screen

    path = named_screen(tmp_path / "u.zarr", pd.Index([f"cell{i}" for i in range(50)]))
    # c/0, or values/c/0 where anndata stores the names as a nullable string array
    (chunk,) = (Path(path) / "obs" / "_index").rglob("c/0")
    chunk.write_bytes(b"not zstd")
    with pytest.raises(StoreError, match="obs/_index"):
        open_screen(path)
