"""``catbatch status OUTPUT``: committed, pending and failed shards and images, per variant.

Reads only the output (local or any fsspec URL): the run record's planned pieces (written at
submit), the stats files (commit markers), the sizes of the Parquet files (with ``verify``
their contents: sha256 and footer, see :mod:`catbatch.job.verify`) and the lease. Needs no
manifest or prompt source. A damaged shard is not committed: it is named, and the run is not
complete until a submit has made it again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from catbatch.job.layout import OutputLayout
from catbatch.job.lease import current_lease
from catbatch.job.verify import check_pieces


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
        return all(not v.pending_shards and not v.damaged_shards for v in self.variants.values())

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
    planned: dict[str, dict[str, int]] = record.get("planned_shards") or {}
    failed_tasks: dict[str, str] = (record.get("summary") or {}).get("failed_tasks") or {}
    variants = {}
    for variant in record.get("variants", list(planned)):
        v = VariantStatus()
        pieces = planned.get(variant, {})
        found = check_pieces(layout, variant, deep=verify)
        stats = found.stats
        committed = set(stats)
        v.damaged_shards = dict(found.damaged)
        v.planned_shards = len(pieces)
        v.committed_shards = len(committed & set(pieces))
        v.images_planned = sum(pieces.values())
        for name, n_images in pieces.items():
            if name not in committed:
                v.pending_shards.append(name)
                v.images_pending += n_images
                if f"{variant}/{name}" in failed_tasks:
                    v.failed_shards[name] = failed_tasks[f"{variant}/{name}"]
        for name, s in stats.items():
            v.images_ok += int(s.get("images_ok", 0))
            v.images_failed += int(s.get("images_failed", 0))
            v.images_invalid += int(s.get("images_invalid", 0))
            if s.get("images_failed"):
                v.shards_with_failed_images.append(name)
            if s.get("images_invalid"):
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


def _some(names: list[str], show: int = 10) -> str:
    return ", ".join(names[:show]) + (" ..." if len(names) > show else "")


def _lease_line(layout: OutputLayout) -> str:
    info = current_lease(layout)
    if info is None or not info.live():
        return "free"
    return info.describe()
