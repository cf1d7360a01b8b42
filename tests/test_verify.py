"""Committed pieces checked against their stats (catbatch.job.verify) and how resume plans a
damaged one, extension pieces included; no model and no Ray."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from catbatch.job.layout import OutputLayout
from catbatch.job.prompts import Prompt
from catbatch.job.resume import ResumeError, ShardPart, plan_variant
from catbatch.job.sharding import make_shards
from catbatch.job.verify import check_pieces, move_aside
from catbatch.job.writer import Row, write_shard

PROMPTS = [Prompt(f"s{i}", f"prompt {i}", {}, i) for i in range(3)]


def commit(layout: OutputLayout, piece: ShardPart) -> None:
    rows = [
        Row(p.sample_id, 0, p.prompt, {}, 1, "v", {}, b"png", 16, 16, "b0", 1, 0.1, "cpu")
        for p in piece.prompts
    ]
    write_shard(layout, "v", piece.name, piece.content_hash, rows, 0.1, "cpu")


@pytest.fixture
def extended(tmp_path: Path) -> tuple[OutputLayout, Path]:
    """Shard 0 of three prompts, committed as piece 0 (two prompts) and its extension x1."""
    layout = OutputLayout(str(tmp_path / "out"))
    commit(layout, ShardPart(0, tuple(PROMPTS[:2]), 0))
    commit(layout, ShardPart(0, tuple(PROMPTS[2:]), 1))
    return layout, tmp_path / "out" / "variants" / "v"


def test_intact_pieces_pass_every_check(extended):
    layout, _ = extended
    found = check_pieces(layout, "v", deep=True)
    assert sorted(found.stats) == ["shard-00000", "shard-00000-x1"] and found.damaged == {}


def test_damaged_first_piece_is_made_again_for_its_own_prompts(extended):
    layout, folder = extended
    (folder / "shard-00000.parquet").write_bytes(b"PAR1 not really")
    plan = plan_variant(layout, "v", make_shards(PROMPTS, 3), 1)
    assert list(plan.damaged) == ["shard-00000"]
    assert plan.pending == [ShardPart(0, tuple(PROMPTS[:2]), 0)]
    assert [p.name for p in plan.committed] == ["shard-00000-x1"]
    assert plan.planned(1) == {"shard-00000": 2, "shard-00000-x1": 1}


def test_unreadable_stats_of_a_middle_piece_refuse_the_run(extended):
    layout, folder = extended
    (folder / "shard-00000.stats.json").write_text("{not json")
    with pytest.raises(ResumeError, match=r"v/shard-00000 is damaged \(its stats file is unread"):
        plan_variant(layout, "v", make_shards(PROMPTS, 3), 1)


def test_unreadable_stats_of_the_last_piece_make_the_rest_again(extended):
    layout, folder = extended
    (folder / "shard-00000-x1.stats.json").write_text("")
    plan = plan_variant(layout, "v", make_shards(PROMPTS, 3), 1)
    assert plan.pending == [ShardPart(0, tuple(PROMPTS[2:]), 1)]
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
