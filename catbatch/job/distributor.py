"""Ray side of a job: the cluster connection, one actor per GPU (or CPU slot), and a pull loop
that keeps two tasks on each actor: the one it is making and the next.

A task goes through two actor calls: ``run`` makes its images (the pipeline calls) and returns
when the last call is done, the shard's rows, Parquet file and commit then going on in the
actor's own threads; ``finish`` waits for that commit and returns the shard's stats. Each actor
holds up to :data:`DEPTH` tasks whose ``run`` has not returned, numbered in the order they were
handed out, and makes them in that order (one at a time), so its next task starts the moment the
current one's pipeline calls end, while that one's shard is still being written.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
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
DEPTH = 2  # tasks an actor holds whose pipeline calls are not done: the one it makes, the next
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


class _Turns:
    """Lets ``run`` calls through one at a time, in the order the driver numbered them (Ray
    does not order the calls of an actor that has threads)."""

    def __init__(self) -> None:
        self._next = 0
        self._cond = threading.Condition()

    @contextmanager
    def take(self, turn: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._next == turn)
        try:
            yield
        finally:
            with self._cond:
                self._next += 1
                self._cond.notify_all()


@ray.remote(max_restarts=0, max_concurrency=DEPTH, concurrency_groups={"probe": 1, "finish": 1})
class ShardActor:
    """Holds one pipeline (one GPU each when GPUs exist) and runs tasks.

    ``run`` makes a task's images (two calls may wait, made in turn order), ``finish`` waits
    for its commit; ``progress`` and ``drain`` answer from their own thread while ``run``
    works, so the pool can spot a hung batch and stop the actor's next task on SIGTERM.
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
        self.turns = _Turns()
        self.pending: dict[str, Any] = {}  # task key -> PendingShard, until finish() takes it
        self.draining = False
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

    def run(self, task: Task, turn: int) -> dict:
        """Make the task's images once its turn comes; ``{"started": False}`` when the actor
        was drained before that (the task did not run)."""
        with self.turns.take(turn):
            if self.draining:
                return {"started": False}
            try:
                self.pending[task.key] = self.worker.start_task(task, self.layout)
            except Exception as e:
                self.worker.event("task_error", task=task.key, error=f"{type(e).__name__}: {e}")
                raise
        return {"started": True}

    @ray.method(concurrency_group="finish")
    def finish(self, key: str) -> dict:
        """The committed shard's stats and the structured events so far (see Worker.event)."""
        from dataclasses import asdict

        try:
            stats = asdict(self.pending.pop(key).result())
        except Exception as e:
            self.worker.event("task_error", task=key, error=f"{type(e).__name__}: {e}")
            raise
        return {"stats": stats, "events": self.worker.take_events()}

    @ray.method(concurrency_group="probe")
    def progress(self) -> float | None:
        """Seconds the running batch has taken so far (None between batches)."""
        return self.worker.batch_elapsed()

    @ray.method(concurrency_group="probe")
    def drain(self) -> None:
        """Start no more tasks: those still waiting for their turn return unstarted."""
        self.draining = True


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
    done: set[str] = field(default_factory=set)  # keys of the tasks committed
    failed: dict[str, str] = field(default_factory=dict)  # task key -> last error
    worker_info: dict = field(default_factory=dict)
    retries: list[tuple[str, str]] = field(default_factory=list)  # (task key, why)
    stopped: bool = False  # stop() turned true: unstarted tasks were not run
    abandoned: list[str] = field(default_factory=list)  # running at the end of the grace period


@dataclass(eq=False)
class _Held:
    """A task handed to an actor, with its pending call: ``run`` while its images are being
    made (or it waits for its turn), then ``finish`` while its shard is written."""

    task: Task
    turn: int
    ref: Any
    writing: bool = False


@dataclass(eq=False)
class _Actor:
    handle: Any
    name: str  # actor-N, in start order; replacements get new numbers
    turns: int = 0  # run calls numbered so far
    held: list[_Held] = field(default_factory=list)  # in turn order

    def making(self) -> list[_Held]:
        """Held tasks whose pipeline calls are not done: the first is running (or about to)."""
        return [h for h in self.held if not h.writing]

    def started(self) -> list[_Held]:
        """Held tasks it works on: the shards being written and the task being made."""
        return [h for h in self.held if h.writing] + self.making()[:1]


