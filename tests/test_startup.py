"""Start-up: the commands that need no model (`--help`, `validate --no-model-check`, `status`,
and a submission refused because another holds the lease) import neither torch, diffusers nor
Ray. Each runs in a fresh interpreter, which then reports what it imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from catbatch.job.layout import OutputLayout
from catbatch.job.lease import Lease

HEAVY = ("torch", "diffusers", "ray")

# Runs `catbatch ARGS...` in this interpreter, then prints the exit code and the heavy modules.
PROBE = f"""
import json, sys
from catbatch.cli import main
try:
    main.main(sys.argv[1:], prog_name="catbatch")
    code = 0
except SystemExit as e:
    code = e.code or 0
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
print("PROBE " + json.dumps({{"code": code, "heavy": heavy}}))
"""

MANIFEST = """\
name: startup
model: {id: tiny-sd3, dtype: float32, device: cpu}
prompts: {path: prompts.txt}
width: 128
height: 128
steps: 2
variants:
  - name: full
  - name: cat
    pruning: {alpha: 0.5}
output: out
"""


def probe(*args: str) -> tuple[int, list[str], str]:
    """(exit code, heavy modules imported, output) of `catbatch ARGS` in a new interpreter."""
    res = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("PROBE ")]
    assert lines, res.stdout + res.stderr
    found = json.loads(lines[-1].removeprefix("PROBE "))
    return found["code"], found["heavy"], res.stdout + res.stderr


@pytest.fixture
def job(tmp_path: Path) -> Path:
    (tmp_path / "prompts.txt").write_text("a red fox\na blue boat\n")
    path = tmp_path / "m.yaml"
    path.write_text(MANIFEST)
    return path


def test_help_imports_no_engine_or_ray():
    code, heavy, out = probe("--help")
    assert code == 0 and "validate" in out
    assert heavy == [], f"catbatch --help imported {heavy}"


def test_validate_without_model_check_imports_no_engine_or_ray(job):
    code, heavy, out = probe("validate", str(job), "--no-model-check")
    assert code == 0 and "ok: 2 prompts" in out, out
    assert heavy == [], f"catbatch validate --no-model-check imported {heavy}"


def test_status_imports_no_engine_or_ray(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    record = {
        "name": "startup",
        "variants": ["full"],
        "prompts": 2,
        "images_per_prompt": 1,
        "manifest": {"shard_size": 1},
    }
    (out / "run.json").write_text(json.dumps(record))
    code, heavy, text = probe("status", str(out))
    assert code == 1 and "incomplete" in text, text
    assert heavy == [], f"catbatch status imported {heavy}"


def test_busy_output_exits_3_before_loading_anything(job):
    holder = Lease(OutputLayout(str(job.parent / "out")))
    holder.acquire()
    try:
        code, heavy, out = probe("submit", str(job), "--quiet")
    finally:
        holder.release()
    assert code == 3 and "being written by another submission" in out, out
    assert heavy == [], f"a refused submission imported {heavy}"
    assert sorted(p.name for p in (job.parent / "out").iterdir()) == [".lease"]


def test_first_command_on_a_fresh_machine_prints_only_its_own_output(job, tmp_path):
    """Building a preset into an empty cache prints no progress bar or library chatter."""
    job.write_text(MANIFEST.replace("tiny-sd3", "tiny-pixart").replace("steps: 2", "steps: 9"))
    env = {**os.environ, "CATBATCH_CACHE": str(tmp_path / "empty-cache")}
    cmd = [sys.executable, "-m", "catbatch.cli", "validate", str(job)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert any((tmp_path / "empty-cache").iterdir()), "the preset was not built here"
    assert res.stderr == ""
    assert res.stdout.startswith("{")
    assert res.stdout.splitlines()[-1].startswith("ok: 2 prompts")
    assert "\r" not in res.stdout and "it/s" not in res.stdout
