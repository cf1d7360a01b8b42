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
from PIL import Image

from catbatch.cli import main

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


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-sd35", "tiny-pixart"])
def test_submit_each_preset(tmp_path, ray_cluster, preset):
    submit(make_manifest(tmp_path, preset=preset))
    out = tmp_path / "out"
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["schema_version"] == 1
    assert record["versions"]["torch"] and record["pipeline"]["scheduler"]
    stats = sorted((out / "variants" / "full").glob("*.stats.json"))
    assert len(stats) == 3
    table = pq.read_table(sorted((out / "variants" / "full").glob("*.parquet"))[0])
    assert table.schema.metadata[b"catbatch.schema_version"] == b"1"
    rows = read_rows(out)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    for r in rows:
        img = Image.open(io.BytesIO(r["image"]["bytes"]))
        assert img.size == (128, 128) and (r["width"], r["height"]) == (128, 128)
        assert r["latency_s"] > 0 and r["batch_size"] in (1, 2) and r["device"]
    assert len({r["seed"] for r in rows}) == 6


def test_output_reads_with_datasets(tmp_path, ray_cluster):
    datasets = pytest.importorskip("datasets")
    submit(make_manifest(tmp_path, ipp=2))
    files = sorted(str(p) for p in (tmp_path / "out" / "variants" / "full").glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.num_rows == 12
    img = ds[0]["image"]
    assert img.size == (128, 128)
    # images per prompt > 1 gives different images
    rows = read_rows(tmp_path / "out")
    assert rows[0]["sample_id"] == rows[1]["sample_id"]
    assert rows[0]["image"]["bytes"] != rows[1]["image"]["bytes"]


def test_same_manifest_twice_is_byte_identical(tmp_path, ray_cluster):
    submit(make_manifest(tmp_path, output="a"))
    submit(make_manifest(tmp_path, output="b"))
    a, b = read_rows(tmp_path / "a"), read_rows(tmp_path / "b")
    assert [r["image"]["bytes"] for r in a] == [r["image"]["bytes"] for r in b]
    assert [r["seed"] for r in a] == [r["seed"] for r in b]


def test_regenerate_alone_matches_batched_row(tmp_path, ray_cluster):
    path = make_manifest(tmp_path, batch=4, size=128, steps=4, shard=6)
    submit(path)
    row = [r for r in read_rows(tmp_path / "out") if r["batch_size"] == 4][1]
    png = tmp_path / "one.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "catbatch.cli",
            "regenerate",
            str(path),
            "--sample-id",
            row["sample_id"],
            "-o",
            str(png),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    alone = np.asarray(Image.open(png)).astype(int)
    batched = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"]))).astype(int)
    assert alone.shape == batched.shape
    assert np.abs(alone - batched).max() <= 1


def test_resubmit_skips_committed_shards(tmp_path, ray_cluster):
    path = make_manifest(tmp_path)
    submit(path)
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.parquet")}
    res = CliRunner().invoke(main, ["submit", str(path), "--quiet"])
    assert res.exit_code == 0 and "3 shard(s) already committed" in res.output
    again = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.parquet")}
    assert first == again
