"""The driver's memory on large remote folders, checked by what is alive, not by timing: a remote
listing is reduced page by page (no store entry of an earlier page outlives it), stats files
are read in bounded batches (no earlier batch's bytes outlive it), and other remote
filesystems keep the generic ``ls``; no Ray, no S3 server (tests/test_s3.py has the real one)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import fsspec
import fsspec.asyn
import pytest

from catbatch.job import commits
from catbatch.job.commits import digest_path, read_commits, refresh
from catbatch.job.layout import FileEntry, OutputLayout
from catbatch.job.prompts import PromptSource, read_prompts
from catbatch.job.sharding import content_hash, piece_name
from catbatch.job.writer import Row, write_shard


class Raw(dict):
    """A store's info dict that can be watched (a plain dict has no weak references)."""


class PagedS3:
    """What list_files needs of s3fs: an async ``_iterdir`` that fetches ``page`` entries at a
    time and keeps none it has yielded once the next page is fetched. ``ls`` (which holds a
    whole folder) must not be called. Records the most store entries alive at a fetch."""

    protocol = ("s3", "s3a")

    def __init__(self, n: int, page: int):
        self.n, self.page = n, page
        self.fetched: list[weakref.ref[Raw]] = []
        self.most_alive = 0
        self.prefixes: list[str] = []
        self.loop = fsspec.asyn.get_loop()

    def entry(self, prefix: str, j: int) -> Raw:
        """Object ``j`` of the folder: the pieces' Parquet and stats files, then a subfolder."""
        i, ext = divmod(j, 2)
        if i == self.n:
            return Raw(name=f"bucket/{prefix}sub", size=0, type="directory")
        if ext == 0:
            name, size, etag = f"shard-{i:05d}.parquet", 1000 + i, f"{i:032x}"
        else:
            name, size, etag = f"shard-{i:05d}.stats.json", 500, f"{i:030x}-2"
        return Raw(name=f"bucket/{prefix}{name}", size=size, type="file", ETag=f'"{etag}"')

    async def _iterdir(self, bucket, max_items=None, delimiter="/", prefix="", versions=False):
        assert bucket == "bucket" and delimiter == "/"
        self.prefixes.append(prefix)
        total = 2 * self.n + 1
        for start in range(0, total, self.page):
            gc.collect()  # what is left of earlier pages: what the caller kept
            alive = sum(r() is not None for r in self.fetched)
            self.most_alive = max(self.most_alive, alive)
            page = [self.entry(prefix, j) for j in range(start, min(start + self.page, total))]
            self.fetched += map(weakref.ref, page)
            for e in page:
                yield e
            del page, e

    def split_path(self, path: str) -> tuple[str, str, None]:
        bucket, _, key = path.partition("/")
        return bucket, key, None

    def ls(self, *args, **kwargs):
        raise AssertionError("ls holds a whole folder's entries")

    def invalidate_cache(self, path=None) -> None:
        pass

    def unstrip_protocol(self, path: str) -> str:
        return f"s3://{path}"


def paged_layout(fs: PagedS3) -> OutputLayout:
    layout = OutputLayout("memory://unused")
    layout.fs, layout.root = fs, "bucket/run"
    return layout


def test_an_s3_listing_is_reduced_page_by_page():
    """3,000 pieces (6,001 objects) in pages of 100: when a page is fetched, no entry of an
    earlier one is alive but the one being reduced; the entries are the whole listing's."""
    fs = PagedS3(3000, page=100)
    files = paged_layout(fs).list_files("variants", "v")
    assert fs.prefixes == ["run/variants/v/"]
    assert fs.most_alive <= 1
    assert len(files) == 6000 and "sub" not in files
    assert files["shard-00007.parquet"] == FileEntry(1007, f"{7:032x}", f"{7:032x}")
    assert files["shard-00007.stats.json"] == FileEntry(500, f"{7:030x}-2", None)

    fs = PagedS3(3000, page=100)
    stats = paged_layout(fs).list_files("variants", "v", suffix=".stats.json")
    assert list(stats) == [f"shard-{i:05d}.stats.json" for i in range(3000)]
    assert fs.most_alive <= 1


def test_other_remote_filesystems_list_with_ls():
    """A remote store without a paged listing (fsspec's memory filesystem) is listed by ``ls``,
    fresh each time; a missing folder is empty."""
    layout = OutputLayout(f"memory://listing-{id(object())}/run")
    for i in range(3):
        layout.write_bytes(layout.path("variants", "v", f"shard-{i:05d}.stats.json"), b"x" * i)
        layout.write_bytes(layout.path("variants", "v", f"shard-{i:05d}.parquet"), b"p")
    layout.write_bytes(layout.path("variants", "v", "sub", "f"), b"in a subfolder")
    stats = layout.list_files("variants", "v", suffix=".stats.json")
    assert {n: e.size for n, e in stats.items()} == {
        f"shard-{i:05d}.stats.json": i for i in range(3)
    }
    assert len(layout.list_files("variants", "v")) == 6  # the subfolder is no file
    layout.write_bytes(layout.path("variants", "v", "shard-00003.stats.json"), b"new")
    assert "shard-00003.stats.json" in layout.list_files("variants", "v", suffix=".stats.json")
    assert layout.list_files("variants", "w") == {}


class Blobs(dict):
    """A batch of files read, watched."""


def watch_reads(layout: OutputLayout, monkeypatch) -> list[int]:
    """Record the size of each batch of stats files read, and check at each read that no
    earlier batch's bytes are still held."""
    sizes: list[int] = []
    earlier: list[weakref.ref[Blobs]] = []
    real = layout.read_bytes_many

    def read(paths: list[str]) -> dict[str, bytes]:
        gc.collect()
        assert all(r() is None for r in earlier), "an earlier batch of stats files is held"
        sizes.append(len(paths))
        blobs = Blobs(real(paths))
        earlier.append(weakref.ref(blobs))
        return blobs

    monkeypatch.setattr(layout, "read_bytes_many", read)
    return sizes


@pytest.fixture
def committed(tmp_path: Path) -> OutputLayout:
    """23 committed pieces of one prompt each, no digest."""
    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(23)))
    layout = OutputLayout(str(tmp_path / "out"))
    for i, p in enumerate(read_prompts(PromptSource(path=str(tmp_path / "p.txt")))):
        row = Row(p.sample_id, 0, p.prompt, {}, 1, "v", {}, b"png", 16, 16, "b0", 1, 0.1, "cpu")
        write_shard(layout, "v", piece_name(i), content_hash([p]), [row], 0.1, "cpu")
    return layout


def test_stats_files_are_read_in_bounded_batches(committed, monkeypatch):
    """Without a digest, read_commits and refresh read the 23 stats files 5 at a time, each batch
    folded in before the next is read; the results are those of one big batch."""
    layout = committed
    whole = read_commits(layout, "v")
    monkeypatch.setattr(commits, "READ_BATCH", 5)
    sizes = watch_reads(layout, monkeypatch)
    batched = read_commits(layout, "v")
    assert sizes == [5, 5, 5, 5, 3]
    assert batched.stats == whole.stats and batched.read == 23

    sizes.clear()
    totals = refresh(layout, "v")
    assert sizes == [5, 5, 5, 5, 3]
    assert totals["shards_committed"] == 23 and totals["images_ok"] == 23
    assert Path(digest_path(layout, "v")).exists()
    sizes.clear()
    assert read_commits(layout, "v").read == 0 and sizes == []  # the digest covers them
