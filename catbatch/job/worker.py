"""The worker: one pipeline, loaded once, that turns a shard task into a committed Parquet file.

Free of Ray (the Ray actor in :mod:`catbatch.job.distributor` wraps it) and of pruning details
(pruning sections come from the manifest and go to the engine's ``apply_cat``).

A batch that fails (an exception, or out of memory) is split in halves and retried, down to
single images, so one bad image fails alone; each split is recorded in the shard's stats
(``extra.batch_splits``) and in the rows (``batch_id`` suffix ``.0``/``.1``, ``batch_size``).

Test hook: ``CATBATCH_TEST_FAULTS`` (JSON, read when a Worker is made; the actor pool forwards it
to its actors) injects faults for the fault tests and does nothing when unset. Keys:
``delay_s`` (sleep before each batch), ``fail_ids`` / ``nan_ids`` (sample ids whose batch raises
/ whose image comes out NaN), ``oom_above`` (batches larger than this raise
``torch.OutOfMemoryError``), ``crash_shards`` (shard names whose actor SIGKILLs itself) and
``hang_once`` (a file path: the first batch that finds it missing creates it and hangs).
"""

from __future__ import annotations

import gc
import io
import json
import os
import platform
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from catbatch.job.layout import OutputLayout
from catbatch.job.lease import LeaseLost, check_generation
from catbatch.job.manifest import Manifest, Sampling
from catbatch.job.prompts import Prompt
from catbatch.job.seeds import image_generator, image_seed
from catbatch.job.shardindex import read_piece
from catbatch.job.sharding import Task
from catbatch.job.writer import Row, ShardStats, write_shard
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

    def after_batch(self, batch: list[Item], images: np.ndarray) -> np.ndarray:
        for n, it in enumerate(batch):
            if it.prompt.sample_id in self.nan_ids:
                images[n] = np.nan
        return images


