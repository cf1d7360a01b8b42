"""The commit digest: the stats of a variant's committed pieces as of a listing, so that
``status`` and resume read one listing and one file per variant, not one stats file per piece::

    OUTPUT/index/commits/<variant>.npz

The stats files stay the commit markers and the truth: a stats file is taken from the digest
only when the listing shows it with the size and version (S3 ETag, local modification time and
inode) the digest recorded it with; any other is read. The driver writes the digest after
planning and when a submission ends, with the stats its actors returned (taken as written when
the listing's size, and MD5 where the store gives one, match). A missing or stale digest costs
reads, never a wrong answer. Per piece the driver holds a few hundred bytes: a
:class:`CommitStats`, a :class:`Written`, or a row of the digest's arrays.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from catbatch.job.layout import FileEntry, OutputLayout, json_bytes

DIGEST_DIR = ("index", "commits")
STATS_SUFFIX = ".stats.json"
_COUNTS = ("rows", "images_ok", "images_failed", "images_invalid", "parquet_bytes")
_HASHES = ("parquet_sha256", "content_hash")
READ_BATCH = 1000  # stats files read at once (one fs.cat on object stores), then folded in


@dataclass(frozen=True, slots=True)
class CommitStats:
    """What resume, ``status`` and the digest need of a piece's stats file."""

    rows: int
    images_ok: int
    images_failed: int
    images_invalid: int
    parquet_bytes: int
    parquet_sha256: str
    content_hash: str

    @classmethod
    def of(cls, stats: dict[str, Any]) -> CommitStats | None:
        """From a stats file's content; None when it lacks what resume needs."""
        try:
            counts = [int(stats.get(k) or 0) for k in _COUNTS]
            if any(k not in stats for k in ("rows", "parquet_bytes", *_HASHES)):
                return None
            return cls(*counts, str(stats["parquet_sha256"]), str(stats["content_hash"]))
        except (TypeError, ValueError, AttributeError):
            return None


def parse_stats(data: bytes | None) -> CommitStats | None:
    """A stats file's content, or None when it is missing, unreadable or lacks what resume
    needs."""
    try:
        stats = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return CommitStats.of(stats) if isinstance(stats, dict) else None


# a stats file's size, MD5 and counts, then its two hashes
_WRITTEN = struct.Struct(f"<q16s{len(_COUNTS)}q32s32s")


@dataclass(frozen=True, slots=True)
class Written:
    """A stats file as its actor wrote it, as compact as the driver can hold one per commit of
    a run: the size and MD5 of its bytes, its counts and its two hashes, packed in one bytes
    object (about 200 bytes in all)."""

    packed: bytes

    @classmethod
    def of(cls, stats: dict[str, Any]) -> Written:
        data = json_bytes(stats)
        counts = (int(stats.get(k) or 0) for k in _COUNTS)
        hashes = (bytes.fromhex(stats[k]) for k in _HASHES)
        md5 = hashlib.md5(data, usedforsecurity=False).digest()
        return cls(_WRITTEN.pack(len(data), md5, *counts, *hashes))

    def matches(self, entry: FileEntry) -> bool:
        size, md5 = _WRITTEN.unpack(self.packed)[:2]
        return entry.size == size and entry.md5 in (None, md5.hex())

    def stats(self) -> CommitStats:
        fields = _WRITTEN.unpack(self.packed)[2:]
        n = len(_COUNTS)
        return CommitStats(*fields[:n], *(h.hex() for h in fields[n:]))


@dataclass
class Commits:
    """A variant's folder as listed, and the stats of each piece with a stats file there
    (``None``: unreadable)."""

    files: dict[str, FileEntry] = field(default_factory=dict)
    stats: dict[str, CommitStats | None] = field(default_factory=dict)
    read: int = 0  # stats files read
    received: int = 0  # stats taken as an actor returned them

    @property
    def new(self) -> bool:
        """Whether some stats did not come from the digest (it is worth writing again)."""
        return bool(self.read or self.received)


