"""The shard index (catbatch.job.shardindex): every format read back shard by shard from its
span, stored under the output and reused while the source is unchanged, copied where the
source cannot be read in place, a source edited after planning refused, and memory that does
not grow with the prompt count. No model, no Ray."""

from __future__ import annotations

import dataclasses
import gzip
import json
import tracemalloc
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catbatch.job.driver import plan, prepare_output
from catbatch.job.layout import OutputLayout
from catbatch.job.manifest import parse_manifest
from catbatch.job.prompts import PromptSource, PromptSourceError, read_prompts
from catbatch.job.resume import plan_variant
from catbatch.job.shardindex import (
    INDEX_DIR,
    ShardRefs,
    SourceChanged,
    TaskList,
    build_index,
    load_index,
    read_piece,
    save_index,
)
from catbatch.job.sharding import Task, content_hash, piece_name
from catbatch.job.writer import Row, write_shard

TEXT = b"\xef\xbb\xbffirst\r\n\n  \nsecond\nthird\n\nfourth\nfifth\r\nsixth\nseventh"
CSV = 'id,caption,extra\n1,"a cat, sitting",x\n\n2,"two\nlines",y\n3,three,z\r\n4,"fo""ur",w\n'
COCO = {"annotations": [{"id": 50 - i, "image_id": i % 4, "caption": f"c{i}"} for i in range(10)]}


def write_sources(folder: Path) -> None:
    (folder / "a.txt").write_bytes(TEXT)
    (folder / "a.csv").write_text(CSV + "5,five,v\n6,six,u\n")
    rows = "".join(f'p{i} "q"\tC{i}\tX\n' for i in range(7))
    (folder / "parti.tsv").write_text("Prompt\tCategory\tChallenge\n" + rows)
    lines = [json.dumps({"prompt": f"p{i}", "n": i}) if i % 3 else "" for i in range(12)]
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
    table = pa.table({"uid": [f"u{i}" for i in range(100)], "text": [f"t{i}" for i in range(100)]})
    pq.write_table(table, folder / "small.parquet", row_group_size=4)
    pq.write_table(table, folder / "big.parquet", row_group_size=100)
    (folder / "c.json").write_text(json.dumps(COCO))
    (folder / "g.txt.gz").write_bytes(gzip.compress(b"".join(b"g%d\n" % i for i in range(8))))


CASES = [
    ("a.txt", {}, False),
    ("a.txt", {"offset": 2, "limit": 3}, False),
    ("a.csv", {"id_column": "id"}, False),
    ("parti.tsv", {}, False),
    ("a.jsonl", {"id_column": "n"}, False),
    ("small.parquet", {"id_column": "uid", "offset": 5}, False),
    ("big.parquet", {}, True),  # a row group of 100 rows holds 33 shards: copied
    ("c.json", {"captions": "all"}, True),
    ("g.txt.gz", {}, True),
]


@pytest.mark.parametrize(("name", "options", "copied"), CASES)
def test_every_format_reads_back_shard_by_shard(tmp_path, name, options, copied):
    write_sources(tmp_path)
    source = PromptSource(path=str(tmp_path / name), **options)
    index = build_index(source, None, 3)
    assert index.copied == copied
    shards = [index.read(i) for i in range(index.n_shards)]
    assert [len(s) for s in shards] == [index.size(i) for i in range(index.n_shards)]
    assert [content_hash(s) for s in shards] == [
        index.content_hash(i) for i in range(index.n_shards)
    ]
    assert [p for s in shards for p in s] == read_prompts(source)
    assert index.n_prompts == len(read_prompts(source))


def test_line_spans_are_byte_ranges_of_the_source(tmp_path):
    write_sources(tmp_path)
    index = build_index(PromptSource(path=str(tmp_path / "a.txt")), None, 3)
    for i in range(index.n_shards):
        start, end, row, line = index.span(i)
        lines = TEXT[start:end].decode().splitlines()
        assert [x.strip() for x in lines if x.strip()] == [p.prompt for p in index.read(i)]
        assert index.read(i)[0].row == row and line == row + 1
    index = build_index(PromptSource(path=str(tmp_path / "a.csv"), id_column="id"), None, 2)
    data = (tmp_path / "a.csv").read_bytes()
    start, end, row, line = index.span(0)  # a blank line between; the second record has two
    assert (row, line) == (0, 2)
    assert data[start:end] == b'1,"a cat, sitting",x\n\n2,"two\nlines",y\n'
    start, end, row, line = index.span(1)
    assert (row, line) == (3, 6) and data[start:end] == b'3,three,z\r\n4,"fo""ur",w\n'


