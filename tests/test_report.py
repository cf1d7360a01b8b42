"""`catbatch report`: every number of report.json recomputed from the Parquet rows, the Markdown
table, the dataset card, and the HTML page loaded in headless Chromium."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from catbatch.cli import main
from catbatch.job.layout import OutputLayout
from catbatch.job.writer import SCHEMA
from catbatch.metrics.fidelity import ssim
from catbatch.report import ReportOptions, make_report

METRIC_FIELDS = [
    ("macs_paper", pa.float64()),
    ("macs_total", pa.float64()),
    ("t_text_s", pa.float64()),
    ("t_denoise_s", pa.float64()),
    ("t_vae_s", pa.float64()),
    ("t_score_s", pa.float64()),
    ("warmup", pa.bool_()),
    ("gpu_seconds", pa.float64()),
    ("cost_usd", pa.float64()),
    ("clip_score", pa.float64()),
    ("clip_model", pa.string()),
    ("prompt_truncated", pa.bool_()),
]
FULL_SCHEMA = pa.schema(
    [f for f in SCHEMA if f.name not in dict(METRIC_FIELDS)]
    + [pa.field(n, t) for n, t in METRIC_FIELDS]
)
SIZE = 24
PRUNINGS = {"full": None, "cat": {"method": "cat", "alpha": 0.5, "strategy": "cat"}}


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def base_image(sample: int, index: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * sample + index)
    return rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def synthetic_rows(variant: str, shard: int, per_shard: int = 3) -> list[dict]:
    """Rows with every metric column; ``cat`` differs from ``full`` by seeded noise."""
    rng = np.random.default_rng(zlib.crc32(f"{variant}-{shard}".encode()))
    pruned = variant != "full"
    rows = []
    for s in range(shard * per_shard, (shard + 1) * per_shard):
        for i in range(2):
            img = base_image(s, i)
            if pruned and (s, i) != (0, 0):  # (0, 0) stays identical: infinite PSNR
                noise = rng.integers(-20, 21, img.shape)
                img = np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)
            failed = pruned and (s, i) == (4, 1)
            settings = {"model": "tiny-sd3", "revision": "r1", "dtype": "float32"}
            settings |= {"width": SIZE, "height": SIZE, "steps": 4, "guidance_scale": 5.0}
            settings |= {"negative_prompt": "", "pruning": PRUNINGS[variant]}
            lat = float(rng.uniform(0.5, 1.0) * (0.5 if pruned else 1.0))
            rows.append(
                {
                    "sample_id": f"s{s:03d}",
                    "image_index": i,
                    "prompt": f"prompt <{s}> & more",
                    "prompt_metadata": json.dumps({"Category": "Animals", "Challenge": "Basic"}),
                    "seed": 10 * s + i,
                    "variant": variant,
                    "settings": json.dumps(settings, sort_keys=True),
                    "image": None if failed else {"bytes": png(img), "path": None},
                    "width": SIZE,
                    "height": SIZE,
                    "batch_id": f"shard-{shard:05d}-b0",
                    "batch_size": 2,
                    "latency_s": 0.0 if failed else lat,
                    "device": "cpu:x86_64" if s % 2 else "NVIDIA H100",
                    "status": "failed" if failed else "ok",
                    "error": "RuntimeError: boom" if failed else None,
                    "macs_paper": None if failed else (1.0e12 if pruned else 2.0e12),
                    "macs_total": None if failed else (1.2e12 if pruned else 2.5e12),
                    "t_text_s": lat * 0.1,
                    "t_denoise_s": lat * 0.7,
                    "t_vae_s": lat * 0.15,
                    "t_score_s": lat * 0.05,
                    "warmup": shard == 0 and s == 0,
                    "gpu_seconds": lat,
                    "cost_usd": lat * 0.001 if s % 2 == 0 else None,
                    "clip_score": None if failed else float(rng.uniform(20, 35)),
                    "clip_model": None if failed else "tiny-clip/random",
                    "prompt_truncated": s == 1,
                }
            )
    return rows


def write_run(url: str, shards: int = 2, status: str = "complete", drop: tuple = ()) -> None:
    """A two-variant run written straight to ``url``; ``drop`` lists (variant, shard) left out."""
    layout = OutputLayout(url)
    record = {
        "name": "tiny-report",
        "status": status,
        "variants": list(PRUNINGS),
        "manifest": {"prompts": {"path": "PartiPrompts.tsv", "format": "parti"}, "shard_size": 3},
        "model_source": {"kind": "preset", "revision": "r1"},
        "versions": {"catbatch": "0.1"},
        "prompts": 3 * shards,
        "images_per_prompt": 2,
        "shards": shards,
        "fingerprint_inputs": {
            "variants": {v: {"width": SIZE, "steps": 4, "pruning": p} for v, p in PRUNINGS.items()}
        },
    }
    layout.write_json(layout.run_record, record)
    for v in PRUNINGS:
        for k in range(shards):
            if (v, k) in drop:
                continue
            name = f"shard-{k:05d}"
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(synthetic_rows(v, k), schema=FULL_SCHEMA), buf)
            layout.write_bytes(layout.shard_parquet(v, name), buf.getvalue())
            stats = {"variant": v, "shard": name, "seconds": 2.0 + k, "device": "x", "rows": 6}
            layout.write_json(layout.shard_stats(v, name), stats)


# -- independent recomputation from the Parquet files --------------------------------------


def committed_rows(out: Path, variant: str) -> tuple[list[dict], list[dict]]:
    """Rows of the committed shards (those with a stats file), and the stats."""
    folder = out / "variants" / variant
    stats = [json.loads(p.read_text()) for p in sorted(folder.glob("*.stats.json"))]
    rows = []
    for s in stats:
        rows += pq.read_table(folder / f"{s['shard']}.parquet").to_pylist()
    return rows, stats


def q(values: list[float], quantile: float) -> float:
    return pc.quantile(pa.array(values, pa.float64()), q=quantile, interpolation="linear")[
        0
    ].as_py()


def psnr_np(x: np.ndarray, y: np.ndarray) -> float:
    mse = np.mean((x.astype(np.float64) / 255 - y.astype(np.float64) / 255) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def ssim_ref(x: np.ndarray, y: np.ndarray) -> float:
    """Luminance SSIM with scikit-image when installed (else the fidelity module)."""
    luma = np.array([0.299, 0.587, 0.114])
    xl, yl = (a.astype(np.float64) / 255 @ luma for a in (x, y))
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return ssim(x, y)
    return structural_similarity(
        xl, yl, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
    )


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def col(rows: list[dict], name: str) -> list:
    return [r[name] for r in rows if r.get(name) is not None]


def macs(ok: list[dict], name: str) -> dict | None:
    v = col(ok, name)
    return {"mean": pc.mean(pa.array(v)).as_py(), "total": sum(v), "n": len(v)} if v else None


def expected_variant(out: Path, variant: str, bootstrap: int, seed: int) -> dict:
    rows, stats = committed_rows(out, variant)
    ok = [r for r in rows if r["status"] == "ok"]
    timed = [r for r in ok if not r.get("warmup")]
    lat = [r["latency_s"] for r in timed]
    mean = sum(lat) / len(lat)
    seconds = sum(s["seconds"] for s in stats)
    gpu, cost = col(rows, "gpu_seconds"), col(rows, "cost_usd")
    names = set(rows[0])
    exp = {
        "rows": len(rows),
        "images": len(ok),
        "failures": sum(r["status"] == "failed" for r in rows),
        "invalid": sum(r["status"] == "invalid" for r in rows),
        "shards_committed": len(stats),
        "failure_examples": [
            {"sample_id": r["sample_id"], "image_index": r["image_index"], "error": r["error"]}
            for r in sorted(rows, key=lambda r: (r["sample_id"], r["image_index"]))
            if r["status"] != "ok"
        ][:5],
        "macs": {"paper": macs(ok, "macs_paper"), "all": macs(ok, "macs_total")},
        "latency_s": {
            "n": len(lat),
            "warmup_excluded": len(ok) - len(timed),
            "mean": mean,
            "p50": q(lat, 0.5),
            "p95": q(lat, 0.95),
            "min": min(lat),
            "max": max(lat),
        },
        "stage_s": {
            k: sum(v) / len(v) if (v := col(timed, f"t_{k}_s")) else None
            for k in ("text", "denoise", "vae", "score")
            if f"t_{k}_s" in names
        },
        "images_per_s": {
            "from_latency": 1 / mean,
            "from_shard_seconds": len(ok) / seconds,
            "shard_seconds": seconds,
        },
        "gpu_seconds": {
            "total": sum(gpu) if gpu else None,
            "per_image": sum(gpu) / len(ok) if gpu else None,
        },
        "cost_usd": {
            "total": sum(cost) if cost else None,
            "per_image": sum(cost) / len(ok) if cost else None,
            "rows_priced": len(cost),
        },
        "devices": {},
        "prompts_truncated": (
            sum(bool(r["prompt_truncated"]) for r in rows) if "prompt_truncated" in names else None
        ),
    }
    for dev in {r["device"] for r in rows}:
        mine = [r for r in rows if r["device"] == dev]
        dok = [r for r in mine if r["status"] == "ok"]
        dlat = [r["latency_s"] for r in dok if not r.get("warmup")]
        exp["devices"][dev] = {
            "images": len(dok),
            "failures": sum(r["status"] == "failed" for r in mine),
            "latency_mean_s": sum(dlat) / len(dlat) if dlat else None,
            "gpu_seconds": sum(col(mine, "gpu_seconds")) if col(mine, "gpu_seconds") else None,
            "cost_usd": sum(col(mine, "cost_usd")) if col(mine, "cost_usd") else None,
        }
    clip = np.array(col(ok, "clip_score"), dtype=np.float64)
    if len(clip):
        idx = np.random.default_rng(seed).integers(0, len(clip), (bootstrap, len(clip)))
        ci = np.percentile(clip[idx].mean(1), [2.5, 97.5])
        exp["clip"] = {"n": len(clip), "mean": float(clip.mean()), "ci95": list(ci)}
    else:
        exp["clip"] = None
    return exp


def expected_fidelity(out: Path, variant: str, baseline: str) -> dict:
    base = {(r["sample_id"], r["image_index"]): r for r in committed_rows(out, baseline)[0]}
    values = []
    unpaired = 0
    for r in sorted(
        committed_rows(out, variant)[0], key=lambda r: (r["sample_id"], r["image_index"])
    ):
        b = base.get((r["sample_id"], r["image_index"]))
        if r["status"] != "ok":
            continue
        if b is None or b["status"] != "ok":
            unpaired += 1
            continue
        assert b["seed"] == r["seed"] and b["prompt"] == r["prompt"]
        x, y = decode_png(r["image"]["bytes"]), decode_png(b["image"]["bytes"])
        p = psnr_np(x, y)
        values.append(
            {
                "sample_id": r["sample_id"],
                "image_index": r["image_index"],
                "psnr": None if math.isinf(p) else p,
                "identical": math.isinf(p),
                "ssim": ssim_ref(x, y),
            }
        )
    finite = [v["psnr"] for v in values if v["psnr"] is not None]
    return {
        "pairs": len(values),
        "psnr_mean": sum(finite) / len(finite) if finite else None,
        "psnr_identical": sum(v["identical"] for v in values),
        "ssim_mean": sum(v["ssim"] for v in values) / len(values),
        "unpaired": unpaired,
        "seed_mismatch": 0,
        "size_mismatch": 0,
        "values": values,
    }


def numeric_leaves(obj, path: str = ""):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield path
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from numeric_leaves(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numeric_leaves(v, f"{path}[{i}]")


def assert_matches(got, exp, path: str = "") -> None:
    if isinstance(exp, dict):
        assert isinstance(got, dict), path
        for k, v in exp.items():
            assert k in got, f"{path}.{k} missing"
            assert_matches(got[k], v, f"{path}.{k}")
    elif isinstance(exp, list):
        assert isinstance(got, list) and len(got) == len(exp), path
        for i, (g, e) in enumerate(zip(got, exp, strict=True)):
            assert_matches(g, e, f"{path}[{i}]")
    elif isinstance(exp, float):
        assert got == pytest.approx(exp, rel=1e-9, abs=1e-12), path
    else:
        assert got == exp, path


def check_report(out: Path, report: dict, baseline: str, bootstrap: int, seed: int) -> None:
    """Every number of report.json's variants against the rows; none left unchecked."""
    exp = {v: expected_variant(out, v, bootstrap, seed) for v in report["variants_order"]}
    run_json = out / "run.json"
    record = json.loads(run_json.read_text()) if run_json.exists() else {}
    for v, e in exp.items():
        base = exp[baseline]
        e["vs_baseline"] = {
            "speedup": base["latency_s"]["mean"] / e["latency_s"]["mean"],
            "macs_ratio": e["macs"]["paper"]["mean"] / base["macs"]["paper"]["mean"]
            if e["macs"]["paper"]
            else None,
            "macs_all_ratio": e["macs"]["all"]["mean"] / base["macs"]["all"]["mean"]
            if e["macs"]["all"]
            else None,
        }
        e["fidelity"] = None if v == baseline else expected_fidelity(out, v, baseline)
        e["shards_planned"] = record.get("shards")
        got = report["variants"][v]
        assert_matches(got, e, v)
        rows, _ = committed_rows(out, v)
        assert got["settings"] == json.loads(rows[0]["settings"])
        checked = set(numeric_leaves(e))
        ignored = ("settings", "pruning")
        unchecked = [
            p for p in numeric_leaves(got) if p not in checked and p.split(".")[1] not in ignored
        ]
        assert not unchecked, f"{v}: numbers not checked: {unchecked}"
    assert report["baseline"] == baseline


