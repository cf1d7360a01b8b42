"""Observability of a running job: throughput and ETA, Ray metrics, structured log files.

- :class:`Throughput` turns committed images into images/s and an ETA (pure, testable).
- :class:`JobMetrics` exports them through Ray's metrics API, so each node's Prometheus
  endpoint (``ray start --metrics-export-port``) serves ``ray_catbatch_*`` series.
- :class:`PoolObserver` is what the actor pool reports to as it runs (the driver implements it).
- :class:`EventLog` writes the structured events of the driver and of each actor as JSON lines
  under the output's ``logs/<run id>/`` folder (local or object storage).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from catbatch.job.layout import OutputLayout

if TYPE_CHECKING:
    from catbatch.job.sharding import Task

log = logging.getLogger(__name__)

LOG_DIR = "logs"


@dataclass
class Throughput:
    """Images/s and ETA from commits, measured from the first commit (start-up excluded)."""

    total: int
    clock: Callable[[], float] = time.monotonic
    done: int = 0
    failed: int = 0
    first_commit: tuple[float, int] | None = None  # (time, images done at the first commit)

    def add(self, images: int, failed: int = 0) -> None:
        self.done += images
        self.failed += failed
        if self.first_commit is None:
            self.first_commit = (self.clock(), self.done)

    def images_per_s(self) -> float | None:
        """Rate over the commits after the first (None until there are two)."""
        if self.first_commit is None:
            return None
        t0, n0 = self.first_commit
        elapsed, n = self.clock() - t0, self.done - n0
        return n / elapsed if n > 0 and elapsed > 0 else None

    def eta_s(self) -> float | None:
        rate = self.images_per_s()
        if self.done >= self.total:
            return 0.0
        return None if rate is None else (self.total - self.done) / rate


class JobMetrics:
    """``ray_catbatch_*`` metrics of one job, tagged with the manifest's name.

    Counters: images_total, failed_images_total, task_retries_total, failed_tasks_total.
    Gauges: images_per_second, eta_seconds, queue_depth (tasks waiting), running_tasks, actors.
    Metrics are best effort: without Ray's metrics agent (a minimal install) nothing is exported
    and the job runs the same.
    """

    def __init__(self, job: str):
        self.tags = {"job": job}
        self._m: dict[str, Any] = {}
        try:
            from ray.util.metrics import Counter, Gauge

            for name, kind, text in _METRICS:
                cls = Counter if kind == "counter" else Gauge
                self._m[name] = cls(f"catbatch_{name}", description=text, tag_keys=("job",))
        except Exception as e:  # noqa: BLE001 - metrics never stop a job
            log.debug("Ray metrics unavailable: %s", e)
            self._m = {}

    def inc(self, name: str, value: float = 1.0) -> None:
        if name in self._m and value > 0:
            self._safe(lambda: self._m[name].inc(value, tags=self.tags))

    def set(self, name: str, value: float | None) -> None:
        if name in self._m and value is not None:
            self._safe(lambda: self._m[name].set(float(value), tags=self.tags))

    @staticmethod
    def _safe(fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            log.debug("metric not recorded: %s", e)


_METRICS = (
    ("images", "counter", "Images committed (ok and failed)."),
    ("failed_images", "counter", "Images committed as failed rows."),
    ("task_retries", "counter", "Shard tasks retried after an actor died or hung."),
    ("failed_tasks", "counter", "Shard tasks that failed after all attempts."),
    ("images_per_second", "gauge", "Committed images per second since the first commit."),
    ("eta_seconds", "gauge", "Estimated seconds until every pending shard is committed."),
    ("queue_depth", "gauge", "Shard tasks waiting for an actor."),
    ("running_tasks", "gauge", "Shard tasks running on actors."),
    ("actors", "gauge", "Actors holding a loaded pipeline."),
)
METRIC_NAMES = tuple(f"catbatch_{name}" for name, _, _ in _METRICS)


SEGMENT_EVENTS = 5000


@dataclass
class EventLog:
    """JSON-lines logs of one run: ``logs/<run_id>/<source>.jsonl`` (driver, actor-N).

    A file is rewritten whole (atomically) when its source reports, so an object store works as
    well as a disk; a write that fails is retried at the next flush. Once a file holds
    :data:`SEGMENT_EVENTS` events the source goes on in ``<source>.1.jsonl``, then ``.2`` ...:
    a flush rewrites only the newest file of each source, and only its events stay in memory.
    """

    layout: OutputLayout
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # newest file's
    _dirty: set[str] = field(default_factory=set)
    _segment: dict[str, int] = field(default_factory=dict)
    _flushed: float = float("-inf")

    @property
    def folder(self) -> str:
        return f"{LOG_DIR}/{self.run_id}"

    def add(self, source: str, events: list[dict[str, Any]]) -> None:
        if events:
            self.events.setdefault(source, []).extend(events)
            self._dirty.add(source)

    def note(self, source: str, kind: str, **fields: Any) -> None:
        self.add(source, [{"t": round(time.time(), 3), "event": kind, **fields}])

    def flush(self, every_s: float = 0.0) -> None:
        """Write what is new; with ``every_s``, only if the last flush is that long ago."""
        now = time.monotonic()
        if now - self._flushed < every_s:
            return
        self._flushed = now
        for source in sorted(self._dirty):
            events = self.events[source]
            segment = self._segment.get(source, 0)
            name = f"{source}.{segment}.jsonl" if segment else f"{source}.jsonl"
            text = "".join(json.dumps(e, default=str) + "\n" for e in events)
            try:
                self.layout.write_bytes(self.layout.path(LOG_DIR, self.run_id, name), text.encode())
            except OSError as e:  # logs never fail a job; the next flush tries again
                log.warning("could not write the %s log: %s", source, e)
                continue
            self._dirty.discard(source)
            if len(events) >= SEGMENT_EVENTS:
                self._segment[source] = segment + 1
                self.events[source] = []


class PoolObserver:
    """What the pool reports as it runs (every method optional; the driver implements them)."""

    def actor_ready(self, name: str, info: dict) -> None: ...

    def actor_lost(self, name: str, error: str) -> None: ...

    def task_done(self, name: str, task: Task, stats: dict, events: list[dict]) -> None: ...

    def task_retry(self, name: str, task: Task, error: str, will_retry: bool) -> None: ...

    def task_requeued(self, name: str, task: Task, why: str) -> None: ...

    def tick(self, queued: int, running: int, actors: int) -> None: ...
