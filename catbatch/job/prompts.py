"""Prompt sources: read prompts from PartiPrompts, COCO captions, CSV/TSV, JSONL, Parquet or text.

A :class:`PromptSource` names a local path or an fsspec URL (``s3://``, ``memory://``,
``https://`` ...; ``.gz``/``.bz2``/``.xz`` files are decompressed) and how to read it.
:func:`read_prompts` turns it into :class:`Prompt` rows, in source order:

- ``parti``: PartiPrompts TSV (column ``Prompt``; ``Category`` and ``Challenge`` kept as
  metadata). ``auto`` picks it for a ``.tsv`` whose header has ``Prompt`` and ``Category``.
- ``coco``: a COCO captions annotation file (``.json``; ``"annotations": [{"id", "image_id",
  "caption"}]``). Prompts are ordered by (image_id, caption id); ``captions="first"`` keeps the
  lowest caption id of each image, ``"all"`` keeps every caption. Sample id = caption id,
  metadata ``image_id``, ``row`` = index in the ``annotations`` list.
- ``csv`` / ``tsv`` / ``jsonl`` / ``parquet``: one prompt per record from ``prompt_column``
  (default: the first of ``prompt``, ``Prompt``, ``caption``, ``text`` that exists). CSV follows
  RFC 4180 quoting; TSV has no quoting (quotes are part of the text, as in PartiPrompts).
- ``text`` (``.txt``): one prompt per line.

``row`` is the 0-based record index in the source after any header. Blank lines of line-based
formats (text, csv, tsv, jsonl) are skipped but keep their row number, so ids do not shift.
The sample id is the ``id_column`` value when given (must be unique), else
:func:`sample_id_for` of the source name and row; ``offset``/``limit`` apply after parsing and
never change ids (reading stops after ``offset + limit`` prompts). A prompt that is
empty/whitespace-only or holds a NUL byte is not an error: it comes back with ``problem`` set
(and ``where`` it is), and its rows are recorded ``invalid``. Anything else wrong raises
:class:`PromptSourceError` naming the file and, where possible, the line or row.

:class:`SourceScan` reads a source once, as a stream (memory does not grow with its size), and
gives each prompt with its record's place: byte offsets for line-based files, rows for Parquet.
:func:`read_span` reads the prompts of such a span again (a byte-range or row-group read), which
is how an actor gets its shard's prompts (:mod:`catbatch.job.shardindex`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import re
from array import array
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import urlsplit

import fsspec
import pydantic

from catbatch.job.layout import describe_error

Format = Literal["auto", "parti", "coco", "csv", "tsv", "jsonl", "parquet", "text"]
DEFAULT_PROMPT_COLUMNS = ("prompt", "Prompt", "caption", "text")
PARTI_METADATA_COLUMNS = ("Category", "Challenge")
SAMPLE_ID_HEX_CHARS = 16
CHUNK_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 65_536
COPIED = "prompts"  # the format of prompts copied under the output (see shardindex)
_EXTENSION_FORMATS = {
    ".tsv": "tsv",
    ".json": "coco",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".txt": "text",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz")
_TABULAR_FORMATS = ("parti", "csv", "tsv", "jsonl", "parquet")
_BOM = b"\xef\xbb\xbf"
_UNIVERSAL_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)")


class PromptSourceError(ValueError):
    """A prompt source cannot be read; the message names the file and line/row."""


class PromptSource(pydantic.BaseModel):
    """Where prompts come from and how to read them."""

    model_config = pydantic.ConfigDict(extra="forbid")

    path: str = pydantic.Field(min_length=1)
    format: Format = "auto"
    prompt_column: str | None = None
    id_column: str | None = None
    captions: Literal["first", "all"] = "first"
    offset: int = pydantic.Field(0, ge=0)
    limit: int | None = pydantic.Field(None, ge=1)
    name: str | None = pydantic.Field(None, min_length=1)


@dataclass(frozen=True)
class Prompt:
    """One prompt; ``problem`` says why it cannot be generated (its rows are then recorded
    ``invalid``); ``where`` is its place in the file ("line 3", "row 2", "annotations[7]")."""

    sample_id: str
    prompt: str
    metadata: dict[str, str]
    row: int
    problem: str | None = None
    where: str = ""


@dataclass(frozen=True)
class SourceFormat:
    """How to parse a span of a source's records again: what a shard task carries besides the
    span itself. ``fmt`` is a source format (``parti`` once detected) or ``prompts`` (parsed
    prompts copied under the output, one JSON array per line)."""

    location: str  # the file the spans point into (local path or URL)
    fmt: str
    name: str  # the source's name, for sample ids
    display: str  # the prompt source, as messages name it
    columns: tuple[str, ...] = ()  # CSV/TSV header
    prompt_column: str | None = None
    id_column: str | None = None
    metadata_columns: tuple[str, ...] = ()


Located = tuple[Prompt, int, int, int]  # (prompt, start, end, first line of its record or 0)


def sample_id_for(source_name: str, row: int) -> str:
    """Stable id of a row without an id column: sha256(f"{name}\\x00{row}") hex, 16 chars."""
    digest = hashlib.sha256(f"{source_name}\x00{row}".encode()).hexdigest()
    return digest[:SAMPLE_ID_HEX_CHARS]


def resolve_location(path: str, base_dir: str | Path | None = None) -> str:
    """URLs unchanged; local paths made absolute (relative ones against ``base_dir``)."""
    if "://" in path:
        return path
    local = Path(path).expanduser()
    if not local.is_absolute() and base_dir is not None:
        local = Path(base_dir).expanduser() / local
    return str(local.resolve())


def source_name(source: PromptSource) -> str:
    """``source.name``, else the file name of the path (without a URL query)."""
    return source.name or Path(urlsplit(source.path).path).name or source.path


def source_identity(source: PromptSource, base_dir: str | Path | None = None) -> dict[str, Any]:
    """What identifies a source in a fingerprint (location and reading options, not content)."""
    identity = source.model_dump()
    identity.update(path=resolve_location(source.path, base_dir), name=source_name(source))
    return identity


def read_prompts(source: PromptSource, base_dir: str | Path | None = None) -> list[Prompt]:
    """Read, validate and slice (``offset``/``limit``) the prompts of ``source``."""
    return [located[0] for located in SourceScan(source, base_dir)]


class SourceScan:
    """One pass over a prompt source from its start, as a stream.

    Iterating yields each prompt of the run (``offset``/``limit`` applied, ids checked for
    repeats) as ``(prompt, start, end, line)``: the byte offsets of its record and the record's
    first line for line-based files, ``(row, row + 1, 0)`` for Parquet, its place in caption
    order for COCO. Once the header or first record is read, :attr:`format` says how to read
    such spans again; :attr:`random_access` is False where spans cannot be read back from the
    source itself (COCO: ordered by id; compressed files)."""

    def __init__(self, source: PromptSource, base_dir: str | Path | None = None):
        self.source, self.base_dir = source, base_dir
        self.location = resolve_location(source.path, base_dir)
        fmt = source.format if source.format != "auto" else _format_from_extension(self.location)
        _check_options(source, fmt, self.location)
        self.compressed = _is_compressed(self.location)
        self.table = _Table(
            SourceFormat(self.location, fmt, source_name(source), self.location),
            prompt_column=source.prompt_column,
            id_column=source.id_column,
            detect_parti=source.format == "auto",
        )
        self.row_group_rows = 0  # Parquet: rows of its largest row group
        self.scanned = 0  # prompts read (those before the offset included)

    @property
    def format(self) -> SourceFormat:
        return self.table.format

    @property
    def random_access(self) -> bool:
        return not self.compressed and self.format.fmt != "coco"

    def __iter__(self) -> Iterator[Located]:
        offset, limit = self.source.offset, self.source.limit
        stop = None if limit is None else offset + limit
        ids = _RepeatCheck() if self.source.id_column else None
        n = 0
        for located in self._records():
            if ids is not None:
                ids.add(located[0].sample_id)
            if n >= offset:
                yield located
            n += 1
            if stop is not None and n >= stop:
                break
        self.scanned = n
        if ids is not None and (suspects := ids.repeated()):
            self._raise_repeat(suspects, n)
        if n == 0:
            raise PromptSourceError(
                f"{self.location}: no prompts (the file is empty or has only a header)"
            )
        if offset >= n:
            raise PromptSourceError(
                f"{self.location}: offset {offset} is past the end ({n} prompts)"
            )

    def _records(self) -> Iterator[Located]:
        fmt, location = self.format.fmt, self.location
        with source_errors(location):
            if fmt == "coco":
                prompts = _coco_prompts(_read_text(location), self.source, location)
                for n, prompt in enumerate(prompts):
                    yield prompt, n, n + 1, 0
                return
            if fmt == "parquet":
                yield from self._parquet()
                return
            with fsspec.open(location, "rb", compression="infer") as handle:
                chunks = _chunks(handle)
                first = next(chunks, b"")
                start = len(_BOM) if first.startswith(_BOM) else 0
                chunks = itertools.chain([first[start:]], chunks)
                yield from _line_records(chunks, start, self.table, row=0, line=1)

    def _parquet(self) -> Iterator[Located]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with fsspec.open(self.location, "rb", compression="infer") as handle:
            try:
                file = pq.ParquetFile(pa.BufferReader(handle.read()) if self.compressed else handle)
            except (pa.ArrowException, OSError) as error:
                raise PromptSourceError(
                    f"{self.location}: not a readable Parquet file: {error}"
                ) from None
            meta = file.metadata
            groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            self.row_group_rows = max(groups, default=0)
            self.table.resolve(file.schema_arrow.names)
            wanted = self.table.wanted()
            row = 0
            for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
                yield from _table_rows(self.table, batch.to_pydict(), wanted, row)
                row += batch.num_rows

    def _raise_repeat(self, suspects: set[int], scanned: int) -> None:
        """Find the first id seen twice (only ids whose hash repeats are kept) and name it."""
        rescan = SourceScan(self.source, self.base_dir)
        seen: dict[str, str] = {}
        for n, (prompt, *_) in enumerate(rescan._records()):
            if n >= scanned:
                break
            if _RepeatCheck.key(prompt.sample_id) in suspects:
                if prompt.sample_id in seen:
                    raise PromptSourceError(
                        f"{self.location}: duplicate id {prompt.sample_id!r} in column "
                        f"{self.format.id_column!r} at {seen[prompt.sample_id]} and {prompt.where}"
                    )
                seen[prompt.sample_id] = prompt.where


def read_span(sf: SourceFormat, start: int, end: int, row: int = 0, line: int = 1) -> list[Prompt]:
    """The prompts of the records in ``[start, end)`` of ``sf.location`` (bytes; Parquet: rows),
    the first of which has row ``row`` and starts on line ``line``."""
    with source_errors(sf.display):
        if sf.fmt == "parquet":
            return _parquet_rows(sf, start, end)
        fs, path = fsspec.core.url_to_fs(sf.location)
        data = fs.cat_file(path, start=start, end=end)
        return [located[0] for located in _line_records(iter([data]), start, _Table(sf), row, line)]


# -- reading ---------------------------------------------------------------------------------
@contextmanager
def source_errors(location: str) -> Iterator[None]:
    """Turn the storage's errors into :class:`PromptSourceError` naming the file."""
    try:
        yield
    except PromptSourceError:
        raise
    except FileNotFoundError:
        raise PromptSourceError(f"{location}: prompt file not found") from None
    except Exception as error:
        if isinstance(error, (OSError, ValueError)) or type(error).__module__ != "builtins":
            raise PromptSourceError(f"{location}: cannot read: {describe_error(error)}") from None
        raise


