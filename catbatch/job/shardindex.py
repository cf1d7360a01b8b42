"""The shard index: where each shard's prompts are in the source and what they hash to, so that
the driver plans per shard, not per prompt, and each actor reads its own shard's prompts.

:func:`build_index` reads the source once, as a stream: per shard it keeps the span of its
records (byte offsets, first row and line for line-based files; rows for Parquet) and the
:func:`~catbatch.job.sharding.content_hash` of its prompts, about 64 bytes a shard. Sources whose
records cannot be read back in place are copied, parsed, as one JSON array per prompt under the
output, and the spans point there: COCO files (prompts are ordered by id, not by position),
compressed files (no random access) and Parquet files whose row groups hold more than
:data:`ROW_GROUP_SHARDS` shards (each task would read a whole row group).

:func:`save_index` stores it under the output; :func:`load_index` reuses it on a resubmit when
the source is unchanged by its fingerprint (size; modification time locally, ETag or generation
on object stores; sha256 of the whole file up to :data:`WHOLE_FILE_BYTES`, else of
:data:`SAMPLE_BLOCKS` blocks spread over it)::

    OUTPUT/index/<key>/index.json              what it indexes (source identity, shard size),
                                               the fingerprint, counts, how to read a span;
                                               written last
    OUTPUT/index/<key>/<build>.shards.npz      per shard: start, end, row, line; content hashes
    OUTPUT/index/<key>/<build>.prompts.jsonl   the copied prompts, where the source is not read
                                               in place

An actor's :func:`read_piece` checks the prompts it reads against the hash the task carries, so
a source edited after planning fails the task (:class:`SourceChanged`) instead of making images
of other prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
import uuid
import weakref
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import fsspec
import numpy as np

from catbatch.job.layout import OutputLayout
from catbatch.job.prompts import (
    COPIED,
    Prompt,
    PromptSource,
    SourceFormat,
    SourceScan,
    copied_line,
    read_span,
    resolve_location,
    source_errors,
    source_identity,
)
from catbatch.job.sharding import ShardRef, Span, Task, content_hash

INDEX_VERSION = 1
INDEX_DIR = "index"
INDEX_FILE = "index.json"
WHOLE_FILE_BYTES = 4 << 20
SAMPLE_BLOCKS = 16
SAMPLE_BYTES = 64 << 10
ROW_GROUP_SHARDS = 16
INVALID_EXAMPLES = 10
SOURCE_CHANGED = "the prompt source changed during the run"

log = logging.getLogger(__name__)


class SourceChanged(RuntimeError):
    """A piece's prompts, read from the source, no longer match the hash it was planned with."""


@dataclass
class ShardIndex:
    """Every shard of a run's prompts: its span in :attr:`source` and its content hash."""

    key: str
    identity: dict[str, Any]
    fingerprint: dict[str, Any]
    shard_size: int
    n_prompts: int
    source: SourceFormat
    spans: np.ndarray  # int64, (shards, 4): start, end, row, line
    hashes: bytes  # 32 bytes a shard
    invalid: int = 0  # prompts that cannot be generated
    invalid_examples: list[dict[str, str]] = field(default_factory=list)  # the first few
    build: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    copy_path: str | None = None  # a fresh build's copied prompts, local, until saved
    stored: bool = False  # read from, or saved to, the output

    @property
    def n_shards(self) -> int:
        return len(self.spans)

    @property
    def copied(self) -> bool:
        return self.source.fmt == COPIED

    def size(self, index: int) -> int:
        """Prompts in shard ``index`` (the last one may be short)."""
        return min(self.shard_size, self.n_prompts - index * self.shard_size)

    def content_hash(self, index: int) -> str:
        return self.hashes[32 * index : 32 * (index + 1)].hex()

    def span(self, index: int) -> Span:
        start, end, row, line = (int(x) for x in self.spans[index])
        return start, end, row, line

    def ref(self, index: int) -> ShardRef:
        """The whole of shard ``index``."""
        return ShardRef(
            index, 0, 0, self.size(index), self.content_hash(index), self.span(index), self.source
        )

    def read(self, index: int) -> list[Prompt]:
        """The prompts of shard ``index``, read from the source (or the copied prompts)."""
        return read_piece(self.ref(index))

    def meta(self) -> dict[str, Any]:
        copy = f"{self.build}.prompts.jsonl" if self.copied else None
        return {
            "version": INDEX_VERSION,
            "key": self.key,
            "build": self.build,
            "identity": self.identity,
            "fingerprint": self.fingerprint,
            "shard_size": self.shard_size,
            "prompts": self.n_prompts,
            "shards": self.n_shards,
            "invalid_prompts": self.invalid,
            "invalid_examples": self.invalid_examples,
            "source": {**dataclasses.asdict(self.source), "location": copy or self.source.location},
            "shards_file": f"{self.build}.shards.npz",
        }


