"""Object storage for real: submit, extend, status and the lease on ``s3://`` against SeaweedFS on
loopback; credentials stay out of every file and log; an S3 outage during a run."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from s3server import ACCESS_KEY, SECRET_KEY, drop_requests

from catbatch.cli import main
from catbatch.job.layout import OutputLayout, StorageError
from catbatch.job.lease import Lease

pytestmark = pytest.mark.slow
s3fs = pytest.importorskip("s3fs", reason="s3fs not installed (test extras)")

PROMPTS = ["a red fox", "a blue boat", "a green tree", "a yellow house", "a black cat"]

MANIFEST = """\
name: s3job
model: {{id: tiny-sd3, dtype: float32, device: cpu}}
prompts: {{path: prompts.txt}}
seed: 9
width: 128
height: 128
steps: 2
batch_size: 1
shard_size: {shard}
variants: [{{name: full, pruning: none}}]
ray: {{address: local, actors: 1, resources: {{cpus: 1}}}}
output: {output}
"""


def job(tmp: Path, output: str, prompts: list[str], shard: int = 2) -> Path:
    (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")
    path = tmp / "job.yaml"
    path.write_text(MANIFEST.format(output=output, shard=shard))
    return path


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def fresh_fs() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)


def s3_rows(url: str) -> dict[tuple[str, int], dict]:
    fs = fresh_fs()
    root = url.removeprefix("s3://")
    rows = []
    for f in fs.glob(f"{root}/variants/full/*.parquet"):
        with fs.open(f, "rb") as fh:
            rows += pq.read_table(fh).to_pylist()
    keyed = {(r["sample_id"], r["image_index"]): r for r in rows}
    assert len(keyed) == len(rows), "a sample appears twice"
    return keyed


def all_text(url: str) -> str:
    """Every object under the output, as text (Parquet included, bytes decoded loosely)."""
    fs = fresh_fs()
    root = url.removeprefix("s3://")
    return "\n".join(fs.cat_file(p).decode("latin-1") for p in fs.find(root))


def test_submit_extend_status_lease_on_s3(tmp_path, s3_server, ray_cluster, caplog):
    caplog.set_level(logging.DEBUG)
    url = s3_server.url(f"runs/{uuid.uuid4().hex[:8]}")
    path = job(tmp_path, url, PROMPTS[:3])
    code, out = cli("submit", str(path), "--quiet")
    assert code == 0, out
    assert len(s3_rows(url)) == 3

    path = job(tmp_path, url, PROMPTS)  # two prompts appended: shard-00001-x1 and shard-00002
    code, out = cli("submit", str(path), "--quiet")
    assert code == 0 and "2 shard(s) already committed" in out, out
    rows = s3_rows(url)
    assert len(rows) == 5 and {r["status"] for r in rows.values()} == {"ok"}
    code, text = cli("status", url)
    assert code == 0 and "4/4" in text and "lease: free" in text, text

    holder = Lease(OutputLayout(url))
    holder.acquire()
    try:
        code, text = cli("submit", str(path), "--quiet")
        assert code == 3 and "being written by another submission" in text
    finally:
        holder.release()

    # a lost object: status names it, the next submit moves its stats aside and makes it again
    root = url.removeprefix("s3://")
    fresh_fs().rm_file(f"{root}/variants/full/shard-00002.parquet")
    code, text = cli("status", url, "--verify")
    assert code == 1 and "damaged shard full/shard-00002: its Parquet file is missing" in text
    code, out = cli("submit", str(path), "--quiet")
    assert code == 0 and "1 of 4 tasks to run" in out, out
    assert len(s3_rows(url)) == 5
    assert [p.rsplit("/", 1)[1] for p in fresh_fs().find(f"{root}/damaged")] == [
        "shard-00002.stats.json"
    ]

    record = json.loads(fresh_fs().cat_file(url.removeprefix("s3://") + "/run.json"))
    assert record["status"] == "complete" and record["planned"]["full"]["pieces"] == 4
    everything = all_text(url) + out + text + caplog.text
    assert SECRET_KEY not in everything
    assert ACCESS_KEY not in all_text(url)


def test_rejected_credentials_fail_before_anything_starts(tmp_path, s3_server, monkeypatch):
    url = s3_server.url(f"runs/{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        code, text = cli("submit", str(job(tmp_path, url, PROMPTS[:1])), "--quiet")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert code == 2 and "is not writable" in text and url in text, text
    assert "wrong-secret-value-123" not in text
    monkeypatch.undo()
    assert not fresh_fs().exists(url.removeprefix("s3://") + "/run.json")


def test_outage_mid_run_retries_then_completes(tmp_path, s3_server, ray_cluster, monkeypatch):
    """The S3 server stops after the first shard commits and comes back a few seconds later;
    the writes retry with backoff and the run completes with every image exactly once."""
    from catbatch.job.driver import plan, prepare_output, submit
    from catbatch.job.manifest import load_manifest
    from catbatch.job.worker import FAULTS_ENV

    # a second per batch: shards are still to be written when the server stops (without it
    # the tiny model can commit all five before the test sees the first, and no write fails)
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"delay_s": 1.0}))
    url = s3_server.url(f"runs/{uuid.uuid4().hex[:8]}")
    m = load_manifest(job(tmp_path, url, PROMPTS, shard=1))
    p = plan(m)
    result: dict = {}

    def run() -> None:
        try:
            with Lease(p.layout) as lease:
                prepare_output(p, overwrite=False)
                result["summary"] = submit(p, progress=False, lease=lease)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    fs, folder = fresh_fs(), url.removeprefix("s3://") + "/variants/full"
    deadline = time.monotonic() + 300
    while not fs.glob(f"{folder}/*.stats.json") and time.monotonic() < deadline:
        time.sleep(0.2)
        fs.invalidate_cache()
    assert thread.is_alive(), result
    s3_server.stop()
    # while it is down, wait for a worker's write (dropped unanswered), then bring it back
    lines = drop_requests(
        lambda seen: any(" /catbatch-test/" in x and "/variants/" in x for x in seen)
    )
    s3_server.start()
    assert any(x.startswith("PUT ") and "/variants/full/shard-" in x for x in lines), lines
    thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary.images == 5 and not summary.failed_tasks
    rows = s3_rows(url)
    assert len(rows) == 5 and {r["status"] for r in rows.values()} == {"ok"}
    code, text = cli("status", url)
    assert code == 0 and "5/5" in text, text


def test_outage_past_retry_budget_fails_clearly_then_rerun_completes(
    tmp_path, s3_server, ray_cluster, monkeypatch
):
    """A worker whose writes stay refused past the retry budget raises a clear error without
    committing anything; after the server is back, rerunning the submission completes."""
    from catbatch.job.driver import plan, prepare_output
    from catbatch.job.manifest import load_manifest
    from catbatch.job.worker import Worker

    url = s3_server.url(f"runs/{uuid.uuid4().hex[:8]}")
    path = job(tmp_path, url, PROMPTS[:2])
    p = plan(load_manifest(path))
    prepare_output(p, overwrite=False)
    worker = Worker(p.manifest, p.model_source)
    monkeypatch.setenv("CATBATCH_STORAGE_RETRY_S", "2")
    s3_server.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageError) as err:
            worker.run_task(p.pending[0], p.layout)
        assert time.monotonic() - t0 < 30
    finally:
        s3_server.start()
    msg = str(err.value)
    assert "storage unreachable, gave up after" in msg and url in msg and SECRET_KEY not in msg
    assert not fresh_fs().glob(url.removeprefix("s3://") + "/variants/full/*")  # nothing half-done
    monkeypatch.delenv("CATBATCH_STORAGE_RETRY_S")
    code, text = cli("submit", str(path), "--quiet")
    assert code == 0, text
    assert len(s3_rows(url)) == 2


def test_status_and_resume_read_one_listing_on_s3(tmp_path, s3_server):
    """120 committed pieces: `status` and resume send a handful of requests (the run record,
    one listing, the commit digest, the lease), none per piece."""
    from catbatch.job.driver import plan, prepare_output
    from catbatch.job.manifest import load_manifest
    from catbatch.job.resume import plan_variant
    from catbatch.job.runrecord import committed_totals
    from catbatch.job.sharding import content_hash
    from catbatch.job.status import output_status
    from catbatch.job.writer import Row, write_shard

    url = s3_server.url(f"runs/{uuid.uuid4().hex[:8]}")
    n = 120
    p = plan(load_manifest(job(tmp_path, url, [f"prompt {i}" for i in range(n)], shard=1)), False)
    prepare_output(p, overwrite=False)  # stores the shard index on S3
    for task in p.pending:
        prompts = p.index.read(task.shard.index)
        rows = [
            Row(x.sample_id, 0, x.prompt, {}, 1, "full", {}, b"png", 16, 16, "b", 1, 0.1, "x")
            for x in prompts
        ]
        write_shard(p.layout, "full", task.shard.name, content_hash(prompts), rows, 0.1, "x")
    committed_totals(p.layout, ["full"])  # reads each stats file once, records the digest
    record = {
        "name": "s3job",
        "variants": ["full"],
        "prompts": n,
        "images_per_prompt": 1,
        "manifest": {"shard_size": 1},
    }
    p.layout.write_json(p.layout.run_record, record)

    sent: list[str] = []
    p.layout.fs.connect()
    p.layout.fs.s3.meta.events.register(
        "before-send.s3", lambda request, **_: sent.append(f"{request.method} {request.url}")
    )
    st = output_status(url)
    assert st.complete and st.variants["full"].committed_shards == n
    assert 0 < len(sent) <= 8, sent
    assert not [r for r in sent if ".stats.json" in r], sent
    sent.clear()
    vp = plan_variant(p.layout, "full", p.index, 1)
    assert vp.committed == n and not vp.pending
    assert 0 < len(sent) <= 4 and not [r for r in sent if ".stats.json" in r], sent


def test_missing_s3_credentials_are_a_clear_error(tmp_path, monkeypatch):
    """No credentials anywhere: validate, status and report exit 2 naming what they read and
    where credentials come from (no botocore traceback)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        manifest = tmp_path / "coco.yaml"
        manifest.write_text(
            "name: c\nmodel: {id: tiny-sd3}\noutput: out\n"
            "prompts: {path: 's3://no-bucket/captions.json', format: coco}\n"
        )
        code, text = cli("validate", str(manifest), "--no-model-check")
        assert code == 2 and "s3://no-bucket/captions.json: cannot read" in text, text
        assert "NoCredentialsError" in text and "AWS_ACCESS_KEY_ID" in text
        for command in ("status", "report"):
            code, text = cli(command, "s3://no-bucket/run")
            assert code == 2 and "s3://no-bucket/run/run.json" in text, (command, text)
            assert "NoCredentialsError" in text and "Traceback" not in text
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_prompt_source_on_s3_is_indexed_and_read_by_byte_ranges(tmp_path, s3_server):
    """A text source on S3: the index build streams it once, each shard is read back with a
    ranged GET, and the stored index is reused until the object changes (its ETag)."""
    from catbatch.job.prompts import PromptSource, read_prompts
    from catbatch.job.shardindex import build_index, load_index, save_index

    root = f"{s3_server.url('')}src-{uuid.uuid4().hex[:8]}".removeprefix("s3://")
    fs = fresh_fs()
    fs.pipe_file(f"{root}/prompts.txt", "".join(f"prompt {i}\n" for i in range(50)).encode())
    source = PromptSource(path=f"s3://{root}/prompts.txt")
    index = build_index(source, None, 8)
    layout = OutputLayout(s3_server.url(f"runs/{uuid.uuid4().hex[:8]}"))
    sent: list[str] = []
    layout.fs.connect()
    layout.fs.s3.meta.events.register(
        "before-send.s3",
        lambda request, **_: sent.append(bytes(request.headers.get("Range") or b"").decode()),
    )
    shards = [index.read(i) for i in range(index.n_shards)]
    assert [p for s in shards for p in s] == read_prompts(source)
    assert len([r for r in sent if r.startswith("bytes=")]) >= index.n_shards, sent
    save_index(layout, index)
    assert load_index(layout, source, None, 8).build == index.build
    fs.pipe_file(f"{root}/prompts.txt", b"".join(b"prompt %d\n" % i for i in range(51)))
    assert load_index(layout, source, None, 8) is None


