"""Where a run's files live, locally or on object storage, and how they are written safely.

    OUTPUT/run.json                                  the run record
    OUTPUT/variants/<variant>/shard-00000.parquet    images and per-sample rows
    OUTPUT/variants/<variant>/shard-00000.stats.json the shard's commit marker (written last)

A shard counts as committed only when its stats file exists. Local files are written to a
temporary name and renamed; object stores publish an object only when its upload completes.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

RUN_RECORD = "run.json"


@dataclass
class OutputLayout:
    """Paths of one run's output, on any fsspec filesystem."""

    url: str

    def __post_init__(self) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        for p in parts:
            if p in ("", ".", "..") or "/" in p or "\\" in p:
                raise ValueError(f"unsafe path component {p!r}")
        return "/".join([self.root, *parts])

    @property
    def run_record(self) -> str:
        return self.path(RUN_RECORD)

    def shard_parquet(self, variant: str, shard: str) -> str:
        return self.path("variants", variant, f"{shard}.parquet")

    def shard_stats(self, variant: str, shard: str) -> str:
        return self.path("variants", variant, f"{shard}.stats.json")

    def display(self, path: str | None = None) -> str:
        path = path or self.root
        return path if self.is_local else self.fs.unstrip_protocol(path)

    # -- I/O --------------------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file so that a crash never leaves a complete-looking partial file."""
        parent = path.rsplit("/", 1)[0]
        if self.is_local:
            os.makedirs(parent, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            self.fs.pipe_file(path, data)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def read_json(self, path: str) -> Any | None:
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def committed_shards(self, variant: str) -> set[str]:
        """Names of the variant's shards whose stats file (commit marker) exists."""
        pattern = self.path("variants", variant) + "/*.stats.json"
        return {p.rsplit("/", 1)[1].removesuffix(".stats.json") for p in self.fs.glob(pattern)}

    def check_writable(self) -> None:
        """Create the root and write/remove a probe file; raise OSError with a clear reason."""
        probe = self.path(f".write-probe-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.write_bytes(probe, b"ok")
            self.fs.rm(probe)
        except Exception as e:  # noqa: BLE001 - any backend error means "not writable"
            raise OSError(f"output location {self.display()} is not writable: {e}") from None
