"""Decode speed of the codecs we could write X with: the basis of the codec choice.

Writes the CSR arrays (``data``, ``indices``) of one synthetic screen with each
candidate codec and times decompressing every chunk once (single thread and
all threads), plus the on-disk size.

    python benchmarks/codec_choice.py [--cells 100000] [--genes 8000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import anndata as ad
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from genepert_scale.io.store import CSR_CHUNK
from genepert_scale.datasets.synth import synth_screen

CANDIDATES = {
    "zstd (zarr default)": lambda size: (ZstdCodec(level=0), Crc32cCodec()),
    "blosc-zstd+shuffle": lambda size: (BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle, typesize=size), Crc32cCodec()),
    "blosc-lz4+shuffle": lambda size: (BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle, typesize=size), Crc32cCodec()),
}


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=8_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.mkdtemp()
    try:
        screen, _ = synth_screen(f"{work}/s.zarr", cells=args.cells, genes=args.genes,
                                 perturbations=min(500, args.genes), seed=0)
        x = ad.io.read_elem(zarr.open_group(screen)["X"])
        results = {}
        for name, codecs in CANDIDATES.items():
            path = f"{work}/{name.split()[0]}.zarr"
            group = zarr.open_group(path, mode="w")
            for key, values in (("data", x.data.astype(np.float32)), ("indices", x.indices.astype(np.int32))):
                arr = group.create_array(key, shape=values.shape, chunks=(CSR_CHUNK,), dtype=values.dtype, compressors=codecs(4))
                arr[:] = values
            timings = {}
            for threads in (1, os.cpu_count()):
                zarr.config.set({"threading.max_workers": threads})
                best = float("inf")
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    for key in ("data", "indices"):
                        zarr.open_array(f"{path}/{key}")[:]
                    best = min(best, time.perf_counter() - start)
                timings[f"decode_s_{threads}_threads"] = round(best, 3)
            results[name] = {**timings, "bytes_on_disk": dir_size(path)}
        report = {"cells": args.cells, "genes": args.genes, "nnz": int(x.nnz),
                  "raw_bytes": int(x.nnz * 8), "machine": platform.processor() or platform.machine(),
                  "cores": os.cpu_count(), "results": results}
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
