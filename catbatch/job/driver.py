"""The driver: validate everything, plan shards, run the actor pool, commit the run record."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from catbatch.job import memory as cache_memory
from catbatch.job import resume
from catbatch.job.commits import Written, write_digest
from catbatch.job.layout import OutputLayout
from catbatch.job.lease import LEASE_DIR, Lease
from catbatch.job.manifest import Manifest
from catbatch.job.observe import EventLog, JobMetrics, PoolObserver, Throughput
from catbatch.job.prompts import resolve_location
from catbatch.job.runrecord import (
    committed_totals,
    fingerprint,
    fingerprint_inputs,
    now,
    run_record,
    submission_entry,
)
from catbatch.job.shardindex import (
    INDEX_DIR,
    INDEX_FILE,
    SOURCE_CHANGED,
    ShardIndex,
    TaskList,
    build_index,
    forget_index,
    load_index,
    save_index,
)
from catbatch.job.sharding import Task
from catbatch.job.verify import move_aside
from catbatch.job.writer import shard_format
from catbatch.models.families import Family, source_family
from catbatch.models.loader import ModelLoadError, describe_source

if TYPE_CHECKING:
    from catbatch.job.distributor import PoolResult

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 5.0  # the logs of a running job are rewritten at most this often


class JobError(RuntimeError):
    """A problem found before generation starts; the message is meant for the user."""


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """SIGTERM or SIGINT outside the actor pool (planning, Ray start-up): the submission stops
    at once; what was written is complete (atomic files) and the run record says so."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class Plan:
    """What a submission will do."""

    manifest: Manifest
    index: ShardIndex  # the shards: spans in the source and content hashes
    pending: Sequence[Task]  # shard-major (a TaskList); before prepare_output: every task
    model_source: dict
    layout: OutputLayout
    planned: dict[str, dict[str, int]] = field(default_factory=dict)  # variant -> pieces, images
    retry: list[Task] = field(default_factory=list)  # committed pieces with failed images
    warnings: list[str] = field(default_factory=list)  # settings that run but miss their point
    previous: dict | None = None  # run.json of earlier submissions of this run (prepare_output)
    damaged: list[str] = field(default_factory=list)  # committed pieces moved aside, and why
    cat_cache: dict[str, dict[str, int]] = field(default_factory=dict)  # variant -> CAT bytes

    def counts(self) -> dict[str, int]:
        n_var = len(self.manifest.resolved_variants())
        samples = self.index.n_prompts * self.manifest.images_per_prompt
        return {
            "prompts": self.index.n_prompts,
            "variants": n_var,
            "samples": samples,
            "images": samples * n_var,
            "shards": self.index.n_shards,
            "tasks": sum(v["pieces"] for v in self.planned.values()) or self.index.n_shards * n_var,
            "pending_tasks": len(self.pending),
        }

    @property
    def index_file(self) -> str:
        """The shard index's marker file, relative to the output (the run record points at it)."""
        return f"{INDEX_DIR}/{self.index.key}/{INDEX_FILE}"


