#!/usr/bin/env python3
"""Cron entrypoint: run ``catbatch submit MANIFEST`` once, log it, exit 0 unless a person is needed.

Resubmitting a manifest resumes its output (committed shards are skipped), so this is safe to
run on any schedule. Every line of catbatch's output is appended, timestamped, to a log file
(``--log``, default ``$CATBATCH_LOG_DIR/<manifest name>.log``, ``CATBATCH_LOG_DIR`` defaulting to
``~/.local/state/catbatch``). Exit codes of ``catbatch submit`` map to:

- 0 finished: exit 0 (then ``catbatch report OUTPUT`` with ``--report``).
- 3 a previous submission still holds the output's lease (still running): exit 0.
- 143 stopped by SIGTERM (preempted; committed shards kept, the next run resumes): exit 0.
- 3 or 143 ``--max-deferred`` times in a row (default 3) without a finished run: that code,
  since the run is not getting anywhere.
- 1 some shards failed after retries (``catbatch status OUTPUT`` goes into the log), 2 bad
  input, anything else (127: catbatch not found): that code.

With ``--busy-retries N`` an exit 3 is first retried in place, ``--busy-wait`` seconds apart, up
to N times: a driver that died leaves its lease for 30 s (a RayJob uses this, and
``--max-deferred 1`` so that a run which never started fails).

When the exit code is not 0 a one-line summary also goes to stderr, so cron mails only then.
SIGTERM and SIGINT are passed on to catbatch, which lets running shards commit. Only the Python
standard library is needed (PyYAML, when present, to find the output for report/status).
``CATBATCH_BIN`` overrides the catbatch command (default: the one beside this Python, then PATH,
then ``python -m catbatch.cli`` where this Python has catbatch; else exit 127, catbatch not found).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_BUSY, EXIT_SIGTERM = 1, 2, 3, 143
DEFERRED = (EXIT_BUSY, EXIT_SIGTERM)


class Log:
    """Appends timestamped lines to a file (and to stdout with ``echo``)."""

    def __init__(self, path: Path, echo: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.echo = path, echo
        self._f = path.open("a", encoding="utf-8")
        self._tag = f"run_manifest[{os.getpid()}]"

    def __call__(self, message: str, prefix: str = "") -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = f"{stamp} {self._tag} {prefix}{message.rstrip()}\n"
        self._f.write(line)
        self._f.flush()
        if self.echo:
            sys.stdout.write(line)
            sys.stdout.flush()

    def close(self) -> None:
        self._f.close()


def catbatch_command() -> list[str] | None:
    """``$CATBATCH_BIN`` (split like a shell), else catbatch beside this Python, else PATH, else
    this Python's ``-m catbatch.cli``; None when this Python has no catbatch either."""
    if os.environ.get("CATBATCH_BIN"):
        return shlex.split(os.environ["CATBATCH_BIN"])
    beside = Path(sys.executable).with_name("catbatch")
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("catbatch")
    if found:
        return [found]
    if importlib.util.find_spec("catbatch") is not None:
        return [sys.executable, "-m", "catbatch.cli"]
    return None


def run(cmd: list[str], log: Log) -> int:
    """Run ``cmd``, logging each output line; SIGTERM/SIGINT are forwarded to it."""
    log("$ " + shlex.join(cmd))
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except OSError as e:
        log(f"cannot start {cmd[0]}: {e}")
        return 127

    def forward(signum: int, _frame: object) -> None:
        log(f"received {signal.Signals(signum).name}; passing it on to catbatch")
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            log(line, prefix="| ")
        return proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def manifest_output(manifest: Path) -> str | None:
    """The manifest's ``output`` (local paths resolved like catbatch does), or None."""
    try:
        import yaml

        out = yaml.safe_load(manifest.read_text(encoding="utf-8")).get("output")
    except Exception:  # noqa: BLE001 - no PyYAML, unreadable file: the caller says so
        return None
    if not isinstance(out, str) or not out:
        return None
    if "://" in out or Path(out).is_absolute():
        return out
    return str(manifest.parent / out)


