"""Resuming and extending a run: which shard pieces are committed, which are still to make, and
regenerating only the images recorded as failed.

Shard ``i`` always holds prompts ``[i * shard_size, (i + 1) * shard_size)`` of the source. When
prompts are appended after a run committed a short last shard, that shard's file is never
rewritten: the prompts it lacks go to an extension piece ``shard-0000i-x1`` (then ``-x2`` ...).
Each committed piece covers the next ``rows / images_per_prompt`` prompts of its shard, and its
stats' ``content_hash`` must match exactly those prompts (a whole shard's hash comes from the
shard index; a part of a shard is hashed from the shard's prompts, read from the source);
otherwise the run is refused, naming the piece. So every (sample, image, variant) is made
exactly once across pieces.

A committed piece whose file does not match its stats (:mod:`catbatch.job.verify`) is damaged:
it is pending again, for the same prompts, and the caller moves its files aside.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from catbatch.job import verify
from catbatch.job.commits import CommitStats
from catbatch.job.layout import OutputLayout
from catbatch.job.prompts import Prompt
from catbatch.job.shardindex import ShardIndex, ShardRefs, SourceChanged, read_piece
from catbatch.job.sharding import ShardRef, Task, content_hash, parse_piece, piece_name
from catbatch.job.writer import PARQUET, Row, ShardFormat, ShardStats, shard_format, write_shard


class ResumeError(RuntimeError):
    """Committed output that no longer matches the prompt source."""


@dataclass(frozen=True, slots=True)
class Piece:
    """Prompts ``[first, first + count)`` of shard ``index``, as part ``part``: ``committed``,
    ``damaged`` (committed, but its file does not match its stats) or ``pending``."""

    index: int
    part: int
    first: int
    count: int
    state: str
    stats: CommitStats | None = None

    @property
    def name(self) -> str:
        return piece_name(self.index, self.part)


def lay_out(
    variant: str,
    n_shards: int,
    size: Callable[[int], int],
    found: verify.Pieces,
    images_per_prompt: int,
    same_prompts: Callable[[Piece], bool] | None = None,
) -> tuple[list[Piece], list[str]]:
    """Every piece of the variant's ``n_shards`` shards (shard ``i`` holds ``size(i)`` prompts)
    given its committed pieces, in shard order, and what does not fit (the first makes resume
    refuse the run). ``same_prompts`` checks a committed piece's content hash.

    A damaged piece whose stats cannot be read must be its shard's last piece: it is made again
    with the rest of the shard."""
    all_stats = {**found.stats, **found.damaged_stats}
    by_index: dict[int, dict[int, str]] = {}
    for name in all_stats:
        parsed = parse_piece(name)
        if parsed is not None:
            by_index.setdefault(parsed[0], {})[parsed[1]] = name
    problems = []
    extra = sorted(i for i in by_index if i >= n_shards)
    if extra:
        problems.append(
            f"shard {variant}/{piece_name(extra[0])} is committed but the prompt source now "
            f"has only {n_shards} shard(s): prompts were removed; restore the prompt source "
            "or write to a new output"
        )
    pieces: list[Piece] = []
    for index in range(n_shards):
        parts, n_prompts = by_index.get(index), size(index)
        if not parts:
            pieces.append(Piece(index, 0, 0, n_prompts, "pending"))
            continue
        shard, problem = _lay_out_shard(
            variant,
            index,
            n_prompts,
            parts,
            all_stats,
            found.damaged,
            images_per_prompt,
            same_prompts,
        )
        if problem:
            problems.append(problem)
        pieces += shard
    return pieces, problems


def _lay_out_shard(
    variant: str,
    index: int,
    n_prompts: int,
    parts: dict[int, str],
    all_stats: dict[str, CommitStats | None],
    damaged: dict[str, str],
    images_per_prompt: int,
    same_prompts: Callable[[Piece], bool] | None,
) -> tuple[list[Piece], str | None]:
    if sorted(parts) != list(range(len(parts))):
        return [], (
            f"shard {variant}/{piece_name(index)}: committed pieces {sorted(parts.values())} "
            "are not consecutive; the output was edited by hand"
        )
    out: list[Piece] = []
    covered, rest = 0, len(parts)  # rest: the part number of what remains to make
    for part in range(len(parts)):
        name = parts[part]
        stats = all_stats.get(name)
        if stats is None:  # damaged, and its stats cannot tell which prompts it held
            rest = part
            if part < len(parts) - 1:
                return [], (
                    f"shard {variant}/{name} is damaged ({damaged[name]}) and later pieces of "
                    "its shard are committed, so its prompts are unknown; restore it or write "
                    "to a new output"
                )
            break  # made again below, with the rest of the shard
        n = stats.rows // images_per_prompt
        piece = Piece(index, part, covered, n, "damaged" if name in damaged else "committed", stats)
        if (
            n <= 0
            or covered + n > n_prompts
            or (same_prompts is not None and not same_prompts(piece))
        ):
            return [], (
                f"shard {variant}/{name} is committed but its prompts changed since; restore "
                "the prompt source or write to a new output"
            )
        out.append(piece)
        covered += n
    if covered < n_prompts:
        out.append(Piece(index, rest, covered, n_prompts - covered, "pending"))
    return out, None


@dataclass
class VariantPlan:
    """One variant's pieces: how many are committed, which to make, which to retry."""

    pending: Sequence[ShardRef] = field(default_factory=list)  # damaged ones included
    committed: int = 0
    images: int = 0  # of every piece, committed or not
    failed: list[ShardRef] = field(default_factory=list)  # committed with failed images
    failed_images: dict[str, int] = field(default_factory=dict)  # committed piece -> failed
    damaged: dict[str, str] = field(default_factory=dict)  # piece -> what is wrong (pending)
    found: verify.Pieces | None = None  # what was read (the driver records it in the digest)

    def summary(self) -> dict[str, int]:
        return {"pieces": self.committed + len(self.pending), "images": self.images}


