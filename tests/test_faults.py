"""Faults, each injected for real: failing, NaN and out-of-memory batches inside a worker; an
actor SIGKILLed mid-shard; a shard whose actor crashes every time; a hung batch; SIGTERM and
SIGKILL to the driver. Faults inside actors come from ``CATBATCH_TEST_FAULTS`` (see worker.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from catbatch.cli import main
from catbatch.job.driver import plan
from catbatch.job.lease import Lease
from catbatch.job.manifest import load_manifest
from catbatch.job.worker import FAULTS_ENV, InjectedFaults, OrphanedTask, Worker

PROMPTS = ["a red fox", "a blue boat", "a green tree", "a yellow house", "a black cat", "a bird"]

MANIFEST = """\
name: faults
model: {{id: tiny-sd3, dtype: float32, device: cpu}}
prompts: {{path: prompts.txt}}
seed: 11
width: 128
height: 128
steps: 2
guidance_scale: 5.0
batch_size: {batch}
shard_size: {shard}
ray: {{address: local, actors: {actors}, resources: {{cpus: 1}}, {ray}}}
output: {output}
"""


# Row columns that do not depend on timing: an interrupted run must match an uninterrupted one.
SAME_IN_EVERY_RUN = (
    "sample_id",
    "image_index",
    "prompt",
    "prompt_metadata",
    "seed",
    "variant",
    "settings",
    "image",
    "width",
    "height",
    "batch_id",
    "batch_size",
    "status",
    "error",
)


def write_manifest(
    tmp: Path,
    output: str = "out",
    batch: int = 1,
    shard: int = 2,
    actors: int = 2,
    ray: str = "max_attempts: 3",
    prompts: list[str] = PROMPTS,
) -> Path:
    (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")
    path = tmp / f"{output}.yaml"
    path.write_text(
        MANIFEST.format(output=output, batch=batch, shard=shard, actors=actors, ray=ray)
    )
    return path


def submit(path: Path, capfd) -> tuple[int, str]:
    """``catbatch submit`` in this process: (exit code, stdout + stderr at the fd level)."""
    capfd.readouterr()
    try:
        main.main(["submit", str(path), "--quiet"], prog_name="catbatch", standalone_mode=False)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capfd.readouterr()
    return code, out + err


def read_rows(out: Path) -> list[dict]:
    files = sorted((out / "variants" / "default").glob("*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def check_exactly_once(out: Path, n_prompts: int = len(PROMPTS)) -> list[dict]:
    """Every (sample id, image index) once over all Parquet files; each commit marker matches."""
    rows = read_rows(out)
    keys = [(r["sample_id"], r["image_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == n_prompts
    for stats in (out / "variants" / "default").glob("*.stats.json"):
        info = json.loads(stats.read_text())
        data = stats.with_name(f"{info['shard']}.parquet").read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["parquet_sha256"]
    return rows


def committed(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "variants" / "default").glob("*.stats.json"))


def driver_events(out: Path, kind: str) -> list[dict]:
    """The driver's logged events of one kind (``logs/<run id>/driver.jsonl``)."""
    lines = [ln for f in out.glob("logs/*/driver.jsonl") for ln in f.read_text().splitlines()]
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def wait_for(predicate, timeout: float = 120.0, every: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return None


def _title(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def shard_actor_pids(root: psutil.Process, method: str = "run") -> list[int]:
    """Actor processes below ``root`` that are inside ``ShardActor.<method>`` right now."""
    return [
        p.pid
        for p in root.children(recursive=True)
        if _title(p).startswith(f"ray::ShardActor.{method}")
    ]


# -- inside one worker (no Ray) ------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_and_plan(tmp_path_factory, tiny_cache):
    tmp = tmp_path_factory.mktemp("worker")
    m = load_manifest(write_manifest(tmp, batch=4, shard=4))
    p = plan(m)
    return Worker(m, p.model_source), p


def test_failing_nan_and_oom_images_are_recorded_and_the_shard_commits(
    worker_and_plan, monkeypatch
):
    worker, p = worker_and_plan
    ids = [pr.sample_id for pr in p.index.read(0)]
    spec = {"fail_ids": [ids[1]], "nan_ids": [ids[2]], "oom_above": 2}
    monkeypatch.setenv(FAULTS_ENV, json.dumps(spec))
    worker.faults = InjectedFaults.from_env()
    stats = worker.run_task(p.pending[0], p.layout)
    assert (stats.rows, stats.images_ok, stats.images_failed) == (4, 2, 2)
    # 4 -> out of memory -> 2 + 2; the half holding the failing image -> 1 + 1
    splits = stats.extra["batch_splits"]
    assert [(s["size"], s["error"].split(":")[0]) for s in splits] == [
        (4, "OutOfMemoryError"),
        (2, "RuntimeError"),
    ]
    rows = {r["sample_id"]: r for r in read_rows(Path(p.layout.root))}
    assert rows[ids[0]]["status"] == "ok" and rows[ids[0]]["batch_size"] == 1
    assert rows[ids[1]]["status"] == "failed" and rows[ids[1]]["image"] is None
    assert f"injected failure for sample {ids[1]}" in rows[ids[1]]["error"]
    assert rows[ids[2]]["status"] == "failed" and "non-finite" in rows[ids[2]]["error"]
    assert rows[ids[3]]["status"] == "ok" and rows[ids[3]]["batch_size"] == 2
    assert rows[ids[3]]["batch_id"].endswith("-b0.1")
    assert (Path(p.layout.root) / "variants/default/shard-00000.stats.json").exists()


def test_out_of_memory_at_batch_one_fails_the_rows(worker_and_plan):
    worker, p = worker_and_plan
    worker.faults = InjectedFaults(oom_above=0)
    stats = worker.run_task(p.pending[0], p.layout)
    assert (stats.images_ok, stats.images_failed) == (0, 4)
    assert [s["size"] for s in stats.extra["batch_splits"]] == [4, 2, 2]
    rows = read_rows(Path(p.layout.root))
    assert {r["batch_size"] for r in rows} == {1}
    assert all(r["error"].startswith("OutOfMemoryError: injected") for r in rows)


def test_exception_and_nan_from_inside_the_pipeline(worker_and_plan):
    """Faults raised by the real transformer forward, not by the test hook."""
    worker, p = worker_and_plan
    worker.faults = None

    def boom(module, args, kwargs):
        raise RuntimeError("boom in the transformer")

    handle = worker.pipe.transformer.register_forward_pre_hook(boom, with_kwargs=True)
    try:
        stats = worker.run_task(p.pending[0], p.layout)
    finally:
        handle.remove()
    assert (stats.images_ok, stats.images_failed) == (0, 4)
    rows = read_rows(Path(p.layout.root))
    assert all(r["error"] == "RuntimeError: boom in the transformer" for r in rows)

    handle = worker.pipe.transformer.register_forward_hook(
        lambda module, args, out: (out[0] * float("nan"),)
    )
    try:
        stats = worker.run_task(p.pending[0], p.layout)
    finally:
        handle.remove()
    assert (stats.images_ok, stats.images_failed) == (0, 4)
    assert stats.extra == {}  # NaN is per image: no batch split
    assert all("non-finite" in r["error"] for r in read_rows(Path(p.layout.root)))

    stats = worker.run_task(p.pending[0], p.layout)
    assert (stats.images_ok, stats.images_failed) == (4, 0)


# A driver that takes the output's lease, prints its generation and waits to be killed.
LEASE_HOLDER = """
import sys, time
from catbatch.job.layout import OutputLayout
from catbatch.job.lease import Lease
lease = Lease(OutputLayout(sys.argv[1]))
lease.acquire()
print(lease.info.generation, flush=True)
time.sleep(600)
"""


def test_orphan_does_not_commit_once_a_new_driver_holds_the_lease(worker_and_plan):
    """The driver of a worker is SIGKILLed and a new driver takes the output's lease: the
    orphaned worker finishes its shard but does not commit it (it re-reads the lease generation
    right before writing the stats file); under the current lease the same worker commits."""
    worker, p = worker_and_plan
    worker.faults = None
    task, layout = p.pending[1], p.layout
    folder = Path(layout.root) / "variants" / "default"
    for name in (f"{task.shard.name}.parquet", f"{task.shard.name}.stats.json"):
        (folder / name).unlink(missing_ok=True)
    old = subprocess.Popen(
        [sys.executable, "-c", LEASE_HOLDER, layout.root], stdout=subprocess.PIPE, text=True
    )
    try:
        worker.lease_generation = int(old.stdout.readline())
    finally:
        old.kill()
        old.wait()
    new = Lease(layout)
    new.acquire()  # free at once: its holder died on this host
    try:
        with pytest.raises(OrphanedTask, match="another submission owns the output"):
            worker.run_task(task, layout)
        assert not (folder / f"{task.shard.name}.stats.json").exists()
        worker.lease_generation = new.info.generation
        stats = worker.run_task(task, layout)
        assert stats.images_ok == task.shard.count
        assert (folder / f"{task.shard.name}.stats.json").exists()
    finally:
        worker.lease_generation = None
        new.release()


def test_lease_lost_while_two_shards_are_written_commits_neither(worker_and_plan, monkeypatch):
    """Two tasks made back to back under lease generation g, their rows still being made when
    a new driver takes the lease: neither shard is committed (the fence runs per commit)."""
    worker, p = worker_and_plan
    worker.faults = None
    layout = p.layout
    folder = Path(layout.root) / "variants" / "default"
    tasks = p.pending[:2]
    for task in tasks:
        for name in (f"{task.shard.name}.parquet", f"{task.shard.name}.stats.json"):
            (folder / name).unlink(missing_ok=True)
    release = threading.Event()
    real = Worker._batch_rows

    def held_rows(self, *args):
        release.wait(timeout=60)
        return real(self, *args)

    monkeypatch.setattr(Worker, "_batch_rows", held_rows)
    old = Lease(layout)
    old.acquire()
    worker.lease_generation = old.info.generation
    try:
        pending = [worker.start_task(task, layout) for task in tasks]  # both made, none written
        old.release()
        new = Lease(layout)
        new.acquire()
        release.set()
        for shard in pending:
            with pytest.raises(OrphanedTask, match="another submission owns the output"):
                shard.result(timeout=120)
        new.release()
    finally:
        release.set()
        worker.lease_generation = None
    assert not list(folder.glob("shard-0000[01].stats.json"))


# -- actors and the pool -------------------------------------------------------------------


@pytest.mark.slow
def test_actor_sigkilled_mid_shard_is_redone_elsewhere(
    tmp_path, ray_cluster, monkeypatch, caplog, capfd
):
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"delay_s": 0.5}))
    path = write_manifest(tmp_path, actors=1)  # the shard is redone on a fresh actor
    killed: list[int] = []
    finished = threading.Event()

    def kill_one() -> None:
        # until the job ends: on a loaded box the actor's start alone has taken over 300 s
        pids = wait_for(
            lambda: shard_actor_pids(psutil.Process()) or finished.is_set(), timeout=1800
        )
        if isinstance(pids, list):
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    with caplog.at_level(logging.WARNING, logger="catbatch.job.distributor"):
        code, output = submit(path, capfd)
    finished.set()
    killer.join(timeout=5)
    assert code == 0, output
    assert killed, "no actor was running a shard"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == "zombie"
    died = [r.message for r in caplog.records if "actor died" in r.message]
    assert len(died) == 1 and "shard default/shard-00000 attempt 1 failed" in died[0]
    # it held its next shard too, which goes back to the queue without counting a try
    requeued = driver_events(tmp_path / "out", "task_requeued")
    assert [e["task"] for e in requeued] == ["default/shard-00001"]
    assert "not started" in requeued[0]["why"]
    rows = check_exactly_once(tmp_path / "out")
    assert {r["status"] for r in rows} == {"ok"}
    assert len(committed(tmp_path / "out")) == 3
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_shard_that_always_crashes_stops_after_max_attempts(
    tmp_path, ray_cluster, monkeypatch, capfd
):
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"crash_shards": ["shard-00000"]}))
    path = write_manifest(tmp_path, shard=3, actors=1, ray="max_attempts: 2")
    code, output = submit(path, capfd)
    assert code == 1, output
    assert "shard default/shard-00000 FAILED after retries" in output
    assert "actor died" in output and "(2 attempts)" in output
    assert committed(tmp_path / "out") == ["shard-00001.stats.json"]
    assert not (tmp_path / "out" / "variants/default/shard-00000.parquet").exists()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "incomplete"


