"""Scale-out on one machine: a three-node Ray cluster on loopback whose nodes declare GPUs.

`catbatch submit --address auto` runs as the entrypoint of a Ray Job (submitted to the head's
job server, as `ray job submit` does) and joins the cluster like a real one. Each actor is
pinned to one (declared) GPU; shards run on every worker node; a node removed in the middle of
the run loses and duplicates nothing; the run's logs and Ray metrics are checked.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

N_PROMPTS, SHARD = 12, 2
MANIFEST = """\
name: scaleout
model: {{id: tiny-sd3, dtype: float32}}
prompts: {{path: prompts.txt}}
width: 64
height: 64
steps: 3
batch_size: 1
shard_size: {shard}
ray: {{address: local, actors: auto, resources: {{cpus: 1, gpus: 1}}, max_attempts: 3}}
metrics: {{clip: {{enabled: false}}, macs: false}}
output: out
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tiny_cache):
    """Head (no CPUs or GPUs: only the driver joins it), node A with 2 GPUs, node B with 1."""
    from ray.cluster_utils import Cluster

    common = {"object_store_memory": 80 * 1024 * 1024}
    ports = [_free_port() for _ in range(7)]
    c = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            **common,
            "num_cpus": 0,
            "num_gpus": 0,
            "metrics_export_port": ports[0],
            "include_dashboard": True,  # the job server of `ray job submit`
            "dashboard_host": "127.0.0.1",
            "dashboard_port": ports[3],
            # not the fixed default 52365: the session's own cluster may hold it
            "dashboard_agent_listen_port": ports[4],
            "_system_config": {"metrics_report_interval_ms": 1000},
        },
    )
    a = c.add_node(
        **common,
        num_cpus=2,
        num_gpus=2,
        metrics_export_port=ports[1],
        dashboard_agent_listen_port=ports[5],
    )
    b = c.add_node(
        **common,
        num_cpus=1,
        num_gpus=1,
        metrics_export_port=ports[2],
        dashboard_agent_listen_port=ports[6],
    )
    c.wait_for_nodes()
    yield c, a, b, ports[:3], f"http://127.0.0.1:{ports[3]}"
    c.shutdown()


def _stats(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (out / "variants/default").glob("*.stats.json")]


def _scrape(ports: list[int]) -> str:
    text = ""
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text += r.read().decode()
        except OSError:
            pass
    return text


def _submit_job(url: str, entrypoint: str, env: dict[str, str]) -> tuple[object, str]:
    """Submit a Ray Job (retrying while the head's job agent starts); (client, job id)."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 90
    while True:
        try:
            client = JobSubmissionClient(url)
            return client, client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env})
        except (RuntimeError, ConnectionError) as e:  # "No available agent", not up yet
            if time.monotonic() > deadline:
                raise AssertionError(f"the job server did not start: {e}") from e
            time.sleep(1)


def test_ray_job_on_three_nodes_pins_gpus_survives_node_loss(tmp_path: Path, cluster) -> None:
    from ray.job_submission import JobStatus

    c, node_a, node_b, ports, url = cluster
    (tmp_path / "prompts.txt").write_text("".join(f"shape {i}\n" for i in range(N_PROMPTS)))
    (tmp_path / "job.yaml").write_text(MANIFEST.format(shard=SHARD))
    out = tmp_path / "out"
    entrypoint = f"{sys.executable} -m catbatch.cli submit {tmp_path / 'job.yaml'} --address auto"
    env = {"CATBATCH_TEST_FAULTS": json.dumps({"delay_s": 1.0})}
    client, job = _submit_job(url, f"{entrypoint} --quiet", env)
    removed, metrics = False, ""
    deadline = time.monotonic() + 300
    status = client.get_job_status(job)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        if "ray_catbatch_images" not in metrics:
            metrics = _scrape(ports)
        on_b = [s for s in _stats(out) if s["extra"]["worker"]["node_id"] == node_b.node_id]
        if on_b and not removed:
            c.remove_node(node_b)  # node B's actor is busy with its next shard: lost mid-run
            removed = True
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert removed, "node B never committed a shard"
    assert "images: 12 generated, 0 failed" in logs

    # nothing lost, nothing duplicated: every shard committed once, every prompt exactly once
    stats = _stats(out)
    assert len(stats) == N_PROMPTS // SHARD
    rows = [
        r
        for p in (out / "variants/default").glob("*.parquet")
        for r in pq.read_table(p).to_pylist()
    ]
    assert sorted(r["sample_id"] for r in rows) == sorted({r["sample_id"] for r in rows})
    assert len(rows) == N_PROMPTS and {r["status"] for r in rows} == {"ok"}
    for s in stats:
        data = (out / "variants/default" / f"{s['shard']}.parquet").read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["parquet_sha256"]

    # shards ran on both worker nodes; node A's two actors each had their own GPU
    nodes = {s["extra"]["worker"]["node_id"] for s in stats}
    assert nodes == {node_a.node_id, node_b.node_id}
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    log_dir = out / record["logs"]
    driver = [json.loads(line) for line in (log_dir / "driver.jsonl").read_text().splitlines()]
    ready = [e for e in driver if e["event"] == "actor_ready"]
    pins = [(e["node_id"], tuple(e["gpu_ids"])) for e in ready]
    assert len(ready) >= 3 and all(len(g) == 1 for _, g in pins)
    # no two live actors share a GPU (a replacement may get the GPU its lost actor had)
    live: dict[str, tuple] = {}
    for e in driver:
        if e["event"] == "actor_ready":
            pin = (e["node_id"], tuple(e["gpu_ids"]))
            assert pin not in live.values(), (e["actor"], pin, live)
            live[e["actor"]] = pin
        elif e["event"] == "actor_lost":
            live.pop(e["actor"], None)
    assert {g for n, g in pins if n == node_a.node_id} == {("0",), ("1",)}
    assert any(e["event"] == "actor_lost" for e in driver)
    assert driver[-1]["event"] == "run_end" and driver[-1]["tasks_failed"] == 0

    # per-actor structured logs: every committed task is there with its batches
    commits = [
        json.loads(line)
        for f in log_dir.glob("actor-*.jsonl")
        for line in f.read_text().splitlines()
        if '"task_commit"' in line
    ]
    assert sorted(e["task"] for e in commits) == sorted(f"default/{s['shard']}" for s in stats)

    # Prometheus endpoint of a node served the job's metrics while it ran
    assert "ray_catbatch_images_total{" in metrics and 'job="scaleout"' in metrics, metrics[:2000]
