"""The commit digest: the stats of a variant's committed pieces as of a listing, so that
``status`` and resume read one listing and one file per variant, not one stats file per piece::

    OUTPUT/index/commits/<variant>.npz

The stats files stay the commit markers and the truth: a stats file is taken from the digest
only when the listing shows it with the size and version (S3 ETag, local modification time and
inode) the digest recorded it with; any other is read. The driver writes the digest after
planning and when a submission ends, with the stats its actors returned (taken as written when
the listing's size, and MD5 where the store gives one, match). A missing or stale digest costs
reads, never a wrong answer.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

from catbatch.job.layout import FileEntry, OutputLayout, json_bytes

DIGEST_DIR = ("index", "commits")
STATS_SUFFIX = ".stats.json"
FIELDS = (
    "rows",
    "images_ok",
    "images_failed",
    "images_invalid",
    "parquet_bytes",
    "parquet_sha256",
    "content_hash",
)
_INT_FIELDS = FIELDS[:5]


@dataclass
class Commits:
    """A variant's folder as listed, and the stats of each piece with a stats file there
    (``None``: unreadable)."""

    files: dict[str, FileEntry] = field(default_factory=dict)
    stats: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    read: int = 0  # stats files read
    received: int = 0  # stats taken as an actor returned them

    @property
    def new(self) -> bool:
        """Whether some stats did not come from the digest (it is worth writing again)."""
        return bool(self.read or self.received)


@dataclass(frozen=True, slots=True)
class Written:
    """A stats file as its actor wrote it, as compact as the driver can hold one per commit of
    a run: the size and MD5 of its bytes and the fields the digest keeps (hashes as bytes)."""

    size: int
    md5: bytes
    counts: tuple[int, ...]  # rows, images ok, failed, invalid, Parquet bytes
    hashes: bytes  # parquet_sha256 and content_hash, 32 bytes each

    @classmethod
    def of(cls, stats: dict[str, Any]) -> Written:
        data = json_bytes(stats)
        counts = tuple(int(stats.get(k) or 0) for k in _INT_FIELDS)
        hashes = bytes.fromhex(stats["parquet_sha256"]) + bytes.fromhex(stats["content_hash"])
        return cls(len(data), hashlib.md5(data, usedforsecurity=False).digest(), counts, hashes)

    def matches(self, entry: FileEntry) -> bool:
        return entry.size == self.size and entry.md5 in (None, self.md5.hex())

    def stats(self) -> dict[str, Any]:
        return {
            **dict(zip(_INT_FIELDS, self.counts, strict=True)),
            "parquet_sha256": self.hashes[:32].hex(),
            "content_hash": self.hashes[32:].hex(),
        }


def digest_path(layout: OutputLayout, variant: str) -> str:
    return layout.path(*DIGEST_DIR, f"{variant}.npz")


def read_commits(
    layout: OutputLayout, variant: str, received: dict[str, Written] | None = None
) -> Commits:
    """List the variant's folder once and get each committed piece's stats from the digest,
    from ``received`` (stats as an actor wrote them) or, failing both, from its file."""
    files = layout.list_files("variants", variant)
    names = [n.removesuffix(STATS_SUFFIX) for n in files if n.endswith(STATS_SUFFIX)]
    digest = load_digest(layout, variant) if names else {}
    received = received or {}
    out = Commits(files)
    unknown = []
    for name in names:
        entry = files[name + STATS_SUFFIX]
        known = digest.get(name)
        if (
            known is not None
            and entry.version is not None
            and known[0] == (entry.size, entry.version)
        ):
            out.stats[name] = known[1]
        elif name in received and received[name].matches(entry):
            out.stats[name] = received[name].stats()
            out.received += 1
        else:
            unknown.append(name)
    blobs = layout.read_bytes_many([layout.shard_stats(variant, n) for n in unknown])
    for name in unknown:
        out.stats[name] = parse_stats(blobs.get(layout.shard_stats(variant, name)))
    out.read = len(unknown)
    return out


def parse_stats(data: bytes | None) -> dict[str, Any] | None:
    """A stats file's content, or None when it is missing, unreadable or lacks what resume
    needs."""
    try:
        stats = json.loads(data) if data is not None else None
    except ValueError:
        return None
    needed = ("parquet_bytes", "parquet_sha256", "rows", "content_hash")
    return stats if isinstance(stats, dict) and all(k in stats for k in needed) else None


def load_digest(layout: OutputLayout, variant: str) -> dict[str, tuple[tuple[int, str], dict]]:
    """``{piece: ((size, version) of its stats file, stats)}``; {} without a readable digest."""
    import numpy as np

    data = layout.read_bytes(digest_path(layout, variant))
    if data is None:
        return {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            columns = {k: arrays[k].tolist() for k in ("name", "size", "version", *FIELDS)}
    except (OSError, ValueError, KeyError):
        return {}  # rewritten at the next submit
    out = {}
    for n, name in enumerate(columns["name"]):
        stats = {k: columns[k][n] if k in _INT_FIELDS else columns[k][n].decode() for k in FIELDS}
        out[name.decode()] = ((columns["size"][n], columns["version"][n].decode()), stats)
    return out


def write_digest(layout: OutputLayout, variant: str, commits: Commits) -> None:
    """Record the readable stats of ``commits`` with their files' size and version (numpy,
    not Parquet: pyarrow's array constructors import pandas, 50 MB in the driver)."""
    import numpy as np

    rows = [
        (name, commits.files[name + STATS_SUFFIX], stats)
        for name, stats in sorted(commits.stats.items())
        if stats is not None and commits.files[name + STATS_SUFFIX].version is not None
    ]
    arrays = {
        "name": np.array([r[0].encode() for r in rows], dtype=bytes),
        "size": np.array([r[1].size for r in rows], dtype=np.int64),
        "version": np.array([str(r[1].version).encode() for r in rows], dtype=bytes),
    }
    for k in FIELDS:
        if k in _INT_FIELDS:
            arrays[k] = np.array([int(r[2].get(k) or 0) for r in rows], dtype=np.int64)
        else:
            arrays[k] = np.array([str(r[2].get(k) or "").encode() for r in rows], dtype=bytes)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    layout.write_bytes(digest_path(layout, variant), buf.getvalue())
