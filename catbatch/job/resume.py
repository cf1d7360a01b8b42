"""Resuming and extending a run: which shard pieces are committed, which are still to make, and
regenerating only the images recorded as failed.

Shard ``i`` always holds prompts ``[i * shard_size, (i + 1) * shard_size)`` of the source. When
prompts are appended after a run committed a short last shard, that shard's file is never
rewritten: the prompts it lacks go to an extension piece ``shard-0000i-x1`` (then ``-x2`` ...).
Each committed piece covers the next ``rows / images_per_prompt`` prompts of its shard, and its
stats' ``content_hash`` must match exactly those prompts; otherwise the run is refused, naming
the piece. So every (sample, image, variant) is made exactly once across pieces.

A committed piece whose file does not match its stats (:mod:`catbatch.job.verify`) is damaged:
it is pending again, for the same prompts, and the caller moves its files aside.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.parquet as pq

from catbatch.job import verify
from catbatch.job.layout import OutputLayout
from catbatch.job.sharding import Shard, Task
from catbatch.job.writer import Row, ShardStats, write_shard

_PIECE = re.compile(r"^shard-(\d{5,})(?:-x(\d+))?$")


class ResumeError(RuntimeError):
    """Committed output that no longer matches the prompt source."""


@dataclass(frozen=True)
class ShardPart(Shard):
    """Piece ``part`` of shard ``index`` (part 0 is the shard itself)."""

    part: int = 0

    @property
    def name(self) -> str:
        return piece_name(self.index, self.part)


def piece_name(index: int, part: int) -> str:
    return f"shard-{index:05d}" + (f"-x{part}" if part else "")


def parse_piece(name: str) -> tuple[int, int] | None:
    """(shard index, part) of a piece name, or None for other names."""
    m = _PIECE.match(name)
    return None if m is None else (int(m.group(1)), int(m.group(2) or 0))


@dataclass
class VariantPlan:
    """One variant's pieces: committed (with their prompts), pending, to retry, damaged."""

    committed: list[ShardPart] = field(default_factory=list)
    pending: list[ShardPart] = field(default_factory=list)
    failed_images: dict[str, int] = field(default_factory=dict)  # committed piece -> failed
    damaged: dict[str, str] = field(default_factory=dict)  # piece -> what is wrong (pending)

    def planned(self, images_per_prompt: int) -> dict[str, int]:
        """Every piece of the run (committed or not) and its number of images."""
        pieces = sorted(self.committed + self.pending, key=lambda s: (s.index, s.part))
        return {s.name: len(s.prompts) * images_per_prompt for s in pieces}


def plan_variant(
    layout: OutputLayout,
    variant: str,
    shards: list[Shard],
    images_per_prompt: int,
    deep: bool = False,
) -> VariantPlan:
    """Match the variant's committed pieces against ``shards``; raise naming any mismatch.

    Damaged pieces (``deep``: by sha256 and footer too, see :mod:`catbatch.job.verify`) become
    pending for the prompts their stats name; one whose stats are unreadable must be its
    shard's last piece (it is then made again with the rest of the shard)."""
    found = verify.check_pieces(layout, variant, deep)
    all_stats = {**found.stats, **found.damaged_stats}
    by_index: dict[int, dict[int, str]] = {}
    for name in sorted(all_stats):
        parsed = parse_piece(name)
        if parsed is not None:
            by_index.setdefault(parsed[0], {})[parsed[1]] = name
    extra = sorted(i for i in by_index if i >= len(shards))
    if extra:
        raise ResumeError(
            f"shard {variant}/{piece_name(extra[0], 0)} is committed but the prompt source now "
            f"has only {len(shards)} shard(s): prompts were removed; restore the prompt source "
            "or write to a new output"
        )
    plan = VariantPlan(damaged=dict(found.damaged))
    for shard in shards:
        parts = by_index.get(shard.index, {})
        if sorted(parts) != list(range(len(parts))):
            raise ResumeError(
                f"shard {variant}/{shard.name}: committed pieces {sorted(parts.values())} "
                "are not consecutive; the output was edited by hand"
            )
        covered, rest = 0, len(parts)  # rest: the part number of what remains to make
        for part in range(len(parts)):
            name = parts[part]
            stats = all_stats.get(name)
            if stats is None:  # damaged, and its stats cannot tell which prompts it held
                rest = part
                if part < len(parts) - 1:
                    raise ResumeError(
                        f"shard {variant}/{name} is damaged ({found.damaged[name]}) and later "
                        "pieces of its shard are committed, so its prompts are unknown; restore "
                        "it or write to a new output"
                    )
                break  # made again below, with the rest of the shard
            n = int(stats.get("rows", -1)) // images_per_prompt
            piece = ShardPart(shard.index, shard.prompts[covered : covered + n], part)
            if (
                n <= 0
                or covered + n > len(shard.prompts)
                or stats.get("content_hash") != piece.content_hash
            ):
                raise ResumeError(
                    f"shard {variant}/{parts[part]} is committed but its prompts changed since; "
                    "restore the prompt source or write to a new output"
                )
            if name in found.damaged:
                plan.pending.append(piece)
            else:
                plan.committed.append(piece)
                if stats.get("images_failed"):
                    plan.failed_images[piece.name] = int(stats["images_failed"])
            covered += n
        if covered < len(shard.prompts):
            plan.pending.append(ShardPart(shard.index, shard.prompts[covered:], rest))
    return plan


