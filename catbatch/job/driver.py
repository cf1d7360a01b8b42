"""The driver: validate everything, plan shards, run the actor pool, commit the run record."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from catbatch.job import memory as cache_memory
from catbatch.job import resume
from catbatch.job.layout import OutputLayout
from catbatch.job.lease import Lease
from catbatch.job.manifest import Manifest
from catbatch.job.observe import EventLog, JobMetrics, PoolObserver, Throughput
from catbatch.job.prompts import Prompt, read_prompts, resolve_location
from catbatch.job.runrecord import (
    committed_totals,
    fingerprint,
    fingerprint_inputs,
    now,
    run_record,
    submission_entry,
)
from catbatch.job.sharding import Shard, Task, make_shards, make_tasks
from catbatch.job.verify import move_aside
from catbatch.models.families import Family, source_family
from catbatch.models.loader import ModelLoadError, describe_source

if TYPE_CHECKING:
    from catbatch.job.distributor import PoolResult

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """A problem found before generation starts; the message is meant for the user."""


@dataclass
class Plan:
    """What a submission will do."""

    manifest: Manifest
    prompts: list[Prompt]
    shards: list[Shard]
    tasks: list[Task]
    pending: list[Task]
    model_source: dict
    layout: OutputLayout
    planned: dict[str, dict[str, int]] = field(default_factory=dict)  # variant -> piece -> images
    retry: list[Task] = field(default_factory=list)  # committed pieces with failed images
    warnings: list[str] = field(default_factory=list)  # settings that run but miss their point
    previous: dict | None = None  # run.json of earlier submissions of this run (prepare_output)
    damaged: list[str] = field(default_factory=list)  # committed pieces moved aside, and why
    cat_cache: dict[str, dict[str, int]] = field(default_factory=dict)  # variant -> CAT bytes

    @property
    def images_per_task(self) -> dict[str, int]:
        n = self.manifest.images_per_prompt
        return {t.key: len(t.shard.prompts) * n for t in [*self.tasks, *self.pending]}

    def counts(self) -> dict[str, int]:
        n_var = len(self.manifest.resolved_variants())
        samples = len(self.prompts) * self.manifest.images_per_prompt
        return {
            "prompts": len(self.prompts),
            "variants": n_var,
            "samples": samples,
            "images": samples * n_var,
            "shards": len(self.shards),
            "tasks": sum(len(v) for v in self.planned.values()) or len(self.tasks),
            "pending_tasks": len(self.pending),
        }


@dataclass
class Summary:
    images: int = 0
    failed_images: int = 0
    invalid_images: int = 0  # rows of prompts that cannot be generated
    failed_tasks: dict[str, str] = field(default_factory=dict)
    skipped_tasks: int = 0
    seconds: float = 0.0
    output: str = ""
    stopped: bool = False  # SIGTERM: no new shards were started
    retried_images: int = 0  # --retry-failed: failed images made again
    recovered_images: int = 0  # of which now ok
    unfinished_tasks: int = 0  # not committed by this run (pending for the next one)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """143 stopped by SIGTERM (128 + 15, as a shell reports it), 1 some shards failed after
        retries, else 0."""
        return 143 if self.stopped else 1 if self.failed_tasks else 0

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "images_per_s": self.images_per_s}

    def lines(self) -> list[str]:
        out = [
            f"images: {self.images} generated, {self.failed_images} failed"
            + (f", {self.invalid_images} invalid" if self.invalid_images else "")
            + (f", {self.skipped_tasks} shard(s) already committed" if self.skipped_tasks else ""),
            f"time: {self.seconds:.1f} s ({self.images_per_s:.2f} images/s)",
        ]
        if self.retried_images:
            out.append(
                f"retried {self.retried_images} failed image(s): {self.recovered_images} now ok"
            )
        for key, err in self.failed_tasks.items():
            out.append(f"shard {key} FAILED after retries: {err.splitlines()[0][:200]}")
        if self.stopped:
            out.append(
                f"stopped by SIGTERM: {self.unfinished_tasks} shard task(s) not committed stay "
                "pending; rerun the same command to finish"
            )
        out.append(f"output: {self.output}")
        return out


def plan(manifest: Manifest, check_model: bool = True) -> Plan:
    """Read prompts and find the model; raises on any problem, writes nothing."""
    source = (
        describe_source(manifest.model.id, manifest.model.revision, manifest.base_dir)
        if check_model
        else {}
    )
    _check_resolution(manifest)
    family = source_family(source) if source else None
    _check_family(manifest, family)
    prompts = read_prompts(manifest.prompts, manifest.base_dir)
    shards = make_shards(prompts, manifest.shard_size)
    tasks = make_tasks(list(manifest.resolved_variants()), shards)
    layout = OutputLayout(manifest.output_url)
    p = Plan(manifest, prompts, shards, tasks, tasks, source, layout)
    p.warnings = _pruning_warnings(manifest) + _invalid_prompt_warnings(manifest, prompts)
    if source:
        config = cache_memory.transformer_config(source)
        p.cat_cache = cache_memory.cat_cache_bytes(manifest, config, family)
    return p


def _check_resolution(manifest: Manifest) -> None:
    """Reject sizes the model cannot take before anything starts (multiple of 16 for DiTs)."""
    for name, s in manifest.resolved_variants().items():
        for dim in ("width", "height"):
            if getattr(s, dim) % 16:
                prefix = "" if name == "default" else f"variant {name}: "
                raise JobError(
                    f"{prefix}{dim} {getattr(s, dim)} is not a multiple of 16, which the "
                    "transformer's VAE factor (8) x patch size (2) requires"
                )


def _check_family(manifest: Manifest, family: Family | None) -> None:
    """Reject settings the model's family cannot honour, naming each field (all at once)."""
    if family is None:
        return
    name, problems = family.name.upper(), []
    if not family.pruning:
        where = _fields_with(manifest, "pruning", lambda v: v is not None)
        if where:
            problems.append(
                f"{', '.join(where)}: CAT pruning is not available for {name} pipelines yet "
                "(catbatch prunes SD3, SD3.5, PixArt-Sigma and FLUX.1); use `pruning: none`"
            )
    if not family.cfg:
        where = _fields_with(manifest, "negative_prompt", bool)
        if where:
            problems.append(
                f"{', '.join(where)}: {name} is guidance-distilled and takes no negative "
                "prompt (guidance_scale is an input of its transformer, not classifier-free "
                "guidance); remove it"
            )
        if _inherits(manifest, "guidance_scale") and (
            "guidance_scale" not in manifest.model_fields_set
        ):
            problems.append(
                f"guidance_scale: not set; {name} takes it as an embedded guidance strength, "
                "not classifier-free guidance, and the default 7.0 is meant for CFG: set it "
                "(FLUX.1-dev: 3.5)"
            )
    if problems:
        raise JobError("\n".join(problems))