def test_a_listing_of_several_pages_matches_ls(s3_server):
    """2,201 objects (three pages of S3's 1,000): list_files reads them page by page, with the
    entries s3fs's whole ``ls`` gives, keeps nothing in fsspec's listing cache, and finds a
    missing folder or bucket empty, as ``ls`` does."""
    from catbatch.job.layout import _remote_entry

    layout = OutputLayout(s3_server.url(f"runs/{uuid.uuid4().hex[:8]}"))
    folder = layout.path("variants", "v")
    objects = {
        f"{folder}/shard-{i:05d}.{ext}": b"x" * (i % 7)
        for i in range(1100)
        for ext in ("parquet", "stats.json")
    }
    layout.fs.pipe({**objects, f"{folder}/sub/f": b"in a subfolder"})
    sent: list[str] = []
    layout.fs.connect()
    layout.fs.s3.meta.events.register(
        "before-send.s3", lambda request, **_: sent.append(f"{request.method} {request.url}")
    )
    files = layout.list_files("variants", "v")
    assert len(sent) == 3 and all(r.startswith("GET ") and "list-type=2" in r for r in sent), sent
    assert folder not in layout.fs.dircache
    whole = fresh_fs().ls(folder, detail=True)
    expected = {
        e["name"].rsplit("/", 1)[1]: _remote_entry(e) for e in whole if e["type"] != "directory"
    }
    assert files == expected and len(files) == 2200
    assert files["shard-01099.parquet"].size == 1099 % 7 and files["shard-01099.parquet"].md5
    stats = layout.list_files("variants", "v", suffix=".stats.json")
    assert stats == {n: e for n, e in expected.items() if n.endswith(".stats.json")}
    assert layout.list_files("variants", "missing") == {}
    with pytest.raises(FileNotFoundError):
        fresh_fs().ls("catbatch-no-such-bucket/run/variants")
    assert OutputLayout("s3://catbatch-no-such-bucket/run").list_files("variants") == {}