@dataclass
class RunSummary:
    """What a submission did (``catbatch.submit`` returns it; ``lines()`` is what the command
    prints)."""

    images: int = 0
    failed_images: int = 0
    invalid_images: int = 0  # rows of prompts that cannot be generated
    failed_tasks: dict[str, str] = field(default_factory=dict)
    skipped_tasks: int = 0
    seconds: float = 0.0
    output: str = ""
    stopped: bool = False  # SIGTERM or SIGINT: no new shards were started
    stop_signal: int = signal.SIGTERM
    retried_images: int = 0  # --retry-failed: failed images made again
    recovered_images: int = 0  # of which now ok
    unfinished_tasks: int = 0  # not committed by this run (pending for the next one)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """128 + the signal when stopped (143 SIGTERM, 130 SIGINT, as a shell reports them), 1
        some shards failed after retries, else 0."""
        return 128 + self.stop_signal if self.stopped else 1 if self.failed_tasks else 0

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
                f"stopped by {signal.Signals(self.stop_signal).name}: {self.unfinished_tasks} "
                "shard task(s) not committed stay pending; rerun the same command to finish"
            )
        out.append(f"output: {self.output}")
        return out


def plan(manifest: Manifest, check_model: bool = True, rescan: bool = False) -> Plan:
    """Find the model and index the prompt source's shards; raises on any problem, writes
    nothing. The shard index stored under the output is reused while the source is unchanged
    (``rescan``: build it again anyway); else the source is read once, as a stream."""
    source = check(manifest, check_model)
    layout = OutputLayout(manifest.output_url)
    index = None if rescan else _stored_index(layout, manifest)
    if index is None:
        index = build_index(manifest.prompts, manifest.base_dir, manifest.shard_size)
    p = Plan(manifest, index, all_tasks(manifest, index), source, layout)
    p.warnings = _pruning_warnings(manifest) + _invalid_prompt_warnings(manifest, index)
    if source:
        config = cache_memory.transformer_config(source)
        p.cat_cache = cache_memory.cat_cache_bytes(manifest, config, source_family(source))
    return p


def check(manifest: Manifest, check_model: bool = True) -> dict:
    """The model's source description (``{}`` without ``check_model``) once the manifest's
    settings are known to suit it; raises :class:`JobError` or :class:`ModelLoadError`."""
    source = (
        describe_source(manifest.model.id, manifest.model.revision, manifest.base_dir)
        if check_model
        else {}
    )
    check_model_settings(manifest, source)
    return source


def all_tasks(manifest: Manifest, index: ShardIndex) -> TaskList:
    """Every (variant, shard) task, shard-major, so that paired variants of a shard finish close
    together."""
    return TaskList.every_shard(index, list(manifest.resolved_variants()))


def _stored_index(layout: OutputLayout, manifest: Manifest) -> ShardIndex | None:
    """The output's shard index of this source, if it is there and the source is unchanged."""
    try:
        return load_index(layout, manifest.prompts, manifest.base_dir, manifest.shard_size)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a cache: build it again
        log.info("stored shard index not used: %s: %s", type(e).__name__, e)
        return None


def check_model_settings(manifest: Manifest, source: dict) -> None:
    """Raise :class:`JobError` for sizes or settings the model (``source``, from
    :func:`describe_source`; ``{}``: not checked) cannot take, before anything loads."""
    _check_resolution(manifest)
    _check_family(manifest, source_family(source) if source else None)


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


