"""Ray side of a job: the cluster connection, one actor per GPU (or CPU slot), and a pull loop
that hands the next task to whichever actor is idle."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from catbatch.layout import OutputLayout
from catbatch.manifest import Manifest
from catbatch.sharding import Task

log = logging.getLogger(__name__)

MAX_TASK_ATTEMPTS = 3


def connect(address: str, num_cpus: int | None, object_store_mb: int) -> None:
    """Start a private local cluster (``local``) or join one (``auto`` or an address)."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address == "local":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        kwargs.update(
            address="local",
            num_cpus=num_cpus,
            object_store_memory=object_store_mb * 1024 * 1024,
        )
    else:
        kwargs["address"] = None if address == "auto" else address
    ray.init(**kwargs)


def plan_actors(manifest: Manifest, n_tasks: int) -> tuple[int, float, float]:
    """(number of actors, CPUs each, GPUs each) for the cluster we are connected to."""
    res = ray.cluster_resources()
    gpus_total = res.get("GPU", 0.0)
    cpus = manifest.ray.resources.cpus
    want_gpu = manifest.model.device != "cpu" and gpus_total > 0
    gpus = manifest.ray.resources.gpus if want_gpu else 0.0
    if manifest.ray.actors == "auto":
        if gpus > 0:
            n = int(gpus_total // gpus)
        else:
            n = int(res.get("CPU", 1) // cpus)
    else:
        n = manifest.ray.actors
    return max(1, min(n, n_tasks)), cpus, gpus


@ray.remote(max_restarts=0)
class ShardActor:
    """Holds one pipeline (one GPU each when GPUs exist) and runs tasks."""

    def __init__(self, manifest_json: dict, base_dir: str, source: dict, threads: int):
        import torch

        from catbatch.manifest import Manifest
        from catbatch.worker import Worker

        torch.set_num_threads(max(1, threads))
        manifest = Manifest.model_validate({**manifest_json, "base_dir": base_dir})
        self.worker = Worker(manifest, source)
        self.layout = OutputLayout(manifest.output_url)

    def info(self) -> dict:
        pipe = self.worker.pipe
        return {
            "device": self.worker.device_name,
            "pipeline_class": type(pipe).__name__,
            "scheduler": {k: _jsonable(v) for k, v in dict(pipe.scheduler.config).items()},
            "pid": os.getpid(),
            "gpu_ids": ray.get_gpu_ids(),
        }

    def run(self, task: Task) -> dict:
        from dataclasses import asdict

        return asdict(self.worker.run_task(task, self.layout))


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


@dataclass
class PoolResult:
    done: list[dict] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # task key -> last error
    worker_info: dict = field(default_factory=dict)


def run_pool(
    manifest: Manifest,
    source: dict,
    tasks: list[Task],
    n_actors: int,
    cpus: float,
    gpus: float,
    on_done: Callable[[Task, dict], None],
) -> PoolResult:
    """Run every task on a pull-based actor pool; a dead actor is replaced and its task retried."""
    payload = manifest.model_dump(mode="json", exclude_unset=True)
    threads = max(1, int(cpus))

    def start_actor() -> Any:
        return ShardActor.options(num_cpus=cpus, num_gpus=gpus).remote(
            payload, manifest.base_dir, source, threads
        )

    result = PoolResult()
    queue: deque[Task] = deque(tasks)
    attempts: dict[str, int] = {}
    actors = [start_actor() for _ in range(n_actors)]
    infos = ray.get([a.info.remote() for a in actors])
    result.worker_info = infos[0] if infos else {}
    running: dict[Any, tuple[Any, Task]] = {}

    def submit(actor: Any) -> None:
        if queue:
            task = queue.popleft()
            attempts[task.key] = attempts.get(task.key, 0) + 1
            running[actor.run.remote(task)] = (actor, task)

    for a in actors:
        submit(a)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        ref = ready[0]
        actor, task = running.pop(ref)
        try:
            stats = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            log.warning("actor died while running %s: %s", task.key, e)
            _retry_or_fail(task, attempts, queue, result, f"actor died: {e}")
            actor = start_actor()
        except ray.exceptions.RayTaskError as e:
            log.warning("task %s failed: %s", task.key, e)
            _retry_or_fail(task, attempts, queue, result, str(e.cause or e))
        else:
            result.done.append(stats)
            on_done(task, stats)
        submit(actor)
    return result


def _retry_or_fail(task, attempts, queue, result, error: str) -> None:
    if attempts[task.key] < MAX_TASK_ATTEMPTS:
        queue.append(task)
    else:
        result.failed[task.key] = error
