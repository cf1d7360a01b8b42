"""The worker: one pipeline, loaded once, that turns a shard task into a committed Parquet file.

Free of Ray (the Ray actor in :mod:`catbatch.job.distributor` wraps it) and of pruning details
(pruning sections come from the manifest and go to the engine's ``apply_cat``).

The pipeline calls run back to back on the worker's one pipeline thread, whichever thread asks
for a task (Ray runs an actor's calls on alternating threads; a pipeline call on a thread new to
it ran up to 50% slower on the tiny model: fresh allocator arena); each batch's images go,
still on the device, to a small pool of threads (:mod:`catbatch.job.overlap`) that quantizes
them, scores them with CLIP (batched, on the same device), copies them to the host once, encodes
the PNGs and builds the rows, while the next pipeline call runs. One more thread (the committer)
waits for a shard's rows and writes its Parquet file, then its stats file (the commit marker),
shard after shard in order; :meth:`Worker.start_task` returns once the task's last pipeline call
is done, so the next task's calls can start while its shard is written.

A batch that fails (an exception, or out of memory) is split in halves and retried, down to
single images, so one bad image fails alone; each split is recorded in the shard's stats
(``extra.batch_splits``) and in the rows (``batch_id`` suffix ``.0``/``.1``, ``batch_size``).

Test hook: ``CATBATCH_TEST_FAULTS`` (JSON, read when a Worker is made; the actor pool forwards it
to its actors) injects faults for the fault tests and does nothing when unset. Keys:
``delay_s`` (sleep before each batch), ``fail_ids`` / ``nan_ids`` (sample ids whose batch raises
/ whose image comes out NaN), ``oom_above`` (batches larger than this raise
``torch.OutOfMemoryError``), ``crash_shards`` (shard names whose actor SIGKILLs itself),
``hang_once`` (a file path: the first batch that finds it missing creates it and hangs) and
``crash_before_commit_once`` / ``crash_after_commit_once`` (a file path: the first commit that
finds it missing creates it and SIGKILLs its actor, after the shard's Parquet file is written and
before its stats file / right after its stats file).
"""

from __future__ import annotations

import copy
import gc
import io
import json
import os
import platform
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from catbatch.job import memory as cache_memory
from catbatch.job.layout import OutputLayout
from catbatch.job.lease import LeaseLost, check_generation
from catbatch.job.manifest import Manifest, Sampling
from catbatch.job.overlap import BoundedPool, DeviceImages, to_host
from catbatch.job.prompts import Prompt
from catbatch.job.seeds import image_generator, image_seed
from catbatch.job.shardindex import read_piece
from catbatch.job.sharding import Task
from catbatch.job.writer import Row, ShardStats, shard_format, write_shard
from catbatch.metrics import adherence
from catbatch.metrics import rows as metrics
from catbatch.metrics.clipscore import ClipScorer, ClipSetup, clip_setup
from catbatch.models.families import family_of
from catbatch.models.loader import (
    describe_source,
    load_pipeline,
    pipeline_call_kwargs,
    resolve_device,
)

FAULTS_ENV = "CATBATCH_TEST_FAULTS"
POOL_THREADS = 2  # threads per worker that turn a batch's images into rows
POOL_BATCHES = 4  # batches made and not yet turned into rows, at most (then the pipeline waits)
SHARDS_WRITING = 2  # shards whose Parquet file and commit are pending, at most
PIPELINE_THREAD = "catbatch-pipeline"  # the one thread that makes every pipeline call


class OrphanedTask(RuntimeError):
    """The driver that handed out the task died; its result must not be committed."""