def _invalid_prompt_warnings(manifest: Manifest, index: ShardIndex) -> list[str]:
    """Where the prompts that cannot be generated are (the first few), and how many."""
    if not index.invalid:
        return []
    location = resolve_location(manifest.prompts.path, manifest.base_dir)
    out = [
        f"{location} {p['where']}: {p['problem']} (sample {p['sample_id']})"
        for p in index.invalid_examples
    ]
    left = index.invalid - len(index.invalid_examples)
    more = f"; {left} more not listed" if left > 0 else ""
    out.append(
        f"{index.invalid} prompt(s) cannot be generated: their rows are recorded as invalid, "
        f"counted apart by status and skipped by --retry-failed{more}"
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
    again (:attr:`Plan.damaged` says which and where). Stores the shard index and the commit
    digests under the output. Call it while holding the lease."""
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
    p.pending = []  # (every task until now: rebuilt below, not held twice)
    ipp = p.manifest.images_per_prompt
    fmt = shard_format(p.manifest.output_format)
    plans: dict[str, resume.VariantPlan] = {}
    for variant in p.manifest.resolved_variants():
        try:
            plans[variant] = resume.plan_variant(layout, variant, p.index, ipp, verify, fmt)
        except resume.ResumeError as e:
            raise JobError(str(e)) from None
    # only now: a refused run leaves the output as it was
    if not p.index.stored:
        save_index(layout, p.index)
    for variant, vp in plans.items():
        if vp.damaged:
            folder = move_aside(layout, variant, sorted(vp.damaged))
            p.damaged += [
                f"{variant}/{name}: {why}; moved to {folder}, made again"
                for name, why in sorted(vp.damaged.items())
            ]
        if vp.found is not None and vp.found.commits.new:
            write_digest(layout, variant, vp.found.commits)
    p.planned = {v: vp.summary() for v, vp in plans.items()}
    # shard-major, like TaskList.every_shard, so paired variants of a shard finish close
    # together; the refs point at the stored index's copy of the prompts where there is one
    p.pending = TaskList.shard_major(p.index, {v: vp.pending for v, vp in plans.items()})
    source = p.index.source
    p.retry = [
        Task(v, _with_source(ref, source))
        for v, vp in plans.items()
        for ref in vp.failed
        if retry_failed
    ]


def _prompts(tasks: Sequence[Task]) -> int:
    if isinstance(tasks, TaskList):
        return tasks.prompts()
    return sum(t.shard.count for t in tasks)


def _with_source(ref: Any, source: Any) -> Any:
    return ref if ref.source is source else dataclasses.replace(ref, source=source)


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
    """Delete an output's files for --overwrite, except the lease we hold and the shard index
    (it describes the prompt source, not the results); the commit digests go."""
    from catbatch.job.commits import DIGEST_DIR

    for entry in layout.fs.ls(layout.root, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1] not in (LEASE_DIR, INDEX_DIR):
            layout.fs.rm(entry, recursive=True)
    digests = layout.path(*DIGEST_DIR)
    if layout.fs.exists(digests):
        layout.fs.rm(digests, recursive=True)
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
    p: Plan,
    progress: bool = True,
    num_cpus: int | None = None,
    lease: Lease | None = None,
    stop: StopSignals | None = None,
) -> RunSummary:
    """Run the pending tasks (then the retries) on Ray and write the run record; afterwards
    ``p.pending`` holds the tasks this run did not commit.

    With a ``lease``, a lease lost to another submission stops the run (no new shards). With
    ``stop`` (installed by the caller, see :func:`stop_signals`) a signal before the pool runs
    raises :class:`Interrupted` after recording the submission as interrupted; without it,
    SIGTERM and SIGINT are handled only while the pool runs."""
    m, layout = p.manifest, p.layout
    summary = RunSummary(
        output=layout.display(), skipped_tasks=p.counts()["tasks"] - len(p.pending)
    )
    events = EventLog(layout)
    logs = events.folder if p.pending else None
    entry = submission_entry(len(p.pending), len(p.retry), logs)
    worker_info: dict[str, Any] = {}
    installed = stop is not None  # by the caller, for the whole submission
    stop = stop or StopSignals()
    written: dict[str, dict[str, Written]] = {}

    def write_record(status: str, totals: dict | None, defer: bool = True) -> None:
        record = run_record(
            m,
            p.model_source,
            p.index.n_prompts,
            p.index.n_shards,
            status,
            worker_info,
            totals,
            planned=p.planned,
            logs=logs,
            previous=p.previous,
            submission=entry,
            shard_index=p.index_file,
            cat_cache=p.cat_cache,
        )
        with stop.deferred() if defer else nullcontext():
            layout.write_json(layout.run_record, record)

    stop.check()  # a signal while planning that did not get through (see StopSignals)
    generation = lease.info.generation if lease is not None and lease.info else None
    t0 = time.perf_counter()
    try:
        write_record("running", (p.previous or {}).get("summary"))
        if p.pending:
            import ray

            from catbatch.job import distributor

            with stop.deferred():  # Ray starts processes: act on a signal once it is up
                distributor.connect(m.ray.address, num_cpus, m.ray.object_store_mb)
            n, cpus, gpus = distributor.plan_actors(m, len(p.pending))
            total = _prompts(p.pending) * m.images_per_prompt
            bar = tqdm(total=total, unit="img", disable=not progress, desc=m.name, smoothing=0.1)
            observer = JobObserver(m.name, events, summary, bar, total, written)
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
                with nullcontext() if installed else stop_signals(stop), stop.graceful():
                    result = distributor.run_pool(
                        m,
                        p.model_source,
                        p.pending,
                        n,
                        cpus,
                        gpus,
                        observer,
                        stop=lambda: (
                            stop.event.is_set() or (lease is not None and lease.lost.is_set())
                        ),
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
            summary.stop_signal = stop.signum or signal.SIGTERM
            p.pending = [t for t in p.pending if t.key not in result.done]  # left to make
            summary.unfinished_tasks = len(p.pending)
            worker_info = result.worker_info
            if any(SOURCE_CHANGED in error for error in result.failed.values()):
                forget_index(layout, p.index.key)  # the next submit reads the source again
            del result
        if p.retry and not summary.stopped and not (lease is not None and lease.lost.is_set()):
            retried, retry_failed = resume.run_retries(
                m, p.model_source, p.retry, num_cpus, generation
            )
            for stats in retried:
                summary.retried_images += stats["extra"]["retried_images"]
                summary.recovered_images += stats["extra"]["recovered_images"]
                written.setdefault(stats["variant"], {})[stats["shard"]] = Written.of(stats)
            summary.failed_tasks.update(retry_failed)
    except Interrupted as e:
        entry.update(finished_at=now(), status="interrupted", exit_code=e.exit_code)
        write_record("interrupted", (p.previous or {}).get("summary"), defer=False)
        raise
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
    variants = list(m.resolved_variants())
    totals = committed_totals(layout, variants, written)
    planned = sum(v["pieces"] for v in p.planned.values())
    totals = {"shards_planned": planned, **totals, "failed_tasks": summary.failed_tasks}
    write_record(status, totals)
    return summary


class JobObserver(PoolObserver):
    """Turns what the actor pool reports into the progress bar (with ETA), Ray metrics and the
    run's JSON-lines logs (``logs/<run id>/driver.jsonl`` and one file per actor)."""

    def __init__(
        self,
        job: str,
        events: EventLog,
        summary: RunSummary,
        bar: tqdm,
        total: int,
        written: dict[str, dict[str, Written]] | None = None,
    ):
        self.summary, self.bar = summary, bar
        self.written = {} if written is None else written  # variant -> piece -> its stats file
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
        if "shard" in stats:
            self.written.setdefault(task.variant, {})[stats["shard"]] = Written.of(stats)
        self.events.add(name, events)
        self.events.flush(every_s=FLUSH_EVERY_S)
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


class StopSignals:
    """The handler of SIGTERM and SIGINT for a submission (install it with
    :func:`stop_signals`). Every signal sets :attr:`event`. Inside :meth:`graceful` (the actor
    pool runs) that is all: no new shard starts, running ones may commit. Elsewhere it raises
    :class:`Interrupted` at once, or, inside :meth:`deferred` (a run-record write, Ray's
    start-up, which forks processes), when that ends. A raise that some library swallows (a
    handler that runs inside an at-fork hook) is caught up with at the next :meth:`check`."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self._graceful = 0
        self._deferred = 0

    def __call__(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum
        self.event.set()
        if self._graceful:
            log.warning(
                "%s: stopping; running shards may commit, the rest stay pending",
                signal.Signals(signum).name,
            )
        elif not self._deferred:
            raise Interrupted(self.signum)

    def check(self) -> None:
        """Raise :class:`Interrupted` if a signal came (outside the pool)."""
        if self.event.is_set() and not self._graceful and not self._deferred:
            raise Interrupted(self.signum or signal.SIGTERM)

    @contextmanager
    def graceful(self) -> Iterator[None]:
        self._graceful += 1
        try:
            yield
        finally:
            self._graceful -= 1

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
        self.check()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_signals(stop: StopSignals | None = None) -> Iterator[StopSignals]:
    """``stop`` (a new :class:`StopSignals` by default) handles SIGTERM and SIGINT while
    inside; the previous handlers come back after. Outside the main thread (where Python cannot
    install handlers) nothing is installed and the event is never set."""
    stop = stop or StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _root_cause(e: BaseException) -> str:
    text = str(e)
    for marker in ("ModelLoadError: ", "Error: "):
        if marker in text:
            return text.rsplit(marker, 1)[1].strip().splitlines()[0]
    return text.splitlines()[0] if text else type(e).__name__


__all__ = [
    "Interrupted",
    "JobError",
    "ModelLoadError",
    "Plan",
    "StopSignals",
    "RunSummary",
    "plan",
    "prepare_output",
    "stop_signals",
    "submit",
]
