"""A/B timing of the compiled fold alone at two versions of the code, on one
real block of a cached screen, in one process pinned to one CPU.

    python benchmarks/fold_ab.py --base HEAD~1                  # HEAD~1 vs the working tree
    python benchmarks/fold_ab.py --base main~2 --head main --repeats 31

Whole runs (``ab.py``) on a shared VM swing by ±20 % from minute to minute,
more than most changes to the fold are worth. Here each revision's
``_numba_kernels.py`` is loaded as a module of its own (it imports nothing
from the package) and both fold the *same* block, read once, alternately,
``--repeats`` times each, on one CPU: drifts of the machine hit both sides
alike. The block is the first of the screen in ``genepert-scale
pseudobulk``'s default size, with its perturbation codes, the default
flavor's moments and a ``(groups × genes)`` table as in a pass. Reports ns
per stored value (median and minimum) and whether the two sides' group sums
and moments are bit-identical. Writes
``benchmarks/results/<date>-<machine>-fold-ab.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from ab import REPO, ab_parser, describe
from run import ScreenSpec, ensure_screen, machine, results_path, versions, write_report

KERNELS = "genepert_scale/pp/_numba_kernels.py"
#: Where revisions of the older layout (the package under ``src/``) keep it.
OLD_KERNELS = "src/genepert_scale/_numba_kernels.py"


@contextlib.contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """Run the block on CPU ``cpu`` alone, then on the CPUs allowed before."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def load_kernels(revision: str | None, into: Path, name: str) -> ModuleType:
    """``_numba_kernels`` of ``revision`` (``None``: the working tree's) as module ``name``.

    Either is copied into ``into`` first: numba caches compiled code beside
    the source file, and code compiled here, for a module that is not
    importable by its name, must not land in the package's cache.
    """
    path = into / f"{name}.py"
    if revision is None:
        path.write_bytes((REPO / KERNELS).read_bytes())
    else:
        shown = [subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:{where}"],
                                capture_output=True) for where in (KERNELS, OLD_KERNELS)]
        found = [result.stdout for result in shown if result.returncode == 0]
        if not found:
            raise SystemExit(f"{revision} has no {KERNELS} (nor {OLD_KERNELS})")
        path.write_bytes(found[0])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def first_block(screen: Path):
    """The first row block of ``screen`` (CSR, the pass's default size), its
    group codes, the number of groups and the default flavor's moments."""
    from genepert_scale.pp.labels import assign_groups
    from genepert_scale.pp.aggregate import HVG_MOMENTS
    from genepert_scale.io.screen import open_screen

    opened = open_screen(str(screen))
    rows = opened.X.chunks[0][0]
    codes, groups = assign_groups(opened.obs_column("perturbation").array, "non-targeting",
                                  column="perturbation")
    return opened.csr.read(0, rows), codes[:rows], len(groups), HVG_MOMENTS["seurat"]


def fold(module: ModuleType, block, codes, n_groups: int, moments, group_sum=None):
    """Fold ``block`` with ``module``'s ``fold_rows`` (as the pass calls it);
    the seconds it took, the group sums and the moments."""
    import numpy as np

    from genepert_scale.pp import kernels

    if group_sum is None:
        group_sum = np.zeros((n_groups, block.shape[1]), np.int64)
    start = time.perf_counter()
    sums, *_ = module.fold_rows(
        block.data, block.indices, block.indptr, codes, normalize=True, target_sum=1e4,
        log1p_max=kernels.LOG1P_MAX, group_sum=group_sum, sum_bits=kernels.SUM_BITS,
        group_sumsq=None, square_bits=kernels.SQUARE_BITS, moments=moments,
    )
    return time.perf_counter() - start, group_sum, sums


def identical(a: tuple, b: tuple) -> bool:
    """Whether two :func:`fold` results hold bit-identical sums and moments."""
    import numpy as np

    (_, sums_a, moments_a), (_, sums_b, moments_b) = a, b
    return bool(np.array_equal(sums_a, sums_b)) and moments_a.keys() == moments_b.keys() and all(
        np.array_equal(moments_a[k], moments_b[k]) for k in moments_a)


def markdown(report: dict) -> str:
    summary, labels = report["summary"], report["sides"]
    return "\n".join([
        f"# A/B of the compiled fold, {report['date']}", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{report['machine']['ram_gib']} GiB RAM; one process pinned to CPU {report['cpu']}; "
        f"screen `{report['screen']}`, its first block ({report['block_rows']} rows, "
        f"{report['values']:,} stored values, {report['groups']} groups); "
        f"{report['repeats']} folds per side, alternating.", "",
        "| side | code | ns/value median | ns/value min |", "|---|---|---:|---:|",
        *(f"| {side} | {labels[side]} | {s['median_ns']:.2f} | {s['min_ns']:.2f} |"
          for side, s in summary.items()),
        "", f"base / head median: **{report['base_over_head']:.2f}×** (of the minima: "
        f"{report['base_over_head_min']:.2f}×). Group sums and moments bit-identical: "
        f"{'yes' if report['identical'] else 'NO'}.",
    ]) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ab_parser(__doc__.splitlines()[0], repeats=15, stem="fold-ab")
    parser.add_argument("--cpu", type=int, default=None,
                        help="CPU to pin to (default: the last one this process may use)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repeats < 1:
        sys.exit("--repeats must be at least 1")
    allowed = os.sched_getaffinity(0)
    cpu = max(allowed) if args.cpu is None else args.cpu
    if cpu not in allowed:
        sys.exit(f"--cpu {cpu} is not one of the CPUs this process may use: {sorted(allowed)}")
    spec = ScreenSpec(args.cells, args.genes, args.perturbations)
    screen = ensure_screen(spec, args.cache, dict(os.environ))
    block, codes, n_groups, moments = first_block(screen)
    sides = {"base": args.base, "head": args.head}
    with tempfile.TemporaryDirectory(prefix="gps-fold-ab-") as scratch, pinned(cpu):
        modules = {side: load_kernels(rev, Path(scratch), f"fold_{side}")
                   for side, rev in sides.items()}
        first = {side: fold(m, block, codes, n_groups, moments) for side, m in modules.items()}
        same = identical(first["base"], first["head"])
        table = first.pop("base")[1]  # reused from here on: a pass folds every block into one
        seconds: dict[str, list[float]] = {side: [] for side in sides}
        for repeat in range(args.repeats):
            for side in sides if repeat % 2 == 0 else reversed(sides):
                seconds[side].append(fold(modules[side], block, codes, n_groups, moments,
                                          table)[0])
    summary = {side: {"median_ns": statistics.median(s) / block.nnz * 1e9,
                      "min_ns": min(s) / block.nnz * 1e9} for side, s in seconds.items()}
    today = dt.date.today().isoformat()
    report = {
        "date": today,
        "command": shlex.join(["python", "benchmarks/fold_ab.py", *(argv or sys.argv[1:])]),
        "machine": machine(), "versions": versions(), "cpu": cpu, "screen": spec.name,
        "block_rows": block.shape[0], "values": int(block.nnz), "groups": n_groups,
        "repeats": args.repeats, "sides": {side: describe(rev) for side, rev in sides.items()},
        "seconds": seconds, "summary": summary,
        "base_over_head": summary["base"]["median_ns"] / summary["head"]["median_ns"],
        "base_over_head_min": summary["base"]["min_ns"] / summary["head"]["min_ns"],
        "identical": same,
    }
    json_path = results_path(args.results, args.tag, f"{today}-{socket.gethostname()}-fold-ab")
    write_report(report, json_path, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