def load_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run `catbatch submit MANIFEST` for cron: resume, log, exit 0 unless a "
        "person is needed.",
        epilog="Arguments after `--` go to `catbatch submit` (e.g. -- --address auto).",
    )
    p.add_argument("manifest", type=Path)
    p.add_argument("--log", type=Path, help="Log file (appended).")
    p.add_argument("--output", help="Override the manifest's output (passed to submit).")
    p.add_argument("--report", action="store_true", help="Run `catbatch report` after success.")
    p.add_argument(
        "--max-deferred",
        type=int,
        default=3,
        help="Consecutive runs ending busy (3) or stopped (143) before it is an error.",
    )
    p.add_argument(
        "--busy-retries",
        type=int,
        default=0,
        help="Resubmit this many times when catbatch exits 3 (the output's lease is held).",
    )
    p.add_argument(
        "--busy-wait",
        type=float,
        default=45.0,
        help="Seconds between those resubmissions (a dead driver's lease frees after 30 s).",
    )
    p.add_argument("--echo", action="store_true", help="Also write the log lines to stdout.")
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.submit_args = argv[cut + 1 :]
    return args


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    log_dir = Path(os.environ.get("CATBATCH_LOG_DIR") or Path.home() / ".local/state/catbatch")
    log_path = a.log or log_dir / f"{a.manifest.stem}.log"
    log = Log(log_path, a.echo)
    state_path = log_path.with_name(log_path.name + ".state.json")
    try:
        code, outcome = _run_once(a, log, load_state(state_path), state_path)
    finally:
        log.close()
    if code:
        print(f"catbatch {a.manifest}: {outcome} (exit {code}); log: {log_path}", file=sys.stderr)
    return code


def _run_once(a: argparse.Namespace, log: Log, state: dict, state_path: Path) -> tuple[int, str]:
    cat = catbatch_command()
    output = a.output or manifest_output(a.manifest)
    log(f"start: {a.manifest} -> {output or '(output unknown)'}")
    if cat is None:
        outcome = (
            f"catbatch not found: not beside {sys.executable}, not on PATH "
            f"({os.environ.get('PATH', '')}), not importable; set CATBATCH_BIN - needs a person"
        )
        log(f"end: {outcome} (this job exits 127)")
        return 127, outcome
    extra = (["--output", a.output] if a.output else []) + a.submit_args
    submit = [*cat, "submit", str(a.manifest), "--quiet", *extra]
    rc = run(submit, log)
    for attempt in range(1, a.busy_retries + 1):
        if rc != EXIT_BUSY:
            break
        log(
            f"the output's lease is held; submitting again in {a.busy_wait:g} s "
            f"({attempt}/{a.busy_retries})"
        )
        time.sleep(a.busy_wait)
        rc = run(submit, log)

    deferred = state.get("deferred", 0) + 1 if rc in DEFERRED else 0
    state.update(deferred=deferred, last_exit=rc, last_run=time.time(), manifest=str(a.manifest))
    save_state(state_path, state)

    if rc == 0:
        outcome, code = "finished: every shard is committed", 0
    elif rc in DEFERRED:
        what = (
            "a previous submission still holds the output's lease (still running)"
            if rc == EXIT_BUSY
            else "stopped by SIGTERM; committed shards are kept and the next run resumes"
        )
        late = deferred >= a.max_deferred
        outcome = f"{what}; {deferred} run(s) in a row without finishing"
        outcome += " - needs a look" if late else ""
        code = rc if late else 0
    elif rc == EXIT_FAILED:
        outcome, code = "some shards failed after retries - needs a look", rc
    elif rc == EXIT_BAD_INPUT:
        outcome, code = "bad input, nothing started - needs a person", rc
    else:
        outcome, code = f"catbatch ended with exit code {rc} - needs a look", rc

    if rc == EXIT_FAILED and output:
        run([*cat, "status", output], log)
    if rc == 0 and a.report:
        if not output:
            outcome, code = "finished, but the output is unknown for the report (--output)", 2
        else:
            rc_report = run([*cat, "report", output], log)
            if rc_report:
                outcome, code = f"finished, but `catbatch report` failed ({rc_report})", rc_report
    log(f"end: {outcome} (catbatch exit {rc}, this job exits {code})")
    return code, outcome


if __name__ == "__main__":
    sys.exit(main())
