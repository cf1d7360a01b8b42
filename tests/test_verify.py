"""Committed pieces checked against their stats (catbatch.job.verify) and how resume plans a
damaged one, extension pieces included; the commit digest (catbatch.job.commits) that lets
status and resume read one listing and one file instead of every stats file; no model, no Ray."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from catbatch.job.commits import read_commits, write_digest
from catbatch.job.layout import OutputLayout
from catbatch.job.prompts import Prompt, PromptSource, read_prompts
from catbatch.job.resume import ResumeError, plan_variant
from catbatch.job.shardindex import ShardIndex, build_index, read_piece
from catbatch.job.sharding import content_hash, piece_name
from catbatch.job.verify import check_pieces, move_aside
from catbatch.job.writer import Row, write_shard


def commit(layout: OutputLayout, prompts: list[Prompt], index: int, part: int) -> dict:
    rows = [
        Row(p.sample_id, 0, p.prompt, {}, 1, "v", {}, b"png", 16, 16, "b0", 1, 0.1, "cpu")
        for p in prompts
    ]
    name = piece_name(index, part)
    return asdict(write_shard(layout, "v", name, content_hash(prompts), rows, 0.1, "cpu"))


@pytest.fixture
def index(tmp_path: Path) -> ShardIndex:
    """One shard of three prompts."""
    (tmp_path / "p.txt").write_text("prompt 0\nprompt 1\nprompt 2\n")
    return build_index(PromptSource(path=str(tmp_path / "p.txt")), None, 3)


@pytest.fixture
def prompts(index: ShardIndex) -> list[Prompt]:
    return index.read(0)


@pytest.fixture
def extended(tmp_path: Path, prompts: list[Prompt]) -> tuple[OutputLayout, Path]:
    """Shard 0 of three prompts, committed as piece 0 (two prompts) and its extension x1."""
    layout = OutputLayout(str(tmp_path / "out"))
    commit(layout, prompts[:2], 0, 0)
    commit(layout, prompts[2:], 0, 1)
    return layout, tmp_path / "out" / "variants" / "v"


def pieces(refs) -> list[tuple[int, int, int, int]]:
    return [(r.index, r.part, r.first, r.count) for r in refs]


def test_intact_pieces_pass_every_check(extended):
    layout, _ = extended
    found = check_pieces(layout, "v", deep=True)
    assert sorted(found.stats) == ["shard-00000", "shard-00000-x1"] and found.damaged == {}


def test_damaged_first_piece_is_made_again_for_its_own_prompts(extended, index, prompts):
    layout, folder = extended
    (folder / "shard-00000.parquet").write_bytes(b"PAR1 not really")
    plan = plan_variant(layout, "v", index, 1)
    assert list(plan.damaged) == ["shard-00000"]
    assert pieces(plan.pending) == [(0, 0, 0, 2)]
    assert read_piece(plan.pending[0]) == prompts[:2]  # the actor reads exactly these
    assert plan.committed == 1 and plan.summary() == {"pieces": 2, "images": 3}


def test_unreadable_stats_of_a_middle_piece_refuse_the_run(extended, index):
    layout, folder = extended
    (folder / "shard-00000.stats.json").write_text("{not json")
    with pytest.raises(ResumeError, match=r"v/shard-00000 is damaged \(its stats file is unread"):
        plan_variant(layout, "v", index, 1)


def test_unreadable_stats_of_the_last_piece_make_the_rest_again(extended, index, prompts):
    layout, folder = extended
    (folder / "shard-00000-x1.stats.json").write_text("")
    plan = plan_variant(layout, "v", index, 1)
    assert pieces(plan.pending) == [(0, 1, 2, 1)]
    assert plan.pending[0].content_hash == content_hash(prompts[2:])
    assert read_piece(plan.pending[0]) == prompts[2:]
    assert list(plan.damaged) == ["shard-00000-x1"]


def test_deep_check_reads_the_bytes(extended):
    layout, folder = extended
    path = folder / "shard-00000.parquet"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the footer's length field: the size stays
    path.write_bytes(bytes(data))
    assert check_pieces(layout, "v").damaged == {}
    assert check_pieces(layout, "v", deep=True).damaged == {
        "shard-00000": "its Parquet file's sha256 differs from its stats"
    }


def test_deep_check_reads_the_footer(extended):
    """A file that matches stats written for it but is no Parquet file (a bad writer)."""
    layout, folder = extended
    junk = b"not a parquet file at all"
    stats = json.loads((folder / "shard-00000.stats.json").read_text())
    stats.update(parquet_bytes=len(junk), parquet_sha256=hashlib.sha256(junk).hexdigest())
    (folder / "shard-00000.stats.json").write_text(json.dumps(stats))
    (folder / "shard-00000.parquet").write_bytes(junk)
    (why,) = check_pieces(layout, "v", deep=True).damaged.values()
    assert why.startswith("its Parquet footer is unreadable")


def test_move_aside_keeps_every_file(extended):
    layout, folder = extended
    before = {p.name: p.read_bytes() for p in folder.iterdir() if "x1" not in p.name}
    target = Path(move_aside(layout, "v", ["shard-00000"]))
    assert target.parent.parent.name == "damaged"
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in folder.iterdir()) == [
        "shard-00000-x1.parquet",
        "shard-00000-x1.stats.json",
    ]


# -- the commit digest -----------------------------------------------------------------------


class Counting:
    """Records the storage calls an OutputLayout makes: listings and files read (one entry per
    file, however they are batched)."""

    def __init__(self, layout: OutputLayout, monkeypatch):
        self.calls: list[str] = []
        self.inside = False
        for name in ("list_files", "read_bytes", "read_bytes_many"):
            real = getattr(layout, name)

            def counted(*args, _real=real, _name=name, **kwargs):
                if self.inside:
                    return _real(*args, **kwargs)
                n = len(args[0]) if _name == "read_bytes_many" else 1
                self.calls += ["read_bytes" if _name == "read_bytes_many" else _name] * n
                self.inside = True
                try:
                    return _real(*args, **kwargs)
                finally:
                    self.inside = False

            monkeypatch.setattr(layout, name, counted)


def test_digest_replaces_reading_every_stats_file(tmp_path, monkeypatch):
    """With a digest, checking 60 committed pieces is one listing and one read; a rewritten
    stats file (as --retry-failed rewrites one) is read again, whatever the digest says."""
    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(60)))
    source = PromptSource(path=str(tmp_path / "p.txt"))
    index, all_prompts = build_index(source, None, 1), read_prompts(source)
    layout = OutputLayout(str(tmp_path / "out"))
    for i, prompt in enumerate(all_prompts):
        commit(layout, [prompt], i, 0)
    counting = Counting(layout, monkeypatch)
    found = check_pieces(layout, "v")
    assert len(found.stats) == 60 and found.commits.read == 60
    assert counting.calls == ["list_files"] + ["read_bytes"] * 61  # the digest, then each file
    write_digest(layout, "v", found.commits)

    counting.calls.clear()
    plan = plan_variant(layout, "v", index, 1)
    assert plan.committed == 60 and plan.pending == []
    assert counting.calls == ["list_files", "read_bytes"]  # the listing and the digest

    stats_path = tmp_path / "out/variants/v/shard-00007.stats.json"
    stats = json.loads(stats_path.read_text())
    stats["images_failed"], stats["images_ok"] = 1, 0
    stats_path.write_text(json.dumps(stats))  # same piece, new content
    found = check_pieces(layout, "v")
    assert found.commits.read == 1 and found.stats["shard-00007"].images_failed == 1


def test_stats_an_actor_returned_need_no_read(tmp_path, prompts):
    """The driver hands the stats its actors returned to the digest: a stats file whose size
    matches what the actor wrote is not read again; one that differs is."""
    from catbatch.job.commits import Written

    layout = OutputLayout(str(tmp_path / "out"))
    returned = {piece_name(i): Written.of(commit(layout, [p], i, 0)) for i, p in enumerate(prompts)}
    commits = read_commits(layout, "v", returned)
    assert commits.read == 0 and commits.stats["shard-00001"].rows == 1
    bigger = tmp_path / "out/variants/v/shard-00002.stats.json"
    bigger.write_text(bigger.read_text() + " ")
    assert read_commits(layout, "v", returned).read == 1


def test_refresh_totals_every_piece_and_uses_up_what_actors_returned(tmp_path, monkeypatch):
    """The end of a submission: one listing of the stats files; the stats the actors returned
    go into the digest without being read again (and are released); a second refresh with
    nothing new leaves the digest as it is."""
    from catbatch.job.commits import Written, digest_path, refresh

    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(30)))
    prompts = read_prompts(PromptSource(path=str(tmp_path / "p.txt")))
    layout = OutputLayout(str(tmp_path / "out"))
    returned = {piece_name(i): Written.of(commit(layout, [p], i, 0)) for i, p in enumerate(prompts)}
    (tmp_path / "out/variants/v/shard-00003.stats.json").write_text("{broken")
    counting = Counting(layout, monkeypatch)
    totals = refresh(layout, "v", returned)
    assert totals == {
        "shards_committed": 29,
        "images_ok": 29,
        "images_failed": 0,
        "images_invalid": 0,
    }
    assert returned == {} and counting.calls == ["list_files", "read_bytes", "read_bytes"]
    digest = Path(digest_path(layout, "v"))
    before = digest.stat().st_mtime_ns
    assert refresh(layout, "v") == totals and digest.stat().st_mtime_ns == before
    assert read_commits(layout, "v").read == 1  # only the broken one
