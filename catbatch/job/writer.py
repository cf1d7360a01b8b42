"""Shard files: the row schema, Hugging Face ``datasets`` metadata, the stats file, and the
shard formats (``output_format`` of the manifest).

A shard piece is one file per variant, ``variants/<variant>/<piece><suffix>``, in one of two
formats (:class:`ShardFormat`): Parquet (``.parquet``, one row per image, :data:`SCHEMA`) or
WebDataset (``.tar``: ``<key>.png`` and ``<key>.json`` per image, :mod:`catbatch.job.tarshards`).
Either is written whole, atomically (:meth:`OutputLayout.write_bytes`), then its stats file,
the commit marker, which records the file's size and sha256 (``parquet_bytes`` and
``parquet_sha256``, whatever the format: the names predate WebDataset output).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from catbatch.job.layout import OutputLayout

SCHEMA_VERSION = 1


def _described(name: str, type_: pa.DataType, description: str) -> pa.Field:
    return pa.field(name, type_, metadata={"description": description})


SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("image_index", pa.int32()),
        ("prompt", pa.string()),
        ("prompt_metadata", pa.string()),  # JSON object
        ("seed", pa.int64()),
        ("variant", pa.string()),
        ("settings", pa.string()),  # JSON: model, sampling and pruning settings
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("batch_id", pa.string()),
        ("batch_size", pa.int32()),
        ("latency_s", pa.float64()),
        ("device", pa.string()),
        ("status", pa.string()),  # "ok", "failed", or "invalid" (a prompt that cannot be made)
        ("error", pa.string()),
    ]
)
_BASE_COLUMNS = {f.name for f in SCHEMA}
SCHEMA = pa.schema(
    [
        *SCHEMA,
        # per-sample metrics (catbatch.metrics: rows, clipscore); empty on failed rows
        _described(
            "macs_paper",
            pa.float64(),
            "MACs per image, CFG included: transformer linear "
            "layers + patch embedding over every step it ran (the CAT paper's count)",
        ),
        _described("macs_total", pa.float64(), "as macs_paper, plus attention (QK^T, PV)"),
        _described("t_text_s", pa.float64(), "text encoding: the batch's seconds / batch size"),
        _described(
            "t_denoise_s", pa.float64(), "denoising: pipeline call minus text and VAE, per image"
        ),
        _described("t_vae_s", pa.float64(), "VAE decoding seconds per image"),
        _described("t_score_s", pa.float64(), "CLIP scoring seconds per image"),
        _described("warmup", pa.bool_(), "first batch of an actor: left out of aggregates"),
        _described("gpu_seconds", pa.float64(), "latency_s x GPUs held by the actor (1 on CPU)"),
        _described("cost_usd", pa.float64(), "gpu_seconds x price per GPU-hour / 3600"),
        _described(
            "clip_score",
            pa.float64(),
            "100 * max(cosine(image, text), 0), open_clip, prompt truncated to the model's context",
        ),
        _described("clip_model", pa.string(), "open_clip model/pretrained tag of clip_score"),
        _described(
            "prompt_truncated",
            pa.bool_(),
            "prompt longer than a text encoder's limit (CLIP 77 tokens, T5 max_sequence_length)",
        ),
        # metrics.adherence (catbatch.metrics.adherence); empty when off
        _described(
            "adherence_facts_met", pa.int32(), "stated shape/colour/position facts that hold"
        ),
        _described("adherence_facts_stated", pa.int32(), "shape/colour/position facts stated"),
        _described(
            "adherence_unstated_shapes",
            pa.int32(),
            "shapes drawn that the caption does not state (each: as many failed facts)",
        ),
        _described("adherence_background", pa.bool_(), "the stated background colour holds"),
    ]
)

METRIC_COLUMNS = tuple(f.name for f in SCHEMA if f.name not in _BASE_COLUMNS)

_HF_TYPES = {
    pa.string(): "string",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.float64(): "float64",
    pa.bool_(): "bool",
}


def _hf_features() -> dict[str, Any]:
    """The ``huggingface`` schema metadata that makes ``datasets`` read ``image`` as an Image."""
    feats: dict[str, Any] = {}
    for f in SCHEMA:
        if f.name == "image":
            feats[f.name] = {"_type": "Image"}
        else:
            feats[f.name] = {"dtype": _HF_TYPES[f.type], "_type": "Value"}
    return {"info": {"features": feats}}


SCHEMA = SCHEMA.with_metadata(
    {
        "catbatch.schema_version": str(SCHEMA_VERSION),
        "huggingface": json.dumps(_hf_features()),
    }
)


@dataclass
class Row:
    """One generated image, or one that failed (``failed``) or cannot be made (``invalid``)."""

    sample_id: str
    image_index: int
    prompt: str
    prompt_metadata: dict[str, str]
    seed: int
    variant: str
    settings: dict[str, Any]
    png: bytes | None
    width: int
    height: int
    batch_id: str
    batch_size: int
    latency_s: float
    device: str
    status: str = "ok"
    error: str | None = None
    macs_paper: float | None = None
    macs_total: float | None = None
    t_text_s: float | None = None
    t_denoise_s: float | None = None
    t_vae_s: float | None = None
    t_score_s: float | None = None
    warmup: bool = False
    gpu_seconds: float | None = None
    cost_usd: float | None = None
    clip_score: float | None = None
    clip_model: str | None = None
    prompt_truncated: bool = False
    adherence_facts_met: int | None = None
    adherence_facts_stated: int | None = None
    adherence_unstated_shapes: int | None = None
    adherence_background: bool | None = None


@dataclass
class ShardStats:
    """The commit marker of a shard, written after its file is complete (``parquet_bytes``,
    ``parquet_sha256``: the file's size and sha256 in either format)."""

    variant: str
    shard: str
    content_hash: str
    rows: int
    images_ok: int
    images_failed: int  # generation failed: --retry-failed makes them again
    images_invalid: int  # the prompt cannot be generated (empty, NUL byte): never retried
    parquet_bytes: int
    parquet_sha256: str
    seconds: float
    device: str
    schema_version: int = SCHEMA_VERSION
    written_at: float = field(default_factory=time.time)
    started_at: float | None = None  # wall time the task started on its worker
    extra: dict[str, Any] = field(default_factory=dict)


def rows_to_table(rows: list[Row]) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in SCHEMA}
    for r in rows:
        d = asdict(r)
        png = d.pop("png")
        d["prompt_metadata"] = json.dumps(d["prompt_metadata"], sort_keys=True)
        d["settings"] = json.dumps(d["settings"], sort_keys=True)
        d["image"] = None if png is None else {"bytes": png, "path": None}
        for k in cols:
            cols[k].append(d[k])
    return pa.Table.from_pydict(cols, schema=SCHEMA)


