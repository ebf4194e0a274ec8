"""Side-by-side benchmark of the streamed pseudo-bulk pass against its read
floor and two scanpy peers; every measurement is a separate process.

    python benchmarks/run.py            # 100k and 1M cells, 10k-perturbation variant, ridge
    python benchmarks/run.py --quick    # a small screen, under a minute
    python benchmarks/run.py --render benchmarks/results/<file>.json   # its table again

Screens are generated with ``genepert-scale synth`` once and cached under
``benchmarks/cache/``. Tools run alternating (round-robin) for ``--repeats``
rounds; wall time, CPU time (user + system) and peak RSS of each process come
from ``os.wait4``. Results: ``benchmarks/results/<date>-<machine>.json`` (``-2``,
``-3``… for later runs that day) and ``.md`` (the table with ratios, the exact
command, versions, machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = str(HERE / "tasks.py")
PEERS = ("floor", "zarr_floor", "group_sum_floor", "ours", "scanpy_dask", "scanpy_memory")
#: The pass target of the issue: ours within this factor of the read floor.
FLOOR_TARGET = 1.5


@dataclass(frozen=True)
class ScreenSpec:
    cells: int
    genes: int
    perturbations: int
    seed: int = 0
    peers: tuple[str, ...] = PEERS

    @property
    def name(self) -> str:
        return f"screen_{_human(self.cells)}_{self.genes}g_{self.perturbations}p"


@dataclass
class Measurement:
    tool: str
    screen: str
    repeat: int
    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    returncode: int
    summary: dict = field(default_factory=dict)


def _human(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    if n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def warm_page_cache(path: Path) -> None:
    """Read every file of the store at ``path`` once, untimed, so that each
    measured run starts with the screen in the page cache whatever ran before
    it (scanpy in memory takes ~15 GB at 1M cells and evicts it; the next
    tool would otherwise also time reads from disk)."""
    for file in path.rglob("*"):
        if file.is_file():
            with file.open("rb", buffering=0) as stream:
                while stream.read(1 << 24):
                    pass


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, float, float, int, str]:
    """Run ``argv``; its wall time, CPU seconds, peak RSS (MiB), exit code and stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        print(f"FAILED ({proc.returncode}): {shlex.join(argv)}\n{stderr[-3000:]}", file=sys.stderr)
    rss_mib = usage.ru_maxrss / 1024  # KiB on Linux
    return wall, usage.ru_utime + usage.ru_stime, rss_mib, proc.returncode, stdout


def ensure_screen(spec: ScreenSpec, cache: Path, env: dict[str, str]) -> Path:
    """The cached screen of ``spec``, generated with ``genepert-scale synth`` if missing."""
    path = cache / f"{spec.name}.zarr"
    if not (path / "zarr.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"generating {path} ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "genepert_scale", "synth", str(path), "--cells", str(spec.cells),
             "--genes", str(spec.genes), "--perturbations", str(spec.perturbations),
             "--seed", str(spec.seed), "--overwrite", "--no-progress"],
            check=True, env=env, stdout=subprocess.DEVNULL,
        )
    return path


@functools.cache
def ours_block_rows(screen: Path) -> int:
    """Rows per block of ``genepert-scale pseudobulk`` on ``screen`` (its default sizing)."""
    from genepert_scale.io.screen import open_screen

    return open_screen(str(screen)).X.chunks[0][0]


def tool_argv(tool: str, screen: Path, n_top_genes: int, scratch: Path) -> list[str]:
    if tool == "floor":
        return [sys.executable, TASKS, "floor", str(screen)]
    if tool == "zarr_floor":
        return [sys.executable, TASKS, "zarr-floor", str(screen)]
    if tool == "group_sum_floor":
        return [sys.executable, TASKS, "group-sum-floor", str(screen),
                "--block-rows", str(ours_block_rows(screen))]
    if tool == "ours":
        return [sys.executable, "-m", "genepert_scale", "pseudobulk", str(screen),
                "--n-top-genes", str(n_top_genes), "--out", str(scratch / "pb.zarr"),
                "--overwrite", "--no-progress", "--no-group-variance"]  # means, as the peers
    if tool == "scanpy_memory":
        return [sys.executable, TASKS, "scanpy-memory", str(screen), "--n-top-genes", str(n_top_genes)]
    if tool == "scanpy_dask":
        return [sys.executable, TASKS, "scanpy-dask", str(screen), "--n-top-genes", str(n_top_genes)]
    raise ValueError(tool)


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return {}


