"""Out-of-core, distributed GenePert: predict the expression change of unseen
gene perturbations from gene embeddings with ridge regression, on Dask.

The public face, in scanpy's shape: ``import genepert_scale as gps``, then
``gps.pp.pseudobulk`` (AnnData in, AnnData out), ``gps.tl.evaluate / fit /
predict``, ``gps.pl.*`` (the report's figures), ``gps.io.*`` (stores) and
``gps.datasets.synth_screen``. Each room is imported on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

ROOMS = ("io", "pp", "tl", "pl", "datasets")
__all__ = ["__version__", *ROOMS]


def __getattr__(name: str):
    """The rooms, imported on first use."""
    if name in ROOMS:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
