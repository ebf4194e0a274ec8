"""The codec pipeline that decodes ``X``: zarr-python's own, or zarrs' Rust one.

`zarrs <https://pypi.org/project/zarrs/>`_ (the extra ``zarrs``) is a codec
pipeline written in Rust that zarr-python takes through its public
configuration (``codec_pipeline.path``); it fetches and decodes a slice's
chunks in parallel, without zarr's per-chunk Python work. A pass reads
``X``'s ``data``, ``indices`` and ``indptr`` through it when it is installed
(:func:`zarrs_enabled`; the environment variable :data:`ENV_VAR` set to ``0``
turns it off, ``1`` on). Nothing else is read or written through it.

zarrs reads only stores it knows (a local directory here; an fsspec store is
read by zarr's own pipeline), and does not see through a store wrapper: behind
:class:`.integrity.StrictStore` it would hand every read back to zarr's
pipeline. So ``X`` of a local screen is opened a second time, on a bare
``LocalStore`` (:func:`zarrs_arrays`). A bare store reads a missing chunk as
its fill value; the arrays are therefore opened this way only when every chunk
of them is stored (``nchunks_initialized``, one listing of the directory).
Otherwise ``X`` is read through the strict store, which names the missing
chunk when a block reaches it. A chunk removed while a pass runs would read
as zeros through zarrs.

zarrs decodes a chunk that a slice covers in part without checking its
CRC32C. :meth:`.screen.CsrRows.read` therefore reads whole chunks through it,
and each array's last chunk (which the array ends inside) through zarr's own
pipeline; every chunk's checksum is checked as without zarrs.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import warnings
from typing import Any

import zarr
from zarr.storage import LocalStore

from ..errors import ParameterError

log = logging.getLogger(__name__)

#: Environment variable that turns zarrs off (``0``) or on (``1``).
ENV_VAR = "GENEPERT_SCALE_ZARRS"
#: zarr's configuration value that selects zarrs' pipeline.
ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"
#: Whether a pass decodes through zarrs when it is installed and
#: :data:`ENV_VAR` is not set (see ``benchmarks/results/2026-12-07-read-path-public-zarr.md``).
BY_DEFAULT = True

_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def zarrs_installed() -> bool:
    """Whether the ``zarrs`` package can be imported."""
    return importlib.util.find_spec("zarrs") is not None


def zarrs_enabled() -> bool:
    """Whether ``X`` is decoded through zarrs: installed, and wanted
    (:data:`ENV_VAR`, else :data:`BY_DEFAULT`).

    Raises
    ------
    ParameterError
        If :data:`ENV_VAR` holds anything but ``0``/``1`` (or
        ``false``/``true``, ``no``/``yes``, ``off``/``on``).
    """
    setting = os.environ.get(ENV_VAR, "").strip().lower()
    if setting and setting not in _ON + _OFF:
        raise ParameterError(
            f"{ENV_VAR}={os.environ[ENV_VAR]!r}: set it to 0 (zarr's own codec pipeline) "
            "or 1 (zarrs, when installed)"
        )
    wanted = setting in _ON if setting else BY_DEFAULT
    return wanted and zarrs_installed()


def local_root(path: str) -> str | None:
    """The directory of a local zarr store at ``path``, ``None`` for a URL or a file."""
    path = str(path).removeprefix("file://")
    return None if "://" in path or not os.path.isdir(path) else path


def zarrs_arrays(path: str, element: str, names: tuple[str, ...]) -> list[Any] | None:
    """The arrays ``element/name`` of the local store at ``path``, opened on a
    bare ``LocalStore`` to be decoded by zarrs, or ``None`` (then read them
    through the store's own group): zarrs not enabled, not a local store, or
    a chunk of one of them missing (see the module's notes).
    """
    root = local_root(path) if zarrs_enabled() else None
    if root is None:
        return None
    importlib.import_module("zarrs")  # zarrs 0.2.0 registers its pipeline with zarr on import
    with zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE}), warnings.catch_warnings():
        # a codec zarrs lacks: it says so, and hands those reads to zarr's pipeline
        warnings.filterwarnings("ignore", "Array is unsupported by ZarrsCodecPipeline")
        group = zarr.open_group(LocalStore(root, read_only=True), mode="r")[element]
        arrays = [group[name] for name in names]
    incomplete = [a.path for a in arrays if a.nchunks_initialized < a.nchunks]
    if incomplete:
        log.info("%s: %s miss chunks; reading them through zarr's own pipeline, which "
                 "names each missing chunk", path, ", ".join(incomplete))
        return None
    return arrays
