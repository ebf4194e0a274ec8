"""Where screens and outputs live: stores and fsspec URLs, opening screens lazily, conversion, integrity, exports."""

from __future__ import annotations

import importlib


_PUBLIC = {
    "read_pseudobulk": ("..pp.aggregate", "open_pseudobulk"),
    "write_pseudobulk": ("..pp.aggregate", "write_pseudobulk"),
    "read_model": ("..tl.ridge", "load_model"),
    "write_model": ("..tl.ridge", "save_model"),
    "write_predictions": ("..tl.model", "write_predictions"),
    "pseudobulk_to_anndata": (".interop", "pseudobulk_to_anndata"),
    "export_pseudobulk": (".interop", "export_pseudobulk"),
    "convert_h5ad": (".convert", "convert_h5ad"),
    "open_screen": (".screen", "open_screen"),
    "export_cell_eval": (".celleval", "export_cell_eval"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    """The public names, imported on first use (so that ``import genepert_scale`` stays light)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    return getattr(importlib.import_module(module, __name__), attribute)


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