@dataclass
class InjectedFaults:
    """Faults injected by the tests through ``CATBATCH_TEST_FAULTS`` (see the module doc)."""

    delay_s: float = 0.0
    fail_ids: list[str] = field(default_factory=list)
    nan_ids: list[str] = field(default_factory=list)
    oom_above: int | None = None
    crash_shards: list[str] = field(default_factory=list)
    hang_once: str | None = None
    crash_before_commit_once: str | None = None
    crash_after_commit_once: str | None = None

    @classmethod
    def from_env(cls) -> InjectedFaults | None:
        text = os.environ.get(FAULTS_ENV)
        return cls(**json.loads(text)) if text else None

    def before_task(self, task: Task) -> None:
        if task.shard.name in self.crash_shards:
            os.kill(os.getpid(), signal.SIGKILL)

    def before_batch(self, batch: list[Item]) -> None:
        time.sleep(self.delay_s)
        if self.hang_once and not os.path.exists(self.hang_once):
            open(self.hang_once, "w").close()
            time.sleep(86400)
        if self.oom_above is not None and len(batch) > self.oom_above:
            raise torch.OutOfMemoryError(f"injected out of memory at batch size {len(batch)}")
        failing = [it.prompt.sample_id for it in batch if it.prompt.sample_id in self.fail_ids]
        if failing:
            raise RuntimeError(f"injected failure for sample {failing[0]}")

    def after_batch(self, batch: list[Item], images: torch.Tensor) -> torch.Tensor:
        for n, it in enumerate(batch):
            if it.prompt.sample_id in self.nan_ids:
                images[n] = float("nan")
        return images

    def before_commit(self) -> None:
        _crash_once(self.crash_before_commit_once)

    def after_commit(self) -> None:
        _crash_once(self.crash_after_commit_once)


def _crash_once(marker: str | None) -> None:
    """SIGKILL this process the first time ``marker`` is missing (it is created first)."""
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Item:
    """One image to make: a prompt and its image index."""

    prompt: Prompt
    image_index: int
    seed: int


@dataclass
class _TaskRun:
    """A task's batches so far: each one's rows, or the future of the pool making them."""

    task: Task
    settings: Sampling
    parts: list[Future | list[Row]] = field(default_factory=list)
    batch_splits: list[dict[str, Any]] = field(default_factory=list)

    def rows(self) -> list[Row]:
        """Every row made so far, in the order of the batches (waits for the pool)."""
        return [
            r for part in self.parts for r in (part if isinstance(part, list) else part.result())
        ]


@dataclass
class PendingShard:
    """A task whose pipeline calls are done; its rows, Parquet file and commit are on the way."""

    task: Task
    future: Future

    def result(self, timeout: float | None = None) -> ShardStats:
        """The committed shard's stats; raises what the rows, the write or the fence raised."""
        return self.future.result(timeout)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu:{platform.machine()}"


