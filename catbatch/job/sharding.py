"""Deterministic shards of the prompts, the pieces committed for them, and the tasks that make
them.

Shard ``i`` holds prompts ``[i * shard_size, (i + 1) * shard_size)`` of the source (after its
``offset``). A piece is what one task makes and one Parquet file holds: the whole shard (part
0), or, when prompts were appended after a short last shard was committed, the rest of it
(``shard-0000i-x1`` ...). A task carries a :class:`ShardRef`, where its prompts are, not the
prompts: the actor reads them (:func:`catbatch.job.shardindex.read_piece`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from catbatch.job.prompts import Prompt, SourceFormat

_PIECE = re.compile(r"^shard-(\d{5,})(?:-x(\d+))?$")

Span = tuple[int, int, int, int]  # (start, end, first row, first line) of a shard's records


def content_hash(prompts: Sequence[Prompt]) -> str:
    """Hash of what a piece generates from: ids, prompts, metadata and problems, in order."""
    items = [[p.sample_id, p.prompt, p.metadata, p.problem] for p in prompts]
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


def piece_name(index: int, part: int = 0) -> str:
    return f"shard-{index:05d}" + (f"-x{part}" if part else "")


def parse_piece(name: str) -> tuple[int, int] | None:
    """(shard index, part) of a piece name, or None for other names."""
    m = _PIECE.match(name)
    return None if m is None else (int(m.group(1)), int(m.group(2) or 0))


@dataclass(frozen=True, slots=True)
class ShardRef:
    """Piece ``part`` of shard ``index``: its prompts ``[first, first + count)`` of the shard,
    their :func:`content_hash`, and where the shard's records are (``span`` in ``source``)."""

    index: int
    part: int = 0
    first: int = 0
    count: int = 0
    content_hash: str = ""
    span: Span = (0, 0, 0, 1)
    source: SourceFormat | None = None

    @property
    def name(self) -> str:
        return piece_name(self.index, self.part)


@dataclass(frozen=True, slots=True)
class Task:
    """One unit of work for an actor: a piece of a shard, of one variant."""

    variant: str
    shard: ShardRef

    @property
    def key(self) -> str:
        return f"{self.variant}/{self.shard.name}"
