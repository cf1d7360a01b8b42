"""``metrics.adherence: shapes``: per-image checker columns in the rows, their aggregate (with a
bootstrap interval) in the report beside CLIP, and the demo manifest that uses them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from catbatch.job.driver import plan
from catbatch.job.manifest import ManifestError, load_manifest, parse_manifest
from catbatch.job.worker import Worker
from catbatch.metrics.adherence import COLUMNS, shapes_adherence
from catbatch.report.aggregate import ReportOptions, aggregate_variant
from catbatch.report.fmt import table2
from catbatch.report.load import VariantData
from catbatch.shapes.checker import parse_caption
from catbatch.shapes.scenes import COLOURS, caption, render, scenes

ROOT = Path(__file__).resolve().parent.parent
BASE = "name: x\nmodel: {id: tiny-sd3}\nprompts: {path: p.txt}\noutput: o\n"


def test_manifest_option_is_off_by_default_and_checked():
    assert parse_manifest(BASE).metrics.adherence is None
    assert parse_manifest(BASE + "metrics: {adherence: shapes}").metrics.adherence == "shapes"
    with pytest.raises(ManifestError, match="metrics.adherence"):
        parse_manifest(BASE + "metrics: {adherence: parti}")


def test_shapes_adherence_columns():
    s = next(x for x in scenes(5, 50) if len(x.shapes) == 2)
    image = np.asarray(render(s, 128))
    assert shapes_adherence(image, caption(s)) == {
        "adherence_facts_met": 6,
        "adherence_facts_stated": 6,
        "adherence_unstated_shapes": 0,
        "adherence_background": True,
    }
    first = s.shapes[0]
    other = next(c for c in COLOURS if c != first.colour)
    lie = dataclasses.replace(s, shapes=(dataclasses.replace(first, colour=other), s.shapes[1]))
    assert shapes_adherence(image, caption(lie))["adherence_facts_met"] == 5
    one = dataclasses.replace(s, shapes=s.shapes[:1])
    assert shapes_adherence(image, caption(one))["adherence_unstated_shapes"] == 1
    assert shapes_adherence(image, "a photo of a cat")["adherence_facts_stated"] == 0


def _rows(values: list[tuple[int, int, int, bool | None]]) -> list[dict]:
    settings = json.dumps({"pruning": None})
    return [
        {
            "sample_id": f"s{i}",
            "image_index": 0,
            "status": "ok",
            "error": None,
            "latency_s": 1.0,
            "warmup": False,
            "device": "cpu",
            "settings": settings,
            **dict(zip(COLUMNS, v, strict=True)),
        }
        for i, v in enumerate(values)
    ]


def _variant(rows: list[dict]) -> dict:
    vd = VariantData("v", rows, {}, {}, set(rows[0]))
    return aggregate_variant(vd, ReportOptions(bootstrap=200))


def test_report_aggregates_adherence_with_an_interval():
    values = [(3, 3, 0, True), (0, 6, 1, False), (6, 9, 0, None), (2, 3, 2, True)]
    adh = _variant(_rows(values))["adherence"]
    # facts counted: stated + 3 per unstated shape = 3 + 9 + 9 + 9
    assert adh["mean"] == pytest.approx(11 / 30) and adh["facts_counted"] == 30
    assert adh["n"] == 4 and adh["unstated_shapes_per_image"] == 0.75
    assert adh["background"] == pytest.approx(2 / 3)
    lo, hi = adh["ci95"]
    assert lo < adh["mean"] < hi and 0 <= lo and hi <= 1
    data = {"variants": {"v": {**_variant(_rows(values)), "vs_baseline": None}}}
    data |= {"variants_order": ["v"], "baseline": "v"}
    header, rows = table2(data)
    column = header.index("Adherence ↑ (95% CI)")
    assert header[column - 1].startswith("CLIP") and rows[0][column].startswith("36.7%")


def test_report_without_adherence_has_no_column():
    rows = _rows([(None, None, None, None)] * 2)
    agg = _variant(rows)
    assert agg["adherence"] is None
    data = {"variants": {"v": {**agg, "vs_baseline": None}}, "variants_order": ["v"]}
    assert not any("Adherence" in h for h in table2({**data, "baseline": "v"})[0])


def test_worker_writes_the_adherence_columns(tmp_path: Path):
    captions = (ROOT / "manifests" / "prompts" / "demo.txt").read_text().splitlines()[:2]
    (tmp_path / "prompts.txt").write_text("\n".join([*captions, "a photo of a cat"]) + "\n")
    (tmp_path / "m.yaml").write_text(
        "name: adh\nmodel: {id: catbatch-shapes, dtype: float32, device: cpu}\n"
        "prompts: {path: prompts.txt}\nwidth: 128\nheight: 128\nsteps: 2\nbatch_size: 3\n"
        "shard_size: 3\nmetrics: {adherence: shapes, clip: {enabled: false}, macs: false}\n"
        "output: out\n"
    )
    p = plan(load_manifest(tmp_path / "m.yaml"))
    worker = Worker(p.manifest, p.model_source)
    (task,) = p.pending
    worker.run_task(task, p.layout)
    (path,) = (Path(p.layout.root) / "variants" / task.variant).glob("*.parquet")
    rows = {r["prompt"]: r for r in pq.read_table(path).to_pylist()}
    for text in captions:
        r = rows[text]
        stated = 3 * len(parse_caption(text)[0])
        assert r["adherence_facts_stated"] == stated
        assert 0 <= r["adherence_facts_met"] <= stated and r["adherence_unstated_shapes"] >= 0
        assert isinstance(r["adherence_background"], bool)
    assert rows["a photo of a cat"]["adherence_facts_stated"] == 0
    assert worker.metrics_info()["adherence"] == "shapes"


def test_demo_manifest_runs_full_and_cat_on_the_shapes_preset():
    m = load_manifest(ROOT / "manifests" / "demo.yaml")
    variants = m.resolved_variants()
    assert list(variants) == ["full", "cat-0.3"]
    assert variants["full"].pruning is None and variants["cat-0.3"].pruning["alpha"] == 0.3
    assert m.model.id == "catbatch-shapes" and (m.width, m.height) == (128, 128)
    assert m.metrics.adherence == "shapes" and m.ray.actors == 2
    counts = plan(m).counts()
    assert counts["prompts"] >= 32 and counts["variants"] == 2
