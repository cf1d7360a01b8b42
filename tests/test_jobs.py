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
