"""End to end: `catbatch submit` on each tiny preset with a private local Ray cluster."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from flux_macs import analytic_flux_macs
from PIL import Image

from catbatch.cli import main
from catbatch.models.tiny import preset_dir

pytestmark = pytest.mark.slow

PROMPTS = "\n".join(
    ["a red fox", "a blue boat", "a green tree", "a yellow house", "a black cat", "a white bird"]
)

MANIFEST = """\
name: e2e
model: {{id: {preset}, dtype: float32, device: cpu}}
prompts: {{path: prompts.txt}}
seed: 3
width: {size}
height: {size}
steps: {steps}
guidance_scale: 5.0
images_per_prompt: {ipp}
batch_size: {batch}
shard_size: {shard}
variants:
{variants}
ray: {{address: local, actors: 2, resources: {{cpus: 1}}}}
output: {output}
"""


def make_manifest(
    tmp_path: Path,
    preset: str = "tiny-sd3",
    output: str = "out",
    batch: int = 4,
    ipp: int = 1,
    size: int = 128,
    steps: int = 4,
    variants: str = "  - name: full\n    pruning: none",
    shard: int = 2,
) -> Path:
    (tmp_path / "prompts.txt").write_text(PROMPTS + "\n")
    path = tmp_path / f"{output.replace('/', '_')}.yaml"
    path.write_text(
        MANIFEST.format(
            preset=preset,
            output=output,
            batch=batch,
            ipp=ipp,
            size=size,
            steps=steps,
            variants=variants,
            shard=shard,
        )
    )
    return path


def submit(path: Path) -> None:
    res = CliRunner().invoke(main, ["submit", str(path), "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)


def read_rows(out: Path, variant: str = "full") -> list[dict]:
    files = sorted((out / "variants" / variant).glob("*.parquet"))
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    return sorted(rows, key=lambda r: (r["sample_id"], r["image_index"]))


def check_output(out: Path, n_rows: int, size: int = 128) -> list[dict]:
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["schema_version"] == 1
    assert record["versions"]["torch"] and record["pipeline"]["scheduler"]
    assert record["model_source"]["kind"] == "preset"
    parquet = sorted((out / "variants" / "full").glob("*.parquet"))
    stats = sorted((out / "variants" / "full").glob("*.stats.json"))
    assert len(stats) == len(parquet) > 0
    assert pq.read_table(parquet[0]).schema.metadata[b"catbatch.schema_version"] == b"1"
    rows = read_rows(out)
    assert len(rows) == n_rows and {r["status"] for r in rows} == {"ok"}
    for r in rows:
        img = Image.open(io.BytesIO(r["image"]["bytes"]))
        assert img.size == (size, size) and (r["width"], r["height"]) == (size, size)
        assert r["latency_s"] > 0 and r["device"] and r["error"] is None
    assert len({r["seed"] for r in rows}) == n_rows
    return rows


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory, ray_cluster):
    """One tiny-sd3 run (2 actors, shards of 3 prompts, batch 4, 2 images per prompt)."""
    from test_clipscore import write_tiny_clip

    tmp = tmp_path_factory.mktemp("sd3")
    path = make_manifest(tmp, output="a", ipp=2, shard=3, batch=4)
    clip_config, clip_weights = write_tiny_clip(tmp, "catbatch-e2e-clip")
    clip = f"{{model: {clip_config}, pretrained: null, weights: {clip_weights}}}"
    metrics = f"{{price_per_gpu_hour: 3.6, clip: {clip}}}"
    path.write_text(path.read_text() + f"metrics: {metrics}\n")
    submit(path)
    return tmp, path


@pytest.mark.parametrize("preset", ["tiny-sd35", "tiny-pixart"])
def test_submit_other_presets(tmp_path, ray_cluster, preset):
    path = make_manifest(tmp_path, preset=preset, shard=3)
    path.write_text(path.read_text().replace("actors: 2", "actors: 1"))
    submit(path)
    check_output(tmp_path / "out", 6)


def test_submit_flux(tmp_path, ray_cluster, tiny_cache):
    """tiny-flux unpruned, 2 shards: guidance as an input (one row per image), T5 at 64 tokens."""
    variants = "  - name: full\n    pruning: none\n    max_sequence_length: 64"
    path = make_manifest(tmp_path, preset="tiny-flux", size=64, shard=3, variants=variants)
    path.write_text(path.read_text().replace("actors: 2", "actors: 1"))
    submit(path)
    rows = check_output(tmp_path / "out", 6, size=64)
    config = json.loads(
        (preset_dir("tiny-flux", tiny_cache) / "transformer/config.json").read_text()
    )
    step = analytic_flux_macs(config, n_img=(64 // 16) ** 2, n_txt=64)
    for r in rows:
        assert r["macs_paper"] == 4 * step["paper"]  # 4 steps of one row: no CFG doubling
        assert r["macs_total"] == 4 * (step["paper"] + step["attention"])
        settings = json.loads(r["settings"])
        assert settings["guidance_scale"] == 5.0 and settings["max_sequence_length"] == 64
    assert len({r["image"]["bytes"] for r in rows}) == 6


def test_sd3_output(sd3_run):
    tmp, _ = sd3_run
    rows = check_output(tmp / "a", 12)
    assert {r["batch_size"] for r in rows} == {4, 2}
    # images per prompt > 1 gives different images
    assert rows[0]["sample_id"] == rows[1]["sample_id"]
    assert rows[0]["image"]["bytes"] != rows[1]["image"]["bytes"]
    assert json.loads(rows[0]["settings"])["steps"] == 4
    # per-sample metrics (catbatch.metrics.rows, catbatch.metrics.clipscore)
    assert len({(r["macs_paper"], r["macs_total"]) for r in rows}) == 1  # same passes per image
    assert 0 < rows[0]["macs_paper"] < rows[0]["macs_total"]
    for r in rows:
        # latency_s is the pipeline call's share; CLIP scoring runs beside the next call
        phases = r["t_text_s"] + r["t_denoise_s"] + r["t_vae_s"]
        assert min(r["t_text_s"], r["t_denoise_s"], r["t_vae_s"], r["t_score_s"]) > 0
        assert phases == pytest.approx(r["latency_s"], rel=1e-9)
        assert r["gpu_seconds"] == r["latency_s"]  # CPU actor: one device
        assert r["cost_usd"] == pytest.approx(r["latency_s"] * 3.6 / 3600)
        assert 0 <= r["clip_score"] <= 100 and r["clip_model"] == "catbatch-e2e-clip"
        assert r["prompt_truncated"] is False
    warm = {r["batch_id"] for r in rows if r["warmup"]}  # the first batch of each actor
    assert 1 <= len(warm) <= 2 and not all(r["warmup"] for r in rows)


def test_output_reads_with_datasets(sd3_run):
    datasets = pytest.importorskip("datasets")
    tmp, _ = sd3_run
    files = sorted(str(p) for p in (tmp / "a" / "variants" / "full").glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.num_rows == 12
    assert ds[0]["image"].size == (128, 128)


def test_resubmit_skips_committed_shards(sd3_run):
    tmp, path = sd3_run
    first = {p.name: p.stat().st_mtime_ns for p in (tmp / "a").rglob("*.parquet")}
    res = CliRunner().invoke(main, ["submit", str(path), "--quiet"])
    assert res.exit_code == 0 and "2 shard(s) already committed" in res.output
    again = {p.name: p.stat().st_mtime_ns for p in (tmp / "a").rglob("*.parquet")}
    assert first == again


def test_same_manifest_twice_is_byte_identical(sd3_run):
    tmp, _ = sd3_run
    submit(make_manifest(tmp, output="b", ipp=2, shard=3, batch=4))
    a, b = read_rows(tmp / "a"), read_rows(tmp / "b")
    assert [r["image"]["bytes"] for r in a] == [r["image"]["bytes"] for r in b]
    assert [r["seed"] for r in a] == [r["seed"] for r in b]


def test_regenerate_alone_matches_batched_row(sd3_run):
    """One image by id, in a fresh process at batch size 1, against its row made at batch 4."""
    tmp, path = sd3_run
    row = [r for r in read_rows(tmp / "a") if r["batch_size"] == 4][1]
    png = tmp / "one.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "catbatch.cli", "regenerate", str(path)]
    cmd += ["--sample-id", row["sample_id"], "--image-index", str(row["image_index"])]
    subprocess.run([*cmd, "-o", str(png)], check=True, env=env, capture_output=True)
    alone = np.asarray(Image.open(png)).astype(int)
    batched = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"]))).astype(int)
    assert alone.shape == batched.shape == (128, 128, 3)
    assert np.abs(alone - batched).max() <= 1
