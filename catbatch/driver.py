"""The driver: validate everything, plan shards, run the actor pool, commit the run record."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from tqdm import tqdm

from catbatch import distributor
from catbatch.layout import OutputLayout
from catbatch.manifest import Manifest
from catbatch.models.loader import ModelLoadError, describe_source
from catbatch.prompts import Prompt, read_prompts
from catbatch.runrecord import fingerprint, fingerprint_inputs, run_record
from catbatch.sharding import Shard, Task, make_shards, make_tasks


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

    @property
    def images_per_task(self) -> dict[str, int]:
        n = self.manifest.images_per_prompt
        return {t.key: len(t.shard.prompts) * n for t in self.tasks}

    def counts(self) -> dict[str, int]:
        n_var = len(self.manifest.resolved_variants())
        samples = len(self.prompts) * self.manifest.images_per_prompt
        return {
            "prompts": len(self.prompts),
            "variants": n_var,
            "samples": samples,
            "images": samples * n_var,
            "shards": len(self.shards),
            "tasks": len(self.tasks),
            "pending_tasks": len(self.pending),
        }


@dataclass
class Summary:
    images: int = 0
    failed_images: int = 0
    failed_tasks: dict[str, str] = field(default_factory=dict)
    skipped_tasks: int = 0
    seconds: float = 0.0
    output: str = ""

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        out = [
            f"images: {self.images} generated, {self.failed_images} failed"
            + (f", {self.skipped_tasks} shard(s) already committed" if self.skipped_tasks else ""),
            f"time: {self.seconds:.1f} s ({self.images_per_s:.2f} images/s)",
        ]
        for key, err in self.failed_tasks.items():
            out.append(f"shard {key} FAILED after retries: {err.splitlines()[0][:200]}")
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
    prompts = read_prompts(manifest.prompts, manifest.base_dir)
    shards = make_shards(prompts, manifest.shard_size)
    tasks = make_tasks(list(manifest.resolved_variants()), shards)
    layout = OutputLayout(manifest.output_url)
    return Plan(manifest, prompts, shards, tasks, tasks, source, layout)


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


def prepare_output(p: Plan, overwrite: bool) -> None:
    """Check the output is writable and consistent with an earlier run; choose pending tasks."""
    layout = p.layout
    layout.check_writable()
    old = layout.read_json(layout.run_record)
    fp = fingerprint(p.manifest)
    if old is not None and old.get("fingerprint") != fp:
        if not overwrite:
            diff = _differences(old.get("fingerprint_inputs", {}), fingerprint_inputs(p.manifest))
            raise JobError(
                f"{layout.display()} holds a different run (fingerprint {old.get('fingerprint')} "
                f"vs {fp}); differs in: {', '.join(diff) or 'unknown fields'}. Use another "
                "output or pass --overwrite to replace it."
            )
        layout.fs.rm(layout.root, recursive=True)
        layout.check_writable()
    pending = []
    for variant in p.manifest.resolved_variants():
        committed = layout.committed_shards(variant)
        for t in p.tasks:
            if t.variant != variant:
                continue
            if t.shard.name not in committed:
                pending.append(t)
                continue
            stats = layout.read_json(layout.shard_stats(variant, t.shard.name)) or {}
            if stats.get("content_hash") != t.shard.content_hash:
                raise JobError(
                    f"shard {t.key} is committed but its prompts changed since; restore the "
                    "prompt source or write to a new output"
                )
    p.pending = pending


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


def submit(p: Plan, progress: bool = True, num_cpus: int | None = None) -> Summary:
    """Run the pending tasks on Ray and write the run record; returns the summary."""
    m, layout = p.manifest, p.layout
    summary = Summary(output=layout.display(), skipped_tasks=len(p.tasks) - len(p.pending))
    record = run_record(m, p.model_source, len(p.prompts), len(p.shards), "running")
    layout.write_json(layout.run_record, record)
    t0 = time.perf_counter()
    worker_info: dict[str, Any] = {}
    if p.pending:
        distributor.connect(m.ray.address, num_cpus, m.ray.object_store_mb)
        n, cpus, gpus = distributor.plan_actors(m, len(p.pending))
        total = sum(p.images_per_task[t.key] for t in p.pending)
        bar = tqdm(total=total, unit="img", disable=not progress, desc=m.name, smoothing=0.1)

        def on_done(task: Task, stats: dict) -> None:
            summary.images += stats["images_ok"]
            summary.failed_images += stats["images_failed"]
            bar.update(stats["rows"])

        try:
            result = distributor.run_pool(m, p.model_source, p.pending, n, cpus, gpus, on_done)
        except ray.exceptions.RayActorError as e:
            raise JobError(f"the workers could not start: {_root_cause(e)}") from None
        finally:
            bar.close()
        summary.failed_tasks = result.failed
        worker_info = result.worker_info
    summary.seconds = time.perf_counter() - t0
    status = "complete" if not summary.failed_tasks else "incomplete"
    record = run_record(
        m,
        p.model_source,
        len(p.prompts),
        len(p.shards),
        status,
        worker_info,
        {**summary.__dict__, "images_per_s": summary.images_per_s},
    )
    layout.write_json(layout.run_record, record)
    return summary


def _root_cause(e: BaseException) -> str:
    text = str(e)
    for marker in ("ModelLoadError: ", "Error: "):
        if marker in text:
            return text.rsplit(marker, 1)[1].strip().splitlines()[0]
    return text.splitlines()[0] if text else type(e).__name__


__all__ = ["JobError", "ModelLoadError", "Plan", "Summary", "plan", "prepare_output", "submit"]
