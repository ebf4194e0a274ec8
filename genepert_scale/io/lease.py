"""One writer per output, and no debris of dead writers beside it.

A run that writes an output ``DIR/NAME`` (a file, a directory or a zarr
store; a local path or an fsspec URL) first takes its *lease*: a small JSON
file ``DIR/.NAME.lease`` naming the holder (process id, host, start time, a
random token) and when it last renewed it. The lease is created atomically —
locally with ``open(..., "x")``, on fsspec stores with a write-if-absent
(``pipe_file(mode="create")``; S3's ``If-None-Match``) followed by reading it
back, so that a store which ignores the condition still lets only one writer
find its own token there. The holder rewrites ``renewed`` every
:data:`RENEW_EVERY_S` seconds and removes the lease when done.

A second run that finds the lease fails at once with :class:`OutputBusyError`
naming the holder, unless the holder is *gone*:

- on the same host (same ``socket.gethostname()``), its process id is not a
  running process; or
- on any host (object stores are shared across machines, where no process can
  be looked up), the lease has not been renewed for :data:`EXPIRY_S` seconds.

A gone holder's lease is taken over (with a warning in the log).

Temporaries (``DIR/.NAME.tmp-*``, built by :func:`.store.atomic_output` and
renamed into place on success) exist only while their run holds the lease, so
whoever takes the lease knows that every temporary of ``NAME`` it finds was
left by a run that is gone (killed with SIGKILL, a lost machine): it removes
them and says so in the log. Their names carry the token of the lease they
were built under, so the log can name the run that left them.

If two runs judge the same stale lease gone at the same moment, or a holder
stalls for longer than :data:`EXPIRY_S` and is taken over, both may think
they hold it for a while; the lease is read back just before an output is
renamed into place (:meth:`Lease.check`), so at most one of them puts its
output there and the other fails with :class:`OutputBusyError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..errors import StoreError

log = logging.getLogger(__name__)

#: Seconds between two renewals of a held lease.
RENEW_EVERY_S = 60.0
#: A lease not renewed for this many seconds is stale, whichever host holds it.
EXPIRY_S = 600.0
#: Marks the temporaries of an output: ``.NAME`` + this + the lease's token.
TMP_MARK = ".tmp-"
#: Suffix of the lease file: ``.NAME`` + this.
LEASE_SUFFIX = ".lease"
#: This machine's name, as leases record it.
HOST = socket.gethostname()


class OutputBusyError(StoreError):
    """Another run that is still alive holds the lease of the output."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as its file records it (times are UNIX seconds)."""

    pid: int
    host: str
    started: float
    renewed: float
    token: str

    @classmethod
    def here(cls) -> Holder:
        """A new holder: this process, now, a fresh token."""
        now = time.time()
        return cls(os.getpid(), HOST, now, now, uuid.uuid4().hex[:12])

    def describe(self) -> str:
        """``pid 123 on host h, started 2026-12-01 10:00:00 UTC`` (for messages)."""
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"pid {self.pid} on host {self.host}, started {started}"

    def gone(self, expiry: float = EXPIRY_S) -> str | None:
        """Why this holder is gone (then its lease is stale), or ``None`` if it may be alive."""
        if self.host == HOST and not pid_alive(self.pid):
            return f"process {self.pid} is not running on this host"
        silent = time.time() - self.renewed
        if silent > expiry:
            return f"the lease was not renewed for {silent:.0f} s (more than {expiry:.0f} s)"
        return None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder:
        """Parse a lease file (:class:`ValueError` if it is not one)."""
        try:
            fields = json.loads(data)
            return cls(int(fields["pid"]), str(fields["host"]), float(fields["started"]),
                       float(fields["renewed"]), str(fields["token"]))
        except (TypeError, KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"not a lease: {err}") from err


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def sibling(root: str, prefix: str = "", suffix: str = "") -> tuple[str, str, str]:
    """``(parent, NAME, parent/ + prefix + NAME + suffix)`` of a protocol-less path."""
    parent, name = root.rstrip("/").rsplit("/", 1) if "/" in root else ("", root)
    entry = f"{prefix}{name}{suffix}"
    return parent, name, f"{parent}/{entry}" if parent else entry


