"""The private local Ray cluster dies with its driver, whatever kills the driver.

Ray ties the processes the driver starts itself (GCS, raylet) to it with ``PR_SET_PDEATHSIG``,
but the raylet's own children (dashboard and runtime-env agents, workers) are reparented to init
when it goes, and may live on (after a ``kill -9`` of the driver the two agents were still
running 20 s later, when the trial stopped looking). :func:`start` runs a small watchdog
process (``python -m catbatch.job.reaper PID``) in its own session. It records the driver's
descendants (pid and start time, from ``/proc``) every :data:`POLL_S` seconds while the driver
lives; when the driver is gone (the pipe it holds closes, or its process ends), it sends
SIGTERM to every recorded process still running and to their descendants, then SIGKILL after
:data:`GRACE_S` seconds, and exits.

The window that remains: a process the cluster starts less than ``POLL_S`` before the driver
dies, and whose parent dies too, is not recorded (it then exits when it finds its raylet gone).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

POLL_S = 0.25
GRACE_S = 2.0

_watchdog: subprocess.Popen | None = None  # holds the pipe whose end tells the driver is gone


def start() -> None:
    """Start this process's watchdog (once; before ``ray.init(address="local")``; Linux)."""
    global _watchdog
    if not os.path.isdir("/proc/self") or (_watchdog is not None and _watchdog.poll() is None):
        return
    _watchdog = subprocess.Popen(
        [sys.executable, "-m", "catbatch.job.reaper", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the driver's process group does not reach it
    )


def watch(driver_pid: int, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> None:
    """Record the descendants of ``driver_pid`` until it is gone, then end them."""
    me = os.getpid()
    driver_start = _processes().get(driver_pid, (0, ""))[1]
    seen: dict[int, str] = {}  # pid -> start time (a reused pid is not the same process)
    while True:
        table = _processes()
        if table.get(driver_pid, (0, ""))[1] != driver_start:
            break  # the driver exited (or is a zombie)
        for pid in _descendants(table, driver_pid):
            if pid != me:
                seen.setdefault(pid, table[pid][1])
        ready, _, _ = select.select([sys.stdin], [], [], poll_s)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # the driver's end of the pipe closed: it exited
    end(seen, grace_s)


def end(seen: dict[int, str], grace_s: float = GRACE_S) -> None:
    """SIGTERM the recorded processes still running (and their descendants), then SIGKILL."""
    table = _processes()
    targets = {pid for pid, started in seen.items() if table.get(pid, (0, ""))[1] == started}
    for pid in list(targets):
        targets.update(_descendants(table, pid))
    started = {pid: table[pid][1] for pid in targets}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in targets:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        while targets and time.monotonic() < deadline:
            table = _processes()
            targets = {p for p in targets if table.get(p, (0, ""))[1] == started[p]}
            time.sleep(0.05)


def _processes() -> dict[int, tuple[int, str]]:
    """Every live process: pid -> (parent pid, start time in clock ticks since boot)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":  # a zombie has exited already
            out[int(name)] = (int(fields[1]), fields[19])
    return out


def _descendants(table: dict[int, tuple[int, str]], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


if __name__ == "__main__":
    watch(int(sys.argv[1]))