@pytest.mark.slow
def test_hung_batch_times_out_and_the_shard_is_retried(
    tmp_path, ray_cluster, monkeypatch, caplog, capfd
):
    marker = tmp_path / "hung-once"
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"hang_once": str(marker)}))
    path = write_manifest(tmp_path, shard=3, actors=1, ray="batch_timeout_s: 5")
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="catbatch.job.distributor"):
        code, output = submit(path, capfd)
    assert code == 0, output
    assert marker.exists()
    timeouts = [r.message for r in caplog.records if "batch_timeout_s=5 s" in r.message]
    assert len(timeouts) == 1 and "shard-00000 attempt 1" in timeouts[0]
    # the killed actor held the next shard as well: back to the queue, not counted
    requeued = driver_events(tmp_path / "out", "task_requeued")
    assert [e["task"] for e in requeued] == ["default/shard-00001"]
    assert not [e for e in driver_events(tmp_path / "out", "task_retry") if "00001" in e["task"]]
    rows = check_exactly_once(tmp_path / "out")
    assert {r["status"] for r in rows} == {"ok"}
    assert time.monotonic() - t0 < 120


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before", "after"])
def test_actor_killed_at_a_commit_loses_nothing(
    tmp_path, ray_cluster, monkeypatch, caplog, capfd, when
):
    """The actor dies while it makes the next shard, as it commits one: between the shard's
    Parquet and stats files (the shard is made again), or right after the stats file, before it
    answers (the shard counts as done, read from its stats). Every image exactly once."""
    marker = tmp_path / "crashed-once"
    faults = {f"crash_{when}_commit_once": str(marker), "delay_s": 0.3}
    monkeypatch.setenv(FAULTS_ENV, json.dumps(faults))
    path = write_manifest(tmp_path, actors=1)
    with caplog.at_level(logging.WARNING, logger="catbatch.job.distributor"):
        code, output = submit(path, capfd)
    assert code == 0, output
    assert marker.exists()
    out = tmp_path / "out"
    retried = {e["task"] for e in driver_events(out, "task_retry")}
    if when == "before":
        died = [r.message for r in caplog.records if "actor died" in r.message]
        assert "shard default/shard-00000 attempt 1 failed" in died[0]
        assert "default/shard-00000" in retried
    else:
        assert "default/shard-00000" not in retried
        commits = [
            json.loads(line)
            for f in out.glob("logs/*/actor-*.jsonl")
            for line in f.read_text().splitlines()
            if '"task_commit"' in line
        ]
        found = [e for e in commits if e["task"] == "default/shard-00000"]
        assert len(found) == 1 and "read from its stats file" in found[0]["source"]
    rows = check_exactly_once(out)  # a Parquet file the dead actor left was replaced
    assert {r["status"] for r in rows} == {"ok"}
    assert len(committed(out)) == 3
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def _sigterm_after_first_commit(out: Path) -> threading.Thread:
    def send() -> None:
        if wait_for(lambda: committed(out), timeout=180):
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.parametrize("grace", [30, 0])
def test_sigterm_stops_handing_out_shards(tmp_path, ray_cluster, monkeypatch, capfd, grace):
    """Running shards commit within the grace period (or are abandoned when it is 0); the
    shard the actor holds next is not started (a batch takes 2 s: the stop reaches the actor
    while it makes the shard after the first)."""
    out = tmp_path / "out"
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"delay_s": 2.0}))
    path = write_manifest(tmp_path, shard=1, actors=1, ray=f"stop_grace_s: {grace}")
    handler = signal.getsignal(signal.SIGTERM)
    sender = _sigterm_after_first_commit(out)
    t0 = time.monotonic()
    code, output = submit(path, capfd)
    stopped_after = time.monotonic() - t0
    sender.join(timeout=5)
    assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is back
    assert code == 143, output
    assert "stopped by SIGTERM" in output and "rerun the same command" in output
    done = committed(out)
    assert 1 <= len(done) < len(PROMPTS)
    rows = check_exactly_once(out, n_prompts=len(done))
    assert {r["status"] for r in rows} == {"ok"}
    parquet = sorted(p.name for p in (out / "variants/default").glob("*.parquet"))
    if grace == 0:  # the running shard was abandoned at once (its actor killed)
        assert len(done) <= 2 and len(parquet) <= len(done) + 1
    else:  # the running shard committed: no Parquet file without its commit marker
        assert len(parquet) == len(done)
        # the actor held its next shard, which was not started once the stop came
        requeued = driver_events(out, "task_requeued")
        assert len(requeued) == 1 and "the run is stopping" in requeued[0]["why"]
        assert f"{requeued[0]['task'].split('/')[1]}.stats.json" not in done
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert stopped_after < 120
    if grace == 0:
        return
    before = {p.name: p.stat().st_mtime_ns for p in (out / "variants").rglob("*.parquet")}
    monkeypatch.delenv(FAULTS_ENV)
    code, output = submit(path, capfd)
    assert code == 0, output
    assert f"{len(done)} shard(s) already committed" in output
    check_exactly_once(out)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "variants").rglob("*.parquet")}
    assert all(after[name] == mtime for name, mtime in before.items())


