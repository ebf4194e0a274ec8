"""Transient store errors are retried with back-off; permanent ones, and
transient ones that do not stop, fail with the URL and the key.

The faults come from a real fsspec filesystem (``flaky://``, local files
behind it) that zarr's ``FsspecStore`` reads through, so the whole path from
the pseudo-bulk pass down to the bytes is exercised.
"""

from __future__ import annotations

import collections
import threading

import fsspec
import pytest
from cloud_helpers import assert_same_pseudobulk, make_screen
from fsspec.implementations.local import LocalFileSystem

from genepert_scale.cli.commands import main
from genepert_scale.errors import INPUT_ERROR_EXIT_CODE, StoreError
from genepert_scale.pp.aggregate import pseudobulk
from genepert_scale.io.retry import RetryPolicy, is_transient


class FlakyFileSystem(LocalFileSystem):
    """Local files whose reads of chosen keys fail: ``failures[part]`` times
    for every file whose path contains ``part`` (``-1``: always), with
    ``error``."""

    protocol = "flaky"
    failures: dict[str, int] = {}
    error: type[OSError] = ConnectionError
    calls: collections.Counter = collections.Counter()
    lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path):
        # fsspec before 2025 strips only file:// and local:// from a LocalFileSystem's paths
        return super()._strip_protocol(str(path).removeprefix("flaky://"))

    def cat_file(self, path, start=None, end=None, **kwargs):
        for part, count in self.failures.items():
            if part in path:
                with self.lock:
                    self.calls[path] += 1
                    seen = self.calls[path]
                if count < 0 or seen <= count:
                    raise self.error(f"injected fault #{seen} reading {path}")
        return super().cat_file(path, start=start, end=end, **kwargs)


@pytest.fixture
def flaky(monkeypatch):
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    monkeypatch.setattr(FlakyFileSystem, "failures", {})
    monkeypatch.setattr(FlakyFileSystem, "calls", collections.Counter())
    monkeypatch.setattr(RetryPolicy, "delay", lambda self, retry: 0.001)
    return FlakyFileSystem


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> str:
    return make_screen(tmp_path_factory.mktemp("screen"), cells=3000)


OPTIONS = {"n_top_genes": 100, "block_rows": 500, "progress": False}


def test_first_reads_fail_same_result(flaky, screen):
    expected = pseudobulk(screen, **OPTIONS, as_xarray=True)
    flaky.failures = {"/X/data/": 2, "/X/indptr/": 4, "/obs/perturbation/": 1}
    ds = pseudobulk(f"flaky://{screen}", **OPTIONS, as_xarray=True)
    assert_same_pseudobulk(ds, expected)
    data_reads = [n for path, n in flaky.calls.items() if "/X/data/c" in path]
    assert data_reads and min(data_reads) >= 3  # two faults, then at least one success


@pytest.mark.usefixtures("pass_memory_only")
def test_first_reads_fail_in_group_slabs_same_result(flaky, screen, monkeypatch):
    from cloud_helpers import assert_same_budgeted
    from genepert_scale.pp import budget

    expected = pseudobulk(screen, **OPTIONS, as_xarray=True)
    monkeypatch.setattr(budget, "ONE_PASS_BYTES", 0)
    flaky.failures = {"/X/data/": 2, "/X/indices/": 1}
    ds = pseudobulk(f"flaky://{screen}", memory_limit=60_000, **OPTIONS, as_xarray=True)
    assert_same_budgeted(ds.compute(), expected)


def test_always_failing_key_names_url_and_key(flaky, screen):
    flaky.failures = {"/X/data/c": -1}
    with pytest.raises(StoreError, match=r"flaky://.*screen\.zarr key 'X/data/c/0' failed 5 times"):
        pseudobulk(f"flaky://{screen}", **OPTIONS, as_xarray=True)


def test_permanent_error_is_not_retried(flaky, screen, caplog):
    flaky.failures, flaky.error = {"/X/data/c": -1}, PermissionError
    with pytest.raises(StoreError, match="key 'X/data/c/.' failed permanently.*PermissionError"):
        pseudobulk(f"flaky://{screen}", **OPTIONS, as_xarray=True)
    assert flaky.calls and not [r for r in caplog.records if "transient" in r.getMessage()]


def test_cli_reports_store_error_without_traceback(flaky, screen, tmp_path, capsys):
    flaky.failures = {"/X/indices/c": -1}
    code = main(["pseudobulk", f"flaky://{screen}", "--out", str(tmp_path / "pb.zarr"),
                 "--n-top-genes", "100", "--no-progress"])
    err = capsys.readouterr().err
    assert code == INPUT_ERROR_EXIT_CODE
    assert "error: reading flaky://" in err and "key 'X/indices/c/0'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "pb.zarr").exists()


@pytest.mark.parametrize(
    ("error", "transient"),
    [(ConnectionError(), True), (TimeoutError(), True), (OSError("503 SlowDown"), True),
     (PermissionError(), False), (FileNotFoundError(), False), (ValueError(), False)],
)
def test_transient_errors(error, transient):
    assert is_transient(error) is transient


def test_backoff_grows_and_is_capped():
    policy = RetryPolicy(initial_delay=1.0, factor=2.0, max_delay=5.0)
    for retry, base in enumerate([1.0, 2.0, 4.0, 5.0, 5.0]):
        assert 0.5 * base <= policy.delay(retry) < 1.5 * base
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
