"""The ``genepert-scale`` command's entry point (also ``python -m genepert_scale``)."""

from __future__ import annotations

import gc
import sys
from typing import NoReturn


def main() -> int:
    """Import the command with the garbage collector paused, then run it.

    Importing numpy, pandas, dask, zarr, xarray, anndata and numba makes about
    150k objects the collector tracks, all long-lived, and every collection
    while they are being made walks them again: 0.31–0.42 s of a ~2.7 s
    start-up on a 2-vCPU VM. Once imported they are frozen (``gc.freeze``),
    so that no later collection walks them either (:func:`.cli.main` freezes
    again what its commands import lazily).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        from .cli.commands import main as run
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
    return run()


def console() -> NoReturn:
    """Run :func:`main` as a process, ending with its exit code."""
    sys.exit(main())


if __name__ == "__main__":
    console()