def read_report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


# -- tests on a synthetic run with every metric column --------------------------------------


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    write_run(str(out))
    return out


def test_every_number_matches_the_rows(run_dir: Path):
    _, files = make_report(str(run_dir), options=ReportOptions(bootstrap=300, seed=7))
    assert set(files) == {"report.json", "report.md", "card.md", "report.html", "pairs.png"}
    report = read_report(run_dir / "report")
    check_report(run_dir, report, "full", 300, 7)
    assert report["partial"] is False and report["notes"] == []
    cat = report["variants"]["cat"]
    # the synthetic run's known shape: one failure, one identical pair, halved MACs
    assert (cat["images"], cat["failures"], cat["fidelity"]["psnr_identical"]) == (11, 1, 1)
    assert cat["vs_baseline"]["macs_ratio"] == pytest.approx(0.5)
    assert cat["vs_baseline"]["speedup"] > 1.5
    lo, hi = cat["clip"]["ci95"]
    assert lo < cat["clip"]["mean"] < hi
    assert cat["clip"]["models"] == ["tiny-clip/random"]


def test_invalid_rows_are_counted_apart_from_failures(run_dir: Path):
    """Rows of prompts that cannot be generated are neither images nor failures."""
    path = run_dir / "variants" / "full" / "shard-00001.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[0].update(status="invalid", error="empty prompt", image=None)
    pq.write_table(pa.Table.from_pylist(rows, schema=FULL_SCHEMA), path)
    res = CliRunner().invoke(main, ["report", str(run_dir), "--bootstrap", "100"])
    assert res.exit_code == 0, res.output
    assert "full: 11 images, 0 failed, 1 invalid" in res.output
    report = read_report(run_dir / "report")
    full = report["variants"]["full"]
    assert (full["images"], full["failures"], full["invalid"]) == (11, 0, 1)
    check_report(run_dir, report, "full", 100, 0)


