"""``catbatch status OUTPUT``: committed, pending and failed shards and images, per variant.

Reads only the output (local or any fsspec URL): the run record (how many prompts, the shard
size), one listing of each variant's folder with the commit digest (:mod:`catbatch.job.commits`:
stats files are read only where the digest does not cover them), the sizes of the shard files
(Parquet or WebDataset tars, as the run record's manifest says; with ``verify`` their contents:
sha256 and row count, see :mod:`catbatch.job.verify`) and the lease. The planned pieces
follow from the prompt count, the shard size and the committed pieces, as resume lays them out
(:func:`catbatch.job.resume.lay_out`). Needs no manifest or prompt source. A damaged shard is
not committed: it is named, and the run is not complete until a submit has made it again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from catbatch.job.layout import OutputLayout
from catbatch.job.lease import current_lease
from catbatch.job.resume import Piece, lay_out
from catbatch.job.verify import Pieces, check_pieces
from catbatch.job.writer import record_format


class StatusError(RuntimeError):
    """The location holds no catbatch run."""


@dataclass
class VariantStatus:
    planned_shards: int = 0
    committed_shards: int = 0
    pending_shards: list[str] = field(default_factory=list)  # planned, not committed
    failed_shards: dict[str, str] = field(default_factory=dict)  # pending after failing
    damaged_shards: dict[str, str] = field(default_factory=dict)  # file does not match stats
    shards_with_failed_images: list[str] = field(default_factory=list)
    shards_with_invalid_images: list[str] = field(default_factory=list)
    images_planned: int = 0
    images_ok: int = 0
    images_failed: int = 0  # generation failed: submit --retry-failed makes them again
    images_invalid: int = 0  # their prompts cannot be generated (empty, NUL byte): final
    images_pending: int = 0
    problems: list[str] = field(default_factory=list)  # committed pieces that do not fit the plan


@dataclass
class OutputStatus:
    output: str
    name: str
    run_status: str
    updated_at: str
    lease: str
    variants: dict[str, VariantStatus]
    verified: bool = False  # sha256 and footer checked too

    @property
    def complete(self) -> bool:
        return all(
            not v.pending_shards and not v.damaged_shards and not v.problems
            for v in self.variants.values()
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "complete": self.complete}

    def lines(self) -> list[str]:
        out = [
            f"output: {self.output}",
            f"run: {self.name}, last submit {self.run_status} at {self.updated_at}",
            f"lease: {self.lease}",
        ]
        head = (
            "variant",
            "shards",
            "pending",
            "failed",
            "images ok",
            "failed",
            "invalid",
            "pending",
        )
        rows = [head] + [
            (
                name,
                f"{v.committed_shards}/{v.planned_shards}",
                str(len(v.pending_shards)),
                str(len(v.failed_shards)),
                str(v.images_ok),
                str(v.images_failed),
                str(v.images_invalid),
                str(v.images_pending),
            )
            for name, v in self.variants.items()
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        for r in rows:
            out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        verify = " --verify" if self.verified else ""
        again = f"submit{verify} moves it aside and makes it again"
        for name, v in self.variants.items():
            for problem in v.problems:
                out.append(f"problem: {problem}")
            for shard, why in v.damaged_shards.items():
                out.append(f"damaged shard {name}/{shard}: {why} ({again})")
            for shard, err in v.failed_shards.items():
                out.append(f"failed shard {name}/{shard}: {err.splitlines()[0][:200]}")
            if v.shards_with_failed_images:
                out.append(
                    f"{name}: failed images in {_some(v.shards_with_failed_images)}"
                    " (submit --retry-failed makes them again)"
                )
            if v.shards_with_invalid_images:
                out.append(
                    f"{name}: {v.images_invalid} image(s) of prompts that cannot be generated, in "
                    f"{_some(v.shards_with_invalid_images)} (the rows' error says why)"
                )
        out.append("complete" if self.complete else "incomplete: submit the same manifest again")
        return out


def output_status(url: str, verify: bool = False) -> OutputStatus:
    """The run at ``url``; ``verify`` also checks each committed file's sha256 and footer."""
    layout = OutputLayout(url)
    record = layout.read_json(layout.run_record)
    if record is None:
        raise StatusError(f"{layout.display()} holds no catbatch run (no {layout.run_record})")
    failed_tasks: dict[str, str] = (record.get("summary") or {}).get("failed_tasks") or {}
    variants = {}
    fmt = record_format(record)
    for variant in record.get("variants") or []:
        found = check_pieces(layout, variant, deep=verify, fmt=fmt)
        pieces, problems = planned_pieces(record, variant, found)
        v = VariantStatus(damaged_shards=dict(found.damaged), problems=problems)
        v.planned_shards = len(pieces)
        for piece in pieces:
            images = piece.count * int(record.get("images_per_prompt") or 1)
            v.images_planned += images
            if piece.state == "committed":
                v.committed_shards += 1
                continue
            v.pending_shards.append(piece.name)
            v.images_pending += images
            if f"{variant}/{piece.name}" in failed_tasks:
                v.failed_shards[piece.name] = failed_tasks[f"{variant}/{piece.name}"]
        for name, s in found.stats.items():
            v.images_ok += s.images_ok
            v.images_failed += s.images_failed
            v.images_invalid += s.images_invalid
            if s.images_failed:
                v.shards_with_failed_images.append(name)
            if s.images_invalid:
                v.shards_with_invalid_images.append(name)
        variants[variant] = v
    return OutputStatus(
        output=layout.display(),
        name=str(record.get("name", "?")),
        run_status=str(record.get("status", "?")),
        updated_at=str(record.get("updated_at", "?")),
        lease=_lease_line(layout),
        variants=variants,
        verified=verify,
    )


def planned_pieces(
    record: dict[str, Any], variant: str, found: Pieces
) -> tuple[list[Piece], list[str]]:
    """The variant's pieces as the run record's last submit planned them (prompt count, shard
    size, images per prompt) given what is committed now, and what does not fit."""
    try:
        n_prompts = int(record["prompts"])
        shard_size = int(record["manifest"]["shard_size"])
        images_per_prompt = int(record["images_per_prompt"])
    except (KeyError, TypeError, ValueError):
        return [], ["the run record lacks the prompt count, shard size or images per prompt"]
    n_shards = -(-n_prompts // shard_size)
    return lay_out(
        variant,
        n_shards,
        lambda i: min(shard_size, n_prompts - i * shard_size),
        found,
        images_per_prompt,
    )


def _some(names: list[str], show: int = 10) -> str:
    return ", ".join(names[:show]) + (" ..." if len(names) > show else "")


def _lease_line(layout: OutputLayout) -> str:
    info = current_lease(layout)
    if info is None or not info.live():
        return "free"
    return info.describe()
