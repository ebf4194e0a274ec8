"""Where the time of ``genepert-scale pseudobulk`` goes: a py-spy profile of one run.

    python benchmarks/profile_pass.py                  # run.py's cached 1M-cell screen
    python benchmarks/profile_pass.py --cells 100000

Samples every thread of one run (``py-spy record``, idle samples included),
started with the screen in the page cache as in ``run.py``, and
writes ``benchmarks/results/<date>-<machine>-profile.json`` (numbered
``-2``, ``-3``… when taken; speedscope format: open it at
https://www.speedscope.app). Prints, for each thread, the seconds it spent
and the functions where most of them went. py-spy comes from
PyPI (``pip install py-spy``) and needs permission to trace the process.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from run import HERE, ScreenSpec, ensure_screen, results_path, warm_page_cache

#: Samples per second.
RATE = 100


def profile(screen: Path, out: Path, env: dict[str, str]) -> None:
    """Record one ``pseudobulk`` run of ``screen`` into the speedscope file ``out``."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        sys.exit("py-spy is not installed: pip install py-spy")
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [py_spy, "record", "--idle", "--rate", str(RATE), "--format", "speedscope",
             "--output", str(out), "--", sys.executable, "-m", "genepert_scale", "pseudobulk",
             str(screen), "--out", f"{scratch}/pb.zarr", "--no-progress"],
            check=True, env=env,
        )


def summary(speedscope: dict, top: int) -> str:
    """Seconds per thread and the ``top`` innermost frames of each."""
    frames = speedscope["shared"]["frames"]
    lines = []
    for thread in speedscope["profiles"]:
        where: collections.Counter = collections.Counter()
        for stack, seconds in zip(thread["samples"], thread["weights"]):  # unit: seconds
            innermost = frames[stack[-1]] if stack else {"name": "(idle)"}
            file = Path(innermost.get("file", "")).name
            where[f"{innermost['name']} ({file}:{innermost.get('line', '')})"] += seconds
        lines.append(f"{thread['name']}: {sum(thread['weights']):.2f} s")
        lines += [f"    {seconds:6.2f} s  {name}" for name, seconds in where.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--genes", type=int, default=8000)
    parser.add_argument("--perturbations", type=int, default=2000)
    parser.add_argument("--top", type=int, default=6, help="frames listed per thread")
    parser.add_argument("--cache", type=Path, default=HERE / "cache")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent),
                                         *filter(None, [env.get("PYTHONPATH")])])
    screen = ensure_screen(ScreenSpec(args.cells, args.genes, args.perturbations), args.cache, env)
    out = results_path(args.results, None,
                       f"{dt.date.today().isoformat()}-{socket.gethostname()}-profile")
    warm_page_cache(screen)  # as every timed run: the profile is of the pass, not of the disk
    profile(screen, out, env)
    print(summary(json.loads(out.read_text()), args.top))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
