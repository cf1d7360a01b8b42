"""WebDataset shard files (``output_format: webdataset``): one uncompressed tar per piece,
``variants/<variant>/<piece>.tar``, the files of each image side by side::

    <key>.png    the image (absent on failed and invalid rows)
    <key>.json   every other column of its row: sample_id, image_index, prompt,
                 prompt_metadata and settings (JSON objects), seed, ..., status, error, metrics

in row order, so that ``webdataset.WebDataset(url)`` yields one sample per image (``__key__``,
``png``, ``json``). ``<key>`` is :func:`sample_key`: the sample id percent-encoded (letters,
digits, ``-``, ``_`` and ``%XX`` escapes: WebDataset splits a name at its first ``.``, and no
``/``), then ``_`` and the image index. Reading a tar back gives the rows of the Parquet
format (:data:`SCHEMA`), the JSON objects written back as the writer's JSON strings.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from dataclasses import asdict
from typing import IO, Any
from urllib.parse import quote

import pyarrow as pa

from catbatch.job.writer import SCHEMA, Row, ShardFormat

_JSON_COLUMNS = ("prompt_metadata", "settings")  # JSON strings in Parquet, objects here
_MAX_KEY = 160  # characters of the encoded sample id kept in a key (then a hash)


def sample_key(sample_id: str, image_index: int) -> str:
    """The tar members' common name of an image: injective in (sample id, image index)."""
    safe = quote(sample_id, safe="").replace(".", "%2E").replace("~", "%7E")
    if len(safe) > _MAX_KEY:  # file systems' 255-byte names, if the tar is unpacked
        digest = hashlib.sha256(sample_id.encode()).hexdigest()[:16]
        safe = f"{safe[: _MAX_KEY - 17]}~{digest}"
    return f"{safe}_{image_index}"


def _member(name: str, data: bytes, mtime: int) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    return info, io.BytesIO(data)


def encode_tar(rows: list[Row]) -> bytes:
    """The tar of ``rows``: per row its PNG (when it has one), then its JSON."""
    buf = io.BytesIO()
    mtime = int(time.time())
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for row in rows:
            values = asdict(row)
            png = values.pop("png")
            key = sample_key(row.sample_id, row.image_index)
            if png is not None:
                tar.addfile(*_member(f"{key}.png", png, mtime))
            meta = json.dumps(values, sort_keys=True, ensure_ascii=False).encode()
            tar.addfile(*_member(f"{key}.json", meta, mtime))
    return buf.getvalue()


def _split(name: str) -> tuple[str, str]:
    key, _, ext = name.partition(".")
    return key, ext


def read_tar(f: IO[bytes], columns: list[str] | None = None) -> pa.Table:
    """The rows of a tar as :data:`SCHEMA`'s columns (``columns`` only; without ``image`` the
    PNG members are skipped, not read). Raises ``ValueError`` on a tar that is cut short or
    holds something else."""
    want_image = columns is None or "image" in columns
    records: list[dict[str, Any]] = []
    images: dict[str, bytes] = {}
    keys: list[str] = []
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _split(info.name)
                if ext == "png" and want_image:
                    images[key] = _read_member(tar, info)
                elif ext == "json":
                    record = json.loads(_read_member(tar, info))
                    if not isinstance(record, dict):
                        raise ValueError(f"{info.name} is not a JSON object")
                    for col in _JSON_COLUMNS:
                        if not isinstance(record.get(col), str):
                            record[col] = json.dumps(record.get(col) or {}, sort_keys=True)
                    records.append(record)
                    keys.append(key)
    except (tarfile.TarError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"unreadable tar: {e}") from None
    for key, record in zip(keys, records, strict=True):
        png = images.get(key)
        record["image"] = None if png is None else {"bytes": png, "path": None}
    table = pa.Table.from_pylist(records, schema=SCHEMA)
    return table if columns is None else table.select(columns)


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    member = tar.extractfile(info)
    data = member.read() if member is not None else b""
    if len(data) != info.size:
        raise ValueError(f"{info.name} is cut short ({len(data)} of {info.size} bytes)")
    return data


def count_json(data: bytes) -> int:
    """The rows (JSON members) of a tar's bytes; ``ValueError`` if it cannot be read through."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            names = [info.name for info in tar if info.isfile()]
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"its tar file is unreadable ({e})") from None
    return sum(_split(n)[1] == "json" for n in names)


class WebDatasetFormat(ShardFormat):
    """A tar per piece, readable by the ``webdataset`` package (and ``datasets``)."""

    name, suffix, label = "webdataset", ".tar", "tar file"

    def encode(self, rows: list[Row]) -> bytes:
        return encode_tar(rows)

    def read(self, f: IO[bytes], columns: list[str] | None = None) -> pa.Table:
        return read_tar(f, columns)

    def columns(self, f: IO[bytes]) -> set[str]:
        return set(SCHEMA.names)  # every row's JSON holds them all

    def count_rows(self, data: bytes) -> int:
        return count_json(data)


WEBDATASET = WebDatasetFormat()

__all__ = ["WEBDATASET", "WebDatasetFormat", "count_json", "encode_tar", "read_tar", "sample_key"]