class ShardRefs(Sequence[ShardRef]):
    """Pieces of ``index``'s shards at 8 bytes each: a whole shard as its number, any other piece
    as its :class:`ShardRef`. Refs are built when read, pointing at the index's source as it is
    then (a copied source is read from the output once it is stored there)."""

    def __init__(self, index: ShardIndex):
        self.index = index
        self.codes = array("q")  # >= 0: that whole shard; < 0: -1 - its position in pieces
        self.pieces: list[ShardRef] = []

    def append(self, ref: ShardRef | int) -> None:
        """Add a piece, or a whole shard by its number."""
        if isinstance(ref, ShardRef):
            self.pieces.append(ref)
            self.codes.append(-len(self.pieces))
        else:
            self.codes.append(ref)

    def __len__(self) -> int:
        return len(self.codes)

    @overload
    def __getitem__(self, i: int) -> ShardRef: ...
    @overload
    def __getitem__(self, i: slice) -> list[ShardRef]: ...
    def __getitem__(self, i: int | slice) -> ShardRef | list[ShardRef]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        code = self.codes[i]
        if code >= 0:
            return self.index.ref(code)
        ref, source = self.pieces[-1 - code], self.index.source
        return ref if ref.source is source else dataclasses.replace(ref, source=source)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def shard_order(self) -> tuple[np.ndarray, np.ndarray]:
        """Each entry's shard number and part."""
        codes = np.frombuffer(self.codes, dtype=np.int64) if self.codes else np.zeros(0, np.int64)
        shard, part = codes.copy(), np.zeros(len(codes), dtype=np.int64)
        for n in np.flatnonzero(codes < 0).tolist():
            ref = self.pieces[-1 - int(codes[n])]
            shard[n], part[n] = ref.index, ref.part
        return shard, part

    def prompts(self) -> int:
        """Prompts over every entry."""
        codes = np.frombuffer(self.codes, dtype=np.int64) if self.codes else np.zeros(0, np.int64)
        whole = codes[codes >= 0]
        size = np.minimum(
            self.index.shard_size, self.index.n_prompts - whole * self.index.shard_size
        )
        return int(size.sum()) + sum(ref.count for ref in self.pieces)


class TaskList(Sequence[Task]):
    """Tasks at 10 bytes each (see :class:`ShardRefs`); each :class:`Task` is built when read."""

    def __init__(self, variants: Sequence[str], refs: ShardRefs, variant_of: array):
        self.variants = list(variants)
        self.refs = refs
        self.variant_of = variant_of  # per task: its variant's position in variants

    @classmethod
    def every_shard(cls, index: ShardIndex, variants: Sequence[str]) -> TaskList:
        """Every (variant, shard) task, shard-major, so paired variants of a shard finish close
        together."""
        n, k = index.n_shards, len(variants)
        refs = ShardRefs(index)
        refs.codes = array("q", np.repeat(np.arange(n, dtype=np.int64), k).tobytes())
        of = array("H", np.tile(np.arange(k, dtype=np.uint16), n).tobytes())
        return cls(variants, refs, of)

    @classmethod
    def shard_major(cls, index: ShardIndex, by_variant: dict[str, Sequence[ShardRef]]) -> TaskList:
        """Each variant's pieces as tasks, ordered by shard and part (then by variant)."""
        refs = ShardRefs(index)
        codes, of, shards, parts = [], [], [], []
        for k, listed in enumerate(by_variant.values()):
            part_refs = listed if isinstance(listed, ShardRefs) else ShardRefs(index)
            if part_refs is not listed:
                for ref in listed:
                    part_refs.append(ref)
            c = np.frombuffer(part_refs.codes, np.int64) if part_refs.codes else np.zeros(0, int)
            codes.append(np.where(c < 0, c - len(refs.pieces), c))
            refs.pieces += part_refs.pieces
            of.append(np.full(len(c), k, dtype=np.uint16))
            shard, part = part_refs.shard_order()
            shards.append(shard)
            parts.append(part)
        if not codes:
            return cls(list(by_variant), refs, array("H"))
        order = np.lexsort((np.concatenate(parts), np.concatenate(shards)))  # stable
        refs.codes = array("q", np.concatenate(codes).astype(np.int64)[order].tobytes())
        variant_of = array("H", np.concatenate(of)[order].tobytes())
        return cls(list(by_variant), refs, variant_of)

    def __len__(self) -> int:
        return len(self.variant_of)

    @overload
    def __getitem__(self, i: int) -> Task: ...
    @overload
    def __getitem__(self, i: slice) -> list[Task]: ...
    def __getitem__(self, i: int | slice) -> Task | list[Task]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return Task(self.variants[self.variant_of[i]], self.refs[i])

    def prompts(self) -> int:
        """Prompts over every task."""
        return self.refs.prompts()


