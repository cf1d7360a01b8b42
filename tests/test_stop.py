"""SIGTERM and SIGINT at every phase of `catbatch submit`: planning (reading the prompt source),
Ray start-up and the actor pool end with 128 + the signal, no traceback and nothing
half-written. The pool itself is covered by test_faults.py (SIGTERM mid-run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from catbatch.job.driver import Interrupted, StopSignals, stop_signals

MANIFEST = """\
name: stop
model: {{id: tiny-sd3, dtype: float32, device: cpu}}
prompts: {{path: {prompts}}}
width: 128
height: 128
steps: 2
shard_size: 2
ray: {{address: local, actors: 1, resources: {{cpus: 1}}}}
output: out
"""

SIGNALS = [(signal.SIGTERM, 143), (signal.SIGINT, 130)]


def submit_process(folder: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "catbatch.cli", "submit", str(folder / "job.yaml"), "--quiet"]
    return subprocess.Popen(
        [*cmd, "--num-cpus", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for(predicate, timeout: float = 120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_stop_signals_raise_outside_the_pool_and_set_the_event_inside():
    before = signal.getsignal(signal.SIGINT)
    with stop_signals() as stop:  # planning: at once
        with pytest.raises(Interrupted) as caught:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs in the main thread at once
        assert caught.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before
    with stop_signals() as stop, stop.graceful():  # the pool: no new shards, no exception
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(stop.event.is_set, 5) and stop.signum == signal.SIGTERM
    with stop_signals() as stop:  # a run-record write or Ray's start-up finishes first
        finished = False
        with pytest.raises(Interrupted), stop.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            finished = True
        assert finished
    stop = StopSignals()  # a raise that was swallowed is caught up with at the next check
    stop.event.set()
    with pytest.raises(Interrupted):
        stop.check()


def reading(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open."""
    try:
        return any(
            os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd")
        )
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_signal_while_reading_prompts(tmp_path, signum, code):
    """The signal comes while the driver reads the prompt source to index it (planning):
    nothing is written to the output."""
    prompts = tmp_path / "prompts.txt"
    with open(prompts, "w") as f:
        f.writelines(f"a small red circle on the left, number {i}\n" for i in range(400_000))
    (tmp_path / "job.yaml").write_text(MANIFEST.format(prompts="prompts.txt"))
    driver = submit_process(tmp_path)
    try:
        assert wait_for(lambda: reading(driver.pid, prompts), 120), "never read the prompts"
        driver.send_signal(signum)
        output, _ = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == code, output
    assert f"stopped by {signal.Signals(signum).name}" in output and "Traceback" not in output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_signal_while_ray_starts(tmp_path, signum, code):
    """The signal comes as soon as the run record says running, while the private Ray cluster
    starts: the submission is recorded as interrupted, no shard was written, and the cluster
    ends with the driver."""
    (tmp_path / "prompts.txt").write_text("a red fox\na blue boat\n")
    (tmp_path / "job.yaml").write_text(MANIFEST.format(prompts="prompts.txt"))
    record = tmp_path / "out" / "run.json"
    driver = submit_process(tmp_path)
    try:
        assert wait_for(lambda: record.exists(), 180), "no run record"
        driver.send_signal(signum)
        output, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == code, output
    assert f"stopped by {signal.Signals(signum).name}" in output and "Traceback" not in output
    assert "*** SIG" not in output  # no native stack trace from Ray's own handler
    run = json.loads(record.read_text())
    assert run["status"] == "interrupted"
    assert (run["submissions"][-1]["status"], run["submissions"][-1]["exit_code"]) == (
        "interrupted",
        code,
    )
    assert not list((tmp_path / "out").glob("variants/*/*.parquet"))
    assert not list((tmp_path / "out").rglob("*.tmp-*"))  # nothing half-written