def anndata_defaults_store(screen: Path) -> Path:
    """``screen`` written again by the running anndata with its default
    settings (anndata 0.13: zarr v3 with sharding), cached beside it."""
    out = screen.with_name(f"{screen.stem}-anndata-{metadata.version('anndata')}.zarr")
    if not ((out / "zarr.json").exists() or (out / ".zgroup").exists()):
        print(f"writing {out} with anndata's defaults ...", flush=True)
        # in a child: a harness that held the screen would pass its peak RSS on to
        # every process it starts (Linux reports a forked child's ru_maxrss from its parent's)
        subprocess.run([sys.executable, "-c", "import anndata as ad, sys; "
                        "ad.read_zarr(sys.argv[1]).write_zarr(sys.argv[2])", str(screen), str(out)],
                       check=True)
    return out


def run_screens(specs, repeats, n_top_genes, cache, env, anndata_defaults=False) -> list[Measurement]:
    results = []
    for spec in specs:
        screen = ensure_screen(spec, cache, env)
        if anndata_defaults:
            screen = anndata_defaults_store(screen)
        with tempfile.TemporaryDirectory(prefix="gps-bench-") as scratch:
            for repeat in range(repeats):
                for tool in spec.peers:  # alternating: one of each per round
                    argv = tool_argv(tool, screen, n_top_genes, Path(scratch))
                    warm_page_cache(screen)
                    wall, cpu, rss, code, stdout = measure(argv, env)
                    m = Measurement(tool, spec.name, repeat, wall, cpu, rss, code, _last_json(stdout))
                    print(f"{spec.name:28s} {tool:14s} #{repeat}: {wall:7.2f} s wall "
                          f"{cpu:7.2f} s cpu {rss:8.0f} MiB", flush=True)
                    results.append(m)
    return results


def run_ridge(shape: tuple[int, int, int], repeats: int, env) -> list[Measurement]:
    """Both ridge methods on both workloads (``tasks.WORKLOADS``), alternating."""
    p, d, q = shape
    results = []
    for repeat in range(repeats):
        for workload in ("every", "select"):
            for tool in ("ridge-eigen", "ridge-cholesky"):
                argv = [sys.executable, TASKS, tool, "--p", str(p), "--d", str(d), "--q", str(q),
                        "--workload", workload]
                wall, cpu, rss, code, stdout = measure(argv, env)
                m = Measurement(tool, f"ridge_P{p}_d{d}_q{q}_{workload}", repeat, wall, cpu, rss,
                                code, _last_json(stdout))
                print(f"{m.screen:28s} {tool:14s} #{repeat}: {wall:7.2f} s wall "
                      f"(solve {m.summary.get('inner_seconds', float('nan')):.2f} s) {rss:8.0f} MiB",
                      flush=True)
                results.append(m)
    return results


def _by_round(peer: list[Measurement], ours: list[Measurement],
              rounds: list[int]) -> list[float | None]:
    """``peer / ours`` wall time in each of ``rounds`` (``None`` where either
    failed): a peer and ours in the same round ran close together, so on a VM
    whose second core comes and goes they compare more fairly than medians
    taken over all rounds."""
    peer_wall = {m.repeat: m.wall_s for m in peer}
    ours_wall = {m.repeat: m.wall_s for m in ours}
    return [peer_wall[r] / ours_wall[r] if r in peer_wall and r in ours_wall else None
            for r in rounds]


def summarize(results: list[Measurement]) -> dict:
    """Median wall/CPU/RSS per (screen, tool) and the ratios of the issue."""
    table: dict[str, dict[str, dict]] = {}
    rounds: dict[str, set[int]] = {}
    for m in results:
        rounds.setdefault(m.screen, set()).add(m.repeat)
        if m.returncode == 0:
            table.setdefault(m.screen, {}).setdefault(m.tool, []).append(m)
    out = {}
    for screen, tools in table.items():
        rows = {}
        for tool, ms in tools.items():
            rows[tool] = {
                "runs": len(ms),
                "wall_s": statistics.median(m.wall_s for m in ms),
                "wall_min_s": min(m.wall_s for m in ms),
                "cpu_s": statistics.median(m.cpu_s for m in ms),
                "peak_rss_mib": max(m.peak_rss_mib for m in ms),
                "cores": statistics.median(m.cpu_s / m.wall_s for m in ms),
            }
            inner = [m.summary["inner_seconds"] for m in ms if "inner_seconds" in m.summary]
            if inner:
                rows[tool]["inner_s"] = statistics.median(inner)
        ours = rows.get("ours")
        for tool in ("zarr_floor", "group_sum_floor"):
            if "floor" in rows and tool in rows:
                rows[tool]["over_floor"] = rows[tool]["wall_s"] / rows["floor"]["wall_s"]
        if ours:
            if "floor" in rows:
                ours["ours_over_floor"] = ours["wall_s"] / rows["floor"]["wall_s"]
            if "group_sum_floor" in rows:
                ours["ours_over_group_sum_floor"] = ours["wall_s"] / rows["group_sum_floor"]["wall_s"]
            for peer in ("scanpy_memory", "scanpy_dask"):
                if peer in rows:
                    rows[peer]["peer_over_ours"] = rows[peer]["wall_s"] / ours["wall_s"]
                    rows[peer]["peer_over_ours_by_round"] = _by_round(tools[peer], tools["ours"],
                                                                       sorted(rounds[screen]))
        if "ridge-eigen" in rows and "ridge-cholesky" in rows:
            rows["ridge-eigen"]["cholesky_over_eigen"] = (
                rows["ridge-cholesky"]["inner_s"] / rows["ridge-eigen"]["inner_s"]
            )
        out[screen] = rows
    return out


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram = float("nan")
    return {"hostname": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
            "ram_gib": round(ram, 1), "platform": platform.platform(),
            "python": platform.python_version()}