def read_piece(ref: ShardRef) -> list[Prompt]:
    """The prompts of a piece, read from its source and checked against its content hash."""
    if ref.source is None:
        raise ValueError(f"{ref.name} has no source to read its prompts from")
    prompts = read_span(ref.source, *ref.span)
    piece = prompts[ref.first : ref.first + ref.count]
    if len(piece) != ref.count or content_hash(piece) != ref.content_hash:
        raise SourceChanged(
            f"{ref.source.display}: the prompts of {ref.name} are not the ones it was planned "
            f"with: {SOURCE_CHANGED}; submit again to plan against it as it is now"
        )
    return piece


def index_identity(
    source: PromptSource, base_dir: str | Path | None, shard_size: int
) -> dict[str, Any]:
    return {
        "version": INDEX_VERSION,
        "source": source_identity(source, base_dir),
        "shard_size": shard_size,
    }


def index_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def source_fingerprint(location: str) -> dict[str, Any]:
    """What tells a changed source from an unchanged one without reading all of it."""
    with source_errors(location):
        fs, path = fsspec.core.url_to_fs(location)
        if "://" not in location:
            st = os.stat(path)
            size, modified = st.st_size, str(st.st_mtime_ns)
        else:
            info = fs.info(path)
            size = int(info.get("size") or 0)
            modified = next(
                (
                    str(info[k])
                    for k in ("ETag", "etag", "generation", "mtime", "LastModified")
                    if info.get(k)
                ),
                None,
            )
        digest = hashlib.sha256()
        if size <= WHOLE_FILE_BYTES:
            digest.update(fs.cat_file(path))
        else:
            step = (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1)
            for n in range(SAMPLE_BLOCKS):
                digest.update(fs.cat_file(path, start=n * step, end=n * step + SAMPLE_BYTES))
    return {
        "size": size,
        "modified": modified,
        "sha256": digest.hexdigest(),
        "sampled": size > WHOLE_FILE_BYTES,
    }


def build_index(source: PromptSource, base_dir: str | Path | None, shard_size: int) -> ShardIndex:
    """Read the source once and index its shards (memory: the index, one shard of prompts)."""
    scan = SourceScan(source, base_dir)
    identity = index_identity(source, base_dir, shard_size)
    fingerprint = source_fingerprint(scan.location)
    spans, hashes = array("q"), bytearray()
    invalid, examples = 0, []
    shard: list[Prompt] = []
    copy: _Copy | None = None
    decided = False
    first: tuple[int, int, int] = (0, 0, 0)
    end = 0
    try:
        for prompt, start, end, line in scan:
            if not decided:  # at the first prompt: Parquet's row groups are known by then
                decided = True
                big_groups = scan.row_group_rows > ROW_GROUP_SHARDS * shard_size
                copy = _Copy() if not scan.random_access or big_groups else None
            if copy is not None:
                start, end = copy.add(prompt)
            if not shard:
                first = (start, prompt.row, line)
            shard.append(prompt)
            if prompt.problem is not None:
                invalid += 1
                if len(examples) < INVALID_EXAMPLES:
                    examples.append(
                        {
                            "where": prompt.where,
                            "problem": prompt.problem,
                            "sample_id": prompt.sample_id,
                        }
                    )
            if len(shard) == shard_size:
                spans.extend((first[0], end, first[1], first[2]))
                hashes += bytes.fromhex(content_hash(shard))
                shard = []
        if shard:
            spans.extend((first[0], end, first[1], first[2]))
            hashes += bytes.fromhex(content_hash(shard))
    except BaseException:
        if copy is not None:
            copy.discard()
        raise
    sf = scan.format
    if copy is not None:
        copy.close()
        sf = SourceFormat(copy.path, COPIED, sf.name, sf.display)
    index = ShardIndex(
        key=index_key(identity),
        identity=identity,
        fingerprint=fingerprint,
        shard_size=shard_size,
        n_prompts=scan.scanned - source.offset,
        source=sf,
        spans=np.frombuffer(spans, dtype=np.int64).reshape(-1, 4).copy(),
        hashes=bytes(hashes),
        invalid=invalid,
        invalid_examples=examples,
        copy_path=copy.path if copy is not None else None,
    )
    if copy is not None:
        weakref.finalize(index, _unlink, copy.path)
    return index


