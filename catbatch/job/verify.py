"""Committed shards checked against their stats before they are trusted, and damaged ones moved
aside.

A shard piece is committed when its ``.stats.json`` exists; the stats record the Parquet file's
size (``parquet_bytes``), hash (``parquet_sha256``) and row count. :func:`check_pieces` compares
each committed piece of a variant with its file: existence and size always (one listing, the
stats from the commit digest, :mod:`catbatch.job.commits`), and with ``deep`` the sha256 and
the Parquet footer (reads every file). :func:`move_aside` moves the
files of damaged pieces to ``OUTPUT/damaged/<time>/<variant>/`` (never deletes them), so that
the piece is pending again and the next submit makes it.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from catbatch.job.commits import Commits, CommitStats, read_commits
from catbatch.job.layout import FileEntry, OutputLayout

DAMAGED_DIR = "damaged"


@dataclass
class Pieces:
    """A variant's committed pieces as found on storage."""

    stats: dict[str, CommitStats] = field(default_factory=dict)  # intact: name -> stats
    damaged: dict[str, str] = field(default_factory=dict)  # name -> what is wrong
    damaged_stats: dict[str, CommitStats | None] = field(default_factory=dict)  # None: unread
    commits: Commits = field(default_factory=Commits)  # the listing and stats they come from


def check_pieces(layout: OutputLayout, variant: str, deep: bool = False) -> Pieces:
    """Sort the variant's committed pieces into intact and damaged (with the reason)."""
    commits = read_commits(layout, variant)
    out = Pieces(commits=commits)
    for name in sorted(commits.stats):
        stats = commits.stats[name]
        if stats is None:
            problem = "its stats file is unreadable"
        else:
            problem = _file_problem(layout, variant, name, stats, commits.files, deep)
        if problem is None:
            out.stats[name] = stats
        else:
            out.damaged[name] = problem
            out.damaged_stats[name] = stats
    return out


def _file_problem(
    layout: OutputLayout,
    variant: str,
    name: str,
    stats: CommitStats,
    files: dict[str, FileEntry],
    deep: bool,
) -> str | None:
    entry = files.get(f"{name}.parquet")
    if entry is None:
        return "its Parquet file is missing"
    size = entry.size
    if size != stats.parquet_bytes:
        return f"its Parquet file has {size} bytes, its stats say {stats.parquet_bytes}"
    if not deep:
        return None
    data = layout.read_bytes(layout.shard_parquet(variant, name))
    if data is None:
        return "its Parquet file is missing"
    if hashlib.sha256(data).hexdigest() != stats.parquet_sha256:
        return "its Parquet file's sha256 differs from its stats"
    try:
        rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
    except (pa.ArrowException, OSError) as e:
        return f"its Parquet footer is unreadable ({e})"
    if rows != stats.rows:
        return f"its Parquet file holds {rows} rows, its stats say {stats.rows}"
    return None


def move_aside(layout: OutputLayout, variant: str, names: list[str]) -> str:
    """Move the files of pieces ``names`` (Parquet first, then stats) to a fresh folder under
    ``OUTPUT/damaged/``; returns that folder."""
    stamp = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    folder = layout.path(DAMAGED_DIR, stamp, variant)
    present = set(layout.list_names("variants", variant))
    for name in names:
        for file in (f"{name}.parquet", f"{name}.stats.json"):
            if file in present:
                layout.move(layout.path("variants", variant, file), f"{folder}/{file}")
    return layout.display(folder)