@dataclass(frozen=True)
class Item:
    """One image to make: a prompt and its image index."""

    prompt: Prompt
    image_index: int
    seed: int


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu:{platform.machine()}"


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
        self.faults = InjectedFaults.from_env()
        self.batch_started: float | None = None  # monotonic start of the running batch
        self.batch_splits: list[dict[str, Any]] = []  # of the current task
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

    def event(self, kind: str, **fields: Any) -> None:
        """Record a structured log event (task, batch, split, error) with a wall-clock time."""
        self.events.append({"t": round(time.time(), 3), "event": kind, **fields})

    def take_events(self) -> list[dict[str, Any]]:
        """The events recorded since the last call."""
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
        """Read the task's prompts from the source, generate every image and commit the
        piece."""
        start, started_at = time.perf_counter(), time.time()
        if self.faults:
            self.faults.before_task(task)
        self.batch_splits = []
        settings = self.variants[task.variant]
        items = self.items(read_piece(task.shard))  # the task says where its prompts are
        self.event("task_start", task=task.key, images=len(items))
        rows: list[Row] = []
        bs = self.manifest.batch_size
        good = [it for it in items if it.prompt.problem is None]
        for it in items:
            if it.prompt.problem is not None:
                rows.append(
                    self._row(
                        it, task, settings, None, "-", 0, 0.0, it.prompt.problem, status="invalid"
                    )
                )
        for b in range(0, len(good), bs):
            self._check_owner(task)
            batch = good[b : b + bs]
            rows.extend(self.generate_rows(batch, task, settings, f"{task.shard.name}-b{b // bs}"))
        order = {(it.prompt.sample_id, it.image_index): n for n, it in enumerate(items)}
        rows.sort(key=lambda r: order[(r.sample_id, r.image_index)])
        self._check_owner(task)
        extra: dict[str, Any] = {"batch_splits": self.batch_splits} if self.batch_splits else {}
        if self.placement:
            extra["worker"] = self.placement
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
        )
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
        if self.lease_generation is None:
            return
        try:
            check_generation(layout, self.lease_generation)
        except LeaseLost as e:
            raise OrphanedTask(f"{task.key} not committed: {e}") from None

    def generate_rows(
        self, batch: list[Item], task: Task, settings: Sampling, batch_id: str
    ) -> list[Row]:
        """Run one batch; a failure splits it in halves (down to 1), then marks the images failed.

        Out of memory and any other exception are handled alike, so a single bad image fails
        alone and its batch-mates are made in smaller batches; nothing raises.
        """
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
        seconds = round(time.perf_counter() - t0, 3)
        if error is not None and len(batch) > 1:
            self.event("batch_split", task=task.key, batch=batch_id, size=len(batch), error=error)
            self.batch_splits.append({"batch_id": batch_id, "size": len(batch), "error": error})
            half = (len(batch) + 1) // 2
            return self.generate_rows(
                batch[:half], task, settings, f"{batch_id}.0"
            ) + self.generate_rows(batch[half:], task, settings, f"{batch_id}.1")
        finite = [images is not None and np.isfinite(images[n]).all() for n in range(len(batch))]
        self.event(
            "batch",
            task=task.key,
            batch=batch_id,
            size=len(batch),
            seconds=seconds,
            ok=int(sum(bool(f) for f in finite)),
            **({"error": error[:500]} if error else {}),
        )
        scores, t_score = self._clip_scores(batch, images, finite)
        latency = (time.perf_counter() - t0) / len(batch)
        per_row = (
            self._batch_metrics(batch, settings, latency, t_score) if images is not None else {}
        )
        rows = []
        for n, it in enumerate(batch):
            img = None if images is None else images[n]
            err = error
            if img is not None and not finite[n]:
                img, err = None, "non-finite pixel values (NaN or inf) in the pipeline output"
            pixels = None if img is None else _to_uint8(img)
            png = None if pixels is None else encode_png(pixels)
            extra = {}
            if pixels is not None:
                extra = {**per_row, **self._sample_metrics(it, scores[n], settings, pixels)}
            rows.append(
                self._row(it, task, settings, png, batch_id, len(batch), latency, err, **extra)
            )
        return rows

    def generate(self, batch: list[Item], settings: Sampling) -> np.ndarray:
        """Images as float arrays in [0, 1], shape (len(batch), H, W, 3)."""
        self._configure_pruning(settings.pruning)
        if self.faults:
            self.faults.before_batch(batch)
        recording = self.macs_counter.recording() if self.macs_counter else nullcontext()
        start = time.perf_counter()
        with recording, metrics.PhaseTimer(self.pipe, self._sync) as timer:
            out = self._call_pipeline(batch, settings)
        self.last_timing = {"pipeline": time.perf_counter() - start, **timer.seconds}
        images = np.asarray(out.images)
        return self.faults.after_batch(batch, images) if self.faults else images

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
            output_type="np",
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
        self._prompt_limits: dict[int | None, list] = {}  # by max_sequence_length
        self.devices_held = metrics.devices_held(self.device, self.manifest.ray.resources.gpus)
        self.price = metrics.price_for(spec.price_per_gpu_hour, self.device_name)
        self._sync = torch.cuda.synchronize if self.device.startswith("cuda") else None
        self.warmed_up = False  # the first batch that runs is the warm-up batch
        self.last_timing: dict[str, float] = {}
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
        self, batch: list[Item], images: np.ndarray | None, finite: list[bool]
    ) -> tuple[list[float | None], float | None]:
        """CLIP scores of the finite images (None where not scored) and the seconds it took."""
        scores: list[float | None] = [None] * len(batch)
        todo = [n for n in range(len(batch)) if finite[n]]
        if self.clip is None or images is None or not todo:
            return scores, None
        start = time.perf_counter()
        try:
            values = self.clip.score(images[todo], [batch[n].prompt.prompt for n in todo])
        except Exception as e:  # noqa: BLE001 - a scoring failure leaves the score empty
            self._note(f"CLIP scoring failed ({type(e).__name__}: {e})")
            return scores, None
        for n, value in zip(todo, values, strict=True):
            scores[n] = value
        return scores, time.perf_counter() - start

    def _batch_metrics(
        self, batch: list[Item], settings: Sampling, latency: float, t_score: float | None
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
            "t_score_s": None if t_score is None else t_score / n,
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
        from catbatch.pruning import CATConfig, get_cat_state

        config = None if settings.pruning is None else CATConfig.from_dict(settings.pruning)
        state = get_cat_state(self.pipe)
        steps = None if state is None else (state.full_steps, state.pruned_steps)
        try:
            return self.macs_counter.per_image(batch_size, config, steps)
        except Exception as e:  # noqa: BLE001 - counting never fails an image
            self._note(f"MACs not counted ({type(e).__name__}: {e})")
            return None

    def _sample_metrics(
        self, it: Item, score: float | None, settings: Sampling, pixels: np.ndarray
    ) -> dict[str, Any]:
        length = settings.max_sequence_length
        if length not in self._prompt_limits:
            self._prompt_limits[length] = metrics.prompt_limits(self.pipe, length)
        out = {
            "clip_score": score,
            "clip_model": None if score is None else self.clip_setup.label,
            "prompt_truncated": metrics.is_truncated(it.prompt.prompt, self._prompt_limits[length]),
        }
        if self.adherence is not None:
            try:
                out.update(self.adherence(pixels, it.prompt.prompt))
            except Exception as e:  # noqa: BLE001 - a checker failure leaves the columns empty
                self._note(f"adherence not checked ({type(e).__name__}: {e})")
        return out


def _free_memory() -> None:
    """Give cached accelerator memory back before a smaller retry."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """As diffusers' ``numpy_to_pil``: round(x * 255)."""
    return (np.clip(img, 0.0, 1.0) * 255).round().astype("uint8")