class _Copy:
    """The parsed prompts of a source that cannot be read in place, in a local temporary file."""

    def __init__(self) -> None:
        handle, self.path = tempfile.mkstemp(prefix="catbatch-prompts-", suffix=".jsonl")
        self.file = os.fdopen(handle, "wb")
        self.offset = 0

    def add(self, prompt: Prompt) -> tuple[int, int]:
        data = copied_line(prompt)
        self.file.write(data)
        start, self.offset = self.offset, self.offset + len(data)
        return start, self.offset

    def close(self) -> None:
        self.file.close()

    def discard(self) -> None:
        self.file.close()
        _unlink(self.path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- storage under the output ------------------------------------------------------------------
def save_index(layout: OutputLayout, index: ShardIndex) -> None:
    """Store the index under the output (copied prompts, shard table, then index.json), point
    its spans at the stored copy, and remove the files of earlier builds."""
    folder = (INDEX_DIR, index.key)
    meta = index.meta()
    if index.copied:
        if index.copy_path is None:
            raise ValueError("the index's copied prompts are gone; build it again")
        target = layout.path(*folder, meta["source"]["location"])
        layout.put_file(index.copy_path, target)
        index.source = dataclasses.replace(index.source, location=layout.display(target))
    buf = io.BytesIO()  # numpy, not Parquet: pyarrow's array constructors import pandas
    np.savez_compressed(buf, spans=index.spans, hashes=np.frombuffer(index.hashes, np.uint8))
    layout.write_bytes(layout.path(*folder, meta["shards_file"]), buf.getvalue())
    layout.write_json(layout.path(*folder, INDEX_FILE), meta)
    index.stored = True
    for name in layout.list_files(*folder):
        if name != INDEX_FILE and not name.startswith(f"{index.build}."):
            layout.remove(layout.path(*folder, name))


def load_index(
    layout: OutputLayout, source: PromptSource, base_dir: str | Path | None, shard_size: int
) -> ShardIndex | None:
    """The stored index of this source and shard size, if the source is unchanged since."""
    identity = index_identity(source, base_dir, shard_size)
    key = index_key(identity)
    meta = layout.read_json(layout.path(INDEX_DIR, key, INDEX_FILE))
    if not isinstance(meta, dict) or meta.get("identity") != identity:
        return None
    location = resolve_location(source.path, base_dir)
    if meta.get("fingerprint") != source_fingerprint(location):
        log.info("the prompt source changed since its shard index was built: building it again")
        return None
    data = layout.read_bytes(layout.path(INDEX_DIR, key, meta["shards_file"]))
    if data is None:
        return None
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        spans, raw = arrays["spans"], arrays["hashes"].tobytes()
    sf = SourceFormat(
        **{
            **meta["source"],
            "columns": tuple(meta["source"]["columns"]),
            "metadata_columns": tuple(meta["source"]["metadata_columns"]),
        }
    )
    if sf.fmt == COPIED:
        sf = dataclasses.replace(
            sf, location=layout.display(layout.path(INDEX_DIR, key, sf.location))
        )
    if spans.shape != (int(meta["shards"]), 4) or len(raw) != 32 * len(spans):
        return None
    return ShardIndex(
        key=key,
        identity=identity,
        fingerprint=meta["fingerprint"],
        shard_size=shard_size,
        n_prompts=int(meta["prompts"]),
        source=sf,
        spans=np.ascontiguousarray(spans, dtype=np.int64),
        hashes=raw,
        invalid=int(meta["invalid_prompts"]),
        invalid_examples=list(meta["invalid_examples"]),
        build=str(meta["build"]),
        stored=True,
    )


def forget_index(layout: OutputLayout, key: str) -> None:
    """Remove a stored index's marker, so that the next submit builds it again."""
    layout.remove(layout.path(INDEX_DIR, key, INDEX_FILE))