def _inherits(manifest: Manifest, setting: str) -> bool:
    """Whether some variant takes ``setting`` from the manifest's top level."""
    variants = manifest.variants
    return not variants or any(setting not in v.model_fields_set for v in variants)


def _fields_with(manifest: Manifest, setting: str, bad: Callable[[Any], bool]) -> list[str]:
    """The manifest fields that give some variant a ``bad`` value of ``setting``."""
    fields = [
        f"variants[{i}].{setting}"
        for i, v in enumerate(manifest.variants)
        if setting in v.model_fields_set and bad(getattr(v, setting))
    ]
    if _inherits(manifest, setting) and bad(getattr(manifest, setting)):
        fields.insert(0, setting)
    return fields


def _invalid_prompt_warnings(
    manifest: Manifest, prompts: list[Prompt], show: int = 10
) -> list[str]:
    """Where the prompts that cannot be generated are (the first ``show``), and how many."""
    bad = [p for p in prompts if p.problem is not None]
    if not bad:
        return []
    location = resolve_location(manifest.prompts.path, manifest.base_dir)
    out = [f"{location} {p.where}: {p.problem} (sample {p.sample_id})" for p in bad[:show]]
    more = f"; {len(bad) - show} more not listed" if len(bad) > show else ""
    out.append(
        f"{len(bad)} prompt(s) cannot be generated: their rows are recorded as invalid, counted "
        f"apart by status and skipped by --retry-failed{more}"
    )
    return out


