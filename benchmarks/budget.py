"""Peak memory of ``genepert-scale pseudobulk`` against its memory budget, on
screens whose (groups × genes) outgrow one machine, and equality of the
budgeted result with a reference run.

    python benchmarks/budget.py SCREEN.zarr --limits default,4GiB [--workers 2 --worker-memory 2GiB] [--sorted]

Each run is a separate process (``genepert-scale pseudobulk``); its process
tree's resident memory (the command and, with ``--workers``, its LocalCluster
workers) is sampled every 50 ms: the peak of the sum, and each process's
own peak. Every run's output is compared with the first one's (group
statistics bit for bit, the HVG table to 1e-12). The read floor is the time
to decode ``X`` once (``tasks.py zarr-floor``: through zarr); the write
floor the time to write the first run's output again. With ``--sorted``,
the runs after the first are made on the screen in group order
(``genepert-scale sort``, itself measured). Results:
``benchmarks/results/<date>-memory-budget-<screen>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import xarray as xr

from run import HERE, TASKS, machine, versions

GiB = 2**30


def sample_tree(process: psutil.Process, stop: threading.Event, peaks: dict,
                kill_above: int | None = None) -> None:
    """Record, until ``stop``, the peak summed RSS of ``process`` and its
    descendants (``peaks["tree"]``) and each one's own peak (by pid); with
    ``kill_above``, end the tree once the sum passes it (``peaks["killed"]``)."""
    while not stop.is_set():
        try:
            members = [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        for member in members:
            try:
                rss = member.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            total += rss
            peaks[member.pid] = max(peaks.get(member.pid, 0), rss)
        peaks["tree"] = max(peaks.get("tree", 0), total)
        if kill_above and total > kill_above:
            peaks["killed"] = True
            for member in reversed(members):
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()
            return
        time.sleep(0.05)


def run_measured(command: list[str], kill_above: int | None = None) -> dict:
    """Run ``command``; its wall time, exit code and memory peaks. With
    ``kill_above`` (bytes), a tree whose memory passes it is killed and the
    result says so (``killed_above_gib``)."""
    peaks: dict = {}
    stop = threading.Event()
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = threading.Thread(target=sample_tree, args=(psutil.Process(child.pid), stop, peaks, kill_above))
    sampler.start()
    output, _ = child.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    tree = peaks.pop("tree", 0)
    killed = peaks.pop("killed", False)
    return {"wall_s": round(wall, 2), "returncode": child.returncode,
            **({"killed_above_gib": round(kill_above / GiB, 3)} if killed else {}),
            "peak_tree_gib": round(tree / GiB, 3),
            "peak_process_gib": round(max(peaks.values(), default=0) / GiB, 3),
            "plan": next((line.split("pass plan: ", 1)[1] for line in output.splitlines()
                          if "pass plan: " in line), None),
            "tail": output.splitlines()[-3:]}


def same_result(path: str, reference: str, rows: int = 4096) -> bool:
    """Group statistics equal bit for bit, the HVG table and knockdown (float
    sums over blocks the budget sizes) to 1e-12; compared ``rows`` rows at a
    time (100,000 perturbations x 5,000 genes is 4 GB an array)."""
    a, b = xr.open_zarr(path), xr.open_zarr(reference)
    for name in (*b.coords, *b.data_vars):
        if a[name].shape != b[name].shape:
            return False
        n = b[name].shape[0] if b[name].ndim else 1
        for first in range(0, n, rows):
            part = {b[name].dims[0]: slice(first, first + rows)} if b[name].ndim else {}
            x, y = a[name].isel(part).values, b[name].isel(part).values
            close = (np.allclose(x, y, rtol=1e-12, atol=1e-12, equal_nan=True)
                     if name.startswith("hvg_") or name == "knockdown"
                     else np.array_equal(x, y, equal_nan=x.dtype.kind == "f"))
            if not close:
                return False
    return True


def read_floor(screen: str) -> float:
    """Seconds to decode ``X`` once (the median of 3 runs of ``tasks.py floor``)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, TASKS, "zarr-floor", screen], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)), 2)


def pseudobulk_command(screen: str, n_top_genes: int) -> list[str]:
    """``genepert-scale pseudobulk`` of ``screen``, without its output and limits."""
    return ["genepert-scale", "pseudobulk", screen, "--control", "non-targeting",
            "--n-top-genes", str(n_top_genes), "--no-progress", "-v", "--overwrite"]


