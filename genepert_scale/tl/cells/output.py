"""Predicted cells written to an ``.h5ad`` a part at a time, so that an
evaluation holds the cells of one perturbation, not of all.

``X`` is a dense ``float32`` HDF5 dataset that grows by rows as parts are
added (anndata's ``array`` encoding); ``obs`` (a label code, a control row,
a fold and a context per cell: a few bytes a cell), ``var`` and ``uns`` are
written when the file is closed, with anndata's own writer.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
from anndata.io import write_elem

from ...errors import ParameterError
from ...io.store import atomic_output, filesystem
from .model import CellsModel, CellsPart, cells_obs, genes_var, model_uns

log = logging.getLogger(__name__)

#: Bytes of ``X`` per HDF5 chunk, about.
CHUNK_BYTES = 1 << 20


class CellsWriter:
    """An ``.h5ad`` of predicted cells, written part by part.

    Parameters
    ----------
    path
        The local ``.h5ad`` to write (replaced).
    genes
        The cells' genes.
    key, control
        The ``obs`` column of labels and the control label.
    context_key, contexts
        The ``obs`` column of contexts and their names (``None``: no column).
    """

    def __init__(self, path: str, genes: pd.Index, *, key: str, control: str,
                 context_key: str | None = None, contexts: Sequence[str | None] = (None,)) -> None:
        self.path, self.genes, self.key, self.control = path, genes, key, control
        self.context_key, self.contexts = context_key, list(contexts)
        self.file = h5py.File(path, "w")
        self.file.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        n = len(genes)
        self.x = self.file.create_dataset("X", shape=(0, n), maxshape=(None, n), dtype="float32",
                                          chunks=(max(1, CHUNK_BYTES // (4 * max(n, 1))), max(n, 1)))
        self.x.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        self.codes: dict[str, int] = {}
        self.parts: dict[str, list[np.ndarray]] = {"label": [], "rows": [], "fold": [], "context": []}

    def add(self, part: CellsPart, fold: int) -> None:
        """Append a part's cells (``fold``: the fold that predicted them, -1 for controls)."""
        n, first = len(part.x), self.x.shape[0]
        self.x.resize(first + n, axis=0)
        self.x[first:] = np.asarray(part.x, dtype=np.float32)
        unique = list(dict.fromkeys(part.labels))
        code = np.array([self.codes.setdefault(label, len(self.codes)) for label in unique])
        self.parts["label"].append(code[pd.Index(unique).get_indexer(part.labels)].astype(np.int32))
        self.parts["rows"].append(np.asarray(part.rows, dtype=np.int64))
        self.parts["fold"].append(np.full(n, fold, dtype=np.int64))
        self.parts["context"].append(np.asarray(part.context, dtype=np.int64))

    def close(self, uns: dict[str, Any]) -> str:
        """Write ``obs``, ``var`` and ``uns["genepert_scale"]``; close the file; return its path."""
        joined = {name: np.concatenate(parts) if parts else np.zeros(0, np.int64)
                  for name, parts in self.parts.items()}
        labels = pd.Categorical.from_codes(joined["label"], categories=list(self.codes))
        extra: dict[str, Any] = {"fold": joined["fold"]}
        if self.context_key is not None:
            extra[self.context_key] = pd.Categorical.from_codes(joined["context"],
                                                                categories=self.contexts)
        write_elem(self.file, "obs", cells_obs(labels, joined["rows"], key=self.key,
                                                control=self.control, obs=extra))
        write_elem(self.file, "var", genes_var(self.genes))
        write_elem(self.file, "uns", {"genepert_scale": {"control": self.control, **uns}})
        self.file.close()
        return self.path

    def __enter__(self) -> CellsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file.id.valid:
            self.file.close()


def write_predicted_cells(
    model: CellsModel,
    parts: Iterable[CellsPart],
    out: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write predicted cells (:func:`.model.predicted_parts` of ``model``)
    to the ``.h5ad`` ``out`` (a path or URL, atomically), a part at a time."""
    if not str(out).endswith(".h5ad"):
        raise ParameterError(f"predicted cells output {out}: use a .h5ad name")
    with atomic_output(out, overwrite=overwrite, storage_options=storage_options) as tmp, \
            tempfile.TemporaryDirectory() as local:
        path = str(Path(local) / "cells.h5ad")
        with CellsWriter(path, model.genes, key=model.perturbation_key, control=model.control,
                         context_key=model.context_key, contexts=model.contexts) as writer:
            for part in parts:
                writer.add(part, -1)
            writer.close(model_uns(model))
        fs, root = filesystem(tmp, storage_options)
        fs.put(path, root)
    log.info("wrote predicted cells %s", out)
    return out