def _pruning_warnings(manifest: Manifest) -> list[str]:
    """CAT variants with too few steps to reach a pruned step (their images are the unpruned
    ones, at full cost)."""
    from catbatch.pruning import CATConfig

    out = []
    for name, s in manifest.resolved_variants().items():
        if s.pruning is None:
            continue
        cfg = CATConfig.from_dict(s.pruning)
        if s.steps <= cfg.first_pruned_step:
            prefix = "" if name == "default" else f"variant {name}: "
            out.append(
                f"{prefix}CAT prunes nothing in {s.steps} steps: steps 0..{cfg.cluster_step} run "
                f"in full (pruning.last_full_step {cfg.last_full_step}, then the reference and "
                f"clustering steps); use steps >= {cfg.first_pruned_step + 1} or a lower "
                "pruning.last_full_step"
            )
    return out


def prepare_output(
    p: Plan, overwrite: bool, retry_failed: bool = False, verify: bool = False
) -> None:
    """Check the output is writable and consistent with an earlier run; choose pending tasks
    (shard pieces not committed, see :mod:`catbatch.job.resume`) and, with ``retry_failed``, the
    committed pieces whose failed images to make again. Committed pieces whose files do not
    match their stats (size; with ``verify`` also sha256 and footer) are moved aside and made
    again (:attr:`Plan.damaged` says which and where). Call it while holding the lease."""
    layout = p.layout
    layout.check_writable()
    old = layout.read_json(layout.run_record)
    fp = fingerprint(p.manifest, p.model_source)
    if old is not None and old.get("fingerprint") != fp and _adopt_krow_stream(p, old):
        fp = fingerprint(p.manifest, p.model_source)
    if old is not None and old.get("fingerprint") != fp:
        if not overwrite:
            new_inputs = fingerprint_inputs(p.manifest, p.model_source)
            diff = _differences(old.get("fingerprint_inputs", {}), new_inputs)
            raise JobError(
                f"{layout.display()} holds a different run (fingerprint {old.get('fingerprint')} "
                f"vs {fp}); differs in: {', '.join(diff) or 'unknown fields'}. Use another "
                "output or pass --overwrite to replace it."
            )
        _clear_output(layout)
        layout.check_writable()
        old = None
    p.previous = old
    ipp = p.manifest.images_per_prompt
    plans: dict[str, resume.VariantPlan] = {}
    for variant in p.manifest.resolved_variants():
        try:
            plans[variant] = resume.plan_variant(layout, variant, p.shards, ipp, verify)
        except resume.ResumeError as e:
            raise JobError(str(e)) from None
    for variant, vp in plans.items():  # only now: a refused run leaves the output as it was
        if vp.damaged:
            folder = move_aside(layout, variant, sorted(vp.damaged))
            p.damaged += [
                f"{variant}/{name}: {why}; moved to {folder}, made again"
                for name, why in sorted(vp.damaged.items())
            ]
    p.planned = {v: vp.planned(ipp) for v, vp in plans.items()}
    # shard-major, like make_tasks, so paired variants of a shard finish close together
    pending = [Task(v, s) for v, vp in plans.items() for s in vp.pending]
    p.pending = sorted(pending, key=lambda t: (t.shard.index, t.shard.part))
    p.retry = [
        Task(v, s)
        for v, vp in plans.items()
        for s in vp.committed
        if retry_failed and s.name in vp.failed_images
    ]


def _adopt_krow_stream(p: Plan, old: dict) -> bool:
    """An output made before ``pruning.stream`` existed was made with the K-row stream: when
    the manifest matches it but for the stream, continue with ``krow`` (so one output never
    mixes the two streams' images) and say so. True when the manifest was changed."""
    sections = [p.manifest.pruning, *(v.pruning for v in p.manifest.variants)]
    full = [s for s in sections if isinstance(s, dict) and s.get("stream") == "full"]
    if not full:
        return False
    for section in full:
        section["stream"] = "krow"
    if fingerprint(p.manifest, p.model_source) == old.get("fingerprint"):
        p.warnings.append(
            f"{p.layout.display()} was made before pruning.stream existed, with the K-row "
            "stream: continuing with stream: krow so its images stay consistent (use another "
            "output, or --overwrite, for the default full-length stream)"
        )
        return True
    for section in full:
        section["stream"] = "full"
    return False


