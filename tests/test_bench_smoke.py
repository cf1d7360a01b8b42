"""The benchmarks in bench/ run end to end in their tiny --smoke configurations (no timings)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from catbatch.pruning import STRATEGIES

ROOT = str(Path(__file__).resolve().parents[1])  # bench/ is not an installed package
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import engine_fidelity, engine_speed  # noqa: E402


def test_speed_benchmark_smoke_prints_its_table(capsys):
    assert engine_speed.main(["--smoke", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| steps | full s, median (min-max) |" in out
    row = next(line for line in out.splitlines() if line.startswith("| 10 |"))
    assert row.count("|") == 9
    assert "selection+clustering" in out and ("MET" in out or "MISSED" in out)


def test_fidelity_benchmark_smoke_prints_one_row_per_strategy(capsys):
    assert engine_fidelity.main(["--smoke", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| strategy | image PSNR dB | image SSIM |" in out
    for strategy in STRATEGIES:
        assert any(line.startswith(f"| {strategy} |") for line in out.splitlines()), strategy
    assert "NOT image quality" in out


def test_shapes_table_counts_unstated_shapes_per_caption():
    from catbatch.shapes.checker import check, summary
    from catbatch.shapes.scenes import caption, render, scenes

    scene = next(s for s in scenes("table", 50) if len(s.shapes) == 3)
    image, one_shape = render(scene), caption(scene).split(", ")[0]
    row = {"clip": 30.0, "psnr": [40.0, 42.0], "ssim": [0.9, 1.0], "seconds": 1.0}
    full, partial = summary([check(image, caption(scene))]), summary([check(image, one_shape)])
    rows = [
        row | {"name": "unpruned", "alpha": "-", "adherence": full},
        row | {"name": "cat", "alpha": 0.3, "adherence": partial},
    ]
    lines = engine_fidelity.shapes_table(rows).splitlines()
    assert "extra / caption" in lines[0]
    unpruned, cat = lines[2].split(" | "), lines[3].split(" | ")
    assert unpruned[2] == "100.0" and unpruned[6] == "0.00" and unpruned[8] == "-"
    assert cat[2] == "33.3" and cat[6] == "2.00" and cat[8:10] == ["41.00", "0.9500"]


def test_paired_difference_counts_facts_per_caption():
    import numpy as np

    from catbatch.shapes.checker import check
    from catbatch.shapes.scenes import caption, render, scenes

    picked = [s for s in scenes("paired", 40) if len(s.shapes) == 2][:6]
    right = [check(render(s), caption(s)) for s in picked]
    blank = [check(np.full((64, 64, 3), 255, np.uint8), caption(s)) for s in picked]
    d, lo, hi, better, worse = engine_fidelity.paired_difference(right, blank)
    held = sum(r.held()[0] for r in right) / sum(r.held()[1] for r in right)
    assert d == pytest.approx(100 * held) and lo <= d <= hi and (better, worse) == (6, 0)
    assert engine_fidelity.paired_difference(right, right) == (0.0, 0.0, 0.0, 0, 0)
    assert engine_fidelity.paired_difference(blank, right)[:1] == (-d,)


def test_shapes_store_keeps_whole_chunks_and_refuses_another_setup(tmp_path):
    """A stopped --shapes run resumes from the chunks it kept; a kept chunk reads back as it
    was written; a folder made with another setup is not mixed in."""
    import numpy as np

    setup = {"preset": 4, "steps": 28, "captions": ["a red square"]}
    store = engine_fidelity.ShapesStore(tmp_path / "run", setup)
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    assert store.load("cat a=0.5", 40) is None
    store.save("cat a=0.5", 40, (images, 12.5, 3))
    kept = engine_fidelity.ShapesStore(tmp_path / "run", setup).load("cat a=0.5", 40)
    assert kept is not None and np.array_equal(kept[0], images) and kept[1:] == (12.5, 3)
    assert not list((tmp_path / "run").rglob("*.part.npz"))
    with pytest.raises(SystemExit, match="another setup"):
        engine_fidelity.ShapesStore(tmp_path / "run", setup | {"steps": 10})


def test_shapes_run_names_an_unknown_variant(capsys):
    with pytest.raises(SystemExit, match="unknown \\['cat a=0.4'\\]"):
        engine_fidelity.main(["--shapes", "--prompts", "1", "--variants", "cat a=0.4"])


@pytest.mark.slow
def test_scale_benchmark_smoke_plans_dispatches_and_reuses_the_index(tmp_path, capsys):
    """3000 prompts with the stand-in worker: every shard committed by reading its prompts
    from the source; the resubmit reuses the stored shard index and has nothing to do."""
    from bench import scale

    assert scale.main(["--smoke", "--work", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| prompts | shards | plan s |" in out and "| 3,000 | 47 |" in out
    (row,) = json.loads((tmp_path / "r.json").read_text())
    first, again = row["first"], row["again"]
    assert (first["tasks"], first["images"], first["exit_code"]) == (47, 3000, 0)
    assert not first["index_reused"] and again["index_reused"] and again["tasks"] == 0
    assert first["first_task_s"] > 0 and row["status_s"] > 0


def test_gpu_check_dry_run_writes_each_section(tmp_path, monkeypatch):
    """The GPU check's one shot on a GPU: its plumbing runs on the CPU (nothing captured) for
    SD3 and FLUX.1, and a section that fails is recorded while the others still run."""
    from bench import gpu_check

    out = tmp_path / "gpu.json"
    monkeypatch.setattr(gpu_check, "macs", lambda *a: 1 / 0)
    argv = ["--dry-run", "--models", "sd3", "flux", "--skip", "speed", "--out", str(out)]
    assert gpu_check.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["header"]["device"] == "CPU (dry run)"
    assert data["header"]["setups"]["flux"]["family"] == "flux"
    for model in ("sd3", "flux"):
        checks = data[model]["correctness"]
        alpha_one = [v for k, v in checks.items() if "alpha=1" in k and "tiny" in k]
        assert len(alpha_one) == 4 and all(v["ok"] for v in alpha_one), checks
        assert checks["model alpha=0.3 CAT captured vs eager"]["max_abs"] == 0.0
        assert data[model]["macs"] == {"error": "ZeroDivisionError: division by zero"}


def test_gpu_check_dry_run_speed_flux(tmp_path):
    """The FLUX.1 speed section runs all four variants (one row per prompt, embedded guidance
    through the graph runner) and reports their speed-ups."""
    from bench import gpu_check

    out = tmp_path / "gpu.json"
    argv = ["--dry-run", "--models", "flux", "--skip", "correctness", "macs"]
    argv += ["--samples", "1", "--steps", "10", "--rounds", "1", "--out", str(out)]
    assert gpu_check.main(argv) == 0
    data = json.loads(out.read_text())
    assert list(data) == ["header", "flux", "seconds"]
    result = data["flux"]["speed"]["1 prompt(s), 10 steps"]
    assert set(result["median_s"]) == set(gpu_check.VARIANTS)
    assert result["rounds"] == 1 and result["speedup_eager"] > 0