def _cli(path: Path, *options: str) -> list[str]:
    cmd = [sys.executable, "-m", "catbatch.cli", "submit", str(path), "--quiet", "--num-cpus", "2"]
    return [*cmd, *options]


@pytest.mark.slow
def test_driver_sigkilled_mid_run_then_rerun_matches_uninterrupted(tmp_path, ray_cluster, capfd):
    """A private cluster per submit: the rerun starts its own, whatever the dead one left."""
    reference = write_manifest(tmp_path, output="ref")
    code, output = submit(reference, capfd)
    assert code == 0, output
    path = write_manifest(tmp_path, output="out")
    out = tmp_path / "out"
    env = {**os.environ, FAULTS_ENV: json.dumps({"delay_s": 0.5})}
    # one actor: the kill lands while it works on its second shard, not amid a commit
    driver = subprocess.Popen(
        _cli(path, "--actors", "1"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        assert wait_for(lambda: committed(out) or driver.poll() is not None, timeout=240)
        assert driver.poll() is None, driver.stdout.read().decode()
        family = psutil.Process(driver.pid).children(recursive=True)
        names = {p.pid: _title(p) for p in family}
        driver.kill()
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    first = committed(out)
    assert 1 <= len(first) < 3
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*.stats.json")}
    try:
        # Every process of the dead driver's private cluster (found by the pids recorded above:
        # agents, workers, the watchdog) ends within seconds, and its workers commit nothing.
        assert any(names[p.pid].startswith("ray::ShardActor") for p in family)
        _, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, f"still running 10 s after the driver: {[names[p.pid] for p in alive]}"
        assert committed(out) == first
        env = {k: v for k, v in os.environ.items() if k != FAULTS_ENV}
        rerun = subprocess.run(_cli(path), env=env, capture_output=True, text=True, timeout=300)
    finally:
        for proc in family:
            if proc.is_running():
                proc.kill()
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(first)} shard(s) already committed" in rerun.stdout
    assert all(
        (out / "variants/default" / name).stat().st_mtime_ns == mtime
        for name, mtime in before.items()
    )
    check_exactly_once(out)
    key = lambda r: (r["sample_id"], r["image_index"])  # noqa: E731
    resumed = sorted(read_rows(out), key=key)
    uninterrupted = sorted(read_rows(tmp_path / "ref"), key=key)
    assert len(resumed) == len(uninterrupted) == len(PROMPTS)
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert {k: a[k] for k in SAME_IN_EVERY_RUN} == {k: b[k] for k in SAME_IN_EVERY_RUN}
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
