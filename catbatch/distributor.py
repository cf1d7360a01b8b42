"""Ray side of a job: the cluster connection, one actor per GPU (or CPU slot), and a pull loop
that hands the next task to whichever actor is idle."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from catbatch.layout import OutputLayout
from catbatch.manifest import Manifest
from catbatch.sharding import Task

log = logging.getLogger(__name__)

POLL_S = 0.5
TEST_ENV_PREFIX = "CATBATCH_TEST_"  # forwarded to actors (fault injection, see worker.py)


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


@ray.remote(max_restarts=0, concurrency_groups={"probe": 1})
class ShardActor:
    """Holds one pipeline (one GPU each when GPUs exist) and runs tasks.

    ``progress`` answers from its own thread while ``run`` works, so the pool can spot a hung
    batch.
    """

    def __init__(
        self,
        manifest_json: dict,
        base_dir: str,
        source: dict,
        threads: int,
        env: dict[str, str] | None = None,
        driver_pid: int | None = None,
    ):
        import torch

        from catbatch.manifest import Manifest
        from catbatch.worker import Worker

        os.environ.update(env or {})
        torch.set_num_threads(max(1, threads))
        manifest = Manifest.model_validate({**manifest_json, "base_dir": base_dir})
        self.worker = Worker(manifest, source)
        self.layout = OutputLayout(manifest.output_url)
        if driver_pid is not None:  # same host: stop, uncommitted, if the driver dies
            self.worker.owner_alive = lambda: _pid_alive(driver_pid)

    def info(self) -> dict:
        pipe = self.worker.pipe
        return {
            "device": self.worker.device_name,
            "pipeline_class": type(pipe).__name__,
            "scheduler": {k: _jsonable(v) for k, v in dict(pipe.scheduler.config).items()},
            "pid": os.getpid(),
            "gpu_ids": ray.get_gpu_ids(),
            "metrics": self.worker.metrics_info(),
        }

    def run(self, task: Task) -> dict:
        from dataclasses import asdict

        return asdict(self.worker.run_task(task, self.layout))

    @ray.method(concurrency_group="probe")
    def progress(self) -> float | None:
        """Seconds the running batch has taken so far (None between batches)."""
        return self.worker.batch_elapsed()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    retries: list[tuple[str, str]] = field(default_factory=list)  # (task key, why)
    stopped: bool = False  # stop() turned true: unstarted tasks were not run
    abandoned: list[str] = field(default_factory=list)  # running at the end of the grace period


class _HangWatch:
    """Finds running tasks whose current batch has run past the timeout.

    Each busy actor is asked now and then how long its batch has been running (without
    waiting for the answer); one that answered before and then leaves a question unanswered
    for longer than the timeout counts as hung as well.
    """

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self.every_s = min(timeout_s / 4, 10.0) if timeout_s else 0.0
        self.asked: dict[Any, tuple[Any, float]] = {}  # task ref -> (probe ref, sent at)
        self.answered: dict[Any, float] = {}  # task ref -> time of the last answer

    def hung(self, running: dict[Any, tuple[Any, Task]]) -> list[Any]:
        if self.timeout_s is None:
            return []
        out = []
        now = time.monotonic()
        for ref, (actor, _) in running.items():
            probe, sent = self.asked.get(ref, (None, 0.0))
            if probe is not None:
                ready, _ = ray.wait([probe], timeout=0)
                if not ready:
                    if ref in self.answered and now - sent > self.timeout_s:
                        out.append(ref)
                    continue
                try:
                    elapsed = ray.get(probe)
                except ray.exceptions.RayError:
                    continue  # the actor died; its run reports that
                self.answered[ref] = now
                del self.asked[ref]
                if elapsed is not None and elapsed > self.timeout_s:
                    out.append(ref)
                    continue
            if now - sent >= self.every_s:
                self.asked[ref] = (actor.progress.remote(), now)
        return out

    def forget(self, ref: Any) -> None:
        self.asked.pop(ref, None)
        self.answered.pop(ref, None)


def run_pool(
    manifest: Manifest,
    source: dict,
    tasks: list[Task],
    n_actors: int,
    cpus: float,
    gpus: float,
    on_done: Callable[[Task, dict], None],
    stop: Callable[[], bool] | None = None,
) -> PoolResult:
    """Run every task on a pull-based actor pool.

    A task whose actor dies (crash, SIGKILL, lost node) or whose batch runs past
    ``ray.batch_timeout_s`` (its actor is killed) is retried on a fresh actor, up to
    ``ray.max_attempts`` tries in all, then reported in ``failed``. Once ``stop()`` is true
    (SIGTERM) no task starts; running ones get ``ray.stop_grace_s`` seconds to commit, then
    their actors are killed and the tasks are ``abandoned`` (still pending for the next run).
    """
    spec = manifest.ray
    payload = manifest.model_dump(mode="json", exclude_unset=True)
    threads = max(1, int(cpus))
    env = {k: v for k, v in os.environ.items() if k.startswith(TEST_ENV_PREFIX)}
    # A private cluster's workers outlive a SIGKILLed driver by a task; they must not commit.
    # (On a shared cluster Ray itself kills the actors of a dead driver.)
    driver_pid = os.getpid() if spec.address == "local" else None

    def start_actor() -> Any:
        return ShardActor.options(num_cpus=cpus, num_gpus=gpus).remote(
            payload, manifest.base_dir, source, threads, env, driver_pid
        )

    result = PoolResult()
    queue: deque[Task] = deque(tasks)
    attempts: dict[str, int] = {}
    actors = [start_actor() for _ in range(n_actors)]
    infos = ray.get([a.info.remote() for a in actors])
    result.worker_info = infos[0] if infos else {}
    running: dict[Any, tuple[Any, Task]] = {}
    watch = _HangWatch(spec.batch_timeout_s)
    stop_since: float | None = None

    def stopping() -> bool:
        return stop is not None and stop()

    def submit(actor: Any) -> None:
        if queue and not stopping():
            task = queue.popleft()
            attempts[task.key] = attempts.get(task.key, 0) + 1
            running[actor.run.remote(task)] = (actor, task)

    def retry_or_fail(task: Task, error: str) -> None:
        log.warning("shard %s attempt %d failed: %s", task.key, attempts[task.key], error)
        if attempts[task.key] < spec.max_attempts:
            result.retries.append((task.key, error))
            queue.append(task)
        else:
            result.failed[task.key] = f"{error} ({attempts[task.key]} attempts)"

    def replacement() -> Any | None:
        """A fresh actor for a dead one, when there is work left for it."""
        return start_actor() if queue and not stopping() else None

    for a in actors:
        submit(a)
    while running:
        if stop_since is None and stopping():
            stop_since = time.monotonic()
            result.stopped = True
            log.warning(
                "stop requested: no new shards; %d running shard(s) get %g s to commit",
                len(running),
                spec.stop_grace_s,
            )
        if stop_since is not None and time.monotonic() - stop_since >= spec.stop_grace_s:
            for actor, task in running.values():
                ray.kill(actor, no_restart=True)
                result.abandoned.append(task.key)
            break
        ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
        if not ready:
            for ref in watch.hung(running):
                actor, task = running.pop(ref)
                watch.forget(ref)
                ray.kill(actor, no_restart=True)
                ray.wait([ref], timeout=30)  # the actor is gone before the task runs again
                retry_or_fail(task, f"a batch ran past batch_timeout_s={spec.batch_timeout_s:g} s")
                if (new := replacement()) is not None:
                    submit(new)
            continue
        ref = ready[0]
        actor, task = running.pop(ref)
        watch.forget(ref)
        try:
            stats = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            retry_or_fail(task, f"actor died: {_first_line(e)}")
            actor = replacement()
        except ray.exceptions.RayTaskError as e:
            retry_or_fail(task, _first_line(e.cause or e))
        else:
            result.done.append(stats)
            on_done(task, stats)
        if actor is not None:
            submit(actor)
    return result


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__
