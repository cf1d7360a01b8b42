"""The cron entrypoints in jobs/: exit-code mapping, log file, resume state, signal hand-off.

catbatch is replaced by a fake command (``CATBATCH_BIN``) that records its arguments and exits
with the code it is told; no Ray, no model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE = r"""
import json, os, signal, sys, time
cmd = sys.argv[1]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
print(f"fake {cmd} says hello", flush=True)
print("fake stderr line", file=sys.stderr, flush=True)
if cmd == "submit" and os.environ.get("FAKE_SLEEP"):
    signal.signal(signal.SIGTERM, lambda *_: (print("stopping", flush=True), sys.exit(143)))
    open(os.environ["FAKE_SLEEP"], "w").close()
    time.sleep(30)
sys.exit(int(os.environ.get(f"FAKE_{cmd.upper()}_RC", "0")))
"""


def _load_module():
    spec = importlib.util.spec_from_file_location("run_manifest", ROOT / "jobs/run_manifest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


run_manifest = _load_module()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_catbatch.py"
    script.write_text(FAKE)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("CATBATCH_BIN", f"{sys.executable} {script}")
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.setenv("CATBATCH_LOG_DIR", str(tmp_path / "logs"))
    manifest = tmp_path / "m" / "nightly.yaml"
    manifest.parent.mkdir()
    manifest.write_text("name: nightly\noutput: ../out/nightly\n")

    def calls_made() -> list[list[str]]:
        return [json.loads(x) for x in calls.read_text().splitlines()] if calls.exists() else []

    return manifest, calls_made, tmp_path / "logs" / "nightly.log"


def _set_rc(monkeypatch, submit: int, report: int = 0) -> None:
    monkeypatch.setenv("FAKE_SUBMIT_RC", str(submit))
    monkeypatch.setenv("FAKE_REPORT_RC", str(report))


def test_success_logs_with_timestamps_and_reports(fake, monkeypatch, capsys):
    manifest, calls, log = fake
    _set_rc(monkeypatch, 0)
    assert run_manifest.main([str(manifest), "--report", "--", "--address", "auto"]) == 0
    made = calls()
    assert made[0] == ["submit", str(manifest), "--quiet", "--address", "auto"]
    # the report goes to the manifest's output, resolved relative to the manifest like catbatch
    assert made[1] == ["report", str(manifest.parent / "../out/nightly")]
    lines = log.read_text().splitlines()
    assert all(line[:4].isdigit() and line[10] == "T" and "run_manifest[" in line for line in lines)
    assert any(line.endswith("| fake submit says hello") for line in lines)
    assert any(line.endswith("| fake stderr line") for line in lines)
    assert "finished" in lines[-1] and "this job exits 0" in lines[-1]
    assert capsys.readouterr().err == ""  # cron mails nothing


@pytest.mark.parametrize(
    ("submit_rc", "expected", "words"),
    [
        (3, 0, "holds the output's lease"),
        (143, 0, "next run resumes"),
        (1, 1, "some shards failed"),
        (2, 2, "bad input"),
        (137, 137, "exit code 137"),
    ],
)
def test_exit_code_mapping(fake, monkeypatch, capsys, submit_rc, expected, words):
    manifest, calls, log = fake
    _set_rc(monkeypatch, submit_rc)
    assert run_manifest.main([str(manifest), "--report"]) == expected
    last = log.read_text().splitlines()[-1]
    assert words in last and f"catbatch exit {submit_rc}" in last
    commands = [c[0] for c in calls()]
    assert "report" not in commands  # only after a finished run
    assert ("status" in commands) == (submit_rc == 1)  # the failures go into the log
    err = capsys.readouterr().err
    assert (str(log) in err) == (expected != 0)  # stderr (cron mail) only when needed


def test_deferred_runs_become_an_error_and_success_resets(fake, monkeypatch):
    manifest, _, log = fake
    _set_rc(monkeypatch, 143)
    args = [str(manifest), "--max-deferred", "3"]
    assert [run_manifest.main(args) for _ in range(2)] == [0, 0]
    _set_rc(monkeypatch, 3)
    assert run_manifest.main(args) == 3  # third run in a row without finishing
    state = json.loads(log.with_name(log.name + ".state.json").read_text())
    assert state["deferred"] == 3 and state["last_exit"] == 3
    _set_rc(monkeypatch, 0)
    assert run_manifest.main(args) == 0
    _set_rc(monkeypatch, 143)
    assert run_manifest.main(args) == 0  # the count starts again after a finished run


def test_output_override_and_failed_report(fake, monkeypatch, tmp_path):
    manifest, calls, log = fake
    _set_rc(monkeypatch, 0, report=2)
    log_file = tmp_path / "elsewhere" / "x.log"
    rc = run_manifest.main(
        [str(manifest), "--output", "s3://b/p", "--report", "--log", str(log_file)]
    )
    assert rc == 2
    assert calls() == [
        ["submit", str(manifest), "--quiet", "--output", "s3://b/p"],
        ["report", "s3://b/p"],
    ]
    assert "report` failed" in log_file.read_text() and not log.exists()


def test_missing_catbatch_needs_a_person(fake, monkeypatch, tmp_path):
    manifest, _, log = fake
    monkeypatch.setenv("CATBATCH_BIN", str(tmp_path / "no-such-catbatch"))
    assert run_manifest.main([str(manifest)]) == 127
    assert "cannot start" in log.read_text()


def test_sigterm_is_passed_on_and_the_stop_is_not_an_error(fake, tmp_path):
    manifest, _, log = fake
    started = tmp_path / "started"
    env = {**os.environ, "FAKE_SLEEP": str(started)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs/run_manifest.py"), str(manifest)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 10
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    text = log.read_text()
    assert "passing it on" in text and "| stopping" in text and "catbatch exit 143" in text


def test_nightly_coco_wrapper_runs_the_coco_manifest(fake, monkeypatch, tmp_path):
    _, calls, _ = fake
    env = {**os.environ, "CATBATCH_PYTHON": sys.executable, "FAKE_SUBMIT_RC": "3"}
    done = subprocess.run(
        ["sh", str(ROOT / "jobs/nightly_coco.sh"), "--", "--address", "auto"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert calls() == [["submit", "manifests/coco.yaml", "--quiet", "--address", "auto"]]
    assert (ROOT / "manifests/coco.yaml").is_file()
    assert "holds the output's lease" in (tmp_path / "logs" / "coco.log").read_text()


def test_busy_retries_are_bounded_and_then_fail_with_max_deferred_1(fake, monkeypatch):
    manifest, calls, log = fake
    _set_rc(monkeypatch, 3)
    args = [str(manifest), "--max-deferred", "1", "--busy-retries", "2", "--busy-wait", "0"]
    assert run_manifest.main(args) == 3  # the RayJob's settings: a held lease ends the run
    assert [c[0] for c in calls()] == ["submit"] * 3
    assert log.read_text().count("submitting again in 0 s") == 2


def test_a_busy_retry_that_gets_the_lease_finishes(fake, monkeypatch, tmp_path):
    manifest, calls, _ = fake
    script = tmp_path / "fake_catbatch.py"
    # exit 3 on the first submission only
    script.write_text(
        FAKE.replace(
            'sys.exit(int(os.environ.get(f"FAKE_{cmd.upper()}_RC", "0")))',
            "n = sum(1 for _ in open(os.environ['FAKE_CALLS']))\nsys.exit(3 if n == 1 else 0)",
        )
    )
    args = [str(manifest), "--max-deferred", "1", "--busy-retries", "3", "--busy-wait", "0"]
    assert run_manifest.main(args) == 0
    assert [c[0] for c in calls()] == ["submit", "submit"]


def test_without_busy_retries_a_held_lease_is_submitted_once(fake, monkeypatch):
    manifest, calls, _ = fake
    _set_rc(monkeypatch, 3)
    assert run_manifest.main([str(manifest)]) == 0  # cron: deferred, counted
    assert len(calls()) == 1


def test_no_catbatch_anywhere_is_127_not_some_shards_failed(fake, monkeypatch, tmp_path, capsys):
    manifest, _, log = fake
    monkeypatch.delenv("CATBATCH_BIN")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(run_manifest.sys, "executable", str(tmp_path / "bin" / "python3"))
    monkeypatch.setattr(run_manifest.importlib.util, "find_spec", lambda name: None)
    assert run_manifest.catbatch_command() is None
    assert run_manifest.main([str(manifest)]) == 127
    text = log.read_text()
    assert "catbatch not found" in text and "some shards failed" not in text
    assert "catbatch not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# nightly_coco.sh as cron runs it: PATH=/usr/bin:/bin, HOME, LOGNAME, SHELL and nothing else
# ------------------------------------------------------------------------------------------

FAKE_SH = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/calls.txt"
echo "fake catbatch $1"
exit 3
"""


