"""Where work runs: local threads, a LocalCluster, or a running
dask.distributed scheduler — chosen once, for every command — and progress
display for long computations.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.threaded
from dask.system import CPU_COUNT

from .errors import ParameterError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None,
    workers: int | None = None,
    *,
    threads_per_worker: int | None = None,
    memory_limit: str | None = "auto",
    slurm: dict[str, Any] | None = None,
) -> Iterator[Any]:
    """Context in which dask computations run on the chosen cluster.

    Parameters
    ----------
    scheduler
        Address of a running scheduler (``tcp://host:8786``). When neither a
        scheduler, ``workers`` nor ``slurm`` is given, the
        ``DASK_SCHEDULER_ADDRESS`` environment variable is used if set.
    workers
        Start a ``LocalCluster`` with this many worker processes, or with
        ``slurm``, this many SLURM jobs.
    threads_per_worker, memory_limit
        For the ``LocalCluster``.
    slurm
        Keyword arguments of ``dask_jobqueue.SLURMCluster`` (``cores``,
        ``memory``, ``queue``, ``walltime``, ...): start the workers as SLURM jobs.

    Yields
    ------
    distributed.Client or None
        ``None`` for local threads.
    """
    if scheduler is None and workers is None and slurm is None:
        scheduler = os.environ.get("DASK_SCHEDULER_ADDRESS")
    if not scheduler and not workers and slurm is None:
        with dask.config.set(scheduler=dask.threaded.get):  # see compute
            yield None
        return
    from distributed import Client

    cluster = None if scheduler else _start_cluster(workers, threads_per_worker, memory_limit, slurm)
    client = Client(scheduler or cluster)
    log.info("dask cluster: %s, dashboard %s", client.scheduler.address, client.dashboard_link)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _start_cluster(
    workers: int | None,
    threads_per_worker: int | None,
    memory_limit: str | None,
    slurm: dict[str, Any] | None,
) -> Any:
    if slurm is not None:
        cluster = slurm_cluster(slurm)
        cluster.scale(jobs=workers or 1)
        return cluster
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=workers,
        threads_per_worker=threads_per_worker,
        memory_limit=memory_limit,
        processes=True,
        dashboard_address=":0",
    )


def slurm_cluster(options: dict[str, Any]) -> Any:
    """A dask-jobqueue ``SLURMCluster`` (no jobs submitted yet).

    Raises
    ------
    ParameterError
        If dask-jobqueue is not installed or rejects the options.
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as err:
        raise ParameterError(
            "[cluster] kind = \"slurm\" needs dask-jobqueue: pip install 'genepert-scale[slurm]'"
        ) from err
    try:
        return SLURMCluster(**options)
    except (TypeError, ValueError) as err:
        raise ParameterError(f"[cluster.slurm] options {options} rejected by SLURMCluster: {err}") from err


def compute(obj: Any, *, label: str, progress: bool = True) -> Any:
    """Compute ``obj`` on the current scheduler with a progress bar and a log line.

    Uses ``distributed.progress`` when a distributed client is active, dask's
    ``ProgressBar`` for local threads.
    """
    start = time.perf_counter()
    client = _current_client()
    if client is not None:
        futures = client.compute(obj)  # a future, or a list of them for a list
        if progress:
            from distributed import progress as show_progress

            show_progress(futures)
        result = client.gather(futures)
    else:
        # name the local scheduler: asked to choose, dask imports distributed
        # to look for a client (0.1 s) although none was ever started
        scheduler = dask.config.get("scheduler", None) or dask.threaded.get
        with _progress_bar() if progress else contextlib.nullcontext():
            (result,) = dask.compute(obj, scheduler=scheduler)
    log.info("%s: %.1f s", label, time.perf_counter() - start)
    return result


def _progress_bar() -> Any:
    from dask.diagnostics import ProgressBar

    return ProgressBar(minimum=1.0, dt=0.5)


def _current_client() -> Any:
    if "distributed" not in sys.modules:  # never imported: no client (and no import cost)
        return None
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def cluster_threads() -> int:
    """Threads that compute tasks: the distributed cluster's, else those of
    dask's local scheduler (``num_workers``, or the CPUs this process may use
    as dask counts them: its affinity mask and a container's CPU quota)."""
    client = _current_client()
    if client is not None:
        try:
            return max(1, sum(client.nthreads().values()))
        except Exception:  # noqa: BLE001 - a scheduler without workers yet
            return CPU_COUNT
    return dask.config.get("num_workers", None) or CPU_COUNT


#: Share of the memory (a worker's limit, or this machine's) that the running
#: accumulators of a pass may take together.
ACCUMULATOR_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class Room:
    """The running accumulators one worker (or this machine) can hold.

    Attributes
    ----------
    threads
        Threads that compute tasks there.
    bytes
        Bytes its accumulators may take together: :data:`ACCUMULATOR_MEMORY_SHARE`
        of its memory limit, and no more than the limit leaves beside what the
        process holds already and its threads' blocks in flight.
    held
        Those bytes held outside the accumulators (the process, its blocks).
    """

    threads: int
    bytes: int
    held: int = 0


def accumulator_rooms(memory_limit: int | None = None, *, block_bytes: int = 0,
                      held: int | None = None) -> list[Room]:
    """What each worker of the cluster (or this machine) can hold in running
    accumulators (see :func:`.pp.budget.plan_pass`).

    Parameters
    ----------
    memory_limit
        Bytes the run may use (default: this machine's memory, or its
        container's limit where lower). On a distributed cluster it is
        shared evenly by the workers, each also within its own limit.
    block_bytes
        Bytes of one block in flight (read and folded); every thread holds one.
    held
        Bytes a process holds before the pass (default: measured — this
        process's resident memory, or each worker's as the scheduler last saw it).
    """
    client = _current_client()
    if client is None:
        memory = memory_limit or _local_memory()
        threads = cluster_threads()
        return [_room(threads, memory, (process_memory() if held is None else held)
                      + threads * block_bytes)]
    try:
        workers = list(client.scheduler_info()["workers"].values())
    except Exception:  # noqa: BLE001 - a scheduler without workers yet
        workers = []
    share = memory_limit // len(workers) if memory_limit and workers else memory_limit
    rooms = []
    for worker in workers:
        limits = [limit for limit in (worker.get("memory_limit"), share) if limit]
        memory = min(limits) if limits else _local_memory()
        process = process_memory(worker) if held is None else held
        rooms.append(_room(worker["nthreads"], memory, process + worker["nthreads"] * block_bytes))
    return rooms or [_room(1, memory_limit or _local_memory(), held or 0)]


def _room(threads: int, memory: int, held: int) -> Room:
    """A :class:`Room` of ``threads`` within ``memory``, of which ``held`` is taken."""
    return Room(threads, max(0, min(int(memory * ACCUMULATOR_MEMORY_SHARE), memory - held)), held)


def process_memory(worker: dict[str, Any] | None = None) -> int:
    """Resident memory in bytes of this process, or of a ``worker`` (its
    entry of the scheduler's ``scheduler_info()``) as the scheduler last saw
    it; 0 where it cannot be read."""
    if worker is not None:
        return int(worker.get("metrics", {}).get("memory", 0))
    try:
        import psutil  # a dependency of distributed

        return int(psutil.Process().memory_info().rss)
    except (ImportError, OSError):
        return 0


#: Where a container's memory limit is read (cgroup v2, then v1), as
#: ``distributed.system.memory_limit`` reads it; "max" or a missing file: none.
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _local_memory() -> int:
    """This machine's memory, or a container's memory limit where lower (a
    Kubernetes pod on a large node), without importing ``distributed``."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX
        total = 8 * 2**30
    for path in CGROUP_MEMORY_LIMITS:
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


#: Allocations above this size get their own memory mapping (glibc ``M_MMAP_THRESHOLD``).
MMAP_THRESHOLD = 8 * 2**20
#: Free memory kept at the top of a heap (glibc ``M_TRIM_THRESHOLD``), so that
#: the decoder's chunk-sized buffers reuse pages instead of faulting in new ones.
TRIM_THRESHOLD = 64 * 2**20


def limit_heap_fragmentation(threshold: int = MMAP_THRESHOLD) -> bool:
    """Give block-sized arrays their own memory mappings (glibc only).

    glibc raises its mmap threshold to 32 MiB after the first large free, so
    the pass's blocks (tens of MiB, allocated and freed by several threads)
    end up in per-thread heaps that fragment and are not returned: measured
    on 1M cells, peak RSS 979 MiB with the default, 825 MiB with 8 MiB.
    Setting it also fixes the trim threshold at glibc's 128 KiB, which hands
    the zarr decoder's freed chunk buffers back to the kernel after every
    chunk; :data:`TRIM_THRESHOLD` keeps them (1M cells: page faults 370k →
    195k, 0.4 s less system time, peak RSS +50 MiB).
    Does nothing (returns ``False``) on other C libraries or platforms.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold, m_trim_threshold = -3, -1
        kept = libc.mallopt(m_trim_threshold, TRIM_THRESHOLD)
        return bool(libc.mallopt(m_mmap_threshold, int(threshold)) and kept)
    except (OSError, AttributeError):
        return False