class _HangWatch:
    """Finds actors whose current batch has run past the timeout.

    Each actor making a task is asked now and then how long its batch has been running
    (without waiting for the answer); one that answered before and then leaves a question
    unanswered for longer than the timeout counts as hung as well.
    """

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self.every_s = min(timeout_s / 4, 10.0) if timeout_s else 0.0
        self.asked: dict[_Actor, tuple[Any, float]] = {}  # actor -> (probe ref, sent at)
        self.answered: dict[_Actor, float] = {}  # actor -> time of the last answer

    def hung(self, making: list[_Actor]) -> list[_Actor]:
        if self.timeout_s is None:
            return []
        for actor in [*self.asked, *self.answered]:
            if actor not in making:  # between tasks: its next task is timed afresh
                self.forget(actor)
        out = []
        now = time.monotonic()
        for actor in making:
            probe, sent = self.asked.get(actor, (None, 0.0))
            if probe is not None:
                ready, _ = ray.wait([probe], timeout=0)
                if not ready:
                    if actor in self.answered and now - sent > self.timeout_s:
                        out.append(actor)
                    continue
                try:
                    elapsed = ray.get(probe)
                except ray.exceptions.RayError:
                    continue  # the actor died; its calls report that
                self.answered[actor] = now
                del self.asked[actor]
                if elapsed is not None and elapsed > self.timeout_s:
                    out.append(actor)
                    continue
            if now - sent >= self.every_s:
                self.asked[actor] = (actor.handle.progress.remote(), now)
        return out

    def forget(self, actor: _Actor) -> None:
        self.asked.pop(actor, None)
        self.answered.pop(actor, None)


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


class _Queue:
    """Tasks to hand out: those put back (first), the rest of ``tasks`` in order, then retries.
    The rest are taken from ``tasks`` one at a time, so a compact task list stays compact."""

    def __init__(self, tasks: Sequence[Task]):
        self.tasks, self.taken = tasks, 0
        self.front: deque[Task] = deque()
        self.retries: deque[Task] = deque()

    def __len__(self) -> int:
        return len(self.front) + len(self.tasks) - self.taken + len(self.retries)

    def __iter__(self) -> Iterator[Task]:
        yield from self.front
        for n in range(self.taken, len(self.tasks)):
            yield self.tasks[n]
        yield from self.retries

    def popleft(self) -> Task:
        if self.front:
            return self.front.popleft()
        if self.taken < len(self.tasks):
            self.taken += 1
            return self.tasks[self.taken - 1]
        return self.retries.popleft()

    def extendleft(self, tasks: list[Task]) -> None:
        """Put ``tasks`` back at the front, in their order."""
        self.front.extendleft(reversed(tasks))

    def append(self, task: Task) -> None:
        self.retries.append(task)


