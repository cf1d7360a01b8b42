"""Inside one worker (no Ray): the pipeline calls run back to back while a pool turns images
into rows; rows, PNGs and CLIP scores are those of the plain sequential path; the commit marker
comes after the complete Parquet file; the pool and the actor's turns keep their bounds."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_clipscore import write_tiny_clip

from catbatch.job import worker as worker_module
from catbatch.job.distributor import _Turns
from catbatch.job.driver import plan
from catbatch.job.layout import OutputLayout
from catbatch.job.manifest import load_manifest
from catbatch.job.overlap import BoundedPool
from catbatch.job.seeds import image_generator
from catbatch.job.shardindex import read_piece
from catbatch.job.worker import PIPELINE_THREAD, Worker, encode_png

PROMPTS = ["a red fox", "a blue boat", "a green tree", "a yellow house", "a black cat"]

MANIFEST = """\
name: overlap
model: {{id: tiny-sd3, dtype: float32, device: {device}}}
prompts: {{path: prompts.txt}}
seed: 3
width: 64
height: 64
steps: 2
guidance_scale: 5.0
batch_size: {batch}
shard_size: 3
metrics: {{macs: false, clip: {{model: {clip_model}, pretrained: null, weights: {weights}}}}}
output: out-{batch}-{device}
"""


def make_worker(tmp: Path, batch: int, device: str = "cpu") -> tuple[Worker, object]:
    config, weights = write_tiny_clip(tmp)
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    path = tmp / f"m{batch}.yaml"
    text = MANIFEST.format(batch=batch, clip_model=config, weights=weights, device=device)
    path.write_text(text)
    m = load_manifest(path)
    p = plan(m)
    return Worker(m, p.model_source), p


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def batch2(request, tmp_path_factory, tiny_cache):
    """On the CPU, and on a GPU where there is one (the side-stream hand-off)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return make_worker(tmp_path_factory.mktemp("overlap2"), 2, request.param)


@pytest.fixture(scope="module")
def batch1(tmp_path_factory, tiny_cache):
    return make_worker(tmp_path_factory.mktemp("overlap1"), batch=1)


def read_rows(layout: OutputLayout, name: str) -> list[dict]:
    return pq.read_table(Path(layout.root) / "variants" / "default" / f"{name}.parquet").to_pylist()


def test_rows_are_those_of_the_pipeline_called_directly(batch2):
    """PNG bytes equal the pipeline's numpy output quantized on the host; CLIP scores (made on
    the device from the 8-bit images, as one batch) agree with the PIL path's."""
    worker, p = batch2
    task = p.pending[0]
    stats = worker.run_task(task, p.layout)
    assert stats.images_ok == 3
    rows = read_rows(p.layout, task.shard.name)
    items = worker.items(read_piece(task.shard))
    assert [(r["sample_id"], r["image_index"]) for r in rows] == [
        (it.prompt.sample_id, it.image_index) for it in items
    ]
    for start in (0, 2):  # the batches the worker made: 2 images, then 1
        batch = items[start : start + 2]
        out = worker.pipe(
            prompt=[it.prompt.prompt for it in batch],
            negative_prompt=[""] * len(batch),
            num_inference_steps=2,
            guidance_scale=5.0,
            height=64,
            width=64,
            generator=[image_generator(it.seed) for it in batch],
            output_type="np",
        )
        pixels = (np.clip(out.images, 0.0, 1.0) * 255).round().astype("uint8")
        expected = worker.clip.score(pixels, [it.prompt.prompt for it in batch])
        for n, row in enumerate(rows[start : start + 2]):
            if worker.device == "cpu":
                assert row["image"]["bytes"] == encode_png(pixels[n])
            else:  # two runs of the same kernels: equal up to a unit where a kernel differs
                made = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])), dtype=np.int16)
                assert np.abs(made - pixels[n]).max() <= 1
            assert row["clip_score"] == pytest.approx(expected[n], abs=0.5)
            assert row["clip_model"] == "catbatch-test-clip" and row["t_score_s"] > 0
    assert len({r["clip_score"] for r in rows}) == 3  # each image with its own prompt


def gate_rows(monkeypatch, first_waits_for: str | None = None) -> tuple[dict, threading.Event]:
    """Hold the pool's work on each task's first batch until ``release`` is set (or, with
    ``first_waits_for``, until the pool starts on that batch); returns when each batch's rows
    were done (by batch id) and ``release``."""
    done: dict[str, float] = {}
    release = threading.Event()
    real = Worker._batch_rows

    def batch_rows(self, batch, task, settings, images, finite, error, batch_id, *rest):
        if batch_id == first_waits_for:
            release.set()
        if batch_id.endswith("-b0"):
            release.wait(timeout=20)
        rows = real(self, batch, task, settings, images, finite, error, batch_id, *rest)
        done[batch_id] = time.time()
        return rows

    monkeypatch.setattr(Worker, "_batch_rows", batch_rows)
    return done, release


