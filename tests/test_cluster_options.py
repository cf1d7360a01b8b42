"""Cluster options without a cluster: GPU planning, submit's flags, memory options, the
progress/ETA arithmetic and the run's JSON-lines logs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from catbatch.cli import cluster_overrides
from catbatch.job.distributor import plan_actors
from catbatch.job.layout import OutputLayout
from catbatch.job.manifest import ManifestError, parse_manifest
from catbatch.job.observe import EventLog, JobMetrics, Throughput
from catbatch.job.runrecord import fingerprint
from catbatch.models.loader import ModelLoadError, describe_source, load_pipeline

BASE = """\
name: opts
model:
  id: tiny-sd3
  dtype: float32
{model_extra}prompts: {{path: p.txt}}
output: out
ray: {{actors: auto, resources: {{cpus: 1, gpus: {gpus}}}}}
"""


def manifest(gpus: float = 1, model_extra: str = "", overrides: dict | None = None):
    return parse_manifest(
        BASE.format(gpus=gpus, model_extra=model_extra), "m.yaml", overrides=overrides
    )


@pytest.mark.parametrize(
    ("gpus", "resources", "device", "expected"),
    [
        (1, {"CPU": 16, "GPU": 4}, "auto", (4, 1.0, 1.0)),  # one actor per GPU
        (0.5, {"CPU": 16, "GPU": 4}, "auto", (8, 1.0, 0.5)),  # two per GPU
        (0.33, {"CPU": 16, "GPU": 1}, "auto", (3, 1.0, 0.33)),
        (1, {"CPU": 6}, "auto", (6, 1.0, 0.0)),  # no GPUs: one per CPU
        (1, {"CPU": 6, "GPU": 4}, "cpu", (6, 1.0, 0.0)),  # CPU-only mode ignores the GPUs
        (0, {"CPU": 3, "GPU": 4}, "auto", (3, 1.0, 0.0)),
        (1, {"CPU": 2}, "cuda", (1, 1.0, 1.0)),  # GPU nodes not up yet: still ask for GPUs
    ],
)
def test_plan_actors(gpus, resources, device, expected) -> None:
    m = manifest(gpus, f"  device: {device}\n")
    assert plan_actors(m, n_tasks=100, resources=resources) == expected
    assert plan_actors(m, n_tasks=2, resources=resources)[0] == min(2, expected[0])


def test_submit_flags_override_the_manifest() -> None:
    m = manifest()
    assert cluster_overrides(m) == {}
    over = cluster_overrides(m, address="ray://head:10001", gpus_per_actor=0.5, dtype="bfloat16")
    m2 = manifest(overrides=over)
    assert m2.ray.address == "ray://head:10001" and m2.ray.resources.gpus == 0.5
    assert m2.model.dtype == "bfloat16" and m2.ray.actors == "auto"
    m3 = manifest(overrides=cluster_overrides(m, cpu_only=True, actors=3))
    assert m3.model.device == "cpu" and m3.ray.resources.gpus == 0 and m3.ray.actors == 3
    assert plan_actors(m3, 10, {"CPU": 8, "GPU": 8}) == (3, 1.0, 0.0)


def test_memory_section_validated_with_position() -> None:
    m = manifest(model_extra="  memory: {vae_tiling: true, cpu_offload: model, drop_t5: true}\n")
    assert m.model.memory.cpu_offload == "model" and m.model.memory.drop_t5
    with pytest.raises(ManifestError) as e:
        manifest(model_extra="  memory: {cpu_offload: always}\n")
    assert "m.yaml:5:" in str(e.value) and "model.memory.cpu_offload" in str(e.value)
    with pytest.raises(ManifestError, match="unknown key 'tiling'"):
        manifest(model_extra="  memory: {tiling: true}\n")


def test_fingerprint_counts_only_memory_options_that_change_images() -> None:
    source = {"kind": "preset", "path": "tiny-sd3", "revision": "v2"}
    plain = fingerprint(manifest(), source)
    saving = "  memory: {vae_slicing: true, cpu_offload: sequential}\n"
    assert fingerprint(manifest(model_extra=saving), source) == plain
    assert fingerprint(manifest(model_extra="  memory: {drop_t5: true}\n"), source) != plain
    assert fingerprint(manifest(model_extra="  memory: {vae_tiling: true}\n"), source) != plain


def test_memory_options_reach_the_pipeline(tiny_cache) -> None:
    opts = {"vae_tiling": True, "vae_slicing": True, "cpu_offload": "model", "drop_t5": True}
    pipe = load_pipeline(describe_source("tiny-sd3"), "float32", "cpu", opts)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert pipe.vae.use_tiling and pipe.vae.use_slicing  # offload is GPU-only: ignored on CPU
    out = pipe(
        prompt=["a red circle"], num_inference_steps=2, height=64, width=64, output_type="np"
    )
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
    with pytest.raises(ModelLoadError, match="drop_t5 applies to SD3"):
        load_pipeline(describe_source("tiny-pixart"), "float32", "cpu", {"drop_t5": True})


def test_throughput_and_eta_from_commits() -> None:
    now = [100.0]
    t = Throughput(total=40, clock=lambda: now[0])
    assert t.images_per_s() is None and t.eta_s() is None
    t.add(8)  # first commit: start-up is not counted
    now[0] = 110.0
    assert t.images_per_s() is None
    t.add(8, failed=1)
    assert t.images_per_s() == pytest.approx(0.8) and t.failed == 1
    assert t.eta_s() == pytest.approx(24 / 0.8)
    t.add(24)
    assert t.eta_s() == 0.0


def test_event_log_writes_one_jsonl_file_per_source(tmp_path: Path) -> None:
    log = EventLog(OutputLayout(str(tmp_path)), run_id="r1")
    log.note("driver", "run_start", actors=2)
    log.add("actor-0", [{"t": 1.0, "event": "batch", "seconds": 0.5}])
    log.flush()
    log.note("driver", "run_end")
    log.flush()
    driver = (tmp_path / "logs/r1/driver.jsonl").read_text().splitlines()
    assert [json.loads(x)["event"] for x in driver] == ["run_start", "run_end"]
    assert json.loads((tmp_path / "logs/r1/actor-0.jsonl").read_text())["seconds"] == 0.5


def test_metrics_never_break_a_job() -> None:
    m = JobMetrics("x")
    m.set("eta_seconds", 3.0)
    m.inc("images", 2)
    m.set("no_such_metric", 1.0)
    assert m.tags == {"job": "x"}


def test_progress_bar_shows_failures_queue_and_eta(tmp_path: Path) -> None:
    import io

    from tqdm import tqdm

    from catbatch.job.driver import JobObserver, RunSummary
    from catbatch.job.sharding import ShardRef, Task

    bar = tqdm(total=16, file=io.StringIO())
    obs = JobObserver("j", EventLog(OutputLayout(str(tmp_path))), RunSummary(), bar, total=16)
    now = [0.0]
    obs.rate.clock = lambda: now[0]
    task = Task("default", ShardRef(0))
    stats = {"rows": 4, "images_ok": 3, "images_failed": 1}
    obs.task_done("actor-0", task, stats, [{"t": 0.0, "event": "task_commit"}])
    now[0] = 8.0
    obs.task_done("actor-1", task, stats, [])
    obs.tick(queued=2, running=1, actors=2)
    assert bar.postfix == "failed=2 queued=2 eta=0:16"  # 8 images left at 0.5 images/s
    assert obs.summary.images == 6 and obs.summary.failed_images == 2
    assert (tmp_path / f"logs/{obs.events.run_id}/actor-0.jsonl").exists()
