"""Out-of-core, distributed GenePert: predict the expression change of unseen
gene perturbations from gene embeddings with ridge regression, on Dask."""

from __future__ import annotations

__version__ = "0.1.0"
