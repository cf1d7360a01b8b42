"""Ray side of a job: the cluster connection, one actor per GPU (or CPU slot), and a pull loop
that hands the next task to whichever actor is idle."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import ray

from catbatch.job import reaper
from catbatch.job.layout import OutputLayout
from catbatch.job.manifest import Manifest
from catbatch.job.observe import PoolObserver
from catbatch.job.sharding import Task

log = logging.getLogger(__name__)

POLL_S = 0.5
TEST_ENV_PREFIX = "CATBATCH_TEST_"  # forwarded to actors (fault injection, see worker.py)


def connect(address: str, num_cpus: int | None, object_store_mb: int) -> None:
    """Start a private local cluster (``local``) or join one (``auto`` or an address)."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address == "local" and os.environ.get("RAY_ADDRESS"):
        log.warning(
            "RAY_ADDRESS is set (%s) but ray.address is 'local': starting a private cluster on "
            "this machine; pass --address auto to use that cluster",
            os.environ["RAY_ADDRESS"],
        )
    if address == "local":
        reaper.start()  # the private cluster dies with this process, however it ends
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        kwargs.update(
            address="local",
            num_cpus=num_cpus,
            object_store_memory=object_store_mb * 1024 * 1024,
        )
    else:
        kwargs["address"] = None if address == "auto" else address
    with _keep_signal_handlers():
        ray.init(**kwargs)


@contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """Keep this process's SIGTERM and SIGINT handlers across ``ray.init``: Ray installs its own
    (SIGTERM: exit with code 15, or 1 after killing the local cluster) and its core worker a
    native one that prints a stack trace; the driver's own handlers (the clean stop) must stay."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    utils = ray._private.utils
    install = utils.set_sigterm_handler
    utils.set_sigterm_handler = lambda handler: None  # what ray.init would install
    try:
        yield
    finally:
        utils.set_sigterm_handler = install
        for s, handler in previous.items():
            if handler is not None:
                signal.signal(s, handler)


def plan_actors(
    manifest: Manifest, n_tasks: int, resources: dict[str, float] | None = None
) -> tuple[int, float, float]:
    """(number of actors, CPUs each, GPUs each) for the cluster's ``resources`` (default: the
    cluster we are connected to). With ``model.device: auto`` GPUs are asked for only where the
    cluster has them; with ``cuda`` always (set ``actors: N`` when GPU nodes autoscale from
    zero); with ``cpu`` never. ``actors: auto`` fills the GPUs (or the CPUs without GPUs)."""
    res = ray.cluster_resources() if resources is None else resources
    gpus_total = res.get("GPU", 0.0)
    cpus = manifest.ray.resources.cpus
    device = manifest.model.device
    # device cuda asks for GPUs even before any GPU node is up (an autoscaler adds them)
    want_gpu = device == "cuda" or (device == "auto" and gpus_total > 0)
    gpus = manifest.ray.resources.gpus if want_gpu else 0.0
    if manifest.ray.actors == "auto":
        # a tiny epsilon: 3 x 0.33 GPUs fit on 1 GPU
        per = int(gpus_total / gpus + 1e-6) if gpus > 0 else int(res.get("CPU", 1) / cpus + 1e-6)
        n = max(per, 1)
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
        lease_generation: int | None = None,
    ):
        import torch

        from catbatch.job.manifest import Manifest
        from catbatch.job.worker import Worker

        t0 = time.perf_counter()
        os.environ.update(env or {})
        torch.set_num_threads(max(1, threads))
        manifest = Manifest.model_validate({**manifest_json, "base_dir": base_dir})
        self.worker = Worker(manifest, source)
        self.layout = OutputLayout(manifest.output_url)
        if driver_pid is not None:  # same host: stop, uncommitted, if the driver dies
            self.worker.owner_alive = lambda: _pid_alive(driver_pid)
        self.worker.lease_generation = lease_generation  # commits are fenced by the lease
        self.worker.placement = {
            "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "device": self.worker.device_name,
        }
        self.load_s = round(time.perf_counter() - t0, 3)

    def info(self) -> dict:
        pipe = self.worker.pipe
        return {
            "device": self.worker.device_name,
            "pipeline_class": type(pipe).__name__,
            "scheduler": {k: _jsonable(v) for k, v in dict(pipe.scheduler.config).items()},
            "pid": os.getpid(),
            "gpu_ids": ray.get_gpu_ids(),
            "placement": self.worker.placement,
            "load_s": self.load_s,
            "metrics": self.worker.metrics_info(),
        }

    def run(self, task: Task) -> dict:
        """The shard's stats and the structured events of the task (see Worker.event)."""
        from dataclasses import asdict

        try:
            stats = asdict(self.worker.run_task(task, self.layout))
        except Exception as e:
            self.worker.event("task_error", task=task.key, error=f"{type(e).__name__}: {e}")
            raise
        return {"stats": stats, "events": self.worker.take_events()}

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
    done: list[str] = field(default_factory=list)  # keys of the tasks committed
    failed: dict[str, str] = field(default_factory=dict)  # task key -> last error
    worker_info: dict = field(default_factory=dict)
    retries: list[tuple[str, str]] = field(default_factory=list)  # (task key, why)
    stopped: bool = False  # stop() turned true: unstarted tasks were not run
    abandoned: list[str] = field(default_factory=list)  # running at the end of the grace period


