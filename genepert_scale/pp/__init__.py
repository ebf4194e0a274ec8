"""The streamed pass: block kernels, graph building, HVG selection, labels, pseudo-bulk, DE, and
the screen in group order."""

from __future__ import annotations

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "pseudobulk": (".aggregate", "pseudobulk"),
    "top_de_genes": (".de", "top_de_genes"),
    "fdr_de_genes": (".de", "fdr_de_genes"),
    "sort_screen": (".sort", "sort_screen"),
})