class ShardFormat:
    """How a shard's rows are stored: the file's suffix, its bytes, and reading them back.

    Every reader (resume, ``status``, ``report``, ``open_output``, the damaged-shard checks)
    finds a piece's file by :meth:`path` and reads it by :meth:`read_table`."""

    name = ""  # the manifest's output_format
    suffix = ""  # of the shard files
    label = ""  # what a message calls the file

    def path(self, layout: OutputLayout, variant: str, shard: str) -> str:
        return layout.path("variants", variant, f"{shard}{self.suffix}")

    def encode(self, rows: list[Row]) -> bytes:
        """The whole file holding ``rows``."""
        raise NotImplementedError

    def read(self, f: IO[bytes], columns: list[str] | None = None) -> pa.Table:
        """The rows of an open file as a table of :data:`SCHEMA`'s columns (``columns`` only:
        without ``image``, no image bytes are read where the format allows)."""
        raise NotImplementedError

    def columns(self, f: IO[bytes]) -> set[str]:
        """The columns the file holds."""
        raise NotImplementedError

    def count_rows(self, data: bytes) -> int:
        """The rows the file's bytes hold; raises ``ValueError`` naming what is unreadable."""
        raise NotImplementedError

    def read_table(
        self, layout: OutputLayout, path: str, columns: list[str] | None = None
    ) -> pa.Table:
        """:meth:`read` of the file at ``path`` (storage errors retried)."""

        def read() -> pa.Table:
            with layout.fs.open(path, "rb") as f:
                return self.read(f, columns)

        return layout.retrying(f"reading {layout.display(path)}", read)

    def read_columns(self, layout: OutputLayout, path: str) -> set[str]:
        def read() -> set[str]:
            with layout.fs.open(path, "rb") as f:
                return self.columns(f)

        return layout.retrying(f"reading the schema of {layout.display(path)}", read)


class ParquetFormat(ShardFormat):
    """One Parquet file per piece (zstd), with the ``datasets`` features metadata."""

    name, suffix, label = "parquet", ".parquet", "Parquet file"

    def encode(self, rows: list[Row]) -> bytes:
        buf = io.BytesIO()
        pq.write_table(rows_to_table(rows), buf, compression="zstd")
        return buf.getvalue()

    def read(self, f: IO[bytes], columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(f, columns=columns)

    def columns(self, f: IO[bytes]) -> set[str]:
        return set(pq.read_schema(f).names)

    def count_rows(self, data: bytes) -> int:
        try:
            return pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"its Parquet footer is unreadable ({e})") from None


PARQUET = ParquetFormat()
OUTPUT_FORMATS = ("parquet", "webdataset")


def shard_format(name: str | None = "parquet") -> ShardFormat:
    """The format of a manifest's ``output_format`` (None: Parquet, as before the field)."""
    if name in (None, "parquet"):
        return PARQUET
    if name == "webdataset":
        from catbatch.job.tarshards import WEBDATASET

        return WEBDATASET
    raise ValueError(f"unknown output format {name!r}; formats: {', '.join(OUTPUT_FORMATS)}")


def record_format(record: dict[str, Any] | None) -> ShardFormat:
    """The shard format of a run from its run record (runs made before ``output_format``
    existed: Parquet)."""
    manifest = (record or {}).get("manifest") or {}
    return shard_format(manifest.get("output_format") if isinstance(manifest, dict) else None)


def write_shard(
    layout: OutputLayout,
    variant: str,
    shard: str,
    content_hash: str,
    rows: list[Row],
    seconds: float,
    device: str,
    extra: dict[str, Any] | None = None,
    started_at: float | None = None,
    before_commit: Callable[[], None] | None = None,
    fmt: ShardFormat = PARQUET,
) -> ShardStats:
    """Write the shard's file in format ``fmt``, then its stats file (the commit marker).

    ``before_commit`` runs right before the stats file is written and stops the commit by
    raising (the fence of :func:`catbatch.job.lease.check_generation`)."""
    data = fmt.encode(rows)
    layout.write_bytes(fmt.path(layout, variant, shard), data)
    ok = sum(r.status == "ok" for r in rows)
    invalid = sum(r.status == "invalid" for r in rows)
    stats = ShardStats(
        variant=variant,
        shard=shard,
        content_hash=content_hash,
        rows=len(rows),
        images_ok=ok,
        images_failed=len(rows) - ok - invalid,
        images_invalid=invalid,
        parquet_bytes=len(data),
        parquet_sha256=hashlib.sha256(data).hexdigest(),
        seconds=seconds,
        device=device,
        extra=extra or {},
        started_at=started_at,
    )
    if before_commit is not None:
        before_commit()
    layout.write_json(layout.shard_stats(variant, shard), asdict(stats))
    return stats
