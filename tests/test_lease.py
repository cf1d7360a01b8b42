"""The output lease: exclusive against concurrent acquirers (threads and processes, local and
S3), renewed by its heartbeat, free again when released or when its holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from catbatch.job.layout import OutputLayout
from catbatch.job.lease import (
    LEASE_DIR,
    Lease,
    LeaseHeld,
    LeaseInfo,
    _encode,
    current_lease,
    generations,
)

HOLDER = """
import sys, time
from catbatch.job.layout import OutputLayout
from catbatch.job.lease import Lease, LeaseHeld
url, start, hold = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
lease = Lease(OutputLayout(url), ttl_s=float(sys.argv[4]), heartbeat_s=float(sys.argv[5]))
time.sleep(max(0.0, start - time.time()))
try:
    lease.acquire()
except LeaseHeld:
    sys.exit(3)
print("acquired", flush=True)
time.sleep(hold)
lease.release()
"""


def race_threads(url: str, n: int = 8) -> list[Lease]:
    """n threads acquire at once, each with its own OutputLayout; returns the winners."""
    barrier = threading.Barrier(n)
    winners: list[Lease] = []
    errors: list[BaseException] = []

    def go() -> None:
        lease = Lease(OutputLayout(url), ttl_s=30, heartbeat_s=10)
        barrier.wait()
        try:
            lease.acquire()
            winners.append(lease)
        except LeaseHeld:
            pass
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return winners


def race_processes(url: str, n: int = 4, hold: float = 1.5) -> list[int]:
    start = time.time() + 2.5  # after every interpreter has imported catbatch
    cmd = [sys.executable, "-c", HOLDER, url, str(start), str(hold), "30", "5"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    return [p.wait(timeout=60) for p in procs]


def check_exclusive_and_reusable(url: str) -> None:
    winners = race_threads(url)
    assert len(winners) == 1
    with pytest.raises(LeaseHeld, match="being written by another submission"):
        Lease(OutputLayout(url)).acquire()
    winners[0].release()
    again = Lease(OutputLayout(url))
    again.acquire()  # free right after release
    assert again.info.generation == 2 and generations(OutputLayout(url)) == [2]
    again.release()
    assert current_lease(OutputLayout(url)).released


def test_threads_exclusive_local(tmp_path):
    check_exclusive_and_reusable(str(tmp_path / "out"))


def test_processes_exclusive_local(tmp_path):
    codes = race_processes(str(tmp_path / "out"))
    assert sorted(codes) == [0, 3, 3, 3]


def test_heartbeat_renews_and_a_dead_local_holder_frees_at_once(tmp_path):
    url = str(tmp_path / "out")
    start = time.time() + 2.5
    cmd = [sys.executable, "-c", HOLDER, url, str(start), "60", "1.5", "0.3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "acquired"
    first = current_lease(OutputLayout(url)).renewed_at
    time.sleep(2.0)  # longer than the TTL: only the heartbeat keeps it held
    assert current_lease(OutputLayout(url)).renewed_at > first
    with pytest.raises(LeaseHeld, match=f"pid {proc.pid}"):
        Lease(OutputLayout(url)).acquire()
    os.kill(proc.pid, signal.SIGKILL)  # the driver dies without releasing
    proc.wait()
    lease = Lease(OutputLayout(url))  # same machine: its process is gone, no need to wait
    lease.acquire()
    assert lease.info.generation == 2
    lease.release()


def test_a_silent_holder_elsewhere_expires_after_its_ttl(tmp_path):
    layout = OutputLayout(str(tmp_path / "out"))
    now = time.time()
    other = LeaseInfo(1, "t", "other-host", 4242, now, now, 1.0, boot_id="b", pid_start="1")
    assert layout.create_exclusive(layout.path(LEASE_DIR, "0000000001.json"), _encode(other))
    with pytest.raises(LeaseHeld, match="pid 4242 on other-host"):
        Lease(layout).acquire()
    time.sleep(1.2)  # no heartbeat came: the holder is presumed dead
    lease = Lease(layout)
    lease.acquire()
    assert lease.info.generation == 2 and generations(layout) == [2]
    lease.release()


def test_superseded_holder_sees_lost(tmp_path):
    """A holder that stalled past its TTL (e.g. a storage outage) learns it lost the lease."""
    url = str(tmp_path / "out")
    stalled = Lease(OutputLayout(url), ttl_s=0.5, heartbeat_s=0.1)
    stalled.acquire()
    stalled._stop.set()  # freeze its heartbeat, as if the process hung
    stalled._thread.join()
    time.sleep(0.7)
    newer = Lease(OutputLayout(url), ttl_s=5, heartbeat_s=1)
    newer.acquire()
    assert not stalled.renew() and stalled.lost.is_set() and not stalled.held
    stalled.release()  # must not mark the newer lease released
    assert current_lease(OutputLayout(url)).live() and newer.held
    newer.release()


def test_threads_exclusive_s3(s3_server):
    check_exclusive_and_reusable(s3_server.url(f"lease-{uuid.uuid4().hex[:8]}"))


def test_processes_exclusive_s3(s3_server):
    codes = race_processes(s3_server.url(f"lease-{uuid.uuid4().hex[:8]}"))
    assert sorted(codes) == [0, 3, 3, 3]