def versions() -> dict:
    names = ("genepert-scale", "numpy", "scipy", "numba", "dask", "distributed", "zarr",
             "numcodecs", "anndata", "scanpy")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def markdown(report: dict) -> str:
    lines = [
        f"# Benchmark {report['date']} on {report['machine']['hostname']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{report['machine']['ram_gib']} GiB RAM, {report['machine']['platform']}, "
        f"Python {report['machine']['python']}",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        "",
        f"Median of {report['repeats']} alternating runs per tool, each a separate process"
        + (" started with the screen in the page cache (every file of the store read just "
           "before, untimed)" if report.get("page_cache") == "warm" else "")
        + "; wall time includes interpreter start, CPU = user + system, peak RSS = max over "
        "runs; failed runs are left out of every figure.",
        "`floor` decodes every chunk of X once with the reader ours uses "
        "(zarr's `get_basic_selection` straight into reused buffers, through zarrs' codec "
        "pipeline where ours uses it: `genepert_scale.io.codecs`; in as many threads as "
        "cores); `zarr_floor` does the same through zarr-python's plain array reads (its "
        "own codec pipeline, a new array per read). "
        "`group_sum_floor` is the floor plus the "
        "least compute of a one-pass group mean into dense tables: each stored value added, as it is, to its "
        "group's row of a dense int64 (groups × genes) table (through a scratch row per "
        "group, as ours), with ours' block size and threads, and nothing else (no "
        "normalization, log1p, moments or output). `ours` is "
        f"`genepert-scale pseudobulk` ({report['n_top_genes']} HVGs + means, written to zarr); "
        "`scanpy_memory` reads the whole store; `scanpy_dask` is scanpy on a dask-backed "
        "AnnData plus a per-block group sum.",
        "",
        "`cores` is the median over runs of CPU / wall time (how much of the machine a run "
        "got); `peer / ours` is the ratio of the medians, then in brackets the ratio within "
        "each round (– where a run failed).",
        "",
        "| screen | tool | wall s | CPU s | cores | peak RSS MiB | / floor "
        "| ours / group-sum floor | peer / ours |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for screen, rows in report["summary"].items():
        if screen.startswith("ridge"):
            continue
        for tool, r in rows.items():
            over_floor = r.get("ours_over_floor", r.get("over_floor", float("nan")))
            rounds = ", ".join("–" if ratio is None else f"{ratio:.1f}"
                               for ratio in r.get("peer_over_ours_by_round", []))
            lines.append(
                f"| {screen} | {tool} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
                f"{r.get('cores', float('nan')):.2f} | {r['peak_rss_mib']:.0f} | "
                f"{over_floor:.2f} | "
                f"{r.get('ours_over_group_sum_floor', float('nan')):.2f} | "
                f"{r.get('peer_over_ours', float('nan')):.1f}".replace("nan", "")
                + (f" ({rounds})" if rounds else "") + " |"
            )
    lines += [
        "",
        f"Target: ours ≤ {FLOOR_TARGET} × floor. Where `group_sum_floor / floor` exceeds "
        f"{FLOOR_TARGET}, no pass that sums groups into dense tables with this block size "
        "reaches the target on this machine: the added compute cannot be hidden under "
        "decompression.",
    ]
    ridge = {s: r for s, r in report["summary"].items() if s.startswith("ridge")}
    if ridge:
        lines += [
            "",
            "Ridge, 5-alpha path (solve time, excluding data generation): `genepert_scale.tl.ridge` "
            "(statistics GᵀG, GᵀX; one eigendecomposition; every alpha) vs plain scipy "
            "`cho_factor`/`cho_solve` per alpha. `_every`: explicit coefficients for every "
            "alpha, from all rows. `_select`: 20 % of the rows held out, the alpha with the "
            "smallest held-out error chosen, its coefficients returned (what `fit` does; "
            "ours scores every alpha in the eigenbasis, Cholesky predicts the held-out rows "
            "with each alpha's coefficients).",
            "",
            "| problem | method | solve s | wall s | peak RSS MiB | cholesky / eigen |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for screen, rows in ridge.items():
            for tool, r in rows.items():
                lines.append(
                    f"| {screen} | {tool} | {r.get('inner_s', float('nan')):.2f} | "
                    f"{r['wall_s']:.2f} | {r['peak_rss_mib']:.0f} | "
                    f"{r.get('cholesky_over_eigen', float('nan')):.2f} |".replace("nan", "")
                )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small screen, under a minute")
    parser.add_argument("--cells", type=int, nargs="+", help="screen sizes (default 100000 1000000)")
    parser.add_argument("--genes", type=int, default=8000)
    parser.add_argument("--perturbations", type=int, default=2000)
    parser.add_argument("--wide-perturbations", type=int, default=10_000,
                        help="perturbations of the genome-wide variant at the largest size (0: skip)")
    parser.add_argument("--n-top-genes", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5,
                        help="alternating rounds (medians are reported)")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated tools")
    parser.add_argument("--ridge", default="10000,3072,5000", help="P,d,q of the ridge timing ('' skips)")
    parser.add_argument("--cache", type=Path, default=HERE / "cache")
    parser.add_argument("--anndata-defaults", action="store_true",
                        help="run on the screens as the running anndata writes them by default "
                             "(anndata 0.13: sharded zarr v3), e.g. from a Python 3.12 venv with scanpy 1.12")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--tag", default=None,
                        help="results file name (default <date>-<machine>, numbered if taken)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="only summarize the runs of an earlier results file again and "
                             "rewrite it and its table")
    args = parser.parse_args(argv)
    if args.quick:
        args.cells = args.cells or [20_000]
        args.genes, args.perturbations, args.n_top_genes = 2000, 200, 1000
        args.wide_perturbations = 0
        args.repeats = min(args.repeats, 2)
        args.ridge = "2000,512,1000" if args.ridge == "10000,3072,5000" else args.ridge
    args.cells = args.cells or [100_000, 1_000_000]
    return args


def free_path(folder: Path, stem: str) -> Path:
    """``folder/stem.json``, or ``stem-2.json``, ``stem-3.json``… when taken: a
    second run the same day does not overwrite the first one's results."""
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    return path


def results_path(folder: Path, tag: str | None, stem: str) -> Path:
    """Where a run's JSON goes: ``folder/tag.json`` when a tag is given, else
    the first free ``stem`` name (:func:`free_path`); ``folder`` is created."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{tag}.json" if tag else free_path(folder, stem)


def write_report(report: dict, json_path: Path, table: str) -> None:
    """Write ``report`` to ``json_path`` and its Markdown ``table`` beside it."""
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(table)
    print(table)
    print(f"wrote {json_path} and {md_path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        if not isinstance(report.get("runs"), list):
            sys.exit(f"{args.render} is not a results file of run.py (no list of runs); "
                     "give one written by benchmarks/run.py (ab.py writes its own table)")
        results = [Measurement(**run) for run in report["runs"]]
        report["summary"] = summarize(results)
        write_report(report, args.render, markdown(report))
        return 0 if all(m.returncode == 0 for m in results) else 1
    env = dict(os.environ)
    src = str(HERE.parent)
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    peers = tuple(p for p in args.peers.split(",") if p)
    specs = [ScreenSpec(c, args.genes, args.perturbations, peers=peers) for c in args.cells]
    if args.wide_perturbations:
        wide_peers = tuple(p for p in peers if p in ("floor", "zarr_floor", "group_sum_floor", "ours"))
        specs.append(ScreenSpec(max(args.cells), args.genes, args.wide_perturbations, peers=wide_peers))
    start = time.perf_counter()
    results = run_screens(specs, args.repeats, args.n_top_genes, args.cache, env, args.anndata_defaults)
    if args.ridge:
        shape = tuple(int(v) for v in args.ridge.split(","))
        results += run_ridge(shape, args.repeats, env)
    today = dt.date.today().isoformat()
    report = {
        "date": today,
        "command": shlex.join([Path(sys.executable).name, "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "versions": versions(),
        "repeats": args.repeats,
        "page_cache": "warm",  # see warm_page_cache
        "n_top_genes": args.n_top_genes,
        "screens": [asdict(s) | {"name": s.name} for s in specs],
        "summary": summarize(results),
        "runs": [asdict(m) for m in results],
        "total_seconds": time.perf_counter() - start,
    }
    stem = f"{today}-{socket.gethostname()}{'-quick' if args.quick else ''}"
    write_report(report, results_path(args.results, args.tag, stem), markdown(report))
    return 0 if all(m.returncode == 0 for m in results) else 1


if __name__ == "__main__":
    sys.exit(main())