def _clear_output(layout: OutputLayout) -> None:
    """Delete an output's files for --overwrite, except the lease we hold."""
    from catbatch.job.lease import LEASE_DIR

    for entry in layout.fs.ls(layout.root, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1] != LEASE_DIR:
            layout.fs.rm(entry, recursive=True)
    layout.fs.invalidate_cache()


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(
            b, sort_keys=True, default=str
        ):
            out.append(f"{prefix}{k}")
    return out


def submit(
    p: Plan, progress: bool = True, num_cpus: int | None = None, lease: Lease | None = None
) -> Summary:
    """Run the pending tasks (then the retries) on Ray and write the run record.

    With a ``lease``, a lease lost to another submission stops the run (no new shards)."""
    import ray

    from catbatch.job import distributor

    m, layout = p.manifest, p.layout
    summary = Summary(output=layout.display(), skipped_tasks=p.counts()["tasks"] - len(p.pending))
    events = EventLog(layout)
    logs = events.folder if p.pending else None
    entry = submission_entry(len(p.pending), len(p.retry), logs)
    worker_info: dict[str, Any] = {}

    def write_record(status: str, totals: dict | None) -> None:
        record = run_record(
            m,
            p.model_source,
            len(p.prompts),
            len(p.shards),
            status,
            worker_info,
            totals,
            planned=p.planned,
            logs=logs,
            previous=p.previous,
            submission=entry,
            cat_cache=p.cat_cache,
        )
        layout.write_json(layout.run_record, record)

    write_record("running", (p.previous or {}).get("summary"))
    generation = lease.info.generation if lease is not None and lease.info else None
    t0 = time.perf_counter()
    if p.pending:
        distributor.connect(m.ray.address, num_cpus, m.ray.object_store_mb)
        n, cpus, gpus = distributor.plan_actors(m, len(p.pending))
        total = sum(p.images_per_task[t.key] for t in p.pending)
        bar = tqdm(total=total, unit="img", disable=not progress, desc=m.name, smoothing=0.1)
        observer = JobObserver(m.name, events, summary, bar, total)
        observer.events.note(
            "driver",
            "run_start",
            address=m.ray.address,
            pending_tasks=len(p.pending),
            images=total,
            actors=n,
            cpus_per_actor=cpus,
            gpus_per_actor=gpus,
            cluster=ray.cluster_resources(),
        )
        try:
            with stop_on_sigterm() as stop:
                result = distributor.run_pool(
                    m,
                    p.model_source,
                    p.pending,
                    n,
                    cpus,
                    gpus,
                    observer,
                    stop=lambda: stop.is_set() or (lease is not None and lease.lost.is_set()),
                    lease_generation=generation,
                )
        except ray.exceptions.RayActorError as e:
            observer.events.note("driver", "workers_failed", error=_root_cause(e))
            observer.events.flush()
            entry.update(finished_at=now(), status="failed", exit_code=1, error=_root_cause(e))
            write_record("failed", (p.previous or {}).get("summary"))
            raise JobError(f"the workers could not start: {_root_cause(e)}") from None
        finally:
            bar.close()
        observer.finish(result)
        summary.failed_tasks = result.failed
        summary.stopped = result.stopped
        summary.unfinished_tasks = len(p.pending) - len(result.done)
        worker_info = result.worker_info
    if p.retry and not summary.stopped and not (lease is not None and lease.lost.is_set()):
        retried, retry_failed = resume.run_retries(m, p.model_source, p.retry, num_cpus, generation)
        for stats in retried:
            summary.retried_images += stats["extra"]["retried_images"]
            summary.recovered_images += stats["extra"]["recovered_images"]
        summary.failed_tasks.update(retry_failed)
    if lease is not None and lease.lost.is_set():
        raise JobError(
            f"lost the lease on {layout.display()} to another submission (this driver stalled "
            "past the lease TTL); stopped without writing the run record"
        )
    summary.seconds = time.perf_counter() - t0
    done = summary.unfinished_tasks == 0 and not summary.failed_tasks
    status = "complete" if done else "incomplete"
    status = "interrupted" if summary.stopped else status
    entry.update(
        finished_at=now(), status=status, exit_code=summary.exit_code, summary=summary.to_json()
    )
    totals = {**committed_totals(layout, p.planned), "failed_tasks": summary.failed_tasks}
    write_record(status, totals)
    return summary


