#!/usr/bin/env python3
"""preStop hook of a Ray head pod: stop the running Ray jobs and wait until they have ended.

Kubernetes runs this before it sends SIGTERM to the head (preemption, drain, scale-down, a
deleted RayCluster or RayJob); without it the drivers die with the head and their running
shards are lost. ``ray job stop`` sends each driver SIGTERM: catbatch gives its running shards
``ray.stop_grace_s`` to commit and exits 143; Ray kills a driver that is still there
``RAY_JOB_STOP_WAIT_TIME_S`` later. ``--wait`` should be above both, and the pod's
``terminationGracePeriodSeconds`` above ``--wait``. Always exits 0 (a failing preStop only adds
an event); what it did goes to stderr and, with ``--log``, to a file.

The Jobs API token comes from the environment (``RAY_AUTH_TOKEN``), as for ``ray job``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

TERMINAL = {"STOPPED", "SUCCEEDED", "FAILED"}


def _status(job) -> str:
    status = getattr(job, "status", job)
    return str(getattr(status, "value", status))


def stop_running_jobs(
    client,
    wait_s: float,
    poll_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    say: Callable[[str], None] = print,
) -> list[str]:
    """Stop every submitted job that has not ended; wait up to ``wait_s`` for all to end.

    Returns the submission ids still not ended when the wait ran out."""
    running = [
        j.submission_id
        for j in client.list_jobs()
        if j.submission_id and _status(j) not in TERMINAL
    ]
    for sid in running:
        say(f"stopping Ray job {sid}")
        try:
            client.stop_job(sid)
        except Exception as e:  # noqa: BLE001 - ended meanwhile; the loop below sees it
            say(f"stop {sid}: {e}")
    deadline = clock() + wait_s
    while running:
        running = [sid for sid in running if _status(client.get_job_status(sid)) not in TERMINAL]
        if not running or clock() >= deadline:
            break
        sleep(poll_s)
    for sid in running:
        say(f"Ray job {sid} still running after {wait_s:g} s")
    return running


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="http://127.0.0.1:8265", help="Ray Jobs API (dashboard).")
    p.add_argument("--wait", type=float, default=75.0, help="Seconds to wait for the jobs to end.")
    p.add_argument("--log", help="Also append what happened to this file.")
    a = p.parse_args(argv)
    log = open(a.log, "a", encoding="utf-8") if a.log else None  # noqa: SIM115

    def say(message: str) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} stop_ray_jobs: {message}"
        print(line, file=sys.stderr, flush=True)
        if log:
            log.write(line + "\n")
            log.flush()

    try:
        from ray.job_submission import JobSubmissionClient

        stop_running_jobs(JobSubmissionClient(a.address), a.wait, say=say)
    except Exception as e:  # noqa: BLE001 - the pod is going away either way
        say(f"could not stop the Ray jobs at {a.address}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