class Lease:
    """The lease of one output, taken by this process (see the module's docstring).

    Parameters
    ----------
    fs, root
        The output's filesystem and protocol-less path.
    url
        The output as the user named it (for messages).
    renew_every, expiry
        Seconds between renewals; seconds without renewal after which a lease
        is stale.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str, *,
                 renew_every: float = RENEW_EVERY_S, expiry: float = EXPIRY_S):
        self.fs, self.root, self.url = fs, root.rstrip("/"), url
        self.parent, self.name, self.path = sibling(root, ".", LEASE_SUFFIX)
        self.local = isinstance(fs, LocalFileSystem)
        self.holder = Holder.here()
        self.taken_over: Holder | None = None
        self.renew_every, self.expiry = renew_every, expiry
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def token(self) -> str:
        return self.holder.token

    @property
    def where(self) -> str:
        """The lease file, named as the output is (path or URL)."""
        return self.path if self.local else self.fs.unstrip_protocol(self.path)

    def acquire(self) -> None:
        """Take the lease, taking over a stale one; start renewing it.

        Raises
        ------
        OutputBusyError
            If a run that may be alive holds it.
        """
        if self.parent:
            self.fs.makedirs(self.parent, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._start_renewing()
                return
            current = self._read()
            if current is None:
                continue  # released meanwhile
            reason = current.gone(self.expiry)
            if reason is None:
                raise OutputBusyError(
                    f"{self.url} is being written by another run ({current.describe()}); "
                    "two runs must not write one output at once. Wait for it to finish or "
                    f"write elsewhere; if that run is gone, remove {self.where}"
                )
            log.warning("%s: taking over the lease of a run that is gone (%s): %s",
                        self.url, current.describe(), reason)
            self._remove(current.token)
            self.taken_over = current
        raise OutputBusyError(f"{self.url}: other runs keep taking its lease {self.where}; try again")

    def check(self) -> None:
        """Raise :class:`OutputBusyError` unless this process still holds the
        lease (call it just before putting the output in place)."""
        current = self._read()
        if current is None and self._create():
            return  # its file was removed by hand and nobody took it
        if current is None or current.token != self.token:
            other = f"by {current.describe()}" if current else "by another run"
            raise OutputBusyError(
                f"{self.url}: the lease {self.where} was taken over {other} while this run "
                "was writing (it was judged stale); this run's output is not put in place. "
                "Two runs must not write one output at once"
            )

    def renew(self) -> bool:
        """Record that the holder is alive; ``False`` if the lease is no longer ours."""
        current = self._read()
        if current is None or current.token != self.token:
            return False
        self.holder = replace(self.holder, renewed=time.time())
        self._write(self.holder.to_bytes())
        return True

    def release(self) -> None:
        """Stop renewing and remove the lease file if it is still ours."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        self._remove(self.token)

    def _start_renewing(self) -> None:
        self._renewer = threading.Thread(target=self._renew_loop, daemon=True,
                                         name=f"lease {self.name}")
        self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                if not self.renew():
                    log.warning("%s: the lease %s was taken over by another run; this run's "
                                "output will not be put in place", self.url, self.where)
                    return
            except OSError as err:  # a transient store error: try again next time
                log.warning("%s: could not renew the lease %s: %s", self.url, self.where, err)

    def _create(self) -> bool:
        """Create the lease file if absent; whether it now holds our token."""
        data = self.holder.to_bytes()
        if self.local:
            try:
                with open(self.path, "xb") as handle:
                    handle.write(data)
            except FileExistsError:
                return False
            return True
        if not _write_if_absent(self.fs, self.path, data):
            return False
        current = self._read()  # a store that ignored the condition: the last writer wins
        return current is not None and current.token == self.token

    def _read(self) -> Holder | None:
        """The holder the lease file names, ``None`` if there is none."""
        problem = ""
        for attempt in range(5):
            try:
                if self.local:
                    with open(self.path, "rb") as handle:
                        data = handle.read()
                else:
                    data = self.fs.cat_file(self.path)
            except FileNotFoundError:
                return None
            try:
                return Holder.from_bytes(data)
            except ValueError as err:  # being written (local create, then write)
                problem = str(err)
                time.sleep(0.05 * (attempt + 1))
        raise StoreError(
            f"{self.where} is not a lease file of genepert-scale ({problem}); if no run is "
            f"writing {self.url}, remove it"
        )

    def _write(self, data: bytes) -> None:
        if self.local:  # readers never see a half-written file
            scratch = f"{self.path}.{self.token}"
            with open(scratch, "wb") as handle:
                handle.write(data)
            os.replace(scratch, self.path)
        else:
            self.fs.pipe_file(self.path, data)

    def _remove(self, token: str) -> None:
        """Remove the lease file if it holds ``token``."""
        current = self._read()
        if current is None or current.token != token:
            return
        with contextlib.suppress(FileNotFoundError):
            if self.local:
                os.remove(self.path)
            else:
                self.fs.rm_file(self.path)


def _write_if_absent(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write ``path`` unless it exists; whether it was written.

    Atomic where the filesystem supports ``pipe_file(mode="create")`` (S3's
    ``If-None-Match``); otherwise a check, then a write (read it back).
    """
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except TypeError:  # fsspec before 2024.12 has no mode
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
    return True


_HELD: dict[str, Lease] = {}
_HELD_COUNT: dict[str, int] = {}
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def hold_lease(
    target: str,
    storage_options: dict[str, Any] | None = None,
    *,
    renew_every: float = RENEW_EVERY_S,
    expiry: float = EXPIRY_S,
) -> Iterator[tuple[Lease, bool]]:
    """Hold the lease of ``target`` (a path or URL) while inside.

    Within one process the lease is taken once: a nested ``hold_lease`` of the
    same output (the CLI takes it before the work, the writer again around the
    write) shares it.

    Yields
    ------
    (Lease, bool)
        The lease, and whether this call took it (``False``: shared).

    Raises
    ------
    OutputBusyError
        If another run that may be alive holds it.
    """
    fs, root = fsspec.core.url_to_fs(str(target), **(storage_options or {}))
    key = fs.unstrip_protocol(root.rstrip("/"))
    with _HELD_LOCK:
        lease = _HELD.get(key)
        fresh = lease is None
        if fresh:
            lease = Lease(fs, root, str(target), renew_every=renew_every, expiry=expiry)
            lease.acquire()
            _HELD[key] = lease
        _HELD_COUNT[key] = _HELD_COUNT.get(key, 0) + 1
    try:
        yield lease, fresh
    finally:
        with _HELD_LOCK:
            _HELD_COUNT[key] -= 1
            if _HELD_COUNT[key] == 0:
                del _HELD[key], _HELD_COUNT[key]
                lease.release()
