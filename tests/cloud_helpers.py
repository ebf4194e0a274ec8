"""Helpers of the cluster, object-store and batch-run tests: tiny screens, run
configs, exact comparison of pseudo-bulk stores, real dask scheduler/worker
processes and a moto S3 server, all on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from distributed import WorkerPlugin

from genepert_scale.datasets.synth import synth_screen

SRC = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def make_screen(directory: Path, *, seed: int = 0, cells: int = 4000) -> str:
    """A small synthetic screen (4,000 cells x 200 genes, 40 perturbations)."""
    store, _ = synth_screen(str(directory / "screen.zarr"), cells=cells, genes=200,
                            perturbations=40, seed=seed, chunk_rows=1000, overwrite=True)
    return store


def write_config(path: Path, *, screen: str, out: str, n_top_genes: int = 100,
                 block_rows: int = 500, extra: str = "") -> Path:
    """A run config with the pseudo-bulk settings of these tests."""
    path.write_text(
        f'[input]\nurl = "{screen}"\n\n'
        f"[pseudobulk]\nn_top_genes = {n_top_genes}\nblock_rows = {block_rows}\n\n"
        f'[output]\ndir = "{out}"\n\n{extra}'
    )
    return path


def assert_same_pseudobulk(actual: xr.Dataset, expected: xr.Dataset) -> None:
    """Every coordinate and data variable equal, bit for bit."""
    assert set(actual.data_vars) == set(expected.data_vars)
    for name in (*expected.coords, *expected.data_vars):
        np.testing.assert_array_equal(actual[name].values, expected[name].values, err_msg=name)


def assert_same_budgeted(actual, expected) -> None:
    """Group statistics (exact sums) and the genes equal bit for bit; the
    HVG table's gene moments and the knockdown (float sums, in blocks that
    the budget sizes) to 1e-12 (relative, or absolute near zero)."""
    assert set(actual.data_vars) == set(expected.data_vars)
    for name in (*expected.coords, *expected.data_vars):
        if name.startswith("hvg_") or name == "knockdown":
            np.testing.assert_allclose(actual[name].values, expected[name].values,
                                       rtol=1e-12, atol=1e-12, err_msg=name)
        else:
            np.testing.assert_array_equal(actual[name].values, expected[name].values, err_msg=name)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment in which child processes import this checkout's package."""
    path = os.pathsep.join(filter(None, [str(SRC), str(TESTS), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


@dataclass
class DaskProcesses:
    """A running ``dask scheduler`` and its ``dask worker`` processes."""

    address: str
    scheduler: subprocess.Popen
    workers: dict[str, subprocess.Popen]


@contextlib.contextmanager
def dask_processes(directory: Path, n_workers: int = 2) -> Iterator[DaskProcesses]:
    """Start the real scheduler and worker CLIs on 127.0.0.1; stop them after."""
    scheduler_file = directory / "scheduler.json"
    env = subprocess_env()
    log = open(directory / "dask.log", "w")
    cli = [sys.executable, "-m"]
    procs: list[subprocess.Popen] = []
    try:
        scheduler = subprocess.Popen(
            [*cli, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        procs.append(scheduler)
        address = _wait_for_address(scheduler_file, scheduler)
        workers = {}
        for i in range(n_workers):
            name = f"worker-{i}"
            workers[name] = subprocess.Popen(
                [*cli, "distributed.cli.dask_worker", address, "--name", name,
                 "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny",
                 "--memory-limit", "1GiB", "--no-dashboard"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )
            procs.append(workers[name])
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(n_workers, timeout=120)
        yield DaskProcesses(address, scheduler, workers)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            if proc.poll() is None:
                proc.kill()
        log.close()


def _wait_for_address(scheduler_file: Path, proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dask scheduler exited with {proc.returncode}")
        if scheduler_file.exists():
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(scheduler_file.read_text())["address"]
        time.sleep(0.1)
    raise TimeoutError("dask scheduler did not write its scheduler file")


class KillOnTask(WorkerPlugin):
    """Worker plugin: the worker named ``victim`` exits (``os._exit``) as it
    starts its ``after``-th task whose key contains ``key_part``."""

    name = "kill-on-task"

    def __init__(self, victim: str, key_part: str, after: int):
        self.victim, self.key_part, self.after = victim, key_part, after
        self.seen = 0

    def setup(self, worker: Any) -> None:
        self.worker = worker

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if self.worker.name != self.victim or finish != "executing":
            return
        if self.key_part in str(key):
            self.seen += 1
            if self.seen >= self.after:
                os._exit(1)


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (HTTP), fake credentials in the environment.

    Yields the endpoint URL.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    fake = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in fake}
    os.environ.update(fake)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