def digest_path(layout: OutputLayout, variant: str) -> str:
    return layout.path(*DIGEST_DIR, f"{variant}.npz")


class Digest:
    """A variant's digest as stored: one row per piece, sorted by name, in numpy arrays (no
    object per piece)."""

    def __init__(self, arrays: dict[str, np.ndarray] | None = None):
        self.arrays = arrays or {}

    def __len__(self) -> int:
        return len(self.arrays.get("name", ()))

    def rows(self, names: list[str]) -> list[int]:
        """The row of each name (-1 where the digest has none)."""
        stored = self.arrays.get("name")
        if stored is None or not len(stored) or not names:
            return [-1] * len(names)
        keys = np.array([n.encode() for n in names], dtype=bytes)
        found = np.searchsorted(stored, keys).clip(0, len(stored) - 1)
        return np.where(stored[found] == keys, found, -1).tolist()

    def stats(self, i: int, entry: FileEntry) -> CommitStats | None:
        """Row ``i``'s stats if the listing shows its stats file as the digest recorded it."""
        a = self.arrays
        if i < 0 or entry.version is None or int(a["size"][i]) != entry.size:
            return None
        if a["version"][i].decode() != entry.version:
            return None
        counts = (int(a[k][i]) for k in _COUNTS)
        return CommitStats(*counts, *(a[k][i].tobytes().hex() for k in _HASHES))


def load_digest(layout: OutputLayout, variant: str) -> Digest:
    """The stored digest; an empty one when there is none or it is unreadable."""
    data = layout.read_bytes(digest_path(layout, variant))
    if data is None:
        return Digest()
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            arrays = {k: stored[k] for k in ("name", "size", "version", *_COUNTS, *_HASHES)}
        return Digest(arrays)
    except (OSError, ValueError, KeyError):
        return Digest()  # rewritten at the next submit


def read_commits(
    layout: OutputLayout, variant: str, received: dict[str, Written] | None = None
) -> Commits:
    """List the variant's folder once and get each committed piece's stats from the digest,
    from ``received`` (stats as an actor wrote them) or, failing both, from its file (read
    :data:`READ_BATCH` at a time)."""
    files = layout.list_files("variants", variant)
    names = [n.removesuffix(STATS_SUFFIX) for n in files if n.endswith(STATS_SUFFIX)]
    digest = load_digest(layout, variant) if names else Digest()
    received = received or {}
    out = Commits(files)
    unknown = []
    for name, row in zip(names, digest.rows(names), strict=True):
        entry = files[name + STATS_SUFFIX]
        stats = digest.stats(row, entry)
        if stats is None and name in received and received[name].matches(entry):
            stats = received[name].stats()
            out.received += 1
        if stats is None:
            unknown.append(name)
        out.stats[name] = stats
    for start in range(0, len(unknown), READ_BATCH):
        batch = unknown[start : start + READ_BATCH]
        blobs = layout.read_bytes_many([layout.shard_stats(variant, n) for n in batch])
        for name in batch:
            out.stats[name] = parse_stats(blobs.get(layout.shard_stats(variant, name)))
        del blobs
    out.read = len(unknown)
    return out


