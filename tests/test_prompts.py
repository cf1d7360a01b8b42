"""Tests for catbatch.job.prompts: every format, ids, offset/limit, bad input, fsspec URLs."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest

from catbatch.job.prompts import (
    PromptSource,
    PromptSourceError,
    read_prompts,
    sample_id_for,
    source_identity,
)

SHARED_DATA = Path(
    os.environ.get("CATBATCH_SHARED_DATA")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)
PARTI_TSV = "Prompt\tCategory\tChallenge\tNote\n" + "".join(
    f"{prompt}\t{category}\t{challenge}\t{note}\n"
    for prompt, category, challenge, note in [
        ("bond", "Abstract", "Basic", "meaning"),
        ('"G I G G L E" painted as graffiti', "Illustrations", "Writing & Symbols", ""),
        ("  a red cube  ", "Artifacts", "Colors", "spaces"),
    ]
)
COCO = {
    "images": [{"id": 7}, {"id": 3}],
    "annotations": [
        {"id": 50, "image_id": 7, "caption": "a dog on grass"},
        {"id": 12, "image_id": 7, "caption": " a brown dog "},
        {"id": 40, "image_id": 3, "caption": "a cat"},
        {"id": 41, "image_id": 3, "caption": "a cat asleep"},
        {"id": 9, "image_id": 3, "caption": "a sleeping cat"},
    ],
}


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def read(path: Path | str, **options) -> list:
    return read_prompts(PromptSource(path=str(path), **options))


def error_of(path: Path | str, **options) -> str:
    with pytest.raises(PromptSourceError) as info:
        read(path, **options)
    return str(info.value)


def test_sample_id_is_sha256_prefix_of_name_and_row():
    expected = hashlib.sha256(b"prompts.txt\x003").hexdigest()[:16]
    assert sample_id_for("prompts.txt", 3) == expected
    assert sample_id_for("prompts.txt", 4) != expected
    assert sample_id_for("other.txt", 3) != expected


def test_parti_tsv_is_detected_and_keeps_category_challenge_and_quotes(tmp_path):
    prompts = read(write(tmp_path / "parti.tsv", PARTI_TSV))
    assert [p.prompt for p in prompts] == [
        "bond",
        '"G I G G L E" painted as graffiti',
        "a red cube",
    ]
    assert prompts[1].metadata == {"Category": "Illustrations", "Challenge": "Writing & Symbols"}
    assert [p.row for p in prompts] == [0, 1, 2]
    assert [p.sample_id for p in prompts] == [sample_id_for("parti.tsv", r) for r in range(3)]
    assert all(p.problem is None for p in prompts)


def test_plain_tsv_without_category_is_generic(tmp_path):
    path = write(tmp_path / "plain.tsv", 'key\tprompt\nx1\t"quoted" cat\nx2\tdog\n')
    prompts = read(path, id_column="key")
    assert [(p.sample_id, p.prompt, p.metadata) for p in prompts] == [
        ("x1", '"quoted" cat', {}),
        ("x2", "dog", {}),
    ]
    with pytest.raises(PromptSourceError, match="Category"):
        read(path, format="parti", prompt_column="prompt")


def test_csv_quoting_default_caption_column_and_blank_lines(tmp_path):
    text = 'id,caption,extra\n1,"a cat, sitting",x\n\n2,"two\nlines",y\n'
    prompts = read(write(tmp_path / "p.csv", text), id_column="id")
    assert [(p.sample_id, p.prompt, p.row) for p in prompts] == [
        ("1", "a cat, sitting", 0),
        ("2", "two\nlines", 2),
    ]


def test_jsonl_counts_blank_lines_in_rows_and_stringifies_ids(tmp_path):
    lines = [{"prompt": "a cat", "n": 10}, {"prompt": "a dog", "n": 11}]
    text = json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n"
    path = write(tmp_path / "p.jsonl", text)
    assert [(p.sample_id, p.row) for p in read(path, id_column="n")] == [("10", 0), ("11", 2)]
    assert [p.sample_id for p in read(path)] == [sample_id_for("p.jsonl", r) for r in (0, 2)]


def test_parquet_with_prompt_and_id_columns(tmp_path):
    table = pa.table({"uid": ["a", "b", "c"], "text_prompt": ["one", None, "three"]})
    pq.write_table(table, tmp_path / "p.parquet")
    prompts = read(tmp_path / "p.parquet", prompt_column="text_prompt", id_column="uid")
    assert [(p.sample_id, p.prompt, p.problem) for p in prompts] == [
        ("a", "one", None),
        ("b", "", "empty prompt"),
        ("c", "three", None),
    ]


def test_text_skips_blank_lines_but_keeps_their_row_numbers(tmp_path):
    path = write(tmp_path / "p.txt", "first prompt\r\n\n   \n  second prompt  \nthird")
    prompts = read(path)
    assert [(p.prompt, p.row) for p in prompts] == [
        ("first prompt", 0),
        ("second prompt", 3),
        ("third", 4),
    ]
    assert prompts[1].sample_id == sample_id_for("p.txt", 3)
    assert read(path, name="mine")[1].sample_id == sample_id_for("mine", 3)


def test_coco_first_caption_per_image_in_image_id_order(tmp_path):
    path = write(tmp_path / "captions.json", json.dumps(COCO))
    first = read(path)
    assert [(p.sample_id, p.prompt, p.metadata, p.row) for p in first] == [
        ("9", "a sleeping cat", {"image_id": "3"}, 4),
        ("12", "a brown dog", {"image_id": "7"}, 1),
    ]
    every = read(path, captions="all")
    assert [p.sample_id for p in every] == ["9", "40", "41", "12", "50"]


def test_unusable_single_prompts_carry_a_problem_instead_of_failing(tmp_path):
    rows = [{"prompt": "fine"}, {"prompt": "  "}, {"prompt": "nul\x00byte"}, {"prompt": None}]
    rows.append({"prompt": 42})
    path = write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in rows))
    assert [p.problem for p in read(path)] == [
        None,
        "empty prompt",
        "prompt contains a NUL byte",
        "empty prompt",
        "prompt is not a string but int",
    ]


def test_offset_and_limit_keep_ids_stable(tmp_path):
    path = write(tmp_path / "p.txt", "".join(f"prompt {i}\n" for i in range(10)))
    full = read(path)
    sliced = read(path, offset=3, limit=4)
    assert sliced == full[3:7]
    assert [p.row for p in sliced] == [3, 4, 5, 6]
    assert read(path, offset=8, limit=5) == full[8:]
    assert "offset 10 is past the end (10 prompts)" in error_of(path, offset=10)


@pytest.mark.parametrize(
    "options", [{"offset": -1}, {"limit": 0}, {"path": ""}, {"prompts_column": "x"}]
)
def test_source_options_are_validated(options):
    with pytest.raises(pydantic.ValidationError):
        PromptSource(**{"path": "p.txt", **options})


def test_relative_path_resolves_against_base_dir_and_identity_ignores_content(tmp_path):
    write(tmp_path / "p.txt", "a cat\n")
    source = PromptSource(path="p.txt")
    assert [p.prompt for p in read_prompts(source, base_dir=tmp_path)] == ["a cat"]
    identity = source_identity(source, base_dir=tmp_path)
    assert identity["path"] == str((tmp_path / "p.txt").resolve())
    assert identity["name"] == "p.txt"
    write(tmp_path / "p.txt", "a dog\n")
    assert source_identity(source, base_dir=tmp_path) == identity
    moved = source_identity(source.model_copy(update={"offset": 1}), base_dir=tmp_path)
    assert moved != identity


def test_memory_url_and_gzip(tmp_path):
    root = f"memory://catbatch-test-{uuid.uuid4().hex}"
    with fsspec.open(f"{root}/prompts.txt", "wb") as handle:
        handle.write(b"from memory\n")
    assert [p.prompt for p in read(f"{root}/prompts.txt")] == ["from memory"]
    assert "not found" in error_of(f"{root}/missing.txt")
    path = write(tmp_path / "p.tsv.gz", gzip.compress(PARTI_TSV.encode()))
    assert read(path)[0].metadata == {"Category": "Abstract", "Challenge": "Basic"}


@pytest.mark.parametrize(
    ("name", "content", "options", "expected"),
    [
        ("empty.txt", "", {}, ["no prompts"]),
        ("blank.txt", "\n  \n", {}, ["no prompts"]),
        ("header.csv", "prompt,id\n", {}, ["no prompts"]),
        ("cols.csv", "text_a,b\nx,y\n", {}, ["no prompt column", "['text_a', 'b']"]),
        ("cols.tsv", "prompt\tb\nx\ty\n", {"id_column": "uid"}, ["'uid'", "['prompt', 'b']"]),
        ("utf8.txt", b"ok\nstill ok\nbad \xff byte\n", {}, ["line 3", "invalid UTF-8"]),
        ("dup.csv", "id,prompt\n1,a\n2,b\n1,c\n", {"id_column": "id"}, ["'1'", "line 2", "line 4"]),
        ("noid.csv", "id,prompt\n1,a\n,b\n", {"id_column": "id"}, ["line 3", "empty id"]),
        ("fields.csv", "id,prompt\n1,a,extra\n", {}, ["line 2", "3 fields"]),
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', {}, ["line 2", "invalid JSON"]),
        ("list.jsonl", '{"prompt": "a"}\n["b"]\n', {}, ["line 2", "JSON object"]),
        ("key.jsonl", '{"prompt": "a"}\n{"caption": "b"}\n', {}, ["line 2", "'prompt'"]),
        ("bad.json", '{"annotations": [\n{"id": 1,}\n]}', {}, ["line 2", "invalid JSON"]),
        ("nococo.json", '{"images": []}', {}, ["not a COCO captions file"]),
        ("ann.json", '{"annotations": [{"id": 1}]}', {}, ["annotations[0]"]),
        ("p.yaml", "prompt: x", {}, ["cannot tell the format"]),
        ("p.txt", "a\n", {"prompt_column": "x"}, ["do not apply to text"]),
        ("p.csv", "prompt\na\n", {"captions": "all"}, ["only to coco"]),
        ("p.parquet", "not parquet", {}, ["not a readable Parquet file"]),
    ],
)
def test_bad_input_names_the_file_and_line(tmp_path, name, content, options, expected):
    path = write(tmp_path / name, content)
    message = error_of(path, **options)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message


def test_coco_duplicate_caption_ids_name_both_annotations(tmp_path):
    annotations = [{"id": 5, "image_id": i, "caption": "a"} for i in (1, 2)]
    path = write(tmp_path / "dup.json", json.dumps({"annotations": annotations}))
    message = error_of(path)
    assert "duplicate caption id 5" in message
    assert "annotations[0]" in message and "annotations[1]" in message


def test_missing_file_names_it(tmp_path):
    assert f"{tmp_path / 'nope.tsv'}: prompt file not found" in error_of(tmp_path / "nope.tsv")


def test_real_parti_prompts():
    path = SHARED_DATA / "PartiPrompts.tsv"
    if not path.exists():
        pytest.skip(f"{path} not present")
    prompts = read(path)
    assert len(prompts) == 1632
    assert len({p.sample_id for p in prompts}) == 1632
    assert all(p.problem is None and set(p.metadata) == {"Category", "Challenge"} for p in prompts)
    assert prompts[0].prompt == "bond" and prompts[0].metadata["Category"] == "Abstract"


def test_real_coco_captions():
    path = SHARED_DATA / "coco_captions_val2017.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    annotations = json.loads(path.read_text())["annotations"]
    lowest: dict[int, int] = {}
    for annotation in annotations:
        image = annotation["image_id"]
        lowest[image] = min(lowest.get(image, annotation["id"]), annotation["id"])
    first = read(path)
    assert len(first) == 5000
    assert [p.sample_id for p in first] == [str(lowest[image]) for image in sorted(lowest)]
    every = read(path, captions="all")
    assert len(every) == 25_014
    assert {p.sample_id for p in every} == {str(a["id"]) for a in annotations}
    assert every[0].prompt == annotations[every[0].row]["caption"].strip()
