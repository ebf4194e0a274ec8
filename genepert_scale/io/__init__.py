"""Where screens and outputs live: stores and fsspec URLs, opening screens lazily, conversion, integrity, exports."""

from __future__ import annotations

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
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
})