def _read_text(location: str) -> str:
    with fsspec.open(location, "rb", compression="infer") as handle:
        data = handle.read().removeprefix(_BOM)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise PromptSourceError(
            f"{location} line {line}: invalid UTF-8 ({error.reason}, byte offset {error.start})"
        ) from None


def _chunks(handle: BinaryIO) -> Iterator[bytes]:
    while chunk := handle.read(CHUNK_BYTES):
        yield chunk


def _lines(chunks: Iterable[bytes], offset: int) -> Iterator[tuple[int, bytes, int]]:
    """``(start, line, end)`` of each ``\\n``-terminated line (without the ``\\n``); the last
    line may lack it."""
    carry = b""
    for chunk in chunks:
        parts = (carry + chunk).split(b"\n")
        carry = parts.pop()
        for part in parts:
            end = offset + len(part) + 1
            yield offset, part, end
            offset = end
    if carry:
        yield offset, carry, offset + len(carry)


def _universal_lines(chunks: Iterable[bytes], offset: int) -> Iterator[tuple[int, bytes, int]]:
    """As :func:`_lines`, split at ``\\r\\n``, ``\\r`` or ``\\n`` as Python's universal newlines
    (what the csv module reads), each line with its terminator."""
    carry = b""
    for chunk in chunks:
        data, used = carry + chunk, 0
        for match in _UNIVERSAL_LINE.finditer(data):
            if match.end() == len(data) and data.endswith(b"\r"):
                break  # maybe the first half of a \r\n
            yield offset + used, match.group(), offset + match.end()
            used = match.end()
        carry, offset = data[used:], offset + used
    if carry:
        yield offset, carry, offset + len(carry)