def test_index_is_stored_and_reused_until_the_source_changes(tmp_path):
    source_path = tmp_path / "p.txt"
    source_path.write_text("".join(f"prompt {i}\n" for i in range(10)))
    source = PromptSource(path=str(source_path))
    layout = OutputLayout(str(tmp_path / "out"))
    assert load_index(layout, source, None, 4) is None
    built = build_index(source, None, 4)
    save_index(layout, built)
    stored = load_index(layout, source, None, 4)
    assert stored is not None and stored.stored and stored.build == built.build
    assert (stored.spans == built.spans).all() and stored.hashes == built.hashes
    assert stored.n_prompts == 10 and stored.read(2) == built.read(2)
    assert load_index(layout, source, None, 5) is None  # another shard size: another index

    source_path.write_text(source_path.read_text() + "prompt 10\n")  # appended
    assert load_index(layout, source, None, 4) is None
    rebuilt = build_index(source, None, 4)
    assert rebuilt.content_hash(1) == built.content_hash(1)  # full shards keep their hash
    save_index(layout, rebuilt)
    assert load_index(layout, source, None, 4).n_prompts == 11
    folder = Path(layout.root) / INDEX_DIR / rebuilt.key
    assert sorted(p.name for p in folder.iterdir()) == [
        f"{rebuilt.build}.shards.npz",
        "index.json",
    ]


def test_copied_prompts_are_read_from_the_output(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(COCO))
    source = PromptSource(path=str(tmp_path / "c.json"))
    layout = OutputLayout(str(tmp_path / "out"))
    index = build_index(source, None, 3)
    local_copy = Path(index.copy_path)
    expected = [index.read(i) for i in range(index.n_shards)]
    save_index(layout, index)
    local_copy.unlink()  # the actors only have the output
    assert index.source.location.startswith(str(tmp_path / "out" / INDEX_DIR))
    assert [index.read(i) for i in range(index.n_shards)] == expected
    again = load_index(layout, source, None, 3)
    assert [again.read(i) for i in range(again.n_shards)] == expected


def test_extension_of_a_copied_source_reads_the_shard_for_its_hash(tmp_path):
    """COCO captions appended after a short last shard was committed: the extension piece's
    hash comes from the shard's prompts, read from the stored copy."""
    path, layout = tmp_path / "c.json", OutputLayout(str(tmp_path / "out"))
    captions = [{"id": 90 - i, "image_id": i, "caption": f"c{i}"} for i in range(5)]
    path.write_text(json.dumps({"annotations": captions[:4]}))  # ordered by image: appends
    source = PromptSource(path=str(path), captions="all")
    first = build_index(source, None, 3)
    save_index(layout, first)
    for i in range(first.n_shards):  # commit both shards (the second holds 1 prompt)
        prompts = first.read(i)
        rows = [
            Row(p.sample_id, 0, p.prompt, {}, 1, "v", {}, b"png", 16, 16, "b", 1, 0.1, "x")
            for p in prompts
        ]
        write_shard(layout, "v", piece_name(i), content_hash(prompts), rows, 0.1, "x")
    path.write_text(json.dumps({"annotations": captions}))
    second = build_index(source, None, 3)
    save_index(layout, second)
    vp = plan_variant(layout, "v", second, 1)
    (ref,) = vp.pending
    assert (ref.name, ref.first, ref.count) == ("shard-00001-x1", 1, 1)
    assert read_piece(ref) == second.read(1)[1:]