def _cron_env(home: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "LOGNAME": "ray", "SHELL": "/bin/sh"}


def _checkout(tmp_path: Path) -> Path:
    """The files nightly_coco.sh needs, in a checkout of their own (no .venv)."""
    repo = tmp_path / "catbatch"
    (repo / "jobs").mkdir(parents=True)
    (repo / "manifests").mkdir()
    for rel in ("jobs/nightly_coco.sh", "jobs/run_manifest.py", "manifests/coco.yaml"):
        (repo / rel).write_text((ROOT / rel).read_text())
    return repo


def test_nightly_coco_under_cron_finds_the_ray_images_python_and_catbatch(tmp_path):
    repo = _checkout(tmp_path)
    home = tmp_path / "home" / "ray"
    bin_dir = home / "anaconda3" / "bin"  # where rayproject/ray images keep their Python
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "catbatch").write_text(FAKE_SH)
    (bin_dir / "catbatch").chmod(0o755)
    done = subprocess.run(
        ["/bin/sh", str(repo / "jobs/nightly_coco.sh"), "--", "--address", "auto"],
        env=_cron_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr  # exit 3: the previous night still running
    assert (bin_dir / "calls.txt").read_text().split() == [
        "submit",
        "manifests/coco.yaml",
        "--quiet",
        "--address",
        "auto",
    ]
    log = (home / ".local/state/catbatch/coco.log").read_text()
    assert "| fake catbatch submit" in log and "holds the output's lease" in log


def test_nightly_coco_under_cron_without_catbatch_says_so(tmp_path):
    repo = _checkout(tmp_path)
    home = tmp_path / "home" / "nobody"
    home.mkdir(parents=True)
    done = subprocess.run(
        ["/bin/sh", str(repo / "jobs/nightly_coco.sh")],
        env=_cron_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    # python3 on cron's PATH (or none at all) has no catbatch: a clear 127, mailed by cron
    assert done.returncode == 127, done.stderr
    assert "catbatch not found" in done.stderr or "no Python found" in done.stderr
    assert "some shards failed" not in done.stderr


# ------------------------------------------------------------------------------------------
# stop_ray_jobs.py (the head pod's preStop) and sync_models.py (the weights Job)
# ------------------------------------------------------------------------------------------


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"jobs/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FakeJobs:
    """The JobSubmissionClient calls stop_ray_jobs makes; jobs end `ends_after` polls after
    their stop (None: never)."""

    def __init__(self, statuses: dict[str, str], ends_after: int | None):
        self.statuses, self.ends_after, self.stopped, self.polls = statuses, ends_after, [], 0

    def list_jobs(self):
        from types import SimpleNamespace

        return [SimpleNamespace(submission_id=k, status=v) for k, v in self.statuses.items()]

    def stop_job(self, sid):
        self.stopped.append(sid)
        return True

    def get_job_status(self, sid):
        self.polls += 1
        if sid in self.stopped and self.ends_after is not None and self.polls > self.ends_after:
            self.statuses[sid] = "STOPPED"
        return self.statuses[sid]


def test_prestop_stops_running_jobs_and_waits_for_them():
    stop = _load("stop_ray_jobs")
    client = FakeJobs({"a": "RUNNING", "b": "SUCCEEDED", "c": "PENDING"}, ends_after=3)
    now = [0.0]
    left = stop.stop_running_jobs(
        client, wait_s=75, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)
    )
    assert left == [] and client.stopped == ["a", "c"]  # the finished one is left alone
    assert 0 < now[0] < 75


def test_prestop_gives_up_after_its_wait():
    stop = _load("stop_ray_jobs")
    client = FakeJobs({"a": "RUNNING"}, ends_after=None)
    now = [0.0]
    said = []
    left = stop.stop_running_jobs(
        client,
        wait_s=10,
        clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + s),
        say=said.append,
    )
    assert left == ["a"] and now[0] == pytest.approx(10)
    assert any("still running after 10 s" in s for s in said)