def _decode(raw: bytes, location: str, line: int, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PromptSourceError(
            f"{location} line {line}: invalid UTF-8 ({error.reason}, byte offset "
            f"{offset + error.start})"
        ) from None


def _line_records(
    chunks: Iterable[bytes], offset: int, table: _Table, row: int, line: int
) -> Iterator[Located]:
    """The records of a line-based source (or of its copied prompts) in ``chunks``, which start
    at byte ``offset``, on line ``line`` and row ``row``."""
    fmt = table.format.fmt
    if fmt in ("csv", "tsv", "parti"):
        return _delimited_records(_universal_lines(chunks, offset), table, row, line)
    lines = _lines(chunks, offset)
    if fmt == "text":
        return _text_records(lines, table.format, row)
    if fmt == "jsonl":
        return _jsonl_records(lines, table, row)
    if fmt == COPIED:
        return _copied_records(lines)
    raise ValueError(f"no line records in format {fmt}")


# -- formats ---------------------------------------------------------------------------------
def _text_records(
    lines: Iterable[tuple[int, bytes, int]], sf: SourceFormat, row: int
) -> Iterator[Located]:
    name, location = sf.name, sf.display
    for start, raw, end in lines:
        text = _decode(raw, location, row + 1, start)
        if text.endswith("\r"):
            text = text[:-1]
        if text.strip():
            where = f"line {row + 1}"
            yield make_prompt(sample_id_for(name, row), text, {}, row, where), start, end, row + 1
        row += 1


def _jsonl_records(
    lines: Iterable[tuple[int, bytes, int]], table: _Table, row: int
) -> Iterator[Located]:
    location = table.format.display
    for start, raw, end in lines:
        text = _decode(raw, location, row + 1, start).removesuffix("\r")
        if text.strip():
            try:
                values = json.loads(text)
            except json.JSONDecodeError as error:
                raise PromptSourceError(
                    f"{location} line {row + 1}: invalid JSON: {error.msg} (column {error.colno})"
                ) from None
            if not isinstance(values, dict):
                raise PromptSourceError(
                    f"{location} line {row + 1}: expected a JSON object, got "
                    f"{type(values).__name__}"
                )
            table.resolve(list(values))
            yield table.prompt(row, f"line {row + 1}", values), start, end, row + 1
        row += 1


class _Feed:
    """Decoded lines for the csv reader, remembering how far (bytes, lines) it has read."""

    def __init__(
        self, lines: Iterator[tuple[int, bytes, int]], location: str, start: int, line: int
    ):
        self.lines, self.location = lines, location
        self.end, self.line = start, line - 1

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> str:
        start, raw, self.end = next(self.lines)
        self.line += 1
        return _decode(raw, self.location, self.line, start)


def _delimited_records(
    lines: Iterator[tuple[int, bytes, int]], table: _Table, row: int, line: int
) -> Iterator[Located]:
    first = next(lines, None)
    if first is None:
        return
    lines = itertools.chain([first], lines)
    tab = table.format.fmt in ("tsv", "parti")
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tab else {}
    feed = _Feed(lines, table.format.display, first[0], line)
    reader = csv.reader(feed, **options)
    try:
        while True:
            start, record_line = feed.end, feed.line + 1
            fields = next(reader, None)
            if fields is None:
                return
            blank = not fields or (len(fields) == 1 and not fields[0].strip())
            if not table.format.columns:
                if not blank:
                    table.resolve(_header(fields, table.format.display, record_line))
                continue
            if not blank:
                columns = table.format.columns
                if len(fields) != len(columns):
                    raise PromptSourceError(
                        f"{table.format.display} line {record_line}: {len(fields)} fields, the "
                        f"header has {len(columns)}"
                    )
                values = dict(zip(columns, fields, strict=True))
                yield table.prompt(row, f"line {record_line}", values), start, feed.end, record_line
            row += 1
    except csv.Error as error:
        raise PromptSourceError(f"{table.format.display} line {feed.line}: {error}") from None


def _copied_records(lines: Iterable[tuple[int, bytes, int]]) -> Iterator[Located]:
    for start, raw, end in lines:
        sample_id, text, metadata, problem, row, where = json.loads(raw)
        yield Prompt(sample_id, text, metadata, row, problem, where), start, end, 0


def copied_line(prompt: Prompt) -> bytes:
    """One prompt as a line of the copied-prompts format (read back by :func:`read_span`)."""
    fields = [prompt.sample_id, prompt.prompt, prompt.metadata, prompt.problem, prompt.row]
    return json.dumps([*fields, prompt.where]).encode() + b"\n"


def _table_rows(
    table: _Table, data: dict[str, list], wanted: list[str], row: int
) -> Iterator[Located]:
    for n in range(len(data[wanted[0]]) if wanted else 0):
        values = {column: data[column][n] for column in wanted}
        yield table.prompt(row + n, f"row {row + n}", values), row + n, row + n + 1, 0


_parquet_meta: dict[str, Any] = {}  # location -> (file size, metadata): one footer read per file


def _parquet_rows(sf: SourceFormat, start: int, end: int) -> list[Prompt]:
    """Rows ``[start, end)`` of a Parquet source: only the row groups that hold them are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(sf.location)
    with fs.open(path, "rb") as handle:
        cached = _parquet_meta.get(sf.location)
        size = fs.size(path)
        meta = cached[1] if cached and cached[0] == size else None
        try:
            file = pq.ParquetFile(handle, metadata=meta)
        except (pa.ArrowException, OSError) as error:
            raise PromptSourceError(f"{sf.display}: not a readable Parquet file: {error}") from None
        _parquet_meta[sf.location] = (size, file.metadata)
        groups, first, at = [], None, 0
        for i in range(file.metadata.num_row_groups):
            rows = file.metadata.row_group(i).num_rows
            if at < end and at + rows > start:
                groups.append(i)
                first = at if first is None else first
            at += rows
        table = _Table(sf)
        wanted = table.wanted()
        if not groups:
            return []
        data = file.read_row_groups(groups, columns=wanted).slice(start - first, end - start)
        return [located[0] for located in _table_rows(table, data.to_pydict(), wanted, start)]


class _Table:
    """The columns a tabular source's prompts come from, fixed by its header (CSV/TSV), its
    first record (JSONL) or its schema (Parquet)."""

    def __init__(
        self,
        sf: SourceFormat,
        prompt_column: str | None = None,
        id_column: str | None = None,
        detect_parti: bool = False,
    ):
        self.format = sf
        self.wanted_prompt = prompt_column if sf.prompt_column is None else sf.prompt_column
        self.wanted_id = id_column if sf.prompt_column is None else sf.id_column
        self.detect_parti = detect_parti
        self.resolved = sf.prompt_column is not None

    def resolve(self, columns: list[str]) -> None:
        """Choose the prompt, id and metadata columns (once) from the source's columns."""
        if self.resolved:
            return
        self.resolved = True
        sf, location = self.format, self.format.display
        fmt = sf.fmt
        if fmt == "tsv" and self.detect_parti and {"Prompt", "Category"} <= set(columns):
            fmt = "parti"
        defaults = ("Prompt",) if fmt == "parti" else DEFAULT_PROMPT_COLUMNS
        prompt_column = _pick_column(self.wanted_prompt, defaults, columns, "prompt", location)
        id_column = self.wanted_id and _pick_column(self.wanted_id, (), columns, "id", location)
        if fmt == "parti" and "Category" not in columns:
            raise PromptSourceError(f"{location}: PartiPrompts layout needs a Category column")
        metadata = [c for c in PARTI_METADATA_COLUMNS if c in columns] if fmt == "parti" else []
        self.format = dataclasses.replace(
            sf,
            fmt=fmt,
            columns=tuple(columns) if fmt in ("csv", "tsv", "parti") else (),
            prompt_column=prompt_column,
            id_column=id_column or None,
            metadata_columns=tuple(metadata),
        )

    def wanted(self) -> list[str]:
        sf = self.format
        return list(dict.fromkeys(c for c in (sf.prompt_column, sf.id_column) if c))

    def prompt(self, row: int, where: str, values: dict[str, Any]) -> Prompt:
        sf = self.format
        location, prompt_column, id_column = sf.display, sf.prompt_column, sf.id_column
        for column in (prompt_column, id_column) if id_column else (prompt_column,):
            if column not in values:
                raise PromptSourceError(
                    f"{location} {where}: no {column!r} field; fields: {list(values)}"
                )
        if id_column:
            sample_id = "" if values[id_column] is None else str(values[id_column]).strip()
            if not sample_id:
                raise PromptSourceError(f"{location} {where}: empty id in column {id_column!r}")
        else:
            sample_id = sample_id_for(sf.name, row)
        metadata = {column: str(values[column] or "") for column in sf.metadata_columns}
        return make_prompt(sample_id, values[prompt_column], metadata, row, where)


class _RepeatCheck:
    """Spots ids that repeat among millions without keeping them: 8-byte hashes, sorted at the
    end (a repeated hash is then checked on the ids themselves)."""

    def __init__(self) -> None:
        self.keys = array("Q")

    @staticmethod
    def key(sample_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "big")

    def add(self, sample_id: str) -> None:
        self.keys.append(self.key(sample_id))

    def repeated(self) -> set[int]:
        import numpy as np

        keys = np.sort(np.frombuffer(self.keys, dtype=np.uint64))
        return set(keys[1:][keys[1:] == keys[:-1]].tolist())


# -- shared helpers ----------------------------------------------------------------------------
def _is_compressed(location: str) -> bool:
    return urlsplit(location).path.lower().endswith(_COMPRESSION_SUFFIXES)


def _format_from_extension(location: str) -> str:
    suffix = Path(urlsplit(location).path).name.lower()
    for compression in _COMPRESSION_SUFFIXES:
        suffix = suffix.removesuffix(compression)
    fmt = _EXTENSION_FORMATS.get(Path(suffix).suffix)
    if fmt is None:
        known = ", ".join(sorted(_EXTENSION_FORMATS))
        raise PromptSourceError(
            f"{location}: cannot tell the format from the extension (known: {known}); set format"
        )
    return fmt


def _check_options(source: PromptSource, fmt: str, location: str) -> None:
    if fmt not in _TABULAR_FORMATS and (source.prompt_column or source.id_column):
        raise PromptSourceError(f"{location}: prompt_column/id_column do not apply to {fmt}")
    if fmt != "coco" and source.captions != "first":
        raise PromptSourceError(f"{location}: captions='all' applies only to coco, not {fmt}")


def make_prompt(
    sample_id: str, value: Any, metadata: dict[str, str], row: int, where: str
) -> Prompt:
    """A prompt from a source's value, stripped; with ``problem`` set when it is not a string,
    empty or holds a NUL byte."""
    problem = None
    if value is None:
        value = ""
    if not isinstance(value, str):
        problem, value = f"prompt is not a string but {type(value).__name__}", str(value)
    value = value.strip()
    if problem is None and not value:
        problem = "empty prompt"
    elif problem is None and "\x00" in value:
        problem = "prompt contains a NUL byte"
    return Prompt(sample_id, value, metadata, row, problem, where)


def _header(fields: list[str], location: str, line: int) -> list[str]:
    columns = [column.strip() for column in fields]
    duplicates = sorted({column for column in columns if columns.count(column) > 1})
    if duplicates:
        raise PromptSourceError(f"{location} line {line}: duplicate columns {duplicates}")
    return columns


def _pick_column(
    wanted: str | None, candidates: Iterable[str], columns: list[str], what: str, location: str
) -> str:
    if wanted is None:
        wanted = next((column for column in candidates if column in columns), None)
    if wanted is None or wanted not in columns:
        looked_for = repr(wanted) if wanted else f"(looked for {', '.join(candidates)})"
        raise PromptSourceError(
            f"{location}: no {what} column {looked_for}; available columns: {columns}"
        )
    return wanted


def _coco_prompts(text: str, source: PromptSource, location: str) -> list[Prompt]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptSourceError(
            f"{location} line {error.lineno}: invalid JSON: {error.msg} (column {error.colno})"
        ) from None
    annotations = document.get("annotations") if isinstance(document, dict) else None
    if not isinstance(annotations, list):
        raise PromptSourceError(f"{location}: not a COCO captions file (no 'annotations' list)")
    seen: dict[str, int] = {}
    entries = []
    for index, annotation in enumerate(annotations):
        if not isinstance(annotation, dict) or not {"id", "image_id", "caption"} <= set(annotation):
            raise PromptSourceError(
                f"{location} annotations[{index}]: needs 'id', 'image_id' and 'caption'"
            )
        caption_id = str(annotation["id"])
        if caption_id in seen:
            raise PromptSourceError(
                f"{location}: duplicate caption id {caption_id} at annotations[{seen[caption_id]}]"
                f" and annotations[{index}]"
            )
        seen[caption_id] = index
        key = (_order_key(annotation["image_id"]), _order_key(annotation["id"]))
        entries.append((key, index, annotation))
    entries.sort(key=lambda entry: entry[0])
    prompts = []
    previous_image = None
    for key, index, annotation in entries:
        if source.captions == "first" and key[0] == previous_image:
            continue
        previous_image = key[0]
        metadata = {"image_id": str(annotation["image_id"])}
        prompts.append(
            make_prompt(
                str(annotation["id"]),
                annotation["caption"],
                metadata,
                index,
                f"annotations[{index}]",
            )
        )
    return prompts


def _order_key(value: Any) -> tuple[int, Any]:
    """Numbers sort numerically and before strings, so mixed id types still sort."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return (0, value) if is_number else (1, str(value))


__all__ = [
    "Located",
    "Prompt",
    "PromptSource",
    "PromptSourceError",
    "SourceFormat",
    "SourceScan",
    "copied_line",
    "read_prompts",
    "read_span",
    "source_errors",
    "resolve_location",
    "sample_id_for",
    "source_identity",
    "source_name",
]