# -- --retry-failed ---------------------------------------------------------------------------
def row_from_record(r: dict[str, Any]) -> Row:
    """A Parquet row (as ``to_pylist`` gives it) back into a :class:`Row`, every column kept."""
    names = {f.name for f in dataclasses.fields(Row)}
    values = {k: v for k, v in r.items() if k in names}
    image = r.get("image")
    values["png"] = image["bytes"] if image else None
    values["prompt_metadata"] = json.loads(r.get("prompt_metadata") or "{}")
    values["settings"] = json.loads(r.get("settings") or "{}")
    return Row(**values)


def retry_failed(worker: Any, layout: OutputLayout, task: Task) -> ShardStats:
    """Regenerate the failed rows of a committed piece and commit it again.

    The Parquet file is replaced atomically with the failed rows swapped for new ones (same
    order, every other row untouched), then its stats file. Rows of prompts that are bad in
    themselves (``invalid``: empty, NUL) are left as they are. A crash between the two writes
    leaves a consistent Parquet file with stale counts in the stats, which the next
    ``--retry-failed`` rewrites.
    """
    start = time.perf_counter()
    variant, name = task.variant, task.shard.name
    data = layout.read_bytes(layout.shard_parquet(variant, name))
    if data is None:
        raise FileNotFoundError(layout.display(layout.shard_parquet(variant, name)))
    rows = [row_from_record(r) for r in pq.read_table(io.BytesIO(data)).to_pylist()]
    items = {(it.prompt.sample_id, it.image_index): it for it in worker.items(task.shard.prompts)}
    todo = [
        items[(r.sample_id, r.image_index)]
        for r in rows
        if r.status == "failed" and items[(r.sample_id, r.image_index)].prompt.problem is None
    ]
    settings = worker.variants[variant]
    bs = worker.manifest.batch_size
    new: dict[tuple[str, int], Row] = {}
    for b in range(0, len(todo), bs):
        for row in worker.generate_rows(
            todo[b : b + bs], task, settings, f"{name}-retry-b{b // bs}"
        ):
            new[(row.sample_id, row.image_index)] = row
    merged = [new.get((r.sample_id, r.image_index), r) for r in rows]
    recovered = sum(r.status == "ok" for r in new.values())
    return write_shard(
        layout,
        variant,
        name,
        task.shard.content_hash,
        merged,
        time.perf_counter() - start,
        worker.device_name,
        {"retried_images": len(todo), "recovered_images": recovered},
        before_commit=lambda: worker.check_commit(task, layout),
    )


def run_retries(
    manifest: Any,
    source: dict,
    tasks: list[Task],
    num_cpus: int | None,
    lease_generation: int | None = None,
) -> tuple[list[dict], dict[str, str]]:
    """Run :func:`retry_failed` for ``tasks`` on Ray, one pipeline per group of tasks.

    Returns the new stats and, for groups that failed, ``{task key: error}`` (those pieces keep
    their committed files; a later ``--retry-failed`` tries again)."""
    import ray

    from catbatch.job import distributor

    distributor.connect(manifest.ray.address, num_cpus, manifest.ray.object_store_mb)
    n, cpus, gpus = distributor.plan_actors(manifest, len(tasks))
    payload = manifest.model_dump(mode="json", exclude_unset=True)
    remote = ray.remote(_retry_group).options(num_cpus=cpus, num_gpus=gpus, max_retries=1)
    groups = [tasks[i::n] for i in range(n)]
    refs = [
        remote.remote(payload, manifest.base_dir, source, max(1, int(cpus)), g, lease_generation)
        for g in groups
    ]
    done: list[dict] = []
    failed: dict[str, str] = {}
    for group, ref in zip(groups, refs, strict=True):
        try:
            done += ray.get(ref)
        except ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None) or e
            failed.update({f"{t.key} (retry)": f"{type(cause).__name__}: {cause}" for t in group})
    return done, failed


def _retry_group(
    payload: dict,
    base_dir: str,
    source: dict,
    threads: int,
    tasks: list[Task],
    lease_generation: int | None,
) -> list[dict]:
    import torch

    from catbatch.job.manifest import Manifest
    from catbatch.job.worker import Worker

    torch.set_num_threads(threads)
    manifest = Manifest.model_validate({**payload, "base_dir": base_dir})
    worker = Worker(manifest, source)
    worker.lease_generation = lease_generation
    layout = OutputLayout(manifest.output_url)
    return [asdict(retry_failed(worker, layout, t)) for t in tasks]
