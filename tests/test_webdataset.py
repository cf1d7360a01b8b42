"""WebDataset output (``output_format: webdataset``): the manifest field and the fingerprint,
tar shards written with the Parquet path's commit marker and read back by the ``webdataset``
package, damaged tars found (truncated: by size; same size, other bytes: by sha256), the
rows kept through --retry-failed's read, status / open_output / report on S3; and a real run
of the tiny preset: status, open_output, report, resume after a partial run (a shard missing,
a truncated tar), appended prompts, a changed format refused, --retry-failed of a failed image."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

import catbatch
from catbatch.cli import main
from catbatch.job.layout import OutputLayout
from catbatch.job.manifest import parse_manifest
from catbatch.job.resume import row_from_record
from catbatch.job.runrecord import fingerprint, fingerprint_inputs
from catbatch.job.status import output_status
from catbatch.job.tarshards import WEBDATASET, read_tar, sample_key
from catbatch.job.verify import check_pieces, move_aside
from catbatch.job.writer import SCHEMA, Row, rows_to_table, shard_format, write_shard

MANIFEST = """\
name: wds
model: {id: tiny-sd3, dtype: float32, device: cpu}
prompts: {path: prompts.txt}
seed: 3
width: 64
height: 64
steps: 2
batch_size: 2
shard_size: 2
variants: [{name: full, pruning: none}]
ray: {actors: 1, resources: {cpus: 1}}
output: out
output_format: webdataset
"""


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def rows(ids: list[str]) -> list[Row]:
    """An ok row per id (image index 0), the last one failed (no image)."""
    out = []
    for n, sid in enumerate(ids):
        image = png((n, 0, 0))
        row = Row(
            sid, 0, f"p {n}", {"k": "v"}, n, "v", {"steps": 2}, image, 8, 8, "b0", 1, 0.1, "x"
        )
        row.clip_score = 30.0 + n  # a metric column
        out.append(row)
    out[-1].png, out[-1].status, out[-1].error = None, "failed", "RuntimeError: boom"
    return out


def commit(layout: OutputLayout, name: str, ids: list[str]) -> dict:
    return asdict(write_shard(layout, "v", name, "h" * 64, rows(ids), 0.1, "cpu", fmt=WEBDATASET))


def record(shards: int, per_shard: int) -> dict:
    """A run record as status, report and open_output read it."""
    return {
        "name": "wds",
        "variants": ["v"],
        "prompts": shards * per_shard,
        "images_per_prompt": 1,
        "manifest": {"shard_size": per_shard, "output_format": "webdataset"},
    }


# -- the manifest field and the fingerprint ------------------------------------------------------


def test_output_format_is_a_checked_manifest_field(tmp_path):
    assert parse_manifest(MANIFEST.replace("webdataset", "parquet")).output_format == "parquet"
    default = "\n".join(line for line in MANIFEST.splitlines() if "output_format" not in line)
    assert parse_manifest(default).output_format == "parquet"
    path = tmp_path / "m.yaml"
    path.write_text(MANIFEST.replace("output_format: webdataset", "output_format: tar"))
    with pytest.raises(catbatch.ManifestError) as err:
        catbatch.validate(path, check_model=False)
    e = err.value
    assert (e.field, e.file, e.line) == ("output_format", str(path), 13)
    assert "'tar'" in str(e) and "'parquet' or 'webdataset'" in str(e)


def test_format_is_in_the_fingerprint_only_when_not_parquet(tmp_path):
    parquet = parse_manifest(MANIFEST.replace("webdataset", "parquet"), base_dir=str(tmp_path))
    default = "\n".join(line for line in MANIFEST.splitlines() if "output_format" not in line)
    tar = parse_manifest(MANIFEST, base_dir=str(tmp_path))
    assert fingerprint(parquet) == fingerprint(parse_manifest(default, base_dir=str(tmp_path)))
    assert "output_format" not in fingerprint_inputs(parquet)
    assert fingerprint_inputs(tar)["output_format"] == "webdataset"
    assert fingerprint(tar) != fingerprint(parquet)


# -- shards: written, read back, checked (no model, no Ray) --------------------------------------


def test_tar_shard_is_committed_like_parquet_and_read_by_webdataset(tmp_path):
    layout = OutputLayout(str(tmp_path))
    ids = ["plain", "a.b/c d", "~x_1", "ünï", "__meta__", "l" * 300]
    stats = commit(layout, "shard-00000", ids)
    folder = tmp_path / "variants" / "v"
    assert sorted(p.name for p in folder.iterdir()) == ["shard-00000.stats.json", "shard-00000.tar"]
    data = (folder / "shard-00000.tar").read_bytes()
    assert stats["parquet_bytes"] == len(data) and stats["rows"] == 6
    assert json.loads((folder / "shard-00000.stats.json").read_text()) == stats
    assert stats["parquet_sha256"] == hashlib.sha256(data).hexdigest()
    assert (stats["images_ok"], stats["images_failed"]) == (5, 1)

    keys = [sample_key(i, 0) for i in ids]
    assert len(set(keys)) == 6 and all("." not in k and "/" not in k for k in keys)
    assert max(map(len, keys)) <= 170
    samples = list(wds.WebDataset(str(folder / "shard-00000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == keys
    for n, (s, sid) in enumerate(zip(samples, ids, strict=True)):
        meta = json.loads(s["json"])
        assert meta["sample_id"] == sid and meta["prompt"] == f"p {n}"
        assert meta["prompt_metadata"] == {"k": "v"} and meta["settings"] == {"steps": 2}
        assert "png" not in meta and set(meta) == set(SCHEMA.names) - {"image"}
        if n < 5:
            assert Image.open(io.BytesIO(s["png"])).getpixel((0, 0)) == (n, 0, 0)
        else:
            assert "png" not in s and meta["status"] == "failed"
    decoded = wds.WebDataset(str(folder / "shard-00000.tar"), shardshuffle=False).decode("pil")
    assert next(iter(decoded))["png"].size == (8, 8)

    # read back: the Parquet writer's table, and the rows --retry-failed rewrites from
    table = read_tar(io.BytesIO(data))
    assert table.equals(rows_to_table(rows(ids)))
    assert table.schema.metadata == SCHEMA.metadata
    assert [row_from_record(r) for r in table.to_pylist()] == rows(ids)
    slim = read_tar(io.BytesIO(data), ["sample_id", "status"])
    assert slim.column_names == ["sample_id", "status"]


def test_damaged_tars_are_found_and_moved_aside(tmp_path):
    layout = OutputLayout(str(tmp_path))
    for i in range(3):
        commit(layout, f"shard-0000{i}", [f"s{i}-{k}" for k in range(3)])
    folder = tmp_path / "variants" / "v"
    assert not check_pieces(layout, "v", deep=True, fmt=WEBDATASET).damaged
    truncated = folder / "shard-00000.tar"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    garbled = folder / "shard-00001.tar"
    data = bytearray(garbled.read_bytes())
    data[600:610] = b"x" * 10  # same size, other bytes
    garbled.write_bytes(bytes(data))

    shallow = check_pieces(layout, "v", fmt=WEBDATASET)
    assert list(shallow.damaged) == ["shard-00000"]
    assert "its tar file has 1000 bytes" in shallow.damaged["shard-00000"]
    deep = check_pieces(layout, "v", deep=True, fmt=WEBDATASET)
    assert deep.damaged["shard-00001"] == "its tar file's sha256 differs from its stats"
    assert sorted(deep.stats) == ["shard-00002"]
    # a Parquet-format reader finds no Parquet files: the format comes from the run record
    assert "Parquet file is missing" in check_pieces(layout, "v").damaged["shard-00002"]

    layout.write_json(layout.run_record, record(3, 3))
    st = output_status(str(tmp_path))
    assert list(st.variants["v"].damaged_shards) == ["shard-00000"] and not st.complete
    assert catbatch.open_output(tmp_path).count_rows() == 6  # shard-00001: same size
    assert catbatch.open_output(tmp_path, verify=True).count_rows() == 3

    moved = move_aside(layout, "v", ["shard-00000"])
    assert sorted(p.name for p in Path(moved).iterdir()) == [
        "shard-00000.stats.json",
        "shard-00000.tar",
    ]
    assert sorted(p.name for p in folder.iterdir())[0] == "shard-00001.stats.json"


def test_status_open_output_and_report_on_s3(s3_server, tmp_path):
    from catbatch.report import ReportOptions, make_report

    url = s3_server.url(f"wds-{tmp_path.name}")
    layout = OutputLayout(url)
    commit(layout, "shard-00000", ["a", "b"])
    commit(layout, "shard-00001", ["c", "d"])
    layout.write_json(layout.run_record, record(2, 2))
    st = catbatch.status(url, verify=True)
    assert st.complete and st.variants["v"].images_ok == 2
    table = catbatch.open_output(url).to_table()
    assert sorted(table.column("sample_id").to_pylist()) == ["a", "b", "c", "d"]
    assert table.schema.metadata[b"catbatch.schema_version"] == b"1"

    report, files = make_report(url, options=ReportOptions(bootstrap=10))
    assert report.data["output_format"] == "webdataset"
    assert report.data["variants"]["v"]["images"] == 2
    card = layout.read_bytes(layout.path("report", "card.md")).decode()
    assert "data_files: variants/v/*.tar" in card and "WebDataset tars" in card

    path = layout.path("variants", "v", "shard-00001.tar")
    layout.write_bytes(path, layout.read_bytes(path)[:-512])
    st = catbatch.status(url)
    assert list(st.variants["v"].damaged_shards) == ["shard-00001"]
    assert catbatch.open_output(url).count_rows() == 2
    assert shard_format("webdataset") is WEBDATASET


# -- a real run of the tiny preset ---------------------------------------------------------------


def tar_samples(out: Path) -> dict[tuple[str, int], dict]:
    """Every sample of the run's tars as ``webdataset`` reads them, in order, by (id, index)."""
    samples = [
        s
        for f in sorted((out / "variants" / "full").glob("*.tar"))
        for s in wds.WebDataset(str(f), shardshuffle=False)
    ]
    keyed = {}
    for s in samples:
        meta = json.loads(s["json"])
        keyed[(meta["sample_id"], meta["image_index"])] = s
    assert len(keyed) == len(samples), "a sample appears twice"
    return keyed