def test_unreadable_shard_is_named_skipped_and_the_report_still_written(run_dir: Path):
    path = run_dir / "variants" / "cat" / "shard-00001.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # stats file stays
    res = CliRunner().invoke(main, ["report", str(run_dir), "--bootstrap", "100"])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    assert f"warning: skipped unreadable shard {path}" in res.stderr, res.stderr
    report = read_report(run_dir / "report")
    cat = report["variants"]["cat"]
    assert cat["rows"] == 6 and list(cat["unreadable_shards"]) == ["shard-00001"]
    assert report["partial"] and any(str(path) in n for n in report["notes"])
    assert cat["fidelity"]["pairs"] == 6  # the ok images of shard-00000, against full
    assert (run_dir / "report" / "report.html").exists()


def test_bootstrap_is_seeded(run_dir: Path):
    a, _ = make_report(str(run_dir), str(run_dir / "a"), ReportOptions(bootstrap=200, seed=1))
    b, _ = make_report(str(run_dir), str(run_dir / "b"), ReportOptions(bootstrap=200, seed=1))
    c, _ = make_report(str(run_dir), str(run_dir / "c"), ReportOptions(bootstrap=200, seed=2))
    ci = [r.data["variants"]["cat"]["clip"]["ci95"] for r in (a, b, c)]
    assert ci[0] == ci[1] != ci[2]