@dataclass(eq=False)
class _Actor:
    handle: Any
    name: str  # actor-N, in start order; replacements get new numbers


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
                self.asked[ref] = (actor.handle.progress.remote(), now)
        return out

    def forget(self, ref: Any) -> None:
        self.asked.pop(ref, None)
        self.answered.pop(ref, None)


class _PlacementWait:
    """Warns every minute while no actor has started (no free GPU, an autoscaler adding
    nodes, or a pipeline still loading), naming what each actor needs."""

    def __init__(self, every_s: float = 60.0):
        self.every_s = every_s
        self.since = time.monotonic()
        self.last = self.since

    def check(self, n_starting: int, cpus: float, gpus: float) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        free = ray.available_resources()
        log.warning(
            "%.0f s and no actor is ready yet: %d starting, each needs %g CPU and %g GPU; the "
            "cluster has %g CPU and %g GPU free",
            now - self.since,
            n_starting,
            cpus,
            gpus,
            free.get("CPU", 0.0),
            free.get("GPU", 0.0),
        )


def run_pool(
    manifest: Manifest,
    source: dict,
    tasks: list[Task],
    n_actors: int,
    cpus: float,
    gpus: float,
    observer: PoolObserver | None = None,
    stop: Callable[[], bool] | None = None,
    lease_generation: int | None = None,
) -> PoolResult:
    """Run every task on a pull-based actor pool.

    Actors start in the background; each takes a task as soon as its pipeline is loaded and the
    next one when it finishes, so fast and slow devices both stay busy and an actor that cannot
    be placed yet (no free GPU) holds no work. A task whose actor dies (crash, SIGKILL, lost
    node) or whose batch runs past ``ray.batch_timeout_s`` (its actor is killed) is retried on
    another actor, up to ``ray.max_attempts`` tries in all, then reported in ``failed``. A dead
    actor is replaced while work is left. Once ``stop()`` is true (SIGTERM) no task starts;
    running ones get ``ray.stop_grace_s`` seconds to commit, then their actors are killed and
    the tasks are ``abandoned`` (still pending for the next run). An actor whose pipeline fails
    to load raises :class:`ray.exceptions.RayActorError` (the same error would hit every actor).
    With ``lease_generation`` (the output lease the driver holds) an actor commits nothing once
    a newer lease exists (see :mod:`catbatch.job.lease`).
    """
    spec = manifest.ray
    obs = observer or PoolObserver()
    payload = manifest.model_dump(mode="json", exclude_unset=True)
    threads = max(1, int(cpus))
    env = {k: v for k, v in os.environ.items() if k.startswith(TEST_ENV_PREFIX)}
    # A private cluster's workers outlive a SIGKILLed driver by a task; they must not commit.
    # (On a shared cluster Ray itself kills the actors of a dead driver.)
    driver_pid = os.getpid() if spec.address == "local" else None
    started = 0
    max_starts = n_actors + max(2 * n_actors, spec.max_attempts * len(tasks))

    result = PoolResult()
    queue: deque[Task] = deque(tasks)
    attempts: dict[str, int] = {}
    starting: dict[Any, _Actor] = {}  # info ref -> actor loading its pipeline
    running: dict[Any, tuple[_Actor, Task]] = {}
    ready: set[_Actor] = set()
    watch = _HangWatch(spec.batch_timeout_s)
    waiting = _PlacementWait()
    stop_since: float | None = None

    def stopping() -> bool:
        return stop is not None and stop()

    def start_actor() -> None:
        nonlocal started
        if started >= max_starts:
            return
        handle = ShardActor.options(num_cpus=cpus, num_gpus=gpus).remote(
            payload, manifest.base_dir, source, threads, env, driver_pid, lease_generation
        )
        actor = _Actor(handle, f"actor-{started}")
        started += 1
        starting[handle.info.remote()] = actor

    def submit(actor: _Actor) -> None:
        if queue and not stopping():
            task = queue.popleft()
            attempts[task.key] = attempts.get(task.key, 0) + 1
            running[actor.handle.run.remote(task)] = (actor, task)
        else:  # nothing left for it: free its GPU for other jobs
            ready.discard(actor)
            ray.kill(actor.handle, no_restart=True)

    def retry_or_fail(actor: _Actor, task: Task, error: str) -> None:
        log.warning("shard %s attempt %d failed: %s", task.key, attempts[task.key], error)
        again = attempts[task.key] < spec.max_attempts
        obs.task_retry(actor.name, task, error, again)
        if again:
            result.retries.append((task.key, error))
            queue.append(task)
        else:
            result.failed[task.key] = f"{error} ({attempts[task.key]} attempts)"

    def lost(actor: _Actor, error: str) -> None:
        """An actor is gone: replace it while work is left and fewer actors run than asked."""
        ready.discard(actor)
        obs.actor_lost(actor.name, error)
        if queue and not stopping() and len(ready) + len(starting) < n_actors:
            start_actor()

    for _ in range(min(n_actors, len(tasks))):
        start_actor()
    while running or (starting and queue and not stopping()):
        obs.tick(len(queue), len(running), len(ready))
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
                ray.kill(actor.handle, no_restart=True)
                result.abandoned.append(task.key)
            break
        done, _ = ray.wait([*running, *starting], num_returns=1, timeout=POLL_S)
        if not running and not ready:
            waiting.check(len(starting), cpus, gpus)
        if not done:
            for ref in watch.hung(running):
                actor, task = running.pop(ref)
                watch.forget(ref)
                ray.kill(actor.handle, no_restart=True)
                ray.wait([ref], timeout=30)  # the actor is gone before the task runs again
                retry_or_fail(
                    actor, task, f"a batch ran past batch_timeout_s={spec.batch_timeout_s:g} s"
                )
                lost(actor, "killed: batch timeout")
            continue
        ref = done[0]
        if ref in starting:
            actor = starting.pop(ref)
            try:
                info = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                if e.actor_init_failed:
                    raise  # the pipeline cannot load: every actor would fail the same way
                lost(actor, f"died while starting: {_first_line(e)}")
                continue
            result.worker_info = result.worker_info or info
            ready.add(actor)
            obs.actor_ready(actor.name, info)
            submit(actor)
            continue
        actor, task = running.pop(ref)
        watch.forget(ref)
        try:
            out = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            retry_or_fail(actor, task, f"actor died: {_first_line(e)}")
            lost(actor, _first_line(e))
            continue
        except ray.exceptions.RayTaskError as e:
            retry_or_fail(actor, task, _first_line(e.cause or e))
        else:
            result.done.append(task.key)
            obs.task_done(actor.name, task, out["stats"], out["events"])
        submit(actor)
    for actor in [*starting.values(), *ready]:
        ray.kill(actor.handle, no_restart=True)
    result.stopped = result.stopped or stopping()  # (a stop between two tasks ends the loop)
    if not result.stopped:  # every actor start failed (max_starts): say so, do not drop them
        for task in queue:
            result.failed[task.key] = f"no actor could run it ({started} actor starts failed)"
    obs.tick(len(queue), 0, 0)
    return result


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__
