"""A/B timing of ``genepert-scale pseudobulk`` at two versions of the code, on
the same cached screen, alternating, each run its own process.

    python benchmarks/ab.py --base HEAD~1                    # HEAD~1 vs the working tree
    python benchmarks/ab.py --base main~3 --head main --cells 100000 --repeats 7
    python benchmarks/ab.py --base HEAD~1 --screen S.zarr --args "--memory-limit 4GiB" --repeats 3

``--base`` and ``--head`` are git revisions (``--head`` defaults to the
working tree); each revision's package is exported with ``git archive`` into
a scratch folder and run with ``PYTHONPATH`` pointing there. Every version
runs once untimed first (numba compiles its cache), then the two alternate
for ``--repeats`` rounds, each run started with the screen in the page
cache (``run.warm_page_cache``). Wall time, CPU time and peak RSS come from
``run.measure``; the outputs of the two versions are compared variable by
variable (an optimisation must not change a result). Writes
``benchmarks/results/<date>-<machine>-ab.json`` (numbered ``-2``, ``-3``… when
taken) and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from run import (
    HERE,
    ScreenSpec,
    ensure_screen,
    machine,
    measure,
    results_path,
    versions,
    warm_page_cache,
    write_report,
)

REPO = HERE.parent


def export_src(revision: str | None, into: Path) -> Path:
    """The folder to put on ``PYTHONPATH`` for the package of ``revision``
    (``None``: the working tree's): ``genepert_scale/`` at the top, or under
    ``src/`` in revisions of the older layout."""
    if revision is None:
        return REPO
    listing = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", revision],
                             check=True, capture_output=True, text=True).stdout.split()
    top = "genepert_scale" if "genepert_scale" in listing else "src"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", revision, top],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into if top == "genepert_scale" else into / "src"


def describe(revision: str | None) -> str:
    """Short hash and subject of ``revision`` (``None``: HEAD, marked if the package changed)."""
    if revision is None:
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "genepert_scale"],
                               capture_output=True, text=True).stdout.strip()
        head = describe("HEAD")
        return f"{head} + uncommitted changes" if dirty else head
    return subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s", revision],
                          check=True, capture_output=True, text=True).stdout.strip()[:100]


def pseudobulk_argv(screen: Path, out: Path, extra: Sequence[str] = ()) -> list[str]:
    """The command line of one timed run: the CLI's defaults, as ``run.py``'s
    ``ours``, and ``extra`` options (those one side needs for the same work).
    ``-P``: the package comes from ``PYTHONPATH``, not from the current
    directory (the checkout's own package when run from its root)."""
    return [sys.executable, "-P", "-m", "genepert_scale", "pseudobulk", str(screen), "--out", str(out),
            "--overwrite", "--no-progress", *extra]


def same_outputs(a: Path, b: Path) -> dict[str, bool]:
    """Whether every variable of two pseudo-bulk stores (data and coordinates:
    the selected genes, the perturbations kept) is bit-identical."""
    import numpy as np
    import xarray as xr

    with xr.open_zarr(a) as x, xr.open_zarr(b) as y:
        names = sorted(set(x.variables) | set(y.variables))
        return {name: name in x and name in y and x[name].shape == y[name].shape
                and bool(np.array_equal(x[name].values, y[name].values,
                                        equal_nan=x[name].dtype.kind in "fc"))  # numpy 2.0: not for strings
                for name in names}


def markdown(report: dict) -> str:
    """The report's table: medians per side, their ratio, which outputs match."""
    summary, labels, identical = report["summary"], report["sides"], report["identical_outputs"]
    lines = [
        f"# A/B of `genepert-scale pseudobulk`, {report['date']}", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{report['machine']['ram_gib']} GiB RAM; screen `{report['screen']}`; medians of "
        f"{report['repeats']} alternating runs, each a separate process started with the "
        "screen in the page cache (failed runs left out).", "",
        "| side | code | wall s | CPU s | peak RSS MiB |", "|---|---|---:|---:|---:|",
        *(f"| {side} | {labels[side]} | {s['wall_s']:.2f} | {s['cpu_s']:.2f} | "
          f"{s['peak_rss_mib']:.0f} |" for side, s in summary.items()),
        "", f"base / head wall time: **{report['base_over_head']:.2f}×** (the median of each "
        f"round's ratio: {report['base_over_head_by_round'] or float('nan'):.2f}×, rounds "
        + ", ".join(f"{r:.2f}" for r in report["round_ratios"]) + "). Outputs bit-identical: "
        + ", ".join(f"{name} {'yes' if same else 'NO'}" for name, same in identical.items()),
    ]
    return "\n".join(lines) + "\n"


def ab_parser(description: str, *, repeats: int, stem: str) -> argparse.ArgumentParser:
    """The options every A/B script shares: the two revisions, the cached
    screen, the rounds and where the results go (named ``<date>-<machine>-stem``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--base", required=True, help="git revision of the A side")
    parser.add_argument("--head", default=None,
                        help="git revision of the B side (default: the working tree)")
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--genes", type=int, default=8000)
    parser.add_argument("--perturbations", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--cache", type=Path, default=HERE / "cache")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--tag", default=None,
                        help=f"results file name (default <date>-<machine>-{stem}, "
                             "numbered if taken)")
    parser.add_argument("--head-args", default="",
                        help="extra pseudobulk options of the B side, for the same work as A "
                             "(e.g. '--no-group-variance' where B's defaults do more)")
    parser.add_argument("--args", default="",
                        help="pseudobulk options of both sides (e.g. '--memory-limit 4GiB')")
    parser.add_argument("--screen", type=Path,
                        help="an existing screen instead of the synthetic one of --cells, "
                             "--genes and --perturbations")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return ab_parser(__doc__.splitlines()[0], repeats=5, stem="ab").parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = ScreenSpec(args.cells, args.genes, args.perturbations)
    screen = args.screen or ensure_screen(spec, args.cache, dict(os.environ))
    sides = {"base": args.base, "head": args.head}
    both = tuple(shlex.split(args.args))
    extra = {"base": both, "head": (*both, *shlex.split(args.head_args))}
    labels = {side: describe(rev) for side, rev in sides.items()}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="gps-ab-") as scratch:
        scratch = Path(scratch)
        envs, outs = {}, {}
        for side, revision in sides.items():
            src = export_src(revision, scratch / side)
            envs[side] = dict(os.environ, PYTHONPATH=str(src))
            outs[side] = scratch / f"{side}.zarr"
            measure(pseudobulk_argv(screen, outs[side], extra[side]), envs[side])  # numba's cache
        for repeat in range(args.repeats):
            for side in sides:
                warm_page_cache(screen)
                wall, cpu, rss, code, _ = measure(pseudobulk_argv(screen, outs[side], extra[side]),
                                                  envs[side])
                runs[side].append({"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": rss,
                                   "returncode": code})
                print(f"{side} #{repeat}: {wall:6.2f} s wall {cpu:6.2f} s cpu {rss:6.0f} MiB",
                      flush=True)
        identical = same_outputs(outs["base"], outs["head"])
    succeeded = {side: [r for r in rs if r["returncode"] == 0] for side, rs in runs.items()}
    for side, rs in succeeded.items():
        if not rs:
            sys.exit(f"every run of {side} ({labels[side]}) failed; run "
                     f"{shlex.join(pseudobulk_argv(screen, Path('out.zarr')))} with "
                     f"PYTHONPATH at that revision's package to see why")
    summary = {side: {key: statistics.median(r[key] for r in rs)
                      for key in ("wall_s", "cpu_s", "peak_rss_mib")}
               for side, rs in succeeded.items()}
    speedup = summary["base"]["wall_s"] / summary["head"]["wall_s"]
    # a round's two runs ran back to back: their ratio is spared most of a VM's drift
    rounds = [a["wall_s"] / b["wall_s"] for a, b in zip(runs["base"], runs["head"])
              if a["returncode"] == 0 and b["returncode"] == 0]
    today = dt.date.today().isoformat()
    report = {
        "date": today,
        "command": shlex.join(["python", "benchmarks/ab.py", *(argv or sys.argv[1:])]),
        "machine": machine(), "versions": versions(),
        "screen": str(args.screen) if args.screen else spec.name, "repeats": args.repeats,
        "sides": labels, "runs": runs, "summary": summary,
        "base_over_head": speedup, "round_ratios": rounds,
        "base_over_head_by_round": statistics.median(rounds) if rounds else None,
        "identical_outputs": identical,
    }
    json_path = results_path(args.results, args.tag, f"{today}-{socket.gethostname()}-ab")
    write_report(report, json_path, markdown(report))
    return 0 if all(r["returncode"] == 0 for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
