"""The worker: one pipeline, loaded once, that turns a shard task into a committed Parquet file.

Free of Ray (the Ray actor in :mod:`catbatch.distributor` wraps it) and of pruning details
(pruning sections come from the manifest and go to the engine's ``apply_cat``).
"""

from __future__ import annotations

import io
import platform
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from catbatch.layout import OutputLayout
from catbatch.manifest import Manifest, Sampling
from catbatch.models.loader import describe_source, load_pipeline, resolve_device
from catbatch.prompts import Prompt
from catbatch.seeds import image_generator, image_seed
from catbatch.sharding import Task
from catbatch.writer import Row, ShardStats, write_shard


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
        self.pipe = load_pipeline(self.source, manifest.model.dtype, self.device)
        self.device_name = device_name(self.device)
        self.variants = manifest.resolved_variants()
        self._pruning: dict | None = None
        self._call_kwargs = _pipeline_call_kwargs(self.pipe)

    # -- public -----------------------------------------------------------------------------
    def items(self, prompts: tuple[Prompt, ...] | list[Prompt]) -> list[Item]:
        seed = self.manifest.seed
        return [
            Item(p, i, image_seed(seed, p.sample_id, i))
            for p in prompts
            for i in range(self.manifest.images_per_prompt)
        ]

    def run_task(self, task: Task, layout: OutputLayout) -> ShardStats:
        """Generate every image of the task's shard and commit the shard."""
        start = time.perf_counter()
        settings = self.variants[task.variant]
        items = self.items(task.shard.prompts)
        rows: list[Row] = []
        bs = self.manifest.batch_size
        good = [it for it in items if it.prompt.problem is None]
        for it in items:
            if it.prompt.problem is not None:
                rows.append(self._row(it, task, settings, None, "-", 0, 0.0, it.prompt.problem))
        for b in range(0, len(good), bs):
            batch = good[b : b + bs]
            rows.extend(self.generate_rows(batch, task, settings, f"{task.shard.name}-b{b // bs}"))
        order = {(it.prompt.sample_id, it.image_index): n for n, it in enumerate(items)}
        rows.sort(key=lambda r: order[(r.sample_id, r.image_index)])
        return write_shard(
            layout,
            task.variant,
            task.shard.name,
            task.shard.content_hash,
            rows,
            time.perf_counter() - start,
            self.device_name,
        )

    def generate_rows(
        self, batch: list[Item], task: Task, settings: Sampling, batch_id: str
    ) -> list[Row]:
        """Run one batch; a failure marks each of its images failed instead of raising."""
        t0 = time.perf_counter()
        try:
            images = self.generate(batch, settings)
            error = None
        except Exception as e:  # noqa: BLE001 - recorded per row
            images, error = None, f"{type(e).__name__}: {e}"
        latency = (time.perf_counter() - t0) / len(batch)
        rows = []
        for n, it in enumerate(batch):
            img = None if images is None else images[n]
            err = error
            if img is not None and not np.isfinite(img).all():
                img, err = None, "non-finite pixel values (NaN or inf) in the pipeline output"
            png = None if img is None else encode_png(_to_uint8(img))
            rows.append(self._row(it, task, settings, png, batch_id, len(batch), latency, err))
        return rows

    def generate(self, batch: list[Item], settings: Sampling) -> np.ndarray:
        """Images as float arrays in [0, 1], shape (len(batch), H, W, 3)."""
        self._configure_pruning(settings.pruning)
        out = self.pipe(
            prompt=[it.prompt.prompt for it in batch],
            negative_prompt=[settings.negative_prompt] * len(batch),
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
            generator=[image_generator(it.seed) for it in batch],
            output_type="np",
            **self._call_kwargs,
        )
        return np.asarray(out.images)

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

    def _row(self, it, task, settings, png, batch_id, batch_size, latency, error) -> Row:
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
            status="ok" if error is None else "failed",
            error=error,
        )


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """As diffusers' ``numpy_to_pil``: round(x * 255)."""
    return (np.clip(img, 0.0, 1.0) * 255).round().astype("uint8")


def _pipeline_call_kwargs(pipe: Any) -> dict[str, Any]:
    """Extra call arguments some pipeline classes need for exact, offline generation."""
    name = type(pipe).__name__
    if name.startswith("PixArt"):
        return {"use_resolution_binning": False, "clean_caption": False}
    return {}
