"""Committed shards checked against their stats before they are trusted, and damaged ones moved
aside.

A shard piece is committed when its ``.stats.json`` exists; the stats record its file's size
(``parquet_bytes``), hash (``parquet_sha256``) and row count, in either shard format (Parquet or
WebDataset tar, :class:`catbatch.job.writer.ShardFormat`). :func:`check_pieces` compares each
committed piece of a variant with its file: existence and size always (one listing, the stats
from the commit digest, :mod:`catbatch.job.commits`), and with ``deep`` the sha256 and the row
count the file holds (the Parquet footer; the tar's members), which reads every file.
:func:`move_aside` moves the
files of damaged pieces to ``OUTPUT/damaged/<time>/<variant>/`` (never deletes them), so that
the piece is pending again and the next submit makes it.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field

from catbatch.job.commits import STATS_SUFFIX, Commits, CommitStats, read_commits
from catbatch.job.layout import FileEntry, OutputLayout
from catbatch.job.writer import OUTPUT_FORMATS, PARQUET, ShardFormat, shard_format

DAMAGED_DIR = "damaged"


@dataclass
class Pieces:
    """A variant's committed pieces as found on storage."""

    stats: dict[str, CommitStats] = field(default_factory=dict)  # intact: name -> stats
    damaged: dict[str, str] = field(default_factory=dict)  # name -> what is wrong
    damaged_stats: dict[str, CommitStats | None] = field(default_factory=dict)  # None: unread
    commits: Commits = field(default_factory=Commits)  # the listing and stats they come from


def check_pieces(
    layout: OutputLayout, variant: str, deep: bool = False, fmt: ShardFormat = PARQUET
) -> Pieces:
    """Sort the variant's committed pieces (files of format ``fmt``) into intact and damaged
    (with the reason)."""
    commits = read_commits(layout, variant)
    out = Pieces(commits=commits)
    for name in sorted(commits.stats):
        stats = commits.stats[name]
        if stats is None:
            problem = "its stats file is unreadable"
        else:
            problem = _file_problem(layout, variant, name, stats, commits.files, deep, fmt)
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
    fmt: ShardFormat,
) -> str | None:
    entry = files.get(f"{name}{fmt.suffix}")
    if entry is None:
        return f"its {fmt.label} is missing"
    size = entry.size
    if size != stats.parquet_bytes:
        return f"its {fmt.label} has {size} bytes, its stats say {stats.parquet_bytes}"
    if not deep:
        return None
    data = layout.read_bytes(fmt.path(layout, variant, name))
    if data is None:
        return f"its {fmt.label} is missing"
    if hashlib.sha256(data).hexdigest() != stats.parquet_sha256:
        return f"its {fmt.label}'s sha256 differs from its stats"
    try:
        rows = fmt.count_rows(data)
    except ValueError as e:
        return str(e)
    if rows != stats.rows:
        return f"its {fmt.label} holds {rows} rows, its stats say {stats.rows}"
    return None


def move_aside(layout: OutputLayout, variant: str, names: list[str]) -> str:
    """Move the files of pieces ``names`` (the shard file of either format first, then stats) to
    a fresh folder under ``OUTPUT/damaged/``; returns that folder."""
    stamp = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    folder = layout.path(DAMAGED_DIR, stamp, variant)
    present = set(layout.list_names("variants", variant))
    suffixes = [shard_format(f).suffix for f in OUTPUT_FORMATS]
    for name in names:
        for file in [*(f"{name}{s}" for s in suffixes), f"{name}{STATS_SUFFIX}"]:
            if file in present:
                layout.move(layout.path("variants", variant, file), f"{folder}/{file}")
    return layout.display(folder)
