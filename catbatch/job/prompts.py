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
never change ids. A prompt that is empty/whitespace-only or holds a NUL byte is not an error: it
comes back with ``problem`` set (and ``where`` it is), and its rows are recorded ``invalid``.
Anything else wrong raises :class:`PromptSourceError` naming the file and, where possible, the
line or row.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic

Format = Literal["auto", "parti", "coco", "csv", "tsv", "jsonl", "parquet", "text"]
DEFAULT_PROMPT_COLUMNS = ("prompt", "Prompt", "caption", "text")
PARTI_METADATA_COLUMNS = ("Category", "Challenge")
SAMPLE_ID_HEX_CHARS = 16
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
    location = resolve_location(source.path, base_dir)
    fmt = source.format if source.format != "auto" else _format_from_extension(location)
    _check_options(source, fmt, location)
    prompts = _parse(_read_bytes(location), fmt, source, location)
    if not prompts:
        raise PromptSourceError(f"{location}: no prompts (the file is empty or has only a header)")
    if source.offset >= len(prompts):
        raise PromptSourceError(
            f"{location}: offset {source.offset} is past the end ({len(prompts)} prompts)"
        )
    end = None if source.limit is None else source.offset + source.limit
    return prompts[source.offset : end]


def _parse(data: bytes, fmt: str, source: PromptSource, location: str) -> list[Prompt]:
    if fmt == "parquet":
        return _tabular_prompts(*_parquet_records(data, location), fmt, source, location)
    text = _decode(data, location)
    if fmt == "coco":
        return _coco_prompts(text, source, location)
    if fmt == "text":
        return _text_prompts(text, source_name(source))
    if fmt == "jsonl":
        return _tabular_prompts(*_jsonl_records(text, location), fmt, source, location)
    columns, records = _delimited_records(text, fmt, location)
    if fmt == "tsv" and source.format == "auto" and {"Prompt", "Category"} <= set(columns):
        fmt = "parti"
    return _tabular_prompts(columns, records, fmt, source, location)


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


def _read_bytes(location: str) -> bytes:
    try:
        with fsspec.open(location, "rb", compression="infer") as handle:
            return handle.read()
    except FileNotFoundError:
        raise PromptSourceError(f"{location}: prompt file not found") from None
    except (OSError, ValueError) as error:
        raise PromptSourceError(f"{location}: cannot read: {error}") from error


def _decode(data: bytes, location: str) -> str:
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise PromptSourceError(
            f"{location} line {line}: invalid UTF-8 ({error.reason}, byte offset {error.start})"
        ) from None


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


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


def _text_prompts(text: str, name: str) -> list[Prompt]:
    return [
        make_prompt(sample_id_for(name, row), line, {}, row, f"line {row + 1}")
        for row, line in enumerate(_lines(text))
        if line.strip()
    ]


Record = tuple[int, str, dict[str, Any]]  # (row, "line N"/"row N", values)


def _delimited_records(text: str, fmt: str, location: str) -> tuple[list[str], list[Record]]:
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt in ("tsv", "parti") else {}
    reader = csv.reader(io.StringIO(text, newline=""), **options)
    columns: list[str] | None = None
    records: list[Record] = []
    row, start = -1, 1
    try:
        for fields in reader:
            line, start = start, reader.line_num + 1
            blank = not fields or (len(fields) == 1 and not fields[0].strip())
            if columns is None:
                columns = None if blank else _header(fields, location, line)
                continue
            row += 1
            if blank:
                continue
            if len(fields) != len(columns):
                raise PromptSourceError(
                    f"{location} line {line}: {len(fields)} fields, the header has {len(columns)}"
                )
            records.append((row, f"line {line}", dict(zip(columns, fields, strict=True))))
    except csv.Error as error:
        raise PromptSourceError(f"{location} line {reader.line_num}: {error}") from None
    return columns or [], records


def _header(fields: list[str], location: str, line: int) -> list[str]:
    columns = [column.strip() for column in fields]
    duplicates = sorted({column for column in columns if columns.count(column) > 1})
    if duplicates:
        raise PromptSourceError(f"{location} line {line}: duplicate columns {duplicates}")
    return columns


def _jsonl_records(text: str, location: str) -> tuple[list[str], list[Record]]:
    records: list[Record] = []
    for row, line in enumerate(_lines(text)):
        if not line.strip():
            continue
        try:
            values = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptSourceError(
                f"{location} line {row + 1}: invalid JSON: {error.msg} (column {error.colno})"
            ) from None
        if not isinstance(values, dict):
            raise PromptSourceError(
                f"{location} line {row + 1}: expected a JSON object, got {type(values).__name__}"
            )
        records.append((row, f"line {row + 1}", values))
    return (list(records[0][2]) if records else []), records


def _parquet_records(data: bytes, location: str) -> tuple[list[str], list[Record]]:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as error:
        raise PromptSourceError(f"{location}: not a readable Parquet file: {error}") from None
    rows = enumerate(table.to_pylist())
    return table.column_names, [(row, f"row {row}", values) for row, values in rows]


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


def _tabular_prompts(
    columns: list[str], records: list[Record], fmt: str, source: PromptSource, location: str
) -> list[Prompt]:
    if not columns:
        return []
    defaults = ("Prompt",) if fmt == "parti" else DEFAULT_PROMPT_COLUMNS
    prompt_column = _pick_column(source.prompt_column, defaults, columns, "prompt", location)
    id_column = source.id_column and _pick_column(source.id_column, (), columns, "id", location)
    metadata_columns = [c for c in PARTI_METADATA_COLUMNS if c in columns] if fmt == "parti" else []
    if fmt == "parti" and "Category" not in columns:
        raise PromptSourceError(f"{location}: PartiPrompts layout needs a Category column")
    name = source_name(source)
    seen: dict[str, str] = {}
    prompts = []
    for row, where, values in records:
        for column in (prompt_column, id_column) if id_column else (prompt_column,):
            if column not in values:
                raise PromptSourceError(
                    f"{location} {where}: no {column!r} field; fields: {list(values)}"
                )
        sample_id = sample_id_for(name, row)
        if id_column:
            sample_id = "" if values[id_column] is None else str(values[id_column]).strip()
            if not sample_id:
                raise PromptSourceError(f"{location} {where}: empty id in column {id_column!r}")
            if sample_id in seen:
                raise PromptSourceError(
                    f"{location}: duplicate id {sample_id!r} in column {id_column!r} "
                    f"at {seen[sample_id]} and {where}"
                )
            seen[sample_id] = where
        metadata = {column: str(values[column] or "") for column in metadata_columns}
        prompts.append(make_prompt(sample_id, values[prompt_column], metadata, row, where))
    return prompts


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
