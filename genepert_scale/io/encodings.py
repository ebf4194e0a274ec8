"""The encodings of the stores the project writes, in one registry.

Every store carries anndata's attributes ``encoding-type`` and
``encoding-version`` (as anndata's own elements do); readers check them
through :class:`Encoding`, and :func:`open_store` finds the reader of any
store by its type.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import GenePertInputError, StoreError
from .integrity import METADATA_ERRORS
from .store import open_dataset

#: The attribute names, anndata's.
TYPE_ATTR = "encoding-type"
VERSION_ATTR = "encoding-version"


@dataclass(frozen=True)
class Encoding:
    """One kind of store: its type, the version this code reads and writes,
    the command that writes it and the function that reads it.

    Attributes
    ----------
    type, version
        The values of ``encoding-type`` and ``encoding-version``.
    what
        What the store is, for messages.
    remedy
        The command that writes one, for messages.
    reader
        ``"module:function"`` that opens one (a path and storage options).
    """

    type: str
    version: str
    what: str
    remedy: str
    reader: str

    def attrs(self) -> dict[str, str]:
        """The attributes a store of this kind is written with."""
        return {TYPE_ATTR: self.type, VERSION_ATTR: self.version}

    def check(self, attrs: Mapping[str, Any], source: str) -> None:
        """Raise unless ``attrs`` (a store's) are of this encoding and version."""
        found = attrs.get(TYPE_ATTR)
        if found != self.type:
            raise StoreError(f"{source} is not a {self.what} ({TYPE_ATTR} {found!r}, expected "
                             f"{self.type!r}); create one with {self.remedy}")
        version = attrs.get(VERSION_ATTR)
        if version != self.version:
            raise StoreError(f"{source} is a {self.what} of {VERSION_ATTR} {version!r}; this "
                             f"version reads {self.version!r}: write it again with {self.remedy}")

    def open(self, path: str, storage_options: dict[str, Any] | None = None) -> Any:
        """Open ``path`` with this encoding's reader."""
        module, function = self.reader.split(":")
        return getattr(importlib.import_module(module), function)(path, storage_options)


PSEUDOBULK = Encoding("genepert_scale.pseudobulk", "0.2.0", "pseudo-bulk store",
                      "'genepert-scale pseudobulk'", "genepert_scale.pp.aggregate:open_pseudobulk")
MODEL = Encoding("genepert_scale.ridge_model", "0.2.0", "model store", "'genepert-scale fit'",
                 "genepert_scale.tl.ridge:load_model")
PREDICTIONS = Encoding("genepert_scale.predictions", "0.1.0", "predictions store",
                       "'genepert-scale predict' or 'genepert-scale evaluate'",
                       "genepert_scale.io.encodings:open_predictions")
CELLS_MODEL = Encoding("genepert_scale.cells_model", "0.1.0", "cell model store",
                       "'genepert-scale cells' (DIR/model) or gps.tl.save_cells_model",
                       "genepert_scale.tl.cells.persist:load_cells_model")

#: Every encoding, by type.
REGISTRY: dict[str, Encoding] = {e.type: e for e in (PSEUDOBULK, MODEL, PREDICTIONS, CELLS_MODEL)}


def open_checked(encoding: Encoding, path: str,
                 storage_options: dict[str, Any] | None = None) -> Any:
    """The Dataset of a store of ``encoding`` at ``path`` (lazy), checked."""
    try:
        ds = open_dataset(path, storage_options)
    except GenePertInputError:
        raise
    except METADATA_ERRORS as err:
        raise StoreError(f"{path} is not a {encoding.what} ({err}); "
                         f"create one with {encoding.remedy}") from err
    encoding.check(ds.attrs, path)
    return ds


def open_predictions(path: str, storage_options: dict[str, Any] | None = None) -> Any:
    """A predictions store (lazy Dataset: ``delta`` by perturbation and gene)."""
    return open_checked(PREDICTIONS, path, storage_options)


def open_store(path: str, storage_options: dict[str, Any] | None = None) -> Any:
    """Open any store the project writes with the reader its encoding names."""
    try:
        attrs = open_dataset(path, storage_options).attrs
    except GenePertInputError:
        raise
    except METADATA_ERRORS as err:
        raise StoreError(f"{path} is not a store of genepert_scale ({err})") from err
    encoding = REGISTRY.get(attrs.get(TYPE_ATTR))
    if encoding is None:
        raise StoreError(f"{path} has {TYPE_ATTR} {attrs.get(TYPE_ATTR)!r}, none of "
                         f"{', '.join(REGISTRY)}; give a store written by genepert-scale")
    return encoding.open(path, storage_options)
