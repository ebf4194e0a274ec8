"""The ``genepert-scale`` command's entry point (also ``python -m genepert_scale``)."""

from __future__ import annotations

import gc
import logging
import os
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
    """Run :func:`main` as a process: flush what it printed and logged, then
    end the process with its exit code, without tearing the interpreter down.

    By then every output is complete (renamed into place) and any cluster the
    command started is closed. What is skipped is freeing, one by one, the
    objects of the imported libraries and joining idle threads: 0.2–0.3 s of
    a 1M-cell ``pseudobulk`` run of ~7 s (2-vCPU VM). Under a profiler or a
    tracer (``cProfile``, coverage), which write their results at exit, and
    after an exception, the process ends the usual way.
    """
    code = main()
    if _observed():
        raise SystemExit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # none, a closed stream, a reader gone
            pass
    os._exit(code)


def _observed() -> bool:
    """Whether a tracer, profiler or coverage tool watches this process: set
    with ``sys.settrace``/``sys.setprofile``, or, from Python 3.12, registered
    with ``sys.monitoring`` (where ``cProfile`` and coverage's ``sysmon`` core
    register)."""
    if sys.gettrace() is not None or sys.getprofile() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)
    return monitoring is not None and any(
        monitoring.get_tool(tool) is not None for tool in range(6)  # its tool ids: 0-5
    )


if __name__ == "__main__":
    console()