def in_item_order(rows: list[Row], items: list[Item]) -> list[Row]:
    """``rows`` sorted as their items are (a shard's order: prompts, then image index)."""
    order = {(it.prompt.sample_id, it.image_index): n for n, it in enumerate(items)}
    return sorted(rows, key=lambda r: order[(r.sample_id, r.image_index)])


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class Worker:
    """Holds one pipeline and generates shards of any variant of one manifest."""

    def __init__(self, manifest: Manifest, source: dict | None = None):
        self.manifest = manifest
        self.device = resolve_device(manifest.model.device)
        self.source = source or describe_source(
            manifest.model.id, manifest.model.revision, manifest.base_dir
        )
        self.pipe = load_pipeline(
            self.source, manifest.model.dtype, self.device, manifest.model.memory.model_dump()
        )
        self.device_name = device_name(self.device)
        self.variants = manifest.resolved_variants()
        self._pruning: dict | None = None
        self._call_kwargs = pipeline_call_kwargs(self.pipe)
        self._family = family_of(self.pipe)  # None for pipelines catbatch does not know
        # CAT's buffer bytes per pruned variant; refused here when they exceed the free memory
        self.cat_cache = cache_memory.cat_cache_bytes(
            manifest, cache_memory.loaded_transformer_config(self.pipe), self._family
        )
        cache_memory.check_fits(
            manifest, self.cat_cache, cache_memory.free_bytes(self.device), self.device_name
        )
        self.faults = InjectedFaults.from_env()
        self.batch_started: float | None = None  # monotonic start of the running batch
        # beside the pipeline: batches' images to rows, and shards' Parquet files and commits
        self._pipeline_ident: int | None = None  # set by the pipeline thread when it starts
        self._pipeline_thread = ThreadPoolExecutor(
            1, thread_name_prefix=PIPELINE_THREAD, initializer=self._mark_pipeline_thread
        )
        self.pool = BoundedPool(POOL_THREADS, POOL_BATCHES, "catbatch-rows")
        self.committer = BoundedPool(1, SHARDS_WRITING, "catbatch-commit")
        self._lock = threading.Lock()  # events and notes come from every thread
        # False once the driver that owns this worker is gone: stop before the next batch and
        # never commit (a rerun may be writing the same shard); set by the Ray actor
        self.owner_alive: Callable[[], bool] = lambda: True
        # the output's lease generation the driver held when it started this worker: nothing is
        # written once a newer one exists (set by the Ray actor; None: not fenced)
        self.lease_generation: int | None = None
        # where this worker runs (node, GPU ids, pid), set by the Ray actor; in each shard's stats
        self.placement: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []  # structured log, collected by take_events()
        self._init_metrics()
        self._warm_up()

    def _warm_up(self) -> None:
        """Pay the one-time costs of the pool's and the committer's first batch now, while the
        actor loads: the tokenizer copies (a deep copy takes up to a second), pyarrow's first
        table (it imports pandas, ~0.3 s), the PNG encoder, CLIP's first call and the MACs
        counter's meta model. Paid in the pool beside the next pipeline call, their Python
        work would hold the GIL and stall the pipeline's thread at every op (the call it ran
        beside took 20-50% longer on the tiny model)."""
        for settings in self.variants.values():
            self._limits(settings)
        shard_format(self.manifest.output_format).encode([])
        encode_png(np.zeros((8, 8, 3), np.uint8))
        if self.macs_counter is not None:
            self.macs_counter.prepare()
        if self.clip is not None:
            try:
                with self._clip_lock:
                    self.clip.score_tensor(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ["a"])
            except Exception as e:  # noqa: BLE001 - recorded; scoring is tried per batch
                self._note(f"CLIP warm-up failed ({type(e).__name__}: {e})")

    def event(self, kind: str, **fields: Any) -> None:
        """Record a structured log event (task, batch, split, error) with a wall-clock time."""
        with self._lock:
            self.events.append({"t": round(time.time(), 3), "event": kind, **fields})

    def take_events(self) -> list[dict[str, Any]]:
        """The events recorded since the last call."""
        with self._lock:
            out, self.events = self.events, []
        return out

    def batch_elapsed(self) -> float | None:
        """Seconds the running batch has taken so far (None between batches)."""
        started = self.batch_started
        return None if started is None else time.monotonic() - started

    # -- public -----------------------------------------------------------------------------
    def items(self, prompts: tuple[Prompt, ...] | list[Prompt]) -> list[Item]:
        seed = self.manifest.seed
        return [
            Item(p, i, image_seed(seed, p.sample_id, i))
            for p in prompts
            for i in range(self.manifest.images_per_prompt)
        ]

    def run_task(self, task: Task, layout: OutputLayout) -> ShardStats:
        """Generate every image of the task's shard and commit the shard (waits for the commit)."""
        return self.start_task(task, layout).result()

    def start_task(self, task: Task, layout: OutputLayout) -> PendingShard:
        """Read the task's prompts from the source, make every batch of its shard and hand its
        commit to the committer thread.

        Returns once the last pipeline call is done: the rows of the last batches, the Parquet
        file and the stats file (the commit marker, written last, only once the Parquet file is
        complete and the fence of :meth:`check_commit` passed) follow in the worker's threads.
        """
        return self._on_pipeline_thread(self._start_task, task, layout)

    def _start_task(self, task: Task, layout: OutputLayout) -> PendingShard:
        start, started_at = time.perf_counter(), time.time()
        if self.faults:
            self.faults.before_task(task)
        run = _TaskRun(task, self.variants[task.variant])
        items = self.items(read_piece(task.shard))  # the task says where its prompts are
        self.event("task_start", task=task.key, images=len(items))
        self._make_items(items, run, task.shard.name)
        future = self.committer.submit(self._commit, run, items, layout, start, started_at)
        return PendingShard(task, future)

    def task_rows(self, task: Task, prompts: list[Prompt], batch_prefix: str) -> list[Row]:
        """Every row of ``prompts`` (given, not read from a source), made now in batches of
        ``batch_size`` images as a shard's are, in item order; nothing is written (the Ray Data
        stage's path).

        Batch ids are ``{batch_prefix}-b{n}``."""
        run = _TaskRun(task, self.variants[task.variant])
        items = self.items(prompts)
        self._on_pipeline_thread(self._make_items, items, run, batch_prefix)
        return in_item_order(run.rows(), items)

    def _on_pipeline_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the pipeline thread (waits for it; raises what it raised)."""
        if threading.get_ident() == self._pipeline_ident:  # already on it (this worker's)
            return fn(*args)
        return self._pipeline_thread.submit(fn, *args).result()

    def _mark_pipeline_thread(self) -> None:
        self._pipeline_ident = threading.get_ident()

    def _make_items(self, items: list[Item], run: _TaskRun, batch_prefix: str) -> None:
        """The rows of the items whose prompt cannot be made (``invalid``), then the pipeline
        calls of the others, ``batch_size`` images each, into ``run.parts``."""
        task, bs = run.task, self.manifest.batch_size
        good = [it for it in items if it.prompt.problem is None]
        run.parts.append(
            [
                self._row(it, task, run.settings, None, "-", 0, 0.0, it.prompt.problem, "invalid")
                for it in items
                if it.prompt.problem is not None
            ]
        )
        for b in range(0, len(good), bs):
            self._check_owner(task)
            self._make_batch(good[b : b + bs], run, f"{batch_prefix}-b{b // bs}")

    def _commit(
        self,
        run: _TaskRun,
        items: list[Item],
        layout: OutputLayout,
        start: float,
        started_at: float,
    ) -> ShardStats:
        """The committer thread: the shard's rows in item order, its file, its commit."""
        task = run.task
        rows = in_item_order(run.rows(), items)
        self._check_owner(task)
        extra: dict[str, Any] = {"batch_splits": run.batch_splits} if run.batch_splits else {}
        if self.placement:
            extra["worker"] = self.placement
        if task.variant in self.cat_cache:
            extra["cat_cache_bytes"] = self.cat_cache[task.variant]
        stats = write_shard(
            layout,
            task.variant,
            task.shard.name,
            task.shard.content_hash,
            rows,
            time.perf_counter() - start,
            self.device_name,
            extra,
            started_at,
            before_commit=lambda: self.check_commit(task, layout),
            fmt=shard_format(self.manifest.output_format),
        )
        if self.faults:
            self.faults.after_commit()
        self.event(
            "task_commit",
            task=task.key,
            seconds=round(stats.seconds, 3),
            images_ok=stats.images_ok,
            images_failed=stats.images_failed,
            images_invalid=stats.images_invalid,
        )
        return stats

    def _check_owner(self, task: Task) -> None:
        if not self.owner_alive():
            raise OrphanedTask(f"the driver of {task.key} is gone; the shard was not committed")

    def check_commit(self, task: Task, layout: OutputLayout) -> None:
        """Raise :class:`OrphanedTask` when this worker may no longer commit ``task``: its
        driver is gone, or a newer submission took the output's lease (re-read now)."""
        self._check_owner(task)
        if self.faults:
            self.faults.before_commit()
        if self.lease_generation is None:
            return
        try:
            check_generation(layout, self.lease_generation)
        except LeaseLost as e:
            raise OrphanedTask(f"{task.key} not committed: {e}") from None

    def generate_rows(
        self, batch: list[Item], task: Task, settings: Sampling, batch_id: str
    ) -> list[Row]:
        """The rows of one batch, made now (the pool's work included); see :meth:`_make_batch`."""
        run = _TaskRun(task, settings)
        self._on_pipeline_thread(self._make_batch, batch, run, batch_id)
        return run.rows()

    def _make_batch(self, batch: list[Item], run: _TaskRun, batch_id: str) -> None:
        """Run one batch's pipeline call and hand its images to the pool (``run.parts``).

        A failure splits the batch in halves (down to 1), then marks the images failed. Out of
        memory and any other exception are handled alike, so a single bad image fails alone and
        its batch-mates are made in smaller batches; nothing raises.
        """
        task, settings = run.task, run.settings
        t0 = time.perf_counter()
        self.batch_started = time.monotonic()
        try:
            images = self.generate(batch, settings)
            error = None
        except Exception as e:  # noqa: BLE001 - retried smaller, then recorded per row
            images, error = None, f"{type(e).__name__}: {e}"
            if isinstance(e, torch.OutOfMemoryError):
                _free_memory()
        finally:
            self.batch_started = None
        seconds = time.perf_counter() - t0
        if error is not None and len(batch) > 1:
            self.event("batch_split", task=task.key, batch=batch_id, size=len(batch), error=error)
            run.batch_splits.append({"batch_id": batch_id, "size": len(batch), "error": error})
            half = (len(batch) + 1) // 2
            self._make_batch(batch[:half], run, f"{batch_id}.0")
            self._make_batch(batch[half:], run, f"{batch_id}.1")
            return
        finite = [False] * len(batch) if images is None else images.finite()
        call = self.last_call if images is not None else {}
        self.event(
            "batch",
            task=task.key,
            batch=batch_id,
            size=len(batch),
            seconds=round(seconds, 3),
            ok=sum(finite),
            **call,
            **({"error": error[:500]} if error else {}),
        )
        # what reads the pipeline's state is taken here, before the next call changes it
        latency = (self.last_timing["pipeline"] if images is not None else seconds) / len(batch)
        per_row = self._batch_metrics(batch, settings, latency) if images is not None else {}
        limits = self._limits(settings)
        args = (batch, run.task, settings, images, finite, error, batch_id, latency, per_row)
        run.parts.append(self.pool.submit(self._batch_rows, *args, limits))

    def _batch_rows(
        self,
        batch: list[Item],
        task: Task,
        settings: Sampling,
        images: DeviceImages | None,
        finite: list[bool],
        error: str | None,
        batch_id: str,
        latency: float,
        per_row: dict[str, Any],
        limits: list[tuple[Any, int]],
    ) -> list[Row]:
        """A pool thread: quantize and CLIP-score the images on their device, copy them to the
        host once, encode the PNGs and build the rows."""
        scores: list[float | None] = [None] * len(batch)
        t_score, pixels = None, None
        if images is not None and any(finite):
            with images.on_side_stream():
                quantized = images.quantized()
                scores, t_score = self._clip_scores(batch, quantized, finite)
                pixels = to_host(quantized)
        rows = []
        for n, it in enumerate(batch):
            err, png, extra = error, None, {}
            if images is not None and not finite[n]:
                err = "non-finite pixel values (NaN or inf) in the pipeline output"
            elif pixels is not None:
                png = encode_png(pixels[n])
                extra = {
                    **per_row,
                    "t_score_s": None if t_score is None else t_score / len(batch),
                    **self._sample_metrics(it, scores[n], pixels[n], limits),
                }
            rows.append(
                self._row(it, task, settings, png, batch_id, len(batch), latency, err, **extra)
            )
        return rows

    def generate(self, batch: list[Item], settings: Sampling) -> DeviceImages:
        """The batch's images where the pipeline made them: ``(len(batch), 3, H, W)`` in [0, 1].

        Sets :attr:`last_timing` (pipeline, text and VAE seconds) and :attr:`last_call` (the
        call's wall-clock start and seconds, for the batch event)."""
        self._configure_pruning(settings.pruning)
        if self.faults:
            self.faults.before_batch(batch)
        counter = self.macs_counter
        recording = counter.recording() if counter else nullcontext()
        start, wall = time.perf_counter(), time.time()
        with recording, metrics.PhaseTimer(self.pipe, self._sync) as timer:
            out = self._call_pipeline(batch, settings)
        if counter is not None and not self.warmed_up:
            self._count_macs(counter, len(batch), settings)  # in the warm-up call's time
        seconds = time.perf_counter() - start
        self.last_timing = {"pipeline": seconds, **timer.seconds}
        self.last_call = {"call_start": round(wall, 4), "call_s": round(seconds, 4)}
        images = out.images
        if self.faults:
            images = self.faults.after_batch(batch, images)
        return DeviceImages.handoff(images)

    def _call_pipeline(self, batch: list[Item], settings: Sampling) -> Any:
        kwargs: dict[str, Any] = dict(self._call_kwargs)
        if self._family is None or self._family.cfg:  # FLUX.1: guidance is an input, not CFG
            kwargs["negative_prompt"] = [settings.negative_prompt] * len(batch)
        if settings.max_sequence_length is not None:
            kwargs["max_sequence_length"] = settings.max_sequence_length
        return self.pipe(
            prompt=[it.prompt.prompt for it in batch],
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
            generator=[image_generator(it.seed) for it in batch],
            output_type="pt",
            **kwargs,
        )

    # -- internals --------------------------------------------------------------------------
    def _configure_pruning(self, section: dict[str, Any] | None) -> None:
        if section == self._pruning:
            return
        from catbatch.pruning import CATConfig, apply_cat, remove_cat

        if self._pruning is not None:
            remove_cat(self.pipe)
        if section is not None:
            apply_cat(self.pipe, CATConfig.from_dict(section))
        self._pruning = section

    def settings_record(self, settings: Sampling) -> dict[str, Any]:
        return {
            "model": self.manifest.model.id,
            "revision": self.source.get("revision"),
            "dtype": self.manifest.model.dtype,
            **settings.model_dump(),
        }

    def _row(
        self, it, task, settings, png, batch_id, batch_size, latency, error, status=None, **extra
    ) -> Row:
        return Row(
            sample_id=it.prompt.sample_id,
            image_index=it.image_index,
            prompt=it.prompt.prompt,
            prompt_metadata=dict(it.prompt.metadata),
            seed=it.seed,
            variant=task.variant,
            settings=self.settings_record(settings),
            png=png,
            width=settings.width,
            height=settings.height,
            batch_id=batch_id,
            batch_size=batch_size,
            latency_s=latency,
            device=self.device_name,
            status=status or ("ok" if error is None else "failed"),
            error=error,
            **extra,
        )

    # -- per-sample metrics (catbatch.metrics.rows, catbatch.metrics.clipscore) --------------
    def _init_metrics(self) -> None:
        spec = self.manifest.metrics
        transformer = getattr(self.pipe, "transformer", None)
        self.macs_counter = (
            metrics.MacsCounter(transformer) if spec.macs and transformer is not None else None
        )
        # copies of the pipeline's tokenizers with their limits, by max_sequence_length: the
        # pool checks truncation while the pipeline's own tokenizers are busy in its calls
        self._prompt_limits: dict[int | None, list[tuple[Any, int]]] = {}
        self._tokenizers_lock = threading.Lock()
        self.devices_held = metrics.devices_held(self.device, self.manifest.ray.resources.gpus)
        self.price = metrics.price_for(spec.price_per_gpu_hour, self.device_name)
        # phase timings wait for this thread's stream only, not for the pool's side streams
        self._sync = _stream_sync if self.device.startswith("cuda") else None
        self.warmed_up = False  # the first batch that runs is the warm-up batch
        self.last_timing: dict[str, float] = {}
        self.last_call: dict[str, float] = {}
        self._clip_lock = threading.Lock()  # one CLIP scoring at a time (its tokenizer, memory)
        self.notes: list[str] = []
        weights = spec.clip.weights and self.manifest.resolve_path(spec.clip.weights)
        model = spec.clip.model
        if model.endswith(".json"):
            model = self.manifest.resolve_path(model)
        self.clip_setup: ClipSetup = clip_setup(
            model, spec.clip.pretrained, weights, spec.clip.enabled
        )
        self.adherence = adherence.scorer(spec.adherence)
        self.clip: ClipScorer | None = None
        if self.clip_setup.available:
            try:
                self.clip = ClipScorer(self.clip_setup, self.device)
            except Exception as e:  # noqa: BLE001 - recorded; the images are still made
                self._note(f"CLIP model not loaded ({type(e).__name__}: {e})")

    def _note(self, message: str) -> None:
        with self._lock:
            if message not in self.notes:
                self.notes.append(message)

    def metrics_info(self) -> dict[str, Any]:
        """For the run record: how MACs, cost and the CLIP score are obtained, or why not."""
        clip = self.clip_setup.to_dict()
        if self.clip_setup.available and self.clip is None:
            clip["available"] = False
        return {
            "clip": clip,
            "macs": "counted" if self.macs_counter else "disabled",
            "adherence": self.manifest.metrics.adherence,
            "devices_held": self.devices_held,
            "price_per_gpu_hour": self.price,
            "notes": list(self.notes),
        }

    def _clip_scores(
        self, batch: list[Item], quantized: torch.Tensor, finite: list[bool]
    ) -> tuple[list[float | None], float | None]:
        """CLIP scores of the finite images, from the 8-bit images on their device, in one
        batch (None where not scored), and the seconds it took."""
        scores: list[float | None] = [None] * len(batch)
        todo = [n for n in range(len(batch)) if finite[n]]
        if self.clip is None or not todo:
            return scores, None
        start = time.perf_counter()
        try:
            with self._clip_lock:
                values = self.clip.score_tensor(
                    quantized[todo], [batch[n].prompt.prompt for n in todo]
                )
        except Exception as e:  # noqa: BLE001 - a scoring failure leaves the score empty
            self._note(f"CLIP scoring failed ({type(e).__name__}: {e})")
            return scores, None
        for n, value in zip(todo, values, strict=True):
            scores[n] = value
        return scores, time.perf_counter() - start

    def _batch_metrics(
        self, batch: list[Item], settings: Sampling, latency: float
    ) -> dict[str, Any]:
        """Metrics shared by the images of a batch that ran (per image: batch value / size)."""
        n = len(batch)
        timing = self.last_timing
        text, vae = timing.get("text", 0.0), timing.get("vae", 0.0)
        gpu_seconds = latency * self.devices_held
        warmup, self.warmed_up = not self.warmed_up, True
        out = {
            "t_text_s": text / n,
            "t_denoise_s": max(timing.get("pipeline", 0.0) - text - vae, 0.0) / n,
            "t_vae_s": vae / n,
            "warmup": warmup,
            "gpu_seconds": gpu_seconds,
            "cost_usd": metrics.cost_usd(gpu_seconds, self.price),
        }
        macs = self._macs(n, settings)
        if macs is not None:
            out.update(macs_paper=macs.paper, macs_total=macs.total)
        return out

    def _macs(self, batch_size: int, settings: Sampling) -> metrics.Macs | None:
        if self.macs_counter is None:
            return None
        from catbatch.pruning import get_cat_state

        state = get_cat_state(self.pipe)
        steps = None if state is None else (state.full_steps, state.pruned_steps)
        try:
            return self.macs_counter.per_image(batch_size, _cat_config(settings), steps)
        except Exception as e:  # noqa: BLE001 - counting never fails an image
            self._note(f"MACs not counted ({type(e).__name__}: {e})")
            return None

    def _count_macs(
        self, counter: metrics.MacsCounter, batch_size: int, settings: Sampling
    ) -> None:
        try:
            counter.count(batch_size, _cat_config(settings))
        except Exception as e:  # noqa: BLE001 - counting never fails an image
            self._note(f"MACs not counted ({type(e).__name__}: {e})")

    def _limits(self, settings: Sampling) -> list[tuple[Any, int]]:
        """Each text encoder's tokenizer (a copy, made once, when the worker starts) and token
        limit, for :func:`metrics.is_truncated` in the pool."""
        length = settings.max_sequence_length
        if length not in self._prompt_limits:
            limits = metrics.prompt_limits(self.pipe, length)
            self._prompt_limits[length] = [(copy.deepcopy(tok), n) for tok, n in limits]
        return self._prompt_limits[length]

    def _sample_metrics(
        self, it: Item, score: float | None, pixels: np.ndarray, limits: list[tuple[Any, int]]
    ) -> dict[str, Any]:
        with self._tokenizers_lock:  # a tokenizer is not for two threads at once
            truncated = metrics.is_truncated(it.prompt.prompt, limits)
        out = {
            "clip_score": score,
            "clip_model": None if score is None else self.clip_setup.label,
            "prompt_truncated": truncated,
        }
        if self.adherence is not None:
            try:
                out.update(self.adherence(pixels, it.prompt.prompt))
            except Exception as e:  # noqa: BLE001 - a checker failure leaves the columns empty
                self._note(f"adherence not checked ({type(e).__name__}: {e})")
        return out


def _cat_config(settings: Sampling) -> Any:
    """The variant's ``CATConfig`` (None: not pruned)."""
    from catbatch.pruning import CATConfig

    return None if settings.pruning is None else CATConfig.from_dict(settings.pruning)


def _free_memory() -> None:
    """Give cached accelerator memory back before a smaller retry."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _stream_sync() -> None:
    """Wait for the work queued on this thread's CUDA stream."""
    torch.cuda.current_stream().synchronize()
