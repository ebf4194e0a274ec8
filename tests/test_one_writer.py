"""One writer per output, and no debris of killed writers: real processes
hold an output's lease while a second one tries to write it, or are killed
with SIGKILL in the middle; locally and on a moto S3 server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cloud_helpers import assert_same_pseudobulk, moto_s3, subprocess_env, write_config

from genepert_scale.cli.commands import main
from genepert_scale.errors import INPUT_ERROR_EXIT_CODE
from genepert_scale.io.lease import HOST, Holder, OutputBusyError, hold_lease
from genepert_scale.io.store import atomic_output, hold_output
from genepert_scale.pp.aggregate import open_pseudobulk, pseudobulk

#: Writes a pseudo-bulk store, then waits (holding the output's lease, its
#: temporary complete but not yet renamed) for a line on stdin.
WRITER = textwrap.dedent(
    """
    import json, sys
    import xarray as xr
    from genepert_scale.pp.aggregate import pseudobulk, write_pseudobulk

    screen, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    ds = pseudobulk(screen, n_top_genes=100, progress=False, as_xarray=True)
    original = xr.Dataset.to_zarr

    def write_then_wait(self, store, **kwargs):
        result = original(self, store, **kwargs)
        print("written", flush=True)
        sys.stdin.readline()
        return result

    xr.Dataset.to_zarr = write_then_wait
    write_pseudobulk(ds, out, overwrite=True, storage_options=options)
    """
)

needs_sigkill = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


def start_writer(screen: str, out: str, options: dict | None = None) -> subprocess.Popen:
    """A writer process, returned once it holds the lease with its output written."""
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, screen, out, json.dumps(options or {})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=subprocess_env(),
    )
    assert writer.stdout.readline().strip() == "written"
    return writer


def cli(*argv: str) -> subprocess.CompletedProcess:
    """``genepert-scale ARGV`` in a new process."""
    return subprocess.run([sys.executable, "-m", "genepert_scale", *argv], capture_output=True,
                          text=True, env=subprocess_env(), timeout=300, check=False)


def pseudobulk_cli(screen: str, out: str, *extra: str) -> subprocess.CompletedProcess:
    return cli("pseudobulk", screen, "--out", out, "--n-top-genes", "100", "--overwrite",
               "--no-progress", *extra)


def assert_names_writer(stderr: str, writer: subprocess.Popen) -> None:
    """The second run's one-line error names the first run: pid, host, start time."""
    assert f"is being written by another run (pid {writer.pid} on host {HOST}, started 20" in stderr
    assert "Traceback" not in stderr
    assert "cells x" not in stderr, "the second run failed before its pass"


def debris(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}."))


def test_second_writer_fails_at_once_and_the_first_finishes(small_screen, tmp_path):
    screen, _ = small_screen
    out = tmp_path / "pb.zarr"
    writer = start_writer(screen, str(out))
    try:
        second = pseudobulk_cli(screen, str(out))
        assert second.returncode == INPUT_ERROR_EXIT_CODE, second.stderr
        assert_names_writer(second.stderr, writer)
        with pytest.raises(OutputBusyError, match=f"pid {writer.pid}"):  # the Python API too
            with atomic_output(str(out), overwrite=True):
                pass
        writer.stdin.write("go on\n")
        writer.stdin.flush()
        assert writer.wait(timeout=120) == 0
    finally:
        writer.kill()
    assert_same_pseudobulk(open_pseudobulk(str(out)), pseudobulk(screen, n_top_genes=100,
                                                                 progress=False, as_xarray=True))
    assert debris(tmp_path, "pb.zarr") == []


@needs_sigkill
def test_run_after_a_killed_one_takes_its_lease_and_removes_its_temporary(small_screen, tmp_path):
    screen, _ = small_screen
    out = tmp_path / "pb.zarr"
    writer = start_writer(screen, str(out))
    writer.send_signal(signal.SIGKILL)
    assert writer.wait() == -signal.SIGKILL
    left = debris(tmp_path, "pb.zarr")
    assert ".pb.zarr.lease" in left and any(".tmp-" in name for name in left)

    done = pseudobulk_cli(screen, str(out))
    assert done.returncode == 0, done.stderr
    assert (f"taking over the lease of a run that is gone (pid {writer.pid} on host {HOST}"
            in done.stderr)
    assert f"process {writer.pid} is not running on this host" in done.stderr
    temporary = next(name for name in left if ".tmp-" in name)
    assert f"removed the stale temporary {tmp_path / temporary} left by the run pid {writer.pid}" \
        in done.stderr
    assert debris(tmp_path, "pb.zarr") == []
    assert_same_pseudobulk(open_pseudobulk(str(out)), pseudobulk(screen, n_top_genes=100,
                                                                 progress=False, as_xarray=True))


#: Holds the lease of an output (argv[1]) until a line comes on stdin.
HOLDER = textwrap.dedent(
    """
    import sys
    from genepert_scale.io.store import hold_output

    with hold_output(sys.argv[1]):
        print("holding", flush=True)
        sys.stdin.readline()
    """
)


def test_second_batch_run_of_one_dir_fails_at_once(small_screen, tmp_path, capsys):
    screen, _ = small_screen
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "holding"
        config = write_config(tmp_path / "run.toml", screen=screen, out=str(out))
        assert main(["run", str(config), "--no-progress"]) == INPUT_ERROR_EXIT_CODE
        assert f"is being written by another run (pid {holder.pid}" in capsys.readouterr().err
        assert not out.exists()
    finally:
        holder.communicate("done\n", timeout=60)
    assert holder.returncode == 0 and debris(tmp_path, "run") == []


def write_lease(path: Path, holder: Holder) -> None:
    path.write_bytes(holder.to_bytes())


