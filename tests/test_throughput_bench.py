"""The throughput benchmark's pure helpers: spreads, ratios, stats timestamps, steady rates."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import yaml

ROOT = str(Path(__file__).resolve().parents[1])  # bench/ is not an installed package
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import throughput as tp  # noqa: E402
from bench.throughput import Interval  # noqa: E402


def test_median_spread_and_formatting():
    assert tp.median_spread([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert tp.fmt_spread([1.5, 1.0, 2.25]) == "1.50 (1.00-2.25)"
    assert tp.fmt_spread([1.234], 1, "x") == "1.2x"
    assert tp.fmt_spread([]) == "-"
    assert tp.fmt_spread([float("nan"), 2.0, 4.0]) == "3.00 (2.00-4.00)"


def test_ratios_pair_by_index_and_skip_zero_or_nan():
    assert tp.ratios([2.0, 3.0, 1.0], [1.0, 0.0, 4.0]) == [2.0, 0.25]
    assert tp.ratios([float("nan")], [1.0]) == []
    assert tp.overhead_pct(0.96) == pytest.approx(4.0)
    assert tp.overhead_pct(1.02) == pytest.approx(-2.0)


def _stats(start: float, end: float, images: int = 8, **extra) -> dict:
    return {"written_at": end, "seconds": end - start, "images_ok": images, **extra}


def test_shard_intervals_from_stats_prefer_started_at():
    ivs = tp.shard_intervals([_stats(10.0, 14.0), _stats(0.0, 4.0, started_at=1.0)])
    assert ivs == [Interval(1.0, 4.0, 8), Interval(10.0, 14.0, 8)]
    assert tp.first_commit_s([_stats(5.0, 9.0), _stats(0.0, 7.5)], launched_at=2.0) == 5.5


def test_steady_rate_one_actor_skips_the_first_shard():
    # first shard slow (warm-up), then 8 images per 4 s
    ivs = [Interval(0, 10, 8), Interval(10, 14, 8), Interval(14, 18, 8), Interval(18, 22, 8)]
    assert tp.steady_rate(ivs, actors=1) == pytest.approx(24 / 12)
    assert math.isnan(tp.steady_rate(ivs[:1], actors=1))


def test_steady_rate_two_actors_counts_partial_shards_pro_rata():
    # actor A: first shard 0-8, then 8-12, 12-16; actor B: first shard 0-10, then 10-14, 14-18
    a = [Interval(0, 8, 8), Interval(8, 12, 8), Interval(12, 16, 8)]
    b = [Interval(0, 10, 8), Interval(10, 14, 8), Interval(14, 18, 8)]
    # window 10-18: A's 8-12 counts half, A's 12-16 and B's 10-14, 14-18 in full
    assert tp.steady_rate(a + b, actors=2) == pytest.approx((4 + 8 + 8 + 8) / 8)
    # the naive count (every image committed after the first commit) would say more
    assert tp.steady_rate(a + b, actors=2) < 5 * 8 / 10


def test_plain_steady_rate_and_first_images():
    batches = [Interval(100, 105, 4), Interval(105, 107, 4), Interval(107.5, 109, 4)]
    assert tp.plain_steady_rate(batches) == pytest.approx(8 / 4)
    assert math.isnan(tp.plain_steady_rate(batches[:1]))
    assert tp.first_n_images_s(batches, 8, launched_at=90.0) == pytest.approx(17.0)
    assert math.isnan(tp.first_n_images_s(batches, 20, launched_at=90.0))


def test_manifest_text_sets_the_compared_configuration():
    cfg = {
        "model": "tiny-sd3",
        "prompts_path": "/tmp/p.txt",
        "size": 256,
        "steps": 28,
        "batch_size": 4,
        "shard_size": 8,
        "macs": False,
        "clip": True,
        "output": "/tmp/out",
    }
    m = yaml.safe_load(tp.manifest_text(cfg))  # catbatch.job.manifest imports torch: too slow here
    assert (m["width"], m["height"], m["steps"]) == (256, 256, 28)
    assert (m["batch_size"], m["shard_size"]) == (4, 8)
    assert m["ray"]["address"] == "local" and m["ray"]["resources"]["cpus"] == 1
    assert m["metrics"] == {"macs": False, "clip": {"enabled": True}}
    assert m["model"] == {"id": "tiny-sd3", "dtype": "float32", "device": "cpu"}
    assert m["prompts"]["path"] == "/tmp/p.txt" and m["output"] == "/tmp/out"


def test_summary_lines_give_overhead_and_speedup_verdicts():
    def run(variant: str, repeat: int, ips: float) -> tp.RunResult:
        return tp.RunResult(variant, repeat, images=32, wall_s=60.0, steady_ips=ips)

    results = [
        run("plain", 0, 1.0),
        run("catbatch-1", 0, 0.97),
        run("catbatch-2", 0, 1.5),
        run("plain", 1, 1.0),
        run("catbatch-1", 1, 0.99),
        run("catbatch-2", 1, 1.8),
    ]
    lines = tp.summary_lines(results, ["plain", "catbatch-1", "catbatch-2"])
    text = "\n".join(lines)
    assert "overhead 2.0 % (target <= 5 %: MET)" in text
    assert "1.68x (1.55-1.82) per repeat (target >= 1.7x: MISSED)" in text


def test_outside_share_and_same_run_line():
    # 0.5 s of pipeline per image at 1.6 images/s: 80 % of the time in the pipeline
    assert tp.outside_share(0.5, 1.6) == pytest.approx(0.2)
    # two actors at 0.9 images/s each = 1.8 in all, 1 s of pipeline per image each
    assert tp.outside_share(1.0, 1.8, actors=2) == pytest.approx(0.1)
    line = tp.same_run_line(0.05, 0.01)
    assert "catbatch 1 actor 5.0 %, plain 1.0 %" in line
    assert "catbatch/plain 0.960, overhead 4.0 % (target <= 5 %: MET)" in line
    assert "MISSED" in tp.same_run_line(0.10, 0.01)


def test_load_note_only_when_load_exceeds_cores():
    assert tp.load_note([0.5, 1.9], cores=2) is None
    note = tp.load_note([1.0, 6.4], cores=2)
    assert note is not None and "LOADED MACHINE: load average up to 6.4 on 2 cores" in note


def test_idle_share_leaves_out_the_warmup_call():
    # warm-up call 0-10, then calls of 2 s with gaps of 0.5 s, 0 s and 1.5 s
    calls = [(0.0, 10.0), (10.5, 2.0), (12.5, 2.0), (16.0, 2.0)]
    assert tp.idle_share(calls) == pytest.approx(2.0 / 8.0)
    assert tp.idle_share(list(reversed(calls))) == pytest.approx(2.0 / 8.0)
    assert tp.idle_share([(0.0, 1.0), (1.0, 3.0)]) == 0.0  # back to back
    assert math.isnan(tp.idle_share(calls[:1]))


def test_calls_rate_counts_the_images_after_the_warmup_call():
    # warm-up 0-10 (4 images), then 4 + 4 + 2 images ending at 18
    calls = [(0.0, 10.0, 4), (10.5, 2.0, 4), (12.5, 2.0, 4), (16.0, 2.0, 2)]
    assert tp.calls_rate(calls) == pytest.approx(10 / 8)
    assert math.isnan(tp.calls_rate(calls[:1]))


def test_actor_calls_from_batch_events_and_per_actor_formatting():
    events = [
        {"event": "task_start", "t": 1.0},
        {"event": "batch", "t": 3.0, "size": 4, "call_start": 1.5, "call_s": 1.4},
        {"event": "batch", "t": 4.0, "error": "boom"},  # failed: no call timing
        {"event": "task_commit", "t": 5.0},
    ]
    assert tp.actor_calls(events) == [(1.5, 1.4, 4)]
    assert tp.fmt_actors([[0.021, 0.034]]) == "2.1 / 3.4"
    assert tp.fmt_actors([[0.01], [0.02]]) == "1.0; 2.0"
    assert tp.fmt_actors([]) == "-"


def test_summary_lines_give_the_idle_share_verdict_for_one_actor_with_metrics():
    def run(variant: str, calls_ips: float, idle: float) -> tp.RunResult:
        return tp.RunResult(variant, 0, 32, 60.0, 1.0, idle=[idle], calls_ips=calls_ips)

    results = [run("plain", 1.0, 0.099), run("catbatch-1", 1.0, 0.05)]
    results.append(run("catbatch-1+metrics", 1.02, 0.02))
    text = "\n".join(tp.summary_lines(results, ["plain", "catbatch-1", "catbatch-1+metrics"]))
    assert "catbatch-1+metrics, share of steady time with no pipeline call: 0.020" in text
    assert "-> 2.0 % (target <= 3 %: MET)" in text
    assert "pipeline calls: 1.020 per repeat (target >= 1: MET)" in text
    table = tp.report(results, ["plain", "catbatch-1", "catbatch-1+metrics"])
    assert "| 9.9 |" in table and "| 2.0 |" in table


def test_demo_job_is_the_demo_manifest_on_the_cpu(tmp_path):
    m = tp.write_demo_job(tmp_path)
    demo = yaml.safe_load(tp.DEMO_MANIFEST.read_text())
    assert m["model"] == {**demo["model"], "device": "cpu"}
    assert [v["name"] for v in m["variants"]] == [v["name"] for v in demo["variants"]]
    assert m["metrics"] == demo["metrics"] and m["steps"] == demo["steps"]
    assert Path(m["prompts"]["path"]).is_file() and m["prompts"]["limit"] == 32
    assert m["ray"]["resources"] == {"cpus": 1, "gpus": 0} and m["output"] == str(tmp_path / "out")
    assert yaml.safe_load((tmp_path / "manifest.yaml").read_text()) == m
    assert tp.write_demo_job(tmp_path, quick=True)["prompts"]["limit"] == 4