def sort_run(screen: str, out: str, limits: list[str]) -> dict:
    """``genepert-scale sort`` of ``screen`` into ``out`` within the smallest
    of ``limits`` (none: ``"default"`` only), measured."""
    import dask.utils

    given = [limit for limit in limits if limit != "default"]
    smallest = min(given, key=dask.utils.parse_bytes) if given else None
    command = ["genepert-scale", "sort", screen, out, "--control", "non-targeting",
               *(["--memory-limit", smallest] if smallest else []), "--no-progress", "--overwrite"]
    return {"run": f"sort ({smallest or 'default'})", "command": shlex.join(command),
            **run_measured(command)}


def write_floor(store: str) -> float:
    """Seconds to write the output ``store`` holds again with the writer of
    ``pseudobulk`` (its arrays decoded and encoded anew): what writing the
    output costs at least, beside reading the screen."""
    code = ("import sys, tempfile, time\n"
            "from genepert_scale.pp.aggregate import open_pseudobulk, write_pseudobulk\n"
            "ds = open_pseudobulk(sys.argv[1])\n"
            "with tempfile.TemporaryDirectory(dir=sys.argv[2]) as scratch:\n"
            "    start = time.perf_counter()\n"
            "    write_pseudobulk(ds, scratch + '/copy.zarr')\n"
            "    print(time.perf_counter() - start)\n")
    done = subprocess.run([sys.executable, "-c", code, store, str(Path(store).parent)],
                          check=True, capture_output=True, text=True)
    return round(float(done.stdout.split()[-1]), 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("screen")
    parser.add_argument("--limits", default="default,4GiB",
                        help="comma-separated --memory-limit values ('default': none given)")
    parser.add_argument("--workers", type=int, default=0, help="also run on a LocalCluster")
    parser.add_argument("--worker-memory", default="2GiB")
    parser.add_argument("--n-top-genes", type=int, default=5000)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--tag", default="", help="appended to the results file's name")
    parser.add_argument("--sorted", action="store_true",
                        help="after the first run, write the screen in group order "
                             "('genepert-scale sort', within the smallest limit) and make "
                             "the other runs on it")
    args = parser.parse_args(argv)
    screen = args.screen
    runs = [(limit, []) if limit == "default" else (limit, ["--memory-limit", limit])
            for limit in args.limits.split(",")]
    if args.workers:
        runs.append((f"{args.workers} workers x {args.worker_memory}",
                     ["--workers", str(args.workers), "--threads-per-worker", "1",
                      "--memory-limit", args.worker_memory]))
    results = []
    with tempfile.TemporaryDirectory(dir=Path(screen).parent) as scratch:
        reference = None
        for label, extra in runs:
            out = str(Path(scratch) / f"pb-{len(results)}.zarr")
            command = [*pseudobulk_command(screen, args.n_top_genes), "--out", out, *extra]
            result = {"run": label, "command": shlex.join(command), **run_measured(command)}
            if result["returncode"] == 0:
                reference = reference or out
                result["same_as_first"] = out == reference or same_result(out, reference)
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.sorted and screen == args.screen:
                screen = str(Path(scratch) / "sorted.zarr")
                limits = [*args.limits.split(","), *([args.worker_memory] if args.workers else [])]
                results.append(sort_run(args.screen, screen, limits))
                print(json.dumps(results[-1]), flush=True)
        floor = read_floor(screen)
        written = write_floor(reference) if reference else None
    report = {"date": dt.date.today().isoformat(), "command": shlex.join(sys.argv),
              "screen": args.screen, "read_floor_s": floor, "write_floor_s": written,
              "machine": machine(), "versions": versions(), "runs": results}
    stem = f"{report['date']}-memory-budget-{Path(args.screen).stem}{args.tag and '-' + args.tag}"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Memory budget of pseudobulk: {Path(args.screen).name}", "",
             f"`{report['command']}` on {report['machine']}, {report['date']}.", "",
             f"Read floor (decode X once): {floor} s. Write floor (write the first run's "
             f"output again): {written} s.", "",
             "| run | plan | wall s | x read floor | x read + write floor | peak tree GiB "
             "| peak process GiB | same result |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        both = f"{r['wall_s'] / (floor + written):.2f}" if written else "-"
        lines.append(f"| {r['run']} | {r['plan'] or '-'} | {r['wall_s']} | "
                     f"{r['wall_s'] / floor:.2f} | {both} | "
                     f"{r['peak_tree_gib']} | {r['peak_process_gib']} | "
                     f"{r.get('same_as_first', '-' if r['returncode'] == 0 else 'failed: ' + ' / '.join(r['tail']))} |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    (args.results / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