@pytest.mark.parametrize("host", ["elsewhere", HOST])
def test_lease_not_renewed_in_time_is_taken_over(tmp_path, caplog, host):
    """From another host no process can be looked up: a lease is stale when
    it was not renewed for EXPIRY_S (here too for a live pid of this host,
    which may be a reused one)."""
    out, hour_ago = tmp_path / "t.txt", time.time() - 3600
    write_lease(tmp_path / ".t.txt.lease", Holder(1, host, hour_ago, hour_ago, "0123abcd"))
    with atomic_output(str(out)) as tmp:
        Path(tmp).write_text("new")
    assert out.read_text() == "new"
    assert "the lease was not renewed for 3600 s (more than 600 s)" in caplog.text
    assert debris(tmp_path, "t.txt") == []


def test_renewed_lease_of_another_host_is_respected(tmp_path):
    now = time.time()
    write_lease(tmp_path / ".t.txt.lease", Holder(4242, "elsewhere", now - 7200, now - 5, "0123abcd"))
    with pytest.raises(OutputBusyError, match="pid 4242 on host elsewhere, started 20"):
        with atomic_output(str(tmp_path / "t.txt")):
            pass
    assert debris(tmp_path, "t.txt") == [".t.txt.lease"], "the other run's lease is left alone"


def test_lease_is_renewed_while_held(tmp_path):
    with hold_lease(str(tmp_path / "t.txt"), renew_every=0.05) as (lease, fresh):
        assert fresh
        time.sleep(0.5)
        recorded = Holder.from_bytes((tmp_path / ".t.txt.lease").read_bytes())
        assert recorded.token == lease.token and recorded.renewed > recorded.started
        with hold_output(str(tmp_path / "t.txt")) as nested:  # shared within a process
            assert nested is lease
    assert debris(tmp_path, "t.txt") == []


def test_output_of_a_run_whose_lease_was_taken_over_is_not_put_in_place(tmp_path):
    out = tmp_path / "t.txt"
    with pytest.raises(OutputBusyError, match="taken over by pid 4242 on host elsewhere"):
        with atomic_output(str(out)) as tmp:
            Path(tmp).write_text("late")
            now = time.time()  # another host judged this run gone and took the lease
            write_lease(tmp_path / ".t.txt.lease", Holder(4242, "elsewhere", now, now, "feedbeef"))
    assert not out.exists()
    assert debris(tmp_path, "t.txt") == [".t.txt.lease"]


def test_previous_output_moved_aside_by_a_killed_run_is_put_back(tmp_path, caplog):
    """A run killed between moving the old output aside and renaming its new
    one leaves no output: the next run puts the previous one back."""
    out = tmp_path / "t.txt"
    (tmp_path / ".t.txt.tmp-0123abcd-aaaaaa").write_text("new, never renamed")
    (tmp_path / ".t.txt.tmp-0123abcd-aaaaaa.old").write_text("previous")
    with hold_output(str(out)):
        assert out.read_text() == "previous"
    assert "put back the previous output" in caplog.text
    assert debris(tmp_path, "t.txt") == []


@pytest.mark.s3
@needs_sigkill
def test_one_writer_and_no_debris_on_s3(small_screen):
    import s3fs

    screen, _ = small_screen
    with moto_s3() as endpoint:
        options = {"client_kwargs": {"endpoint_url": endpoint}}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("runs")
        out, flags = "s3://runs/pb.zarr", ["--storage-options", json.dumps(options)]
        writer = start_writer(screen, out, options)
        try:
            second = pseudobulk_cli(screen, out, *flags)
            assert second.returncode == INPUT_ERROR_EXIT_CODE, second.stderr
            assert_names_writer(second.stderr, writer)
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
        fs.invalidate_cache()
        left = [p.rsplit("/", 1)[-1] for p in fs.ls("runs")]
        assert ".pb.zarr.lease" in left and any(".pb.zarr.tmp-" in name for name in left)

        done = pseudobulk_cli(screen, out, *flags)
        assert done.returncode == 0, done.stderr
        assert f"taking over the lease of a run that is gone (pid {writer.pid}" in done.stderr
        assert "removed the stale temporary runs/.pb.zarr.tmp-" in done.stderr
        fs.invalidate_cache()
        assert [p.rsplit("/", 1)[-1] for p in fs.ls("runs")] == ["pb.zarr"]
        assert_same_pseudobulk(open_pseudobulk(out, options).load(),
                               pseudobulk(screen, n_top_genes=100, progress=False, as_xarray=True))


def test_lease_on_a_store_without_write_if_absent(caplog):
    """fsspec's in-memory filesystem checks, then writes, then reads the
    lease back: a live holder is refused, a silent one taken over, and the
    temporaries left beside the output removed."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/leases/.t.txt.tmp-0123abcd-aaaaaa", b"debris")
    now = time.time()
    fs.pipe_file("/leases/.t.txt.lease", Holder(7, "elsewhere", now, now, "0123abcd").to_bytes())
    with pytest.raises(OutputBusyError, match="pid 7 on host elsewhere"):
        with atomic_output("memory://leases/t.txt"):
            pass
    fs.pipe_file("/leases/.t.txt.lease",
                 Holder(7, "elsewhere", now - 900, now - 900, "0123abcd").to_bytes())
    with atomic_output("memory://leases/t.txt") as tmp:
        fs.pipe_file(tmp.removeprefix("memory://"), b"new")
    assert fs.cat_file("/leases/t.txt") == b"new"
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/leases", detail=False)) == ["t.txt"]
    assert "removed the stale temporary /leases/.t.txt.tmp-0123abcd-aaaaaa left by the run pid 7" \
        in caplog.text