def plan_variant(
    layout: OutputLayout,
    variant: str,
    index: ShardIndex,
    images_per_prompt: int,
    deep: bool = False,
    fmt: ShardFormat = PARQUET,
) -> VariantPlan:
    """Match the variant's committed pieces (files of format ``fmt``) against the shard index;
    raise naming any mismatch.

    Damaged pieces (``deep``: by sha256 and row count too, see :mod:`catbatch.job.verify`)
    become pending for the prompts their stats name."""
    found = verify.check_pieces(layout, variant, deep, fmt)
    hashes = _PieceHashes(index)
    pieces, problems = lay_out(
        variant,
        index.n_shards,
        index.size,
        found,
        images_per_prompt,
        lambda piece: piece.stats is not None and piece.stats.content_hash == hashes.of(piece),
    )
    if problems:
        raise ResumeError(problems[0])
    pending = ShardRefs(index)  # (a fresh run's every shard at 8 bytes each)
    plan = VariantPlan(pending, damaged=dict(found.damaged), found=found)
    for piece in pieces:
        plan.images += piece.count * images_per_prompt
        if piece.state == "committed":
            plan.committed += 1
            if piece.stats and piece.stats.images_failed:
                plan.failed_images[piece.name] = piece.stats.images_failed
                plan.failed.append(hashes.ref(piece))
        else:
            pending.append(hashes.entry(piece))
    return plan


class _PieceHashes:
    """Content hashes of pieces: a whole shard's from the index, a part's from the shard's
    prompts (read once per shard)."""

    def __init__(self, index: ShardIndex):
        self.index = index
        self.prompts: dict[int, list[Prompt]] = {}

    def of(self, piece: Piece) -> str:
        if piece.first == 0 and piece.count == self.index.size(piece.index):
            return self.index.content_hash(piece.index)
        if piece.index not in self.prompts:
            try:
                self.prompts[piece.index] = self.index.read(piece.index)
            except SourceChanged as e:
                raise ResumeError(str(e)) from None
        return content_hash(self.prompts[piece.index][piece.first : piece.first + piece.count])

    def entry(self, piece: Piece) -> ShardRef | int:
        """The piece as :class:`ShardRefs` holds it: a whole shard as its number."""
        whole = piece.part == 0 and piece.count == self.index.size(piece.index)
        return piece.index if whole else self.ref(piece)

    def ref(self, piece: Piece) -> ShardRef:
        if piece.part == 0 and piece.count == self.index.size(piece.index):
            return self.index.ref(piece.index)
        return dataclasses.replace(
            self.index.ref(piece.index),
            part=piece.part,
            first=piece.first,
            count=piece.count,
            content_hash=self.of(piece),
        )


# -- --retry-failed ---------------------------------------------------------------------------
def row_from_record(r: dict[str, Any]) -> Row:
    """A shard's row (as ``to_pylist`` of its table gives it) back into a :class:`Row`, every
    column kept."""
    names = {f.name for f in dataclasses.fields(Row)}
    values = {k: v for k, v in r.items() if k in names}
    image = r.get("image")
    values["png"] = image["bytes"] if image else None
    values["prompt_metadata"] = json.loads(r.get("prompt_metadata") or "{}")
    values["settings"] = json.loads(r.get("settings") or "{}")
    return Row(**values)


def retry_failed(worker: Any, layout: OutputLayout, task: Task) -> ShardStats:
    """Regenerate the failed rows of a committed piece and commit it again.

    The shard's file (in the manifest's ``output_format``) is replaced atomically with the
    failed rows swapped for new ones (same order, every other row untouched), then its stats
    file. Rows of prompts that are bad in themselves (``invalid``: empty, NUL) are left as they
    are. A crash between the two writes leaves a consistent file with stale counts in the
    stats, which the next ``--retry-failed`` rewrites.
    """
    start = time.perf_counter()
    variant, name = task.variant, task.shard.name
    fmt = shard_format(worker.manifest.output_format)
    path = fmt.path(layout, variant, name)
    data = layout.read_bytes(path)
    if data is None:
        raise FileNotFoundError(layout.display(path))
    rows = [row_from_record(r) for r in fmt.read(io.BytesIO(data)).to_pylist()]
    items = {
        (it.prompt.sample_id, it.image_index): it for it in worker.items(read_piece(task.shard))
    }
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
        fmt=fmt,
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