def test_pipeline_calls_do_not_wait_for_the_rows_and_rows_keep_their_order(batch1, monkeypatch):
    """Batch 0's rows wait until the pool starts on batch 2, which only the pipeline calls of
    batches 1 and 2 running meanwhile allow (run in sequence, it would wait 20 s in vain)."""
    worker, p = batch1
    ids = ["shard-00000-b0", "shard-00000-b1", "shard-00000-b2"]
    done, _ = gate_rows(monkeypatch, first_waits_for=ids[2])
    worker.take_events()
    task = p.pending[0]
    worker.run_task(task, p.layout)
    calls = [e for e in worker.take_events() if e["event"] == "batch"]
    assert [e["batch"] for e in calls] == ids
    assert done[ids[1]] < done[ids[0]]  # batch 1's rows were done before batch 0's
    assert all(e["call_start"] + e["call_s"] < done[ids[0]] for e in calls)
    rows = read_rows(p.layout, task.shard.name)
    items = worker.items(read_piece(task.shard))
    assert [r["sample_id"] for r in rows] == [it.prompt.sample_id for it in items]
    assert [r["batch_id"] for r in rows] == ids


def test_start_task_returns_before_the_commit_which_follows_the_complete_parquet(
    batch1, monkeypatch
):
    worker, p = batch1
    task, layout = p.pending[1], p.layout
    folder = Path(layout.root) / "variants" / "default"
    for name in (f"{task.shard.name}.parquet", f"{task.shard.name}.stats.json"):
        (folder / name).unlink(missing_ok=True)
    seen: list[tuple[str, bool]] = []
    real_write_json = OutputLayout.write_json

    def write_json(self, path, obj):
        if path.endswith(".stats.json"):  # the Parquet file is complete when the commit starts
            data = (folder / f"{obj['shard']}.parquet").read_bytes()
            seen.append((obj["shard"], hashlib.sha256(data).hexdigest() == obj["parquet_sha256"]))
        return real_write_json(self, path, obj)

    monkeypatch.setattr(OutputLayout, "write_json", write_json)
    _, release = gate_rows(monkeypatch)
    pending = worker.start_task(task, layout)  # both pipeline calls done, rows held
    time.sleep(0.2)
    assert not pending.future.done()
    assert not (folder / f"{task.shard.name}.parquet").exists()
    release.set()
    stats = pending.result(timeout=120)
    assert seen == [(task.shard.name, True)]
    assert json.loads((folder / f"{task.shard.name}.stats.json").read_text())["rows"] == 2
    assert stats.images_ok == 2


def test_every_pipeline_call_runs_on_the_one_pipeline_thread(batch1, monkeypatch):
    """Tasks started from different threads (as Ray's threads of an actor start them) make
    their pipeline calls on the worker's pipeline thread; an error there reaches the caller."""
    worker, p = batch1
    threads: list[str] = []
    real = Worker._call_pipeline

    def call(self, *args):
        threads.append(threading.current_thread().name)
        return real(self, *args)

    monkeypatch.setattr(Worker, "_call_pipeline", call)
    callers = [threading.Thread(target=worker.run_task, args=(t, p.layout)) for t in p.pending]
    for c in callers:
        c.start()
        c.join()
    assert len(threads) == sum(len(read_piece(t.shard)) for t in p.pending)
    assert len(set(threads)) == 1 and threads[0].startswith(PIPELINE_THREAD)
    monkeypatch.setattr(Worker, "_start_task", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        worker.start_task(p.pending[0], p.layout)


def test_the_pools_one_time_costs_are_paid_when_the_worker_starts(batch1, monkeypatch):
    """Tokenizer copies exist before the first batch; none is made between calls."""
    worker, p = batch1
    assert set(worker._prompt_limits) == {s.max_sequence_length for s in worker.variants.values()}
    made = []
    monkeypatch.setattr(worker_module.metrics, "prompt_limits", lambda *a: made.append(a))
    worker.run_task(p.pending[0], p.layout)
    assert made == []


def test_bounded_pool_makes_the_submitter_wait_at_its_limit():
    pool = BoundedPool(threads=1, limit=2, name="test-pool")
    release = threading.Event()
    futures = [pool.submit(release.wait), pool.submit(release.wait)]
    third = threading.Thread(target=lambda: futures.append(pool.submit(len, "ab")))
    third.start()
    third.join(timeout=0.3)
    assert third.is_alive() and len(futures) == 2  # two jobs unfinished: the third waits
    release.set()
    third.join(timeout=10)
    assert not third.is_alive() and [f.result() for f in futures] == [True, True, 2]
    pool.shutdown()


def test_turns_let_calls_through_in_their_numbered_order():
    turns, order = _Turns(), []

    def take(n: int) -> None:
        with turns.take(n):
            order.append(n)
            time.sleep(0.05)

    threads = [threading.Thread(target=take, args=(n,)) for n in (2, 0, 1)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # turn 2 asks first, then 0, then 1
    for t in threads:
        t.join(timeout=10)
    assert order == [0, 1, 2]
