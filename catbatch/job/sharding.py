"""Deterministic sharding of prompts into fixed-size shards, and the work items built on them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from catbatch.job.prompts import Prompt


@dataclass(frozen=True)
class Shard:
    """A fixed slice of the prompt list: shard ``index`` holds prompts
    ``[index * shard_size, (index + 1) * shard_size)``."""

    index: int
    prompts: tuple[Prompt, ...]

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"

    @property
    def content_hash(self) -> str:
        """Hash of what the shard generates from: ids, prompts and metadata."""
        items = [[p.sample_id, p.prompt, p.metadata, p.problem] for p in self.prompts]
        return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Task:
    """One unit of work for an actor: a shard of one variant."""

    variant: str
    shard: Shard

    @property
    def key(self) -> str:
        return f"{self.variant}/{self.shard.name}"


def make_shards(prompts: list[Prompt], shard_size: int) -> list[Shard]:
    """Split prompts, in source order, into shards of ``shard_size`` (the last may be short)."""
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    return [
        Shard(i // shard_size, tuple(prompts[i : i + shard_size]))
        for i in range(0, len(prompts), shard_size)
    ]


def make_tasks(variants: list[str], shards: list[Shard]) -> list[Task]:
    """Tasks shard-major, so that paired variants of a shard finish close together."""
    return [Task(v, s) for s in shards for v in variants]
