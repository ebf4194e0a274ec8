"""The ``genepert-scale`` command.

Every subcommand shares the cluster options (``--scheduler``, ``--workers``,
…) and ``--storage-options``; input errors print one clear message (no
traceback unless ``--debug``) and exit with :data:`INPUT_ERROR_EXIT_CODE`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .cluster import dask_client, limit_heap_fragmentation
from .errors import INPUT_ERROR_EXIT_CODE, GenePertInputError, ParameterError

log = logging.getLogger("genepert_scale")

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    """Register a subcommand handler."""

    def register(func: Command) -> Command:
        COMMANDS[name] = func
        return func

    return register


def _storage_options(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ParameterError(f"--storage-options is not valid JSON ({err}): {text!r}") from err
    if not isinstance(value, dict):
        raise ParameterError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return value


def _n_top_genes(text: str) -> int | None:
    return None if text == "all" else int(text)


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("cluster and storage")
    group.add_argument("--scheduler", help="address of a running dask scheduler (or DASK_SCHEDULER_ADDRESS)")
    group.add_argument("--workers", type=int, help="start a LocalCluster with N worker processes")
    group.add_argument("--threads-per-worker", type=int, help="threads per LocalCluster worker")
    group.add_argument("--memory-limit", default="auto", help="memory limit per LocalCluster worker, e.g. 2GiB; also caps the pass's block size")
    group.add_argument("--storage-options", help="JSON of fsspec options for URLs (s3://, gs://, ...)")
    group.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    group.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="genepert-scale",
        description="Out-of-core GenePert: pseudo-bulk Perturb-seq screens and predict unseen perturbations.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parent = common_options()

    p = sub.add_parser("synth", parents=[parent], help="write a synthetic screen and its embedding table")
    p.add_argument("out", help="output zarr store")
    p.add_argument("--cells", type=int, default=20_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--perturbations", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-rows", type=int, default=10_000, help="rows per written block")

    p = sub.add_parser("convert", parents=[parent], help="stream an .h5ad into a chunked zarr store")
    p.add_argument("source", help="input .h5ad")
    p.add_argument("out", help="output zarr store")

    p = sub.add_parser("pseudobulk", parents=[parent], help="normalize, select HVGs, pseudo-bulk")
    add_pseudobulk_options(p)
    p.add_argument("--out", required=True, help="output pseudo-bulk zarr store")

    p = sub.add_parser("demo", parents=[parent], help="run the whole job on an embedded synthetic screen")
    p.add_argument("--out", default="demo-output", help="directory for every demo output")
    return parser


def add_pseudobulk_options(p: argparse.ArgumentParser) -> None:
    """Options of the pseudo-bulk step (shared by commands that run it)."""
    p.add_argument("screen", help="AnnData zarr store (path or URL) or .h5ad")
    p.add_argument("--perturbation-key", default="perturbation", help="obs column of perturbation labels")
    p.add_argument("--control", default="non-targeting", help="label of control cells")
    p.add_argument("--n-top-genes", type=_n_top_genes, default=5000, help="number of HVGs, or 'all'")
    p.add_argument("--flavor", choices=("seurat", "cell_ranger"), default="seurat")
    p.add_argument("--target-sum", type=float, default=1e4)
    p.add_argument("--input", choices=("auto", "counts", "log1p"), default="auto",
                   help="raw counts, log1p-normalised data, or detect")
    p.add_argument("--min-cells", type=int, default=1, help="drop perturbations with fewer cells")
    p.add_argument("--group-variance", action="store_true", help="also store per-perturbation variances")
    p.add_argument("--block-rows", type=int, help="rows per block of the pass (default: auto)")


@command("synth")
def _synth(args: argparse.Namespace) -> int:
    from .synth import synth_screen

    out, emb = synth_screen(
        args.out, cells=args.cells, genes=args.genes, perturbations=args.perturbations,
        seed=args.seed, chunk_rows=args.chunk_rows, overwrite=args.overwrite,
    )
    print(f"screen: {out}\nembedding: {emb}")
    return 0


@command("convert")
def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_h5ad

    print(convert_h5ad(args.source, args.out, overwrite=args.overwrite,
                       storage_options=_storage_options(args.storage_options)))
    return 0


def run_pseudobulk(args: argparse.Namespace, out: str) -> str:
    """Run the pseudo-bulk step from parsed options and write ``out``."""
    from .pseudobulk import pseudobulk, write_pseudobulk

    options = _storage_options(args.storage_options)
    ds = pseudobulk(
        args.screen, perturbation_key=args.perturbation_key, control=args.control,
        n_top_genes=args.n_top_genes, flavor=args.flavor, target_sum=args.target_sum,
        input=args.input, min_cells=args.min_cells, group_variance=args.group_variance,
        storage_options=options, block_rows=args.block_rows, progress=not args.no_progress,
        memory_limit=None if args.memory_limit in (None, "auto") else args.memory_limit,
    )
    return write_pseudobulk(ds, out, overwrite=args.overwrite, storage_options=options)


@command("pseudobulk")
def _pseudobulk(args: argparse.Namespace) -> int:
    print(run_pseudobulk(args, args.out))
    return 0


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from .synth import synth_screen

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    screen, _ = synth_screen(str(out / "screen.zarr"), cells=20_000, genes=2_000,
                             perturbations=200, seed=0, overwrite=True)
    pb_args = build_parser().parse_args(["pseudobulk", screen, "--out", "unused",
                                         "--n-top-genes", "1000", "--overwrite"])
    pb_args.no_progress = args.no_progress
    pb = run_pseudobulk(pb_args, str(out / "pseudobulk.zarr"))
    print(f"pseudo-bulk: {pb}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``genepert-scale`` command."""
    args = build_parser().parse_args(argv)
    limit_heap_fragmentation()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        with dask_client(args.scheduler, args.workers, threads_per_worker=args.threads_per_worker,
                         memory_limit=args.memory_limit):
            return COMMANDS[args.command](args)
    except GenePertInputError as err:
        if args.debug:
            raise
        print(f"genepert-scale {args.command}: error: {err}", file=sys.stderr)
        return INPUT_ERROR_EXIT_CODE
