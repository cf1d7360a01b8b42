"""Reading a run's output for a report: the run record, committed shards and their rows.

Only committed shards (those with a ``.stats.json``) are read, in the run's shard format
(Parquet or WebDataset tars, from the run record). Metric columns are read without the image
column; images are read one shard at a time when fidelity needs them. A committed
shard that cannot be read (a truncated or missing file) is skipped and named in
``VariantData.unreadable``; storage that stays unreachable still raises.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from catbatch.job.layout import OutputLayout, StorageError
from catbatch.job.writer import METRIC_COLUMNS, PARQUET, SCHEMA, ShardFormat, record_format

# Columns of the per-sample rows (all but the image); older outputs may lack the metric ones.
BASE_COLUMNS = tuple(f.name for f in SCHEMA if f.name not in METRIC_COLUMNS and f.name != "image")

Key = tuple[str, int]  # (sample_id, image_index)

log = logging.getLogger(__name__)


@dataclass
class VariantData:
    """The committed rows (without images) of one variant and its shards' stats."""

    name: str
    rows: list[dict[str, Any]]
    stats: dict[str, dict[str, Any]]  # shard name -> stats file content
    key_shard: dict[Key, str]  # where each row lives
    columns: set[str]
    uncommitted: list[str] = field(default_factory=list)  # shard files without stats
    unreadable: dict[str, str] = field(default_factory=dict)  # committed, skipped: shard -> why
    planned_settings: dict[str, Any] | None = None  # from the run record, for rowless variants

    @property
    def settings(self) -> dict[str, Any]:
        """The settings of the first row (all rows of a variant share them), else the run
        record's sampling settings of the variant."""
        for r in self.rows:
            if r.get("settings"):
                return json.loads(r["settings"])
        return dict(self.planned_settings or {})


@dataclass
class RunData:
    layout: OutputLayout
    record: dict[str, Any] | None
    variants: dict[str, VariantData]
    fmt: ShardFormat = PARQUET  # of the shard files

    def shard_path(self, variant: str, shard: str) -> str:
        return self.fmt.path(self.layout, variant, shard)


def variant_names(layout: OutputLayout, record: dict[str, Any] | None) -> list[str]:
    """The run record's variants in order, then any other folder under ``variants/``."""
    names = list((record or {}).get("variants") or [])
    for n in layout.list_names("variants"):
        if n not in names and not n.startswith("."):
            names.append(n)
    return names


def load_variant(layout: OutputLayout, name: str, fmt: ShardFormat = PARQUET) -> VariantData:
    names = layout.list_names("variants", name)
    committed = sorted(n.removesuffix(".stats.json") for n in names if n.endswith(".stats.json"))
    files = {n.removesuffix(fmt.suffix) for n in names if n.endswith(fmt.suffix)}
    rows: list[dict[str, Any]] = []
    stats: dict[str, dict[str, Any]] = {}
    key_shard: dict[Key, str] = {}
    columns: set[str] = set()
    unreadable: dict[str, str] = {}
    for shard in committed:
        path = fmt.path(layout, name, shard)
        try:
            shard_stats = layout.read_json(layout.shard_stats(name, shard)) or {}
            present = fmt.read_columns(layout, path)
            wanted = [c for c in (*BASE_COLUMNS, *METRIC_COLUMNS) if c in present]
            table = fmt.read_table(layout, path, wanted)
        except StorageError:
            raise
        except (OSError, ValueError, pa.ArrowException) as e:
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("skipped unreadable shard %s: %s", layout.display(path), why)
            unreadable[shard] = why
            continue
        stats[shard] = shard_stats
        columns |= present
        for r in table.to_pylist():
            r["_shard"] = shard
            key_shard[(r["sample_id"], r["image_index"])] = shard
            rows.append(r)
    rows.sort(key=lambda r: (r["sample_id"], r["image_index"]))
    uncommitted = sorted(files - set(committed))
    return VariantData(name, rows, stats, key_shard, columns, uncommitted, unreadable)


def load_run(layout: OutputLayout) -> RunData:
    record = layout.read_json(layout.run_record)
    fmt = record_format(record)
    variants = {n: load_variant(layout, n, fmt) for n in variant_names(layout, record)}
    planned = ((record or {}).get("fingerprint_inputs") or {}).get("variants") or {}
    for name, vd in variants.items():
        vd.planned_settings = planned.get(name)
    return RunData(layout, record, variants, fmt)


def shard_images(
    layout: OutputLayout, variant: str, shard: str, fmt: ShardFormat = PARQUET
) -> dict[Key, bytes]:
    """PNG bytes of a shard's ok rows, by (sample_id, image_index)."""
    table = fmt.read_table(
        layout, fmt.path(layout, variant, shard), ["sample_id", "image_index", "image"]
    )
    out = {}
    for r in table.to_pylist():
        img = r["image"]
        if img and img.get("bytes"):
            out[(r["sample_id"], r["image_index"])] = img["bytes"]
    return out