def test_a_source_edited_after_planning_fails_the_piece(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red fox\na blue boat\na green tree\n")
    index = build_index(PromptSource(path=str(path)), None, 2)
    path.write_text("a red fox\na blue goat\na green tree\n")  # same size, one prompt edited
    with pytest.raises(SourceChanged, match="shard-00000 are not the ones it was planned with"):
        index.read(0)
    assert [p.prompt for p in index.read(1)] == ["a green tree"]  # untouched shards still read


def test_building_the_index_keeps_no_prompts_in_memory(tmp_path):
    """200,000 prompts (16 MB of text; as Prompt objects more than 100 MB): the build's peak
    Python allocations stay a few MB (read chunks, one shard, 64 bytes a shard)."""
    path = tmp_path / "many.txt"
    with open(path, "w") as f:
        f.writelines(f"a small red circle on the left, number {i}\n" for i in range(200_000))
    tracemalloc.start()
    try:
        index = build_index(PromptSource(path=str(path)), None, 1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert index.n_prompts == 200_000 and index.n_shards == 200
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_task_lists_hold_a_few_bytes_a_task_and_build_each_task_when_read(tmp_path):
    """Every task of 100,000 shards of 2 variants at under 16 bytes a task (a Task with its
    ShardRef is about 400 bytes): each is built as read, equal to the one made from the index
    directly."""
    path = tmp_path / "many.txt"
    path.write_text("".join(f"p{i}\n" for i in range(100_000)))
    index = build_index(PromptSource(path=str(path)), None, 1)
    tracemalloc.start()
    try:
        tasks = TaskList.every_shard(index, ["full", "cat"])
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(tasks) == 200_000 and held < 16 * len(tasks), f"{held / 2**20:.1f} MiB"
    assert tasks.prompts() == 200_000  # each prompt once per variant
    assert tasks[-1] == Task("cat", index.ref(99_999))
    assert [t.key for t in tasks[:3]] == ["full/shard-00000", "cat/shard-00000", "full/shard-00001"]


def test_pending_pieces_are_ordered_by_shard_then_part_then_variant(tmp_path):
    """Whole shards and extension pieces of two variants merge as sorting the tasks would;
    pieces follow the index's source (moved to the output when a copy is stored)."""
    path = tmp_path / "p.txt"
    path.write_text("".join(f"p{i}\n" for i in range(7)))
    index = build_index(PromptSource(path=str(path)), None, 3)
    rest = dataclasses.replace(index.ref(1), part=1, first=2, count=1, content_hash="x")
    full, cat = ShardRefs(index), ShardRefs(index)
    for refs, entries in ((full, [rest, 2]), (cat, [0, rest, 2])):
        for entry in entries:
            refs.append(entry)
    listed = [
        *(Task("full", r) for r in (rest, index.ref(2))),
        *(Task("cat", r) for r in (index.ref(0), rest, index.ref(2))),
    ]
    tasks = TaskList.shard_major(index, {"full": full, "cat": cat})
    assert list(tasks) == sorted(listed, key=lambda t: (t.shard.index, t.shard.part))
    assert [t.key for t in tasks] == [
        "cat/shard-00000",
        "full/shard-00001-x1",
        "cat/shard-00001-x1",
        "full/shard-00002",
        "cat/shard-00002",
    ]
    assert tasks.prompts() == 3 + 1 + 1 + 1 + 1 and cat == [index.ref(0), rest, index.ref(2)]
    index.source = dataclasses.replace(index.source, location="elsewhere")
    assert {t.shard.source.location for t in tasks} == {"elsewhere"}


def test_repeated_ids_are_found_without_keeping_every_id(tmp_path):
    lines = [json.dumps({"id": f"id-{i}", "prompt": "p"}) for i in range(20_000)]
    lines.append(json.dumps({"id": "id-7", "prompt": "again"}))
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        PromptSourceError, match="duplicate id 'id-7' in column 'id' at line 8 and line 20001"
    ):
        build_index(PromptSource(path=str(tmp_path / "p.jsonl"), id_column="id"), None, 64)


MANIFEST = """\
name: reuse
model: {id: tiny-sd3}
prompts: {path: p.txt}
shard_size: 3
variants: [{name: full, pruning: none}, {name: cat, pruning: {alpha: 0.5}}]
output: out
"""


def test_plan_reuses_the_stored_index_and_rescan_rebuilds_it(tmp_path):
    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(8)))
    (tmp_path / "m.yaml").write_text(MANIFEST)
    m = parse_manifest(MANIFEST, base_dir=str(tmp_path))
    first = plan(m, check_model=False)
    assert not first.index.stored and first.counts()["tasks"] == 6
    prepare_output(first, overwrite=False)
    assert first.index.stored and [t.key for t in first.pending][:2] == [
        "full/shard-00000",
        "cat/shard-00000",
    ]
    again = plan(m, check_model=False)
    assert again.index.stored and again.index.build == first.index.build
    assert plan(m, check_model=False, rescan=True).index.build != first.index.build
    meta = json.loads((tmp_path / "out" / first.index_file).read_text())
    assert meta["prompts"] == 8 and meta["shards"] == 3 and asdict(first.index.source)