class _Columns:
    """The digest's arrays, filled one piece at a time (a few dozen bytes a piece)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.versions: list[str] = []
        self.ints = {k: array("q") for k in ("size", *_COUNTS)}
        self.hashes = {k: bytearray() for k in _HASHES}

    def __len__(self) -> int:
        return len(self.names)

    def add(self, name: str, size: int, version: str | None, stats: CommitStats) -> None:
        try:
            hashes = {k: bytes.fromhex(getattr(stats, k)) for k in _HASHES}
        except ValueError:
            return  # not a hash: read again next time
        if version is None or any(len(h) != 32 for h in hashes.values()):
            return
        self.names.append(name)
        self.versions.append(version)
        self.ints["size"].append(size)
        for k in _COUNTS:
            self.ints[k].append(getattr(stats, k))
        for k, h in hashes.items():
            self.hashes[k] += h

    def write(self, layout: OutputLayout, variant: str) -> None:
        names = np.array([n.encode() for n in self.names], dtype=bytes)
        order = np.argsort(names, kind="stable")  # Digest.rows searches by name
        arrays = {
            "name": names[order],
            "version": np.array([self.versions[i].encode() for i in order.tolist()], dtype=bytes),
            **{k: np.frombuffer(v, dtype=np.int64)[order] for k, v in self.ints.items()},
            # uint8 rows, not bytes ("S32" would drop a hash's trailing zero bytes)
            **{
                k: np.frombuffer(bytes(v), dtype=np.uint8).reshape(-1, 32)[order]
                for k, v in self.hashes.items()
            },
        }
        buf = io.BytesIO()  # numpy, not Parquet: pyarrow's array constructors import pandas
        np.savez_compressed(buf, **arrays)
        layout.write_bytes(digest_path(layout, variant), buf.getvalue())


def write_digest(layout: OutputLayout, variant: str, commits: Commits) -> None:
    """Record the readable stats of ``commits`` with their files' size and version."""
    columns = _Columns()
    for name, stats in sorted(commits.stats.items()):
        if stats is not None:
            entry = commits.files[name + STATS_SUFFIX]
            columns.add(name, entry.size, entry.version, stats)
    columns.write(layout, variant)


def refresh(
    layout: OutputLayout, variant: str, received: dict[str, Written] | None = None
) -> dict[str, int]:
    """Bring the digest up to date after a submission (one listing; ``received`` entries are
    used up as they go into it) and total the committed pieces' counts. Holds no object per
    piece but its name and version: what the digest or ``received`` lacks is read in
    batches."""
    from catbatch.job.sharding import parse_piece

    files = layout.list_files("variants", variant, suffix=STATS_SUFFIX)
    names = [file.removesuffix(STATS_SUFFIX) for file in files]
    sizes = array("q", (e.size for e in files.values()))
    versions = [e.version for e in files.values()]
    md5s = [e.md5 for e in files.values()]
    del files
    digest = load_digest(layout, variant) if names else Digest()
    stored = len(digest)
    received = received if received is not None else {}
    columns = _Columns()
    totals = dict.fromkeys(("shards_committed", "images_ok", "images_failed", "images_invalid"), 0)
    unknown: list[int] = []
    new = 0  # stats that are not in the digest yet

    def count(i: int, stats: CommitStats | None) -> None:
        if stats is None or parse_piece(names[i]) is None:
            return  # a damaged stats file: the next submit moves it aside
        columns.add(names[i], sizes[i], versions[i], stats)
        totals["shards_committed"] += 1
        for key in ("images_ok", "images_failed", "images_invalid"):
            totals[key] += getattr(stats, key)

    for i, row in enumerate(digest.rows(names)):
        entry = FileEntry(sizes[i], versions[i], md5s[i])
        stats = digest.stats(row, entry)
        written = received.pop(names[i], None)
        if stats is None and written is not None and written.matches(entry):
            stats, new = written.stats(), new + 1
        if stats is None:
            unknown.append(i)
        else:
            count(i, stats)
    del digest
    for start in range(0, len(unknown), READ_BATCH):
        batch = unknown[start : start + READ_BATCH]
        blobs = layout.read_bytes_many([layout.shard_stats(variant, names[i]) for i in batch])
        for i in batch:
            before = len(columns)
            count(i, parse_stats(blobs.get(layout.shard_stats(variant, names[i]))))
            new += len(columns) - before
        del blobs  # one batch's bytes at a time
    if new or stored != len(columns):
        columns.write(layout, variant)
    return totals


__all__ = [
    "CommitStats",
    "Commits",
    "Digest",
    "Written",
    "load_digest",
    "parse_stats",
    "read_commits",
    "refresh",
    "write_digest",
]
