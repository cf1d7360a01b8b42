"""Where a run's files live, locally or on object storage, and how they are written safely.

    OUTPUT/run.json                                  the run record
    OUTPUT/variants/<variant>/shard-00000.parquet    images and per-sample rows (.tar: WebDataset,
                                                     catbatch.job.writer.ShardFormat)
    OUTPUT/variants/<variant>/shard-00000.stats.json the shard's commit marker (written last)

A shard counts as committed only when its stats file exists. Local files are written to a
temporary name and renamed; object stores publish an object only when its upload completes.

Remote reads and writes retry transient errors (connection refused or reset, timeouts, HTTP 5xx,
throttling) with exponential backoff for at most ``CATBATCH_STORAGE_RETRY_S`` seconds (default
300), then raise :class:`StorageError`. Credentials come from the backend's standard chain (for
S3: ``AWS_*`` environment, ``~/.aws``, instance roles; ``AWS_ENDPOINT_URL`` for other S3 servers)
and never pass through catbatch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

RUN_RECORD = "run.json"
RETRY_ENV = "CATBATCH_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 300.0
MAX_BACKOFF_S = 10.0

log = logging.getLogger(__name__)

_TRANSIENT_NAMES = {
    "ConnectionError",  # builtin and botocore (EndpointConnectionError, ConnectTimeoutError...)
    "TimeoutError",
    "HTTPClientError",
    "IncompleteRead",
    "ResponseParserError",
    "ClientConnectionError",  # aiohttp
    "ServerDisconnectedError",
    "ClientPayloadError",
}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "RequestTimeout",
    "ServiceUnavailable",
    "InternalError",
}


class StorageError(OSError):
    """The storage stayed unreachable for the whole retry budget, or refused the request for a
    reason other than a missing file (no credentials, access denied)."""


_BACKEND_MODULES = ("botocore", "aiobotocore", "google", "azure")


def describe_error(error: BaseException) -> str:
    """A storage error in one line; missing S3 credentials get a hint where they come from."""
    text = f"{type(error).__name__}: {error}"
    if type(error).__name__ == "NoCredentialsError":
        text += (
            " (S3 credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            "~/.aws or an instance role)"
        )
    return text


def is_backend_error(error: BaseException) -> bool:
    """An error of a storage backend's own library (botocore...), which fsspec passes on as is."""
    return any(c.__module__.split(".")[0] in _BACKEND_MODULES for c in type(error).__mro__)


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A file as a listing shows it: ``version`` changes whenever the file is rewritten (local:
    modification time and inode; object stores: ETag or generation), ``md5`` is the content's
    MD5 where the listing gives it (an S3 ETag of a single-part upload)."""

    size: int
    version: str | None
    md5: str | None = None


def is_transient(error: BaseException) -> bool:
    """Whether a storage error is worth retrying (network, timeouts, 5xx), not a real answer."""
    if isinstance(error, (FileNotFoundError, FileExistsError, PermissionError, StorageError)):
        return False
    for e in (error, error.__cause__):
        if e is None:
            continue
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(e).__mro__):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if status >= 500 or response.get("Error", {}).get("Code") in _TRANSIENT_CODES:
                return True
    return False


def is_precondition_failed(error: BaseException) -> bool:
    """An exclusive create that lost: the object already exists."""
    if isinstance(error, FileExistsError):
        return True
    response = getattr(error.__cause__, "response", None) or getattr(error, "response", None)
    return isinstance(response, dict) and (
        response.get("Error", {}).get("Code") == "PreconditionFailed"
        or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412
    )


@dataclass
class OutputLayout:
    """Paths of one run's output, on any fsspec filesystem."""

    url: str

    def __post_init__(self) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        if self.is_local:  # one spelling of each place: no "..", no symlinks
            self.root = os.path.realpath(self.root)

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
        """The Parquet format's file (any format's: ``ShardFormat.path``)."""
        return self.path("variants", variant, f"{shard}.parquet")

    def shard_stats(self, variant: str, shard: str) -> str:
        return self.path("variants", variant, f"{shard}.stats.json")

    def display(self, path: str | None = None) -> str:
        path = path or self.root
        return path if self.is_local else self.fs.unstrip_protocol(path)

    # -- I/O --------------------------------------------------------------------------------
    def retrying(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, retried with backoff while it fails transiently (remote storage only)."""
        if self.is_local:
            return fn()
        budget = float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))
        start = time.monotonic()
        delay, attempt = 0.25, 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as e:
                if not is_transient(e):
                    if is_backend_error(e):
                        raise StorageError(f"{what}: {describe_error(e)}") from e
                    raise
                self.fs.invalidate_cache()
                elapsed = time.monotonic() - start
                if elapsed + delay > budget:
                    raise StorageError(
                        f"{what}: storage unreachable, gave up after {attempt} attempt(s) over "
                        f"{elapsed:.1f} s ({RETRY_ENV}={budget:g}): {type(e).__name__}: {e}"
                    ) from e
                log.warning(
                    "%s failed (%s: %s); retrying in %.1f s", what, type(e).__name__, e, delay
                )
                time.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file so that a crash never leaves a complete-looking partial file."""
        if self.is_local:
            tmp = _write_local_tmp(path, data)
            try:
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            self.retrying(f"writing {self.display(path)}", lambda: self.fs.pipe_file(path, data))

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` holding ``data`` only if it does not exist; False if it does.

        Atomic against concurrent creators: ``link(2)`` of a complete temporary file locally, a
        conditional put (``If-None-Match: *``) on S3 and other stores that support it.
        """
        if self.is_local:
            tmp = _write_local_tmp(path, data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)

        def put() -> bool:
            try:
                self.fs.pipe_file(path, data, mode="create")
                return True
            except TypeError:
                raise OSError(
                    f"{self.fs.protocol} storage does not support exclusive create"
                ) from None
            except Exception as e:
                if is_precondition_failed(e):
                    return False
                raise

        return self.retrying(f"creating {self.display(path)}", put)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json_bytes(obj))

    def read_bytes(self, path: str) -> bytes | None:
        """The file's content, or None when it does not exist."""

        def read() -> bytes | None:
            try:
                return self.fs.cat_file(path)
            except FileNotFoundError:
                return None

        return self.retrying(f"reading {self.display(path)}", read)

    def read_json(self, path: str) -> Any | None:
        data = self.read_bytes(path)
        return None if data is None else json.loads(data)

    def read_bytes_many(self, paths: list[str]) -> dict[str, bytes]:
        """``{path: content}`` for the paths that exist; one batched request on object stores."""
        if self.is_local or len(paths) < 2:
            found = {p: self.read_bytes(p) for p in paths}
            return {p: data for p, data in found.items() if data is not None}
        by_key = {self.fs._strip_protocol(p): p for p in paths}
        blobs = self.retrying(
            f"reading {len(paths)} files under {self.display()}",
            lambda: self.fs.cat(list(by_key), on_error="omit"),
        )
        return {by_key[k]: v for k, v in blobs.items() if k in by_key}

    def list_names(self, *parts: str) -> list[str]:
        """Names of the files in a folder (fresh, not from a listing cache); [] if none."""
        folder = self.path(*parts)

        def ls() -> list[str]:
            self.fs.invalidate_cache(folder)
            try:
                entries = self.fs.ls(folder, detail=False)
            except FileNotFoundError:
                return []
            return sorted(p.rstrip("/").rsplit("/", 1)[1] for p in entries)

        return self.retrying(f"listing {self.display(folder)}", ls)

    def list_files(self, *parts: str, suffix: str = "") -> dict[str, FileEntry]:
        """``{name: entry}`` of the files in a folder whose names end with ``suffix``, in one
        (paginated) fresh listing; {} if none. On S3 the pages are reduced to entries as they
        arrive: the store's own entries of one page at a time, not of the whole folder."""
        folder = self.path(*parts)
        if self.is_local:
            return _list_local(folder, suffix)

        def ls() -> dict[str, FileEntry]:
            self.fs.invalidate_cache(folder)
            try:
                if _pages_itself(self.fs):
                    return fsspec.asyn.sync(self.fs.loop, _list_s3, self.fs, folder, suffix)
                entries = self.fs.ls(folder, detail=True)
            except FileNotFoundError:
                return {}
            finally:
                self.fs.invalidate_cache(folder)  # fsspec keeps listings: not 300k entries
            out: dict[str, FileEntry] = {}
            for e in entries:
                _add_remote(out, e, suffix)
            return out

        return self.retrying(f"listing {self.display(folder)}", ls)

    def put_file(self, local_path: str, path: str) -> None:
        """Copy a local file to ``path`` (streamed) so that it appears only when complete."""
        if self.is_local:
            os.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                shutil.copyfile(local_path, tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            self.retrying(
                f"writing {self.display(path)}", lambda: self.fs.put_file(local_path, path)
            )

    def move(self, path: str, target: str) -> None:
        """Move a file (copy then delete on object stores), making the target's folder."""
        if self.is_local:
            os.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            os.replace(path, target)
            return
        self.retrying(f"moving {self.display(path)}", lambda: self.fs.mv(path, target))

    def remove(self, path: str) -> None:
        """Delete a file if it exists."""
        try:
            self.retrying(f"removing {self.display(path)}", lambda: self.fs.rm_file(path))
        except FileNotFoundError:
            pass

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def check_writable(self) -> None:
        """Create the root and write/remove a probe file; raise OSError with a clear reason."""
        probe = self.path(f".write-probe-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.write_bytes(probe, b"ok")
            self.fs.rm(probe)
        except Exception as e:  # noqa: BLE001 - any backend error means "not writable"
            raise OSError(f"output location {self.display()} is not writable: {e}") from None


def json_bytes(obj: Any) -> bytes:
    """How :meth:`OutputLayout.write_json` serializes (stats files included)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _list_local(folder: str, suffix: str = "") -> dict[str, FileEntry]:
    out = {}
    try:
        with os.scandir(folder) as entries:  # one at a time: a folder may hold 300k files
            for entry in entries:
                if not entry.name.endswith(suffix):
                    continue
                try:
                    if not entry.is_file():
                        continue
                    st = entry.stat()
                except FileNotFoundError:  # removed while we looked
                    continue
                out[entry.name] = FileEntry(st.st_size, f"{st.st_mtime_ns}:{st.st_ino}")
    except FileNotFoundError:
        return {}
    return out


def _remote_entry(e: dict[str, Any]) -> FileEntry:
    etag = str(e.get("ETag") or e.get("etag") or "").strip('"') or None
    version = etag or e.get("generation") or e.get("mtime") or e.get("LastModified")
    md5 = etag if etag and len(etag) == 32 and "-" not in etag else None
    return FileEntry(int(e.get("size") or 0), None if version is None else str(version), md5)


def _add_remote(out: dict[str, FileEntry], e: dict[str, Any], suffix: str) -> None:
    """Add a listing's entry (a store's info dict) to ``out`` if it is a file named ``*suffix``."""
    name = e["name"].rstrip("/").rsplit("/", 1)[1]
    if e.get("type") != "directory" and name.endswith(suffix):
        out[name] = _remote_entry(e)


def _pages_itself(fs: Any) -> bool:
    """Whether ``fs`` is s3fs (or one like it): an async ``_iterdir`` that yields a folder's
    entries page by page, without keeping them (``ls`` holds them all, then caches them)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "s3" in protocols and callable(getattr(fs, "_iterdir", None))


async def _list_s3(fs: Any, folder: str, suffix: str) -> dict[str, FileEntry]:
    """:meth:`OutputLayout.list_files` on S3, in s3fs's event loop: each entry is reduced as its
    page arrives (s3fs's ``_lsdir``, which ``ls`` calls, keeps the whole folder's)."""
    bucket, key, _ = fs.split_path(folder)
    prefix = key.strip("/") + "/" if key.strip("/") else ""
    out: dict[str, FileEntry] = {}
    try:
        async for entry in fs._iterdir(bucket, delimiter="/", prefix=prefix):
            _add_remote(out, entry, suffix)
    except Exception as e:
        if not any(c.__name__ == "ClientError" for c in type(e).__mro__):
            raise
        from s3fs.errors import translate_boto_error  # as s3fs's ls raises it

        raise translate_boto_error(e)  # noqa: B904 - it sets the cause where it translates
    return out


def _write_local_tmp(path: str, data: bytes) -> str:
    """Write ``data`` durably to a fresh temporary file beside ``path``; return its name."""
    os.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp
