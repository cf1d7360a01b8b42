"""Resume and extend a run on local storage: fingerprint checks, appended prompts, changed
prompts, --retry-failed, the lease seen from the CLI, and `catbatch status`."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from catbatch.cli import main
from catbatch.job.layout import OutputLayout
from catbatch.job.lease import Lease
from catbatch.job.manifest import parse_manifest
from catbatch.job.runrecord import fingerprint

pytestmark = pytest.mark.slow

PROMPTS = ["a red fox", "a blue boat", "a green tree", "a yellow house", "a black cat", "a bird"]

MANIFEST = """\
name: resume
model: {{id: tiny-sd3, dtype: float32, device: cpu}}
prompts: {{path: {prompts}}}
seed: 5
width: 128
height: 128
steps: {steps}
batch_size: 1
shard_size: 2
variants: [{{name: full, pruning: none}}]
ray: {{address: local, actors: 1, resources: {{cpus: 1}}}}
output: {output}
"""


def write_job(tmp: Path, output: str, prompts: list[str], steps: int = 2) -> Path:
    """A manifest whose prompt file is ``prompts.txt`` in its own folder (same sample ids
    everywhere, since ids come from the file name and row)."""
    folder = tmp / f"job-{output.replace('/', '_').replace(':', '_')}"
    folder.mkdir(exist_ok=True)
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    path = folder / "job.yaml"
    path.write_text(MANIFEST.format(prompts="prompts.txt", steps=steps, output=output))
    return path


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def submit(path: Path, *flags: str) -> str:
    code, out = cli("submit", str(path), "--quiet", *flags)
    assert code == 0, out
    return out


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "variants" / "full").iterdir())}


def rows_by_id(out: Path) -> dict[tuple[str, int], dict]:
    rows = [
        r
        for f in (out / "variants" / "full").glob("*.parquet")
        for r in pq.read_table(f).to_pylist()
    ]
    keyed = {(r["sample_id"], r["image_index"]): r for r in rows}
    assert len(keyed) == len(rows), "a sample appears twice"
    return keyed


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, ray_cluster) -> tuple[Path, Path]:
    """All six prompts in one uninterrupted run: (output, manifest); do not modify, copy it."""
    tmp = tmp_path_factory.mktemp("ref")
    path = write_job(tmp, str(tmp / "ref"), PROMPTS)
    submit(path)
    return tmp / "ref", path


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[tuple[str, int], dict]:
    return rows_by_id(reference_run[0])


def copy_run(reference_run: tuple[Path, Path], tmp: Path, name: str) -> Path:
    """A copy of the reference output (submit to it with the reference manifest + --output)."""
    out = tmp / name
    shutil.copytree(reference_run[0], out)
    return out


def test_fingerprint_covers_what_changes_results(tmp_path):
    base = MANIFEST.format(prompts="p.txt", steps=2, output="out")
    fp = fingerprint(parse_manifest(base, base_dir=str(tmp_path)))
    changes = [
        ("steps: 2", "steps: 3"),
        ("width: 128", "width: 144"),
        ("seed: 5", "seed: 6"),
        ("dtype: float32", "dtype: bfloat16"),
        ("tiny-sd3,", "tiny-pixart,"),
        ("shard_size: 2", "shard_size: 3"),
        ("pruning: none", "pruning: {alpha: 0.5}"),
        ("pruning: none", "pruning: {alpha: 0.5, strategy: noise}"),
        ("{path: p.txt}", "{path: p.txt, limit: 3}"),
        ("{path: p.txt}", "{path: other.txt}"),
        ("name: full", "name: full, guidance_scale: 2.0"),
        ("name: full", "name: full, negative_prompt: blurry"),
    ]
    for old, new in changes:
        assert old in base
        changed = parse_manifest(base.replace(old, new), base_dir=str(tmp_path))
        assert fingerprint(changed) != fp, f"{new} does not change the fingerprint"
    same = {"batch_size: 1": "batch_size: 4", "actors: 1": "actors: 2", "output: out": "output: x"}
    for old, new in same.items():
        assert fingerprint(parse_manifest(base.replace(old, new), base_dir=str(tmp_path))) == fp
    m = parse_manifest(base, base_dir=str(tmp_path))
    a = {"kind": "hub", "path": "/hf/models--x--y/snapshots/abc123", "revision": None}
    b = {**a, "path": "/hf/models--x--y/snapshots/def456"}
    assert fingerprint(m, a) != fingerprint(m, b)  # the hub snapshot a model id resolved to


def test_append_extends_without_touching_committed_files(tmp_path, reference):
    out = tmp_path / "ext"
    path = write_job(tmp_path, str(out), PROMPTS[:3])
    submit(path)  # shard-00000 (2 prompts), shard-00001 (1 prompt, short)
    first = shard_files(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "variants" / "full").iterdir()}
    assert set(first) == {f"shard-0000{i}.{x}" for i in (0, 1) for x in ("parquet", "stats.json")}

    path = write_job(tmp_path, str(out), PROMPTS)  # three prompts appended
    text = submit(path)
    assert "2 shard(s) already committed" in text
    after = shard_files(out)
    for name, data in first.items():  # committed files are never rewritten
        assert after[name] == data
        assert (out / "variants" / "full" / name).stat().st_mtime_ns == mtimes[name]
    assert "shard-00001-x1.parquet" in after and "shard-00002.parquet" in after
    rows = rows_by_id(out)  # each sample exactly once
    assert rows.keys() == reference.keys()
    for key, row in rows.items():  # and the same image as one uninterrupted run
        assert row["image"]["bytes"] == reference[key]["image"]["bytes"], key
    record = json.loads((out / "run.json").read_text())
    assert record["planned"]["full"] == {"pieces": 4, "images": 6}
    assert (record["prompts"], record["shards"]) == (6, 3)
    assert json.loads((out / record["shard_index"]).read_text())["prompts"] == 6
    code, text = cli("status", str(out), "--json")
    st = json.loads(text)["variants"]["full"]
    assert (st["planned_shards"], st["committed_shards"], st["images_planned"]) == (4, 4, 6)
    code, text = cli("status", str(out))
    assert code == 0 and "4/4" in text and "complete" in text

    # resubmitting again finds nothing to do
    assert (
        "0 of 4 tasks to run" in CliRunner().invoke(main, ["submit", str(path), "--quiet"]).output
    )

    # a committed shard whose prompts changed is refused, naming it
    changed = write_job(tmp_path, str(out), ["a purple fox", *PROMPTS[1:]])
    code, text = cli("submit", str(changed), "--quiet")
    assert code == 2 and "shard full/shard-00000 is committed but its prompts changed" in text
    changed = write_job(tmp_path, str(out), [*PROMPTS[:3], "a pink house", *PROMPTS[4:]])
    code, text = cli("submit", str(changed), "--quiet")
    assert code == 2 and "full/shard-00001-x1 is committed but its prompts changed" in text
    shorter = write_job(tmp_path, str(out), PROMPTS[:4])
    code, text = cli("submit", str(shorter), "--quiet")
    assert code == 2 and "full/shard-00002 is committed" in text and "removed" in text
    assert shard_files(out) == after


def test_different_fingerprint_refused_unless_overwrite(tmp_path, ray_cluster):
    out = tmp_path / "fp"
    submit(write_job(tmp_path, str(out), PROMPTS[:1]))
    before = shard_files(out)
    path = write_job(tmp_path, str(out), PROMPTS[:1], steps=3)
    code, text = cli("submit", str(path), "--quiet")
    assert code == 2 and "differs in: variants.full.steps" in text and "--overwrite" in text
    assert shard_files(out) == before
    submit(path, "--overwrite")
    record = json.loads((out / "run.json").read_text())
    assert record["manifest"]["steps"] == 3 and record["status"] == "complete"
    after = shard_files(out)
    assert after.keys() == before.keys() and after != before
    assert (out / ".lease").is_dir()


def test_retry_failed_regenerates_only_failed_images(tmp_path, reference, monkeypatch):
    out = tmp_path / "retry"
    path = write_job(tmp_path, str(out), PROMPTS[:4])
    bad = sorted(reference)[1][0]
    monkeypatch.setenv("CATBATCH_TEST_FAULTS", json.dumps({"fail_ids": [bad]}))
    submit(path)
    monkeypatch.delenv("CATBATCH_TEST_FAULTS")
    rows = rows_by_id(out)
    assert rows[(bad, 0)]["status"] == "failed" and "injected" in rows[(bad, 0)]["error"]
    code, text = cli("status", str(out))
    assert code == 0 and "failed images in" in text
    files = shard_files(out)

    text = submit(path)  # a plain resubmit leaves failed images alone
    assert shard_files(out) == files

    text = submit(path, "--retry-failed")
    assert "retried 1 failed image(s): 1 now ok" in text
    again = rows_by_id(out)
    assert again.keys() == rows.keys()
    for key, row in again.items():
        assert row["status"] == "ok" and row["image"]["bytes"] == reference[key]["image"]["bytes"]
        if key != (bad, 0):  # untouched rows keep their batch ids
            assert row["batch_id"] == rows[key]["batch_id"]
    assert again[(bad, 0)]["batch_id"].endswith("-retry-b0")
    changed = {n for n in files if shard_files(out)[n] != files[n]}
    folder = out / "variants" / "full"
    owner = next(
        n
        for n in files
        if n.endswith(".parquet") and bad in pq.read_table(folder / n)["sample_id"].to_pylist()
    )
    assert changed == {owner, owner.replace(".parquet", ".stats.json")}
    stats = json.loads((folder / owner.replace(".parquet", ".stats.json")).read_text())
    assert stats["images_failed"] == 0 and stats["extra"]["recovered_images"] == 1


def test_status_reports_pending_and_failed_shards(tmp_path, reference_run):
    out = copy_run(reference_run, tmp_path, "st")
    (out / "variants" / "full" / "shard-00001.stats.json").unlink()  # as if never committed
    record = json.loads((out / "run.json").read_text())
    record["summary"]["failed_tasks"] = {"full/shard-00001": "RuntimeError: boom (3 attempts)"}
    (out / "run.json").write_text(json.dumps(record))
    code, text = cli("status", str(out))
    assert code == 1 and "incomplete" in text
    assert "failed shard full/shard-00001: RuntimeError: boom" in text
    code, text = cli("status", str(out), "--json")
    st = json.loads(text)["variants"]["full"]
    assert st["planned_shards"] == 3 and st["committed_shards"] == 2
    assert st["pending_shards"] == ["shard-00001"] and st["images_pending"] == 2
    assert st["images_ok"] == 4 and st["images_failed"] == 0
    code, text = cli("status", str(tmp_path / "nothing"))
    assert code == 2 and "holds no catbatch run" in text


def test_second_submission_refused_while_lease_held(tmp_path, reference_run):
    out = copy_run(reference_run, tmp_path, "busy")
    path, flags = reference_run[1], ("--output", str(out))
    before = (out / "run.json").read_bytes()
    holder = Lease(OutputLayout(str(out)))
    holder.acquire()
    try:
        code, text = cli("submit", str(path), "--quiet", *flags)
        assert code == 3 and "being written by another submission" in text
        assert (out / "run.json").read_bytes() == before  # nothing was written
        code, text = cli("status", str(out))
        assert f"lease: held by pid {os.getpid()}" in text
    finally:
        holder.release()
    text = submit(path, *flags)  # free again: goes through (nothing left to make)
    assert "0 of 3 tasks to run" in text
    code, text = cli("status", str(out))
    assert code == 0 and "lease: free" in text


def test_damaged_shards_are_named_moved_aside_and_made_again(tmp_path, reference_run, reference):
    """A truncated, a missing and a bit-flipped Parquet file whose stats stay: status names them
    (the flipped one with --verify) and is not complete; submit moves them aside (never deletes
    them) and makes them again."""
    out = copy_run(reference_run, tmp_path, "damaged")
    path, flags = reference_run[1], ("--output", str(out))
    folder = out / "variants" / "full"
    originals = {p.name: p.read_bytes() for p in folder.iterdir()}
    truncated = folder / "shard-00000.parquet"
    truncated.write_bytes(originals[truncated.name][: len(originals[truncated.name]) // 2])
    (folder / "shard-00002.parquet").unlink()
    flipped = bytearray(originals["shard-00001.parquet"])
    flipped[len(flipped) // 2] ^= 0xFF
    (folder / "shard-00001.parquet").write_bytes(bytes(flipped))

    code, text = cli("status", str(out))
    assert code == 1 and text.splitlines()[-1].startswith("incomplete"), text
    size = len(originals[truncated.name])
    assert (
        f"damaged shard full/shard-00000: its Parquet file has {size // 2} bytes, its stats say "
        f"{size} (submit moves it aside and makes it again)"
    ) in text
    assert "damaged shard full/shard-00002: its Parquet file is missing" in text
    assert "shard-00001" not in text  # same size: only --verify reads the bytes
    code, text = cli("status", str(out), "--verify", "--json")
    assert code == 1
    damaged = json.loads(text)["variants"]["full"]["damaged_shards"]
    assert sorted(damaged) == ["shard-00000", "shard-00001", "shard-00002"]
    assert damaged["shard-00001"] == "its Parquet file's sha256 differs from its stats"

    text = submit(path, *flags, "--verify")
    assert "3 of 3 tasks to run" in text
    for name in ("shard-00000", "shard-00001", "shard-00002"):
        assert f"damaged shard full/{name}: " in text and "made again" in text
    (aside,) = (out / "damaged").iterdir()  # one folder per submission
    kept = {p.name: p.read_bytes() for p in (aside / "full").iterdir()}
    assert kept == {
        "shard-00000.parquet": originals["shard-00000.parquet"][: size // 2],
        "shard-00001.parquet": bytes(flipped),
        **{f"shard-0000{i}.stats.json": originals[f"shard-0000{i}.stats.json"] for i in range(3)},
    }
    rows = rows_by_id(out)
    assert rows.keys() == reference.keys()
    for key, row in rows.items():
        assert row["image"]["bytes"] == reference[key]["image"]["bytes"], key
    code, text = cli("status", str(out), "--verify")
    assert code == 0 and text.splitlines()[-1] == "complete", text


def test_resubmits_keep_the_run_record(tmp_path, reference_run):
    """Each submission appends an entry to run.json; pipeline and logs stay; the summary counts
    every committed shard, whichever submission wrote it (the nightly cron resubmits)."""
    out = copy_run(reference_run, tmp_path, "nightly")
    path, flags = reference_run[1], ("--output", str(out))
    first = json.loads((out / "run.json").read_text())
    assert first["pipeline"]["pipeline_class"] and first["logs"]
    (entry,) = first["submissions"]
    assert entry["status"] == "complete" and entry["exit_code"] == 0 and entry["tasks"] == 3
    assert entry["host"] == socket.gethostname() and entry["logs"] == first["logs"]
    assert entry["summary"]["images"] == 6 and entry["finished_at"] >= entry["started_at"]
    for name in ("shard-00001.stats.json", "shard-00001.parquet"):
        (out / "variants" / "full" / name).unlink()

    submit(path, *flags)  # one shard to make
    second = json.loads((out / "run.json").read_text())
    assert second["submissions"][0] == entry
    made = second["submissions"][1]
    assert (made["tasks"], made["summary"]["images"], made["status"]) == (1, 2, "complete")
    assert made["logs"] and made["logs"] == second["logs"]

    submit(path, *flags)  # nothing left to do
    third = json.loads((out / "run.json").read_text())
    assert third["submissions"][:2] == second["submissions"]
    idle = third["submissions"][2]
    assert (idle["tasks"], idle["summary"]["images"], idle["logs"]) == (0, 0, None)
    assert third["pipeline"] == second["pipeline"] and third["logs"] == second["logs"]
    assert third["status"] == "complete"
    totals = {k: third["summary"][k] for k in ("images_ok", "images_failed", "shards_committed")}
    assert totals == {"images_ok": 6, "images_failed": 0, "shards_committed": 3}


def test_retry_keeps_every_column_of_untouched_rows():
    """--retry-failed rewrites a shard from its Parquet rows: the round trip loses nothing."""
    from catbatch.job.resume import row_from_record
    from catbatch.job.writer import Row, rows_to_table

    ok = Row(
        "s", 0, "p", {"k": "v"}, 1, "full", {"steps": 2}, b"png", 128, 128, "b0", 1, 0.1, "cpu"
    )
    ok.warmup, ok.clip_score = True, 31.5  # metric columns other modules add keep their values
    failed = Row("t", 1, "q", {}, 2, "full", {}, None, 128, 128, "b1", 1, 0.2, "cpu", "failed", "x")
    table = rows_to_table([ok, failed])
    assert [row_from_record(r) for r in table.to_pylist()] == [ok, failed]