def test_markdown_table_and_card(run_dir: Path):
    make_report(str(run_dir))
    md = (run_dir / "report" / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    header = table[0]
    for column in ("Variant", "MACs", "Speed-up", "Latency", "CLIP", "PSNR", "SSIM"):
        assert column in header
    report = read_report(run_dir / "report")
    full_row = next(line for line in table if line.startswith("| full (baseline)"))
    cat_row = next(line for line in table if line.startswith("| cat |"))
    cat = report["variants"]["cat"]
    assert "2.00T" in full_row and "1.00T" in cat_row
    assert f"{cat['vs_baseline']['speedup']:.2f}×" in cat_row
    assert f"{cat['fidelity']['ssim_mean']:.4f}" in cat_row
    assert f"{cat['clip']['mean']:.2f}" in cat_row
    card = (run_dir / "report" / "card.md").read_text()
    assert card.startswith("---\n") and "data_files: variants/cat/*.parquet" in card
    assert "PartiPrompts" in card and "Apache-2.0" in card
    assert "tiny-sd3" in card and "alpha" in card


def test_licences():
    from catbatch.report.card import model_licence, prompt_licence

    assert prompt_licence({"path": "x/captions_val2017.json", "format": "coco"}, {})[1] == (
        "CC BY 4.0"
    )
    assert prompt_licence({"path": "PartiPrompts.tsv", "format": "auto"}, {})[1] == "Apache-2.0"
    assert prompt_licence({"path": "mine.txt", "format": "text"}, {})[1] == "unknown"
    sd3 = model_licence("stabilityai/stable-diffusion-3-medium-diffusers", "hub")[1]
    assert "own licence" in sd3
    assert model_licence("someone/other-model", "hub")[1] == "unknown"


def test_partial_run(tmp_path: Path):
    out = tmp_path / "run"
    write_run(str(out), shards=3, status="running", drop=(("cat", 1), ("cat", 2)))
    # a Parquet file without its stats file is not committed and must not count
    (out / "variants" / "cat" / "shard-00001.parquet").write_bytes(
        (out / "variants" / "full" / "shard-00001.parquet").read_bytes()
    )
    make_report(str(out), options=ReportOptions(bootstrap=100))
    report = read_report(out / "report")
    assert report["partial"] is True
    assert any("running" in n for n in report["notes"])
    assert any("cat: 1 of 3 shards" in n for n in report["notes"])
    cat = report["variants"]["cat"]
    assert cat["shards_missing"] == ["shard-00001", "shard-00002"]
    assert cat["uncommitted_files"] == ["shard-00001"]
    assert cat["rows"] == 6 and report["variants"]["full"]["rows"] == 18
    assert cat["fidelity"]["pairs"] == 6
    check_report(out, report, "full", 100, 0)
    assert "partial results" in (out / "report" / "report.md").read_text()
    assert 'id="partial"' in (out / "report" / "report.html").read_text()


def test_older_rows_from_the_writer(tmp_path: Path):
    """Rows written by catbatch.job.writer (whatever columns it has) give a report too."""
    from catbatch.job.writer import Row, write_shard

    out = tmp_path / "old"
    layout = OutputLayout(str(out))
    for variant in PRUNINGS:
        for k in range(2):
            rows = []
            for d in synthetic_rows(variant, k):
                img = d["image"]
                rows.append(
                    Row(
                        **{f: d[f] for f in Row.__dataclass_fields__ if f in d and f != "png"}
                        | {"prompt_metadata": json.loads(d["prompt_metadata"])}
                        | {"settings": json.loads(d["settings"])}
                        | {"png": img["bytes"] if img else None}
                    )
                )
            write_shard(layout, variant, f"shard-{k:05d}", "h", rows, 1.5, "cpu")
    make_report(str(out), options=ReportOptions(bootstrap=50))
    report = read_report(out / "report")
    assert report["partial"] is True and "no run record" in report["notes"][0]
    check_report(out, report, "full", 50, 0)
    missing = report["variants"]["cat"]["columns_missing"]
    assert missing == [
        c
        for c in (
            "macs_paper",
            "macs_total",
            "t_text_s",
            "t_denoise_s",
            "t_vae_s",
            "t_score_s",
            "warmup",
            "gpu_seconds",
            "cost_usd",
            "clip_score",
            "prompt_truncated",
        )
        if c not in SCHEMA.names
    ]


def test_cli_report(run_dir: Path, tmp_path: Path):
    res = CliRunner().invoke(main, ["report", str(run_dir), "--bootstrap", "100"])
    assert res.exit_code == 0, res.output
    assert "cat: 11 images, 1 failed" in res.output
    assert (run_dir / "report" / "report.html").exists()
    res = CliRunner().invoke(
        main, ["report", str(run_dir), "--out", str(tmp_path / "r"), "--baseline", "cat"]
    )
    assert res.exit_code == 0, res.output
    report = read_report(tmp_path / "r")
    assert report["baseline"] == "cat" and report["variants"]["full"]["fidelity"]["pairs"] == 11
    check_report(run_dir, report, "cat", 1000, 0)
    res = CliRunner().invoke(main, ["report", str(run_dir), "--baseline", "nope"])
    assert res.exit_code == 2 and "baseline 'nope' is not a variant" in res.output
    res = CliRunner().invoke(main, ["report", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "no variants" in res.output


def test_html_is_self_contained(run_dir: Path):
    make_report(str(run_dir), options=ReportOptions(pairs=3))
    html = (run_dir / "report" / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<link" not in html and "@import" not in html and "url(" not in html
    assert "<script src" not in html
    imgs = re.findall(r'<img src="([^"]+)"', html)
    assert len(imgs) == 3 * 2 and all(u.startswith("data:image/png;base64,") for u in imgs)
    assert html.count("<svg") == 3
    assert "prompt &lt;0&gt; &amp; more" in html  # prompts are escaped


# -- the page in headless Chromium ------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--virtual-time-budget=10000",
]
ENSURE_CHROMIUM = Path(__file__).parents[1] / "scripts" / "ensure-chromium.sh"


def find_chromium() -> str | None:
    return next(
        (p for b in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(b))),
        None,
    )


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed by scripts/ensure-chromium.sh when missing."""
    if find_chromium() is None and ENSURE_CHROMIUM.exists():
        subprocess.run(["sh", str(ENSURE_CHROMIUM)], timeout=900, check=False)
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium (scripts/ensure-chromium.sh could not install it)")
    return path


def run_chromium(binary: str, page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()]
    env = {**os.environ, "HOME": str(tmp)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def load_page(binary: str, page: Path, tmp: Path) -> tuple[dict[str, str], str, str]:
    """The dumped DOM's <html> attributes, the DOM, and the console log (stderr)."""
    res = run_chromium(binary, page, tmp, "--enable-logging=stderr", "--v=0", "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    root = re.search(r"<html([^>]*)>", res.stdout)
    assert root, res.stdout[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', root.group(1)))
    return attrs, res.stdout, res.stderr


def console_errors(log: str) -> list[str]:
    return [
        line
        for line in log.splitlines()
        if "CONSOLE" in line and ("error" in line.lower() or "uncaught" in line.lower())
    ]


def test_page_loads_in_chromium(run_dir: Path, tmp_path: Path, chromium: str):
    make_report(str(run_dir), options=ReportOptions(pairs=4))
    page = run_dir / "report" / "report.html"
    attrs, dom, log = load_page(chromium, page, tmp_path)
    assert attrs["data-report-ready"] == "1", dom[-1000:]
    assert attrs["data-js-errors"] == "0", re.search(r'id="js-errors">([^<]*)', dom)
    assert not console_errors(log)
    assert attrs["data-images-total"] == attrs["data-images-loaded"] == str(4 * 2)
    table = re.search(r'<table id="table2">(.*?)</table>', dom, re.S).group(1)
    assert "full (baseline)" in table and ">cat<" in table
    assert dom.count('data-variant="cat"') == 4 and dom.count('data-variant="full"') == 4
    shot = tmp_path / "report.png"
    res = run_chromium(chromium, page, tmp_path, "--window-size=1280,2400", f"--screenshot={shot}")
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1280) and pixels.std() > 5  # not a blank page


def test_chromium_check_sees_errors(run_dir: Path, tmp_path: Path, chromium: str):
    """The page's error capture works: a broken script and a broken image are reported."""
    make_report(str(run_dir), options=ReportOptions(pairs=1))
    html = (run_dir / "report" / "report.html").read_text()
    broken = html.replace(
        "<h2>Details</h2>", "<script>undefinedFunction();</script><h2>Details</h2>"
    )
    broken = re.sub(
        r'src="data:image/png;base64,[^"]*"', 'src="data:image/png;base64,AAAA"', broken, count=1
    )
    page = tmp_path / "broken.html"
    page.write_text(broken)
    attrs, dom, _ = load_page(chromium, page, tmp_path)
    assert attrs["data-report-ready"] == "1"
    assert int(attrs["data-js-errors"]) >= 2
    assert "undefinedFunction" in dom
    assert int(attrs["data-images-loaded"]) == int(attrs["data-images-total"]) - 1


# -- object storage --------------------------------------------------------------------------


def test_report_on_s3(s3_server, run_dir: Path, tmp_path: Path):
    """The same run on S3 (SeaweedFS) gives the same numbers; the report is written there."""
    url = s3_server.url(f"report-{tmp_path.name}")
    write_run(url)
    _, files = make_report(url, options=ReportOptions(bootstrap=100))
    assert files["report.json"] == f"{url}/report/report.json"
    layout = OutputLayout(url)
    remote = json.loads(layout.read_bytes(layout.path("report", "report.json")))
    make_report(str(run_dir), options=ReportOptions(bootstrap=100))
    local = read_report(run_dir / "report")
    assert remote["variants"] == local["variants"] and remote["partial"] is False
    assert layout.read_bytes(layout.path("report", "report.html")).startswith(b"<!DOCTYPE html>")


# -- end to end: a real two-variant submit with the tiny SD3 pipeline -------------------------

E2E_VARIANTS = """\
  - name: full
    pruning: none
  - name: cat
    pruning: {method: cat, alpha: 0.5, last_full_step: 0}"""


@pytest.mark.slow
def test_report_on_a_real_run(tmp_path: Path, ray_cluster):
    from test_submit_e2e import make_manifest, submit

    # batch 1: each shard has 3 batches, so every variant has timed rows whichever shards the two
    # actors start with (each actor's first batch is a warm-up, left out of latency)
    path = make_manifest(tmp_path, output="out", ipp=1, shard=3, batch=1, variants=E2E_VARIANTS)
    submit(path)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["report", str(out), "--bootstrap", "200", "--seed", "5"])
    assert res.exit_code == 0, res.output
    report = read_report(out / "report")
    assert report["partial"] is False and report["run"]["status"] == "complete"
    check_report(out, report, "full", 200, 5)
    cat = report["variants"]["cat"]
    assert cat["images"] == 6 and cat["pruning"]["alpha"] == 0.5
    assert cat["fidelity"]["pairs"] == 6
    assert cat["fidelity"]["psnr_identical"] < 6  # pruning changed the images
    assert "tiny-sd3" in (out / "report" / "card.md").read_text()


def test_variant_without_committed_shards(tmp_path: Path):
    out = tmp_path / "run"
    write_run(str(out), status="running", drop=(("cat", 0), ("cat", 1)))
    make_report(str(out), options=ReportOptions(pairs=2))
    report = read_report(out / "report")
    cat = report["variants"]["cat"]
    assert (
        report["partial"]
        and cat["rows"] == 0
        and cat["shards_missing"]
        == [
            "shard-00000",
            "shard-00001",
        ]
    )
    assert cat["vs_baseline"]["speedup"] is None and cat["fidelity"]["pairs"] == 0
    assert cat["latency_s"]["mean"] is None and cat["clip"] is None
    html = (out / "report" / "report.html").read_text()
    assert html.count("missing or failed") == 2
    md = (out / "report" / "report.md").read_text()
    assert "| cat | cat α=0.5 |" in md  # settings from the run record
    # without settings anywhere, the baseline is unknown and the report says so
    (out / "run.json").unlink()
    shutil.rmtree(out / "variants" / "full")
    (out / "variants" / "cat").mkdir(parents=True)
    make_report(str(out))
    report = read_report(out / "report")
    assert report["baseline"] is None and any("no variant without" in n for n in report["notes"])


def test_pairs_png_has_a_row_per_variant(run_dir: Path):
    report, files = make_report(str(run_dir), options=ReportOptions(bootstrap=10, pairs=3))
    sheet = np.asarray(Image.open(files["pairs.png"]).convert("RGB"))
    rows = report.grid
    assert len(rows) == 3 and sheet.shape[0] == 2 * (SIZE + 4)  # full, then cat
    label = sheet.shape[1] - 3 * (SIZE + 4)
    first = (rows[0].sample_id, rows[0].image_index)
    assert first == ("s000", 0)  # the baseline's first sample: identical in both variants
    tile = sheet[:SIZE, label : label + SIZE]
    assert np.array_equal(tile, base_image(0, 0))
    assert np.array_equal(sheet[SIZE + 4 : 2 * SIZE + 4, label : label + SIZE], base_image(0, 0))
    second = sheet[:SIZE, label + SIZE + 4 : label + 2 * SIZE + 4]
    assert np.array_equal(second, base_image(int(rows[1].sample_id[1:]), rows[1].image_index))
