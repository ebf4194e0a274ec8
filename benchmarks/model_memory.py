"""Peak memory of ``evaluate``, ``fit`` and ``predict`` on a large pseudo-bulk
(100,000 perturbations x 5,000 genes by default) against ``--memory-limit``.

    python benchmarks/model_memory.py --label after [--commands evaluate,fit,predict]

The pseudo-bulk store is written directly (no cells): random deltas with a
planted linear signal from a random gene embedding, in the layout of
``genepert-scale pseudobulk`` (``mean``, ``delta``, ``var``, ``n_cells``,
control moments, HVG columns), plus the embedding as a GenePT-style pickle
(``dict[symbol, list[float]]``), the list of perturbations to predict, and a
ridge model of the planted signal for ``predict`` (so that ``predict`` is
measured whatever ``fit`` does). They are cached under ``benchmarks/cache/``.
95 % of the perturbations are single genes, 5 % pairs of them; 2,500 of the
measured genes are perturbed genes (the ``pca_ridge`` baseline covers them).

Each command is a separate process (``python -m genepert_scale``, the code
on ``PYTHONPATH``); its process tree's resident memory is sampled every
50 ms (:func:`budget.run_measured`); a tree past ``--kill-above`` is ended
and reported as such. Results are added under ``--label`` to
``benchmarks/results/<stem>.json`` and the whole file rendered to ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pickle
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from budget import GiB, run_measured
from run import HERE, machine, versions

#: Share of the perturbations that are pairs of single genes.
PAIR_SHARE = 0.05
#: Measured genes that are also perturbed genes.
PERTURBED_MEASURED = 2500


def cache_dir(n: int, q: int, d: int) -> Path:
    return HERE / "cache" / f"model_{n}p_{q}g_{d}d"


def labels(n: int, q: int, seed: int) -> tuple[list[str], list[str], list[tuple[int, ...]]]:
    """Perturbation labels, measured genes and each label's embedding rows."""
    rng = np.random.default_rng(seed)
    n_pairs = int(n * PAIR_SHARE)
    n_singles = n - n_pairs
    singles = [f"G{i:06d}" for i in range(n_singles)]
    firsts = rng.integers(0, n_singles, n_pairs)
    seconds = (firsts + rng.integers(1, n_singles, n_pairs)) % n_singles
    members = [(i,) for i in range(n_singles)] + [tuple(sorted(p)) for p in zip(firsts, seconds)]
    names = singles + [f"{singles[a]}+{singles[b]}" for a, b in members[n_singles:]]
    shared = min(PERTURBED_MEASURED, q // 2)
    measured = singles[:shared] + [f"R{j:05d}" for j in range(q - shared)]
    return names, measured, members


def build(n: int, q: int, d: int, seed: int) -> Path:
    """Write (once) the store, the embedding pickle, the perturbation list and a model."""
    root = cache_dir(n, q, d)
    if (root / "done").exists():
        return root
    from genepert_scale import __version__
    from genepert_scale.io.encodings import PSEUDOBULK
    from genepert_scale.pp.aggregate import OUTPUT_CHUNK_BYTES, write_pseudobulk
    from genepert_scale.pp.params import PseudobulkParams
    from genepert_scale.tl.embeddings import encode, normalize_rows
    from genepert_scale.tl.ridge import RidgeModel, save_model

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    names, genes, members = labels(n, q, seed)
    rng = np.random.default_rng(seed + 1)
    n_singles = len([m for m in members if len(m) == 1])
    vectors = rng.normal(size=(n_singles, d))
    unit = normalize_rows(vectors)  # the table's rows, as the embedding reader normalises them
    weights = rng.normal(scale=0.5, size=(d, q))
    control_mean = rng.uniform(0.0, 3.0, q)
    rows = max(1, OUTPUT_CHUNK_BYTES // (q * 8))

    def block(kind: str, block_info=None) -> np.ndarray:
        start, stop = block_info[None]["array-location"][0]
        local = np.random.default_rng([seed, start, "mdv".index(kind[0])])
        features = encode(unit, members[start:stop])
        delta = features @ weights + local.normal(scale=0.3, size=(stop - start, q))
        if kind == "delta":
            return delta
        if kind == "mean":
            return delta + control_mean
        return local.gamma(2.0, 0.1, size=(stop - start, q))

    def lazy(kind: str) -> da.Array:
        return da.map_blocks(block, kind, chunks=(da.core.normalize_chunks(rows, (n,))[0], (q,)),
                             dtype=np.float64, meta=np.empty((0, 0)))

    ds = xr.Dataset(
        {
            "mean": (("perturbation", "gene"), lazy("mean")),
            "delta": (("perturbation", "gene"), lazy("delta")),
            "var": (("perturbation", "gene"), lazy("var")),
            "n_cells": ("perturbation", rng.integers(20, 200, n)),
            "control_mean": ("gene", control_mean),
            "control_var": ("gene", rng.gamma(2.0, 0.1, q)),
            "n_control_cells": ((), 5000),
            "highly_variable": ("screen_gene", np.ones(q, dtype=bool)),
            "hvg_means": ("screen_gene", control_mean),
        },
        coords={"perturbation": np.array(names, dtype=object), "gene": np.array(genes, dtype=object),
                "screen_gene": np.array(genes, dtype=object)},
        attrs={**PSEUDOBULK.attrs(), "genepert_scale_version": __version__,
               "parameters": json.dumps(asdict(PseudobulkParams())), "input_kind": "raw",
               "control": "non-targeting", "dropped_perturbations": "[]", "left_out_cells": "{}"},
    )
    write_pseudobulk(ds, str(root / "pb.zarr"))
    table = {f"G{i:06d}": vectors[i].tolist() for i in range(n_singles)}
    (root / "emb.pkl").write_bytes(pickle.dumps(table))
    (root / "perturbations.txt").write_text("\n".join(names) + "\n")
    from genepert_scale.tl.embeddings import load_embeddings

    model = RidgeModel(weights, np.zeros(q), 1.0, pd.Index(genes), control_mean, pd.Index(names),
                       {"embedding": list(load_embeddings(str(root / "emb.pkl")).sources)})
    save_model(model, str(root / "model.zarr"))
    (root / "done").write_text("")
    return root


def commands(root: Path, out: Path, memory_limit: str) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "genepert_scale"]
    common = ["--memory-limit", memory_limit, "--no-progress", "--overwrite"]
    emb = ["--embeddings", str(root / "emb.pkl")]
    pb = str(root / "pb.zarr")
    return {
        "evaluate": [*cli, "evaluate", pb, *emb, "--folds", "5", "--out", str(out / "eval"), *common],
        "fit": [*cli, "fit", pb, *emb, "--out", str(out / "model.zarr"), *common],
        "predict": [*cli, "predict", str(root / "model.zarr"), *emb, "--perturbations-file",
                    str(root / "perturbations.txt"), "--out", str(out / "pred.zarr"), *common],
    }


def git_head() -> str:
    try:
        return subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def render(report: dict) -> str:
    host = report["machine"]
    lines = [f"# Peak memory of evaluate, fit and predict: {report['store']}", "",
             (f"Machine: {host['cpu']}, {host['cores']} cores, {host['ram_gib']} GiB RAM "
              f"({host['hostname']}, {host['platform']}, Python {host['python']})."), "",
             f"Store: {report['store_detail']}", ""]
    for label, entry in report["labels"].items():
        lines += [f"## {label}", "",
                  f"`{entry['benchmark_command']}` at commit {entry['commit']}, {entry['date']}.", "",
                  "| command | exit | wall s | peak tree GiB | peak process GiB | within limit |",
                  "|---|---|---|---|---|---|"]
        for r in entry["runs"]:
            within = ("killed above " + str(r["killed_above_gib"]) + " GiB" if "killed_above_gib" in r
                      else "yes" if r["peak_tree_gib"] <= entry["limit_gib"] else "no")
            lines.append(f"| {r['name']} | {r['returncode']} | {r['wall_s']} | {r['peak_tree_gib']} | "
                         f"{r['peak_process_gib']} | {within} |")
        lines += ["", "Command lines:", ""]
        lines += [f"- {r['name']}: `{r['command']}`" for r in entry["runs"]]
        lines += ["", "Last lines of output:", ""]
        for r in entry["runs"]:
            lines += [f"- {r['name']}:", "", "  ```", *("  " + t for t in r["tail"]), "  ```"]
        if entry.get("notes"):
            lines += ["", entry["notes"]]
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in entry["versions"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--perturbations", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-limit", default="4GiB")
    parser.add_argument("--kill-above", default="10GiB", help="end a run whose memory passes this")
    parser.add_argument("--commands", default="evaluate,fit,predict")
    parser.add_argument("--label", required=True, help="section of the results (e.g. before, after)")
    parser.add_argument("--notes", default="", help="a paragraph added under the section")
    parser.add_argument("--stem", default=f"{dt.date.today().isoformat()}-model-memory-100k")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args(argv)
    from dask.utils import parse_bytes

    n, q, d = args.perturbations, args.genes, args.dim
    root = build(n, q, d, args.seed)
    if args.build_only:
        print(root)
        return 0
    runs = []
    with tempfile.TemporaryDirectory(dir=root, prefix="out-") as scratch:
        table = commands(root, Path(scratch), args.memory_limit)
        for name in args.commands.split(","):
            command = table[name]
            result = {"name": name, "command": shlex.join(command),
                      **run_measured(command, kill_above=parse_bytes(args.kill_above))}
            runs.append(result)
            print(json.dumps(result), flush=True)
    json_path = args.results / f"{args.stem}.json"
    report = json.loads(json_path.read_text()) if json_path.exists() else {
        "store": f"{n:,} perturbations x {q:,} genes", "machine": machine(), "labels": {},
        "store_detail": (f"{n:,} perturbations ({PAIR_SHARE:.0%} pairs) x {q:,} genes, float64 mean, "
                         f"delta and var; a {d}-d embedding of {n - int(n * PAIR_SHARE):,} genes "
                         f"(GenePT-style pickle); {min(PERTURBED_MEASURED, q // 2):,} measured genes are perturbed "
                         "genes. Built by this script (cached)."),
    }
    report["labels"][args.label] = {
        "date": dt.date.today().isoformat(), "commit": git_head(), "limit_gib": parse_bytes(args.memory_limit) / GiB,
        "benchmark_command": shlex.join(["python", *sys.argv]), "versions": versions(),
        "runs": runs, "notes": args.notes,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    (args.results / f"{args.stem}.md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