def test_prestop_exits_0_when_no_dashboard_answers(tmp_path):
    log = tmp_path / "prestop.log"
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs/stop_ray_jobs.py"), "--address", "http://127.0.0.1:9"]
        + ["--wait", "1", "--log", str(log)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr  # the pod is going away either way
    assert "could not stop the Ray jobs" in log.read_text()


def test_sync_models_copies_missing_and_changed_files_and_follows_links(tmp_path):
    sync = _load("sync_models")
    src = tmp_path / "hub" / "models--org--m"
    (src / "blobs").mkdir(parents=True)
    (src / "snapshots" / "abc").mkdir(parents=True)
    (src / "refs").mkdir()
    (src / "refs" / "main").write_text("abc")
    (src / "blobs" / "f1").write_bytes(b"x" * 10)
    (src / "snapshots" / "abc" / "model.safetensors").symlink_to(src / "blobs" / "f1")
    dst = tmp_path / "models"
    copied, kept, failed = sync.sync(str(tmp_path / "hub"), dst, say=lambda _: None)
    assert (copied, kept, failed) == (3, 0, [])
    snap = dst / "models--org--m" / "snapshots" / "abc" / "model.safetensors"
    assert snap.read_bytes() == b"x" * 10 and not snap.is_symlink()
    (src / "refs" / "main").write_text("abcd")  # changed size: copied again
    assert sync.sync(str(tmp_path / "hub"), dst, say=lambda _: None) == (1, 2, [])
    assert (dst / "models--org--m" / "refs" / "main").read_text() == "abcd"
    assert not list(dst.rglob("*.part"))
    assert sync.main([str(tmp_path / "nothing-here"), str(dst)]) == 1