class JobObserver(PoolObserver):
    """Turns what the actor pool reports into the progress bar (with ETA), Ray metrics and the
    run's JSON-lines logs (``logs/<run id>/driver.jsonl`` and one file per actor)."""

    def __init__(self, job: str, events: EventLog, summary: Summary, bar: tqdm, total: int):
        self.summary, self.bar = summary, bar
        self.rate = Throughput(total)
        self.metrics = JobMetrics(job)
        self.events = events
        self.failed_tasks = 0

    def actor_ready(self, name: str, info: dict) -> None:
        self.events.note(
            "driver", "actor_ready", actor=name, load_s=info.get("load_s"), **info["placement"]
        )
        self.events.flush()

    def actor_lost(self, name: str, error: str) -> None:
        self.events.note("driver", "actor_lost", actor=name, error=error)
        self.events.flush()

    def task_done(self, name: str, task: Task, stats: dict, events: list[dict]) -> None:
        self.summary.images += stats["images_ok"]
        self.summary.failed_images += stats["images_failed"]
        self.summary.invalid_images += stats.get("images_invalid", 0)
        self.rate.add(stats["rows"], stats["images_failed"])
        self.metrics.inc("images", stats["rows"])
        self.metrics.inc("failed_images", stats["images_failed"])
        self.events.add(name, events)
        self.events.flush()
        self.bar.update(stats["rows"])

    def task_retry(self, name: str, task: Task, error: str, will_retry: bool) -> None:
        kind = "task_retry" if will_retry else "task_failed"
        self.events.note("driver", kind, actor=name, task=task.key, error=error)
        self.events.flush()
        self.metrics.inc("task_retries" if will_retry else "failed_tasks")

    def task_requeued(self, name: str, task: Task, why: str) -> None:
        self.events.note("driver", "task_requeued", actor=name, task=task.key, why=why)
        self.events.flush()

    def tick(self, queued: int, running: int, actors: int) -> None:
        eta = self.rate.eta_s()
        for name, value in (
            ("queue_depth", queued),
            ("running_tasks", running),
            ("actors", actors),
            ("images_per_second", self.rate.images_per_s()),
            ("eta_seconds", eta),
        ):
            self.metrics.set(name, value)
        self.bar.set_postfix_str(
            f"failed={self.rate.failed} queued={queued} eta={_clock(eta)}", refresh=False
        )

    def finish(self, result: PoolResult) -> None:
        self.events.note(
            "driver",
            "run_end",
            tasks_done=len(result.done),
            tasks_failed=len(result.failed),
            retries=len(result.retries),
            abandoned=result.abandoned,
            stopped=result.stopped,
            images=self.summary.images,
            failed_images=self.summary.failed_images,
            images_per_s=self.rate.images_per_s(),
        )
        self.events.flush()


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


@contextmanager
def stop_on_sigterm() -> Iterator[threading.Event]:
    """An event set by SIGTERM (preemption) while inside; the previous handler comes back after.

    Outside the main thread (where Python cannot install handlers) the event is never set.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, frame: object) -> None:
        log.warning("SIGTERM: stopping; running shards may commit, the rest stay pending")
        stop.set()

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def _root_cause(e: BaseException) -> str:
    text = str(e)
    for marker in ("ModelLoadError: ", "Error: "):
        if marker in text:
            return text.rsplit(marker, 1)[1].strip().splitlines()[0]
    return text.splitlines()[0] if text else type(e).__name__


__all__ = ["JobError", "ModelLoadError", "Plan", "Summary", "plan", "prepare_output", "submit"]