def run_pool(
    manifest: Manifest,
    source: dict,
    tasks: Sequence[Task],
    n_actors: int,
    cpus: float,
    gpus: float,
    observer: PoolObserver | None = None,
    stop: Callable[[], bool] | None = None,
    lease_generation: int | None = None,
) -> PoolResult:
    """Run every task on a pull-based actor pool.

    Actors start in the background; each takes a task as soon as its pipeline is loaded, and
    holds :data:`DEPTH` tasks whose pipeline calls are not done (the one it makes and the next;
    a second task is not handed out while an actor still loading would go without), so fast
    and slow devices both stay busy, no round trip to the driver sits between two tasks, and
    an actor that cannot be placed yet (no free GPU) holds no work.

    A task whose actor dies (crash, SIGKILL, lost node) while working on it (making its
    images, or writing its shard) is retried on another actor, up to ``ray.max_attempts``
    tries in all, then reported in ``failed``; so is one whose batch runs past
    ``ray.batch_timeout_s`` (its actor is killed; the shards that actor was writing are made
    again uncounted). A held task that had not started goes back to the front of the queue
    without counting a try; a shard the dead actor committed before answering counts as done.
    A dead actor is replaced while work is left. Once ``stop()`` is true (SIGTERM) no task
    starts: actors are drained (their waiting tasks come back unstarted); running ones get
    ``ray.stop_grace_s`` seconds to commit, then their actors are killed and the tasks are
    ``abandoned`` (still pending for the next run). An actor whose pipeline fails to load
    raises :class:`ray.exceptions.RayActorError` (the same error would hit every actor). With
    ``lease_generation`` (the output lease the driver holds) an actor commits nothing once a
    newer lease exists (see :mod:`catbatch.job.lease`).
    """
    spec = manifest.ray
    obs = observer or PoolObserver()
    payload = manifest.model_dump(mode="json", exclude_unset=True)
    threads = max(1, int(cpus))
    env = {k: v for k, v in os.environ.items() if k.startswith(TEST_ENV_PREFIX)}
    # A private cluster's workers outlive a SIGKILLed driver by a task; they must not commit.
    # (On a shared cluster Ray itself kills the actors of a dead driver.)
    driver_pid = os.getpid() if spec.address == "local" else None
    layout = OutputLayout(manifest.output_url)
    started = 0
    max_starts = n_actors + max(2 * n_actors, spec.max_attempts * len(tasks))

    result = PoolResult()
    queue = _Queue(tasks)
    attempts: dict[str, int] = {}
    starting: dict[Any, _Actor] = {}  # info ref -> actor loading its pipeline
    calls: dict[Any, tuple[_Actor, _Held]] = {}  # pending run / finish ref -> actor, task
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

    def fill(actor: _Actor) -> None:
        """Top the actor up to DEPTH tasks in the making; one left with nothing is let go
        (its GPU is free for other jobs)."""
        while queue and not stopping() and len(actor.making()) < DEPTH:
            if actor.making() and len(queue) <= len(starting):
                break  # keep the rest for the actors still loading their pipelines
            task = queue.popleft()
            attempts[task.key] = attempts.get(task.key, 0) + 1
            held = _Held(task, actor.turns, actor.handle.run.remote(task, actor.turns))
            actor.turns += 1
            actor.held.append(held)
            calls[held.ref] = (actor, held)
        if not actor.held:
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
            result.failed[task.key] = f"{error} ({attempts.pop(task.key)} attempts)"

    def requeue(actor: _Actor, back: list[Task], why: str) -> None:
        """Tasks that did not fail go back to the front of the queue, in order, uncounted."""
        for task in back:
            attempts[task.key] -= 1
            obs.task_requeued(actor.name, task, why)
        queue.extendleft(back)

    def finished(actor: _Actor, task: Task, out: dict) -> None:
        attempts.pop(task.key, None)  # (the driver holds nothing per finished task but its key)
        result.done.add(task.key)
        obs.task_done(actor.name, task, out["stats"], out["events"])

    def committed(task: Task) -> dict | None:
        """The stats of the task's shard when its commit marker exists."""
        try:
            stats = layout.read_json(layout.shard_stats(task.variant, task.shard.name))
        except Exception:  # noqa: BLE001 - unreadable: not committed, made again
            return None
        if isinstance(stats, dict) and stats.get("content_hash") == task.shard.content_hash:
            return stats
        return None

    def settle(actor: _Actor, error: str, hung: bool) -> None:
        """Every task of an actor that is gone (died, or killed for a hung batch). What it
        answered before counts, and so does a shard it committed; the task it was making is
        retried (a try, ``error``), and so are the shards it was writing unless it was killed
        for a hang (they are made again uncounted); tasks waiting for their turn go back."""
        back: list[Task] = []
        making_seen = False
        for held in actor.held:
            calls.pop(held.ref, None)
            out = _answer(held.ref)
            if held.writing and out is not None:
                finished(actor, held.task, out)
                continue
            if not held.writing and out is not None:
                if not out["started"]:
                    back.append(held.task)
                    continue
                held.writing = True  # its pipeline calls were done; it may have committed
            if held.writing:
                stats = committed(held.task)
                if stats is not None:  # its log lost the actor's events: say what is known
                    note = _commit_event(held.task, stats)
                    finished(actor, held.task, {"stats": stats, "events": [note]})
                elif hung:
                    back.append(held.task)
                else:
                    retry_or_fail(actor, held.task, error)
            elif not making_seen:
                making_seen = True
                retry_or_fail(actor, held.task, error)
            else:
                back.append(held.task)
        actor.held.clear()
        watch.forget(actor)
        requeue(actor, back, f"not started when its actor was lost ({error})")

    def lost(actor: _Actor, error: str) -> None:
        """An actor is gone: replace it while work is left and fewer actors run than asked."""
        ready.discard(actor)
        obs.actor_lost(actor.name, error)
        if queue and not stopping() and len(ready) + len(starting) < n_actors:
            start_actor()

    for _ in range(min(n_actors, len(tasks))):
        start_actor()
    while calls or (starting and queue and not stopping()):
        obs.tick(len(queue), len(calls), len(ready))
        if stop_since is None and stopping():
            stop_since = time.monotonic()
            result.stopped = True
            for actor in ready:
                actor.handle.drain.remote()
            log.warning(
                "stop requested: no new shards; %d running shard(s) get %g s to commit",
                sum(len(a.started()) for a in ready),
                spec.stop_grace_s,
            )
        if stop_since is not None and time.monotonic() - stop_since >= spec.stop_grace_s:
            for actor in ready:
                if actor.held:
                    ray.kill(actor.handle, no_restart=True)
                    result.abandoned += [h.task.key for h in actor.started()]
            break
        done, _ = ray.wait([*calls, *starting], num_returns=1, timeout=POLL_S)
        if not calls and not ready:
            waiting.check(len(starting), cpus, gpus)
        if not done:
            for actor in watch.hung([a for a in ready if a.making()]):
                ray.kill(actor.handle, no_restart=True)
                refs = [h.ref for h in actor.held]
                ray.wait(refs, num_returns=len(refs), timeout=30)  # gone before tasks rerun
                why = f"a batch ran past batch_timeout_s={spec.batch_timeout_s:g} s"
                settle(actor, why, hung=True)
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
            fill(actor)
            continue
        actor, held = calls.pop(ref)
        try:
            out = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            settle(actor, f"actor died: {_first_line(e)}", hung=False)
            lost(actor, _first_line(e))
            continue
        except ray.exceptions.RayTaskError as e:
            actor.held.remove(held)
            retry_or_fail(actor, held.task, _first_line(e.cause or e))
        else:
            if held.writing:
                actor.held.remove(held)
                finished(actor, held.task, out)
            elif out["started"]:
                held.writing = True
                held.ref = actor.handle.finish.remote(held.task.key)
                calls[held.ref] = (actor, held)
            else:  # drained before its turn
                actor.held.remove(held)
                requeue(actor, [held.task], "not started: the run is stopping")
        fill(actor)
    for actor in [*starting.values(), *ready]:
        ray.kill(actor.handle, no_restart=True)
    result.stopped = result.stopped or stopping()  # (a stop between two tasks ends the loop)
    if not result.stopped:  # every actor start failed (max_starts): say so, do not drop them
        for task in queue:
            result.failed[task.key] = f"no actor could run it ({started} actor starts failed)"
    obs.tick(len(queue), 0, 0)
    return result


def _commit_event(task: Task, stats: dict) -> dict[str, Any]:
    """The ``task_commit`` event of a shard whose actor died before reporting its commit."""
    return {
        "t": stats.get("written_at"),
        "event": "task_commit",
        "task": task.key,
        "seconds": stats.get("seconds"),
        "images_ok": stats.get("images_ok"),
        "images_failed": stats.get("images_failed"),
        "images_invalid": stats.get("images_invalid"),
        "source": "read from its stats file: its actor died before answering",
    }


def _answer(ref: Any) -> Any:
    """The value of a call that has answered, else None (not yet, or it raised)."""
    if not ray.wait([ref], timeout=0)[0]:
        return None
    try:
        return ray.get(ref)
    except ray.exceptions.RayError:
        return None


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__