def tar_images(out: Path) -> dict[tuple[str, int], bytes]:
    return {key: s["png"] for key, s in tar_samples(out).items()}


@pytest.mark.slow
def test_run_status_report_and_resume_after_a_partial_run(tmp_path, ray_cluster):
    (tmp_path / "prompts.txt").write_text("a red fox\na blue boat\na green tree\n")
    path = tmp_path / "m.yaml"
    path.write_text(MANIFEST)
    out = tmp_path / "out"
    folder = out / "variants" / "full"

    summary = catbatch.submit(path)
    assert (summary.images, summary.failed_images) == (3, 0)
    assert sorted(p.name for p in folder.iterdir()) == [
        "shard-00000.stats.json",
        "shard-00000.tar",
        "shard-00001.stats.json",
        "shard-00001.tar",
    ]
    first = tar_images(out)
    assert len(first) == 3
    assert all(Image.open(io.BytesIO(b)).size == (64, 64) for b in first.values())
    assert catbatch.status(out, verify=True).complete
    table = catbatch.open_output(out).to_table()
    assert table.num_rows == 3 and set(table.column("status").to_pylist()) == {"ok"}
    by_key = {(r["sample_id"], r["image_index"]): r for r in table.to_pylist()}
    assert {k: r["image"]["bytes"] for k, r in by_key.items()} == first
    assert all(r["macs_paper"] > 0 for r in by_key.values())

    res = CliRunner().invoke(main, ["report", str(out), "--bootstrap", "10"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["variants"]["full"]["images"] == 3 and not report["partial"]

    # a partial run: shard-00001 never committed, shard-00000's tar cut short by a crash
    (folder / "shard-00001.tar").unlink()
    (folder / "shard-00001.stats.json").unlink()
    tar = folder / "shard-00000.tar"
    tar.write_bytes(tar.read_bytes()[:2048])
    st = catbatch.status(out)
    assert st.variants["full"].pending_shards == ["shard-00000", "shard-00001"]
    assert "tar file has 2048 bytes" in st.variants["full"].damaged_shards["shard-00000"]
    assert catbatch.open_output(out).count_rows() == 0
    summary = catbatch.submit(path)
    assert summary.images == 3
    assert catbatch.status(out, verify=True).complete
    assert tar_images(out) == first  # the same batches: the same bytes
    assert len(list((out / "damaged").rglob("shard-00000.tar"))) == 1

    # appended prompts: the short shard's extension piece is a tar too
    with (tmp_path / "prompts.txt").open("a") as f:
        f.write("a yellow house\n")
    assert catbatch.submit(path).images == 1
    assert (folder / "shard-00001-x1.tar").is_file()
    assert catbatch.open_output(out).count_rows() == 4

    with pytest.raises(catbatch.InputError, match="differs in: output_format"):
        catbatch.submit(path, output_format="parquet")


@pytest.mark.slow
def test_retry_failed_fills_in_a_failed_image(tmp_path, ray_cluster, monkeypatch):
    """A run where one image fails keeps its row in the tar (JSON, no PNG); submit
    --retry-failed rewrites that tar with the image made, every other image as it was."""
    (tmp_path / "prompts.txt").write_text("a red fox\na blue boat\na green tree\n")
    path = tmp_path / "m.yaml"
    path.write_text(MANIFEST)
    out = tmp_path / "out"
    folder = out / "variants" / "full"
    bad = catbatch.validate(path, check_model=False).index.read(0)[1].sample_id

    monkeypatch.setenv("CATBATCH_TEST_FAULTS", json.dumps({"fail_ids": [bad]}))
    res = CliRunner().invoke(main, ["submit", str(path), "--quiet"])
    monkeypatch.delenv("CATBATCH_TEST_FAULTS")
    assert res.exit_code == 0, res.output
    before = tar_samples(out)
    assert len(before) == 3
    failed = before[(bad, 0)]
    assert failed["__key__"] == sample_key(bad, 0) and "png" not in failed
    meta = json.loads(failed["json"])
    assert meta["status"] == "failed" and "injected failure" in meta["error"]
    assert all("png" in s for key, s in before.items() if key != (bad, 0))
    stats = json.loads((folder / "shard-00000.stats.json").read_text())
    assert (stats["images_ok"], stats["images_failed"]) == (1, 1)
    res = CliRunner().invoke(main, ["status", str(out)])
    assert res.exit_code == 0 and "failed images in shard-00000" in res.output
    files = {p.name: p.read_bytes() for p in folder.iterdir()}

    res = CliRunner().invoke(main, ["submit", str(path), "--quiet", "--retry-failed"])
    assert res.exit_code == 0, res.output
    assert "retried 1 failed image(s): 1 now ok" in res.output
    after = tar_samples(out)
    assert list(after) == list(before)  # the same rows, in the same order
    meta = json.loads(after[(bad, 0)]["json"])
    assert meta["status"] == "ok" and meta["error"] is None
    assert meta["batch_id"].endswith("-retry-b0")
    assert Image.open(io.BytesIO(after[(bad, 0)]["png"])).size == (64, 64)
    for key, s in before.items():  # the others: the same image and row
        if key != (bad, 0):
            assert after[key]["png"] == s["png"], key
            assert json.loads(after[key]["json"]) == json.loads(s["json"]), key

    now = {p.name: p.read_bytes() for p in folder.iterdir()}
    changed = {name for name in files if now[name] != files[name]}
    assert now.keys() == files.keys()
    assert changed == {"shard-00000.tar", "shard-00000.stats.json"}
    stats = json.loads(now["shard-00000.stats.json"])
    tar = now["shard-00000.tar"]
    assert stats["parquet_bytes"] == len(tar)
    assert stats["parquet_sha256"] == hashlib.sha256(tar).hexdigest()
    assert (stats["rows"], stats["images_ok"], stats["images_failed"]) == (2, 2, 0)
    assert stats["extra"] == {"retried_images": 1, "recovered_images": 1}
    res = CliRunner().invoke(main, ["status", str(out), "--verify"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1] == "complete" and "failed images" not in res.output
    st = catbatch.status(out, verify=True)
    full = st.variants["full"]
    assert st.complete and (full.images_ok, full.images_failed) == (3, 0)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def readme_example() -> str:
    """The Python block of the README's "In your pipeline" / "WebDataset output" section."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## In your pipeline") :]
    section = section[section.index("### WebDataset output") :].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys, ray_cluster):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "2 rows"
    assert sorted(line.split(" ", 1)[1] for line in out[:-1]) == [
        '(64, 64) ok "a blue boat"',
        '(64, 64) ok "a red fox"',
    ]
    # as the README says, Hugging Face datasets reads the same tars
    import datasets

    data = datasets.load_dataset(
        "webdataset",
        data_files=str(tmp_path / "out-wds/variants/default/*.tar"),
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert data.num_rows == 2 and data[0]["png"].size == (64, 64)
    assert {r["json"]["prompt"] for r in data} == {"a red fox", "a blue boat"}
