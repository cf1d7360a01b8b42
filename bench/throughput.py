"""Throughput of catbatch against a plain in-process loop over the same pipeline.

Three variants run over the same prompts, seeds, batch size, steps and resolution, each in a
fresh process and interleaved across repeats (the order rotates each repeat):

- ``plain``: one process, ``torch.set_num_threads(1)``, the pipeline called batch after batch
  exactly as a catbatch worker calls it, images turned to PNG bytes as catbatch does (no Ray, no
  Parquet);
- ``catbatch-1`` / ``catbatch-2``: ``python -m catbatch.cli submit MANIFEST --quiet --num-cpus N
  --actors 1|2`` with ``ray.address: local`` and ``ray.resources.cpus: 1`` (one thread per
  actor); with ``--with-metrics`` also ``catbatch-1+metrics`` (per-row MACs and CLIP on).

Measured per run: end-to-end wall (launch to exit), time from launch to the first committed shard
(the earliest ``written_at`` of the ``.stats.json`` commit markers), and steady-state images/s.
Steady state for catbatch: each shard's interval is ``[written_at - seconds, written_at]``; the
window runs from the ``actors``-th commit (every actor has finished its first shard, which held
its warm-up batch) to the last commit, and each shard counts the share of its images that falls
inside the window. For the plain loop: the images after one warm-up batch over their time.

From the pipeline calls' own clocks (the ``batch`` events' ``call_start``, ``call_s`` and
``size`` in the run's ``logs/``; the plain loop times its calls the same way), over each actor's
window from the end of its first call (the warm-up batch) to the end of its last: the share of
the time with no pipeline call running, per actor (:func:`idle_share`), and steady images/s
(:func:`calls_rate`, summed over the actors). The commit-based figure above assumes a shard's
images spread over ``[started_at, written_at]``; once a shard is written while the next one's
calls run, consecutive intervals overlap and commits can bunch, so on short runs it strays; the
call-based rate does not depend on when shards are written.

    python -m bench.throughput                       # tiny-sd3, 256 px, 28 steps, 48 prompts
    python -m bench.throughput --demo                # manifests/demo.yaml (both variants, metrics)
    python -m bench.throughput --quick               # smoke test: 64 px, 2 steps, 8 prompts
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPTS_FILE = ROOT / "manifests" / "prompts" / "demo.txt"
DEMO_MANIFEST = ROOT / "manifests" / "demo.yaml"
OVERHEAD_TARGET_PCT = 5.0
SPEEDUP_TARGET = 1.7
IDLE_TARGET_PCT = 3.0  # share of an actor's steady time with no pipeline call running (issue 21)


# -- pure helpers (tested in tests/test_throughput_bench.py) -----------------------------------
@dataclass(frozen=True)
class Interval:
    """Wall-clock span of one committed shard (or one plain-loop batch) and its images."""

    start: float
    end: float
    images: int


def median_spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max); NaN for no values."""
    vals = [v for v in values if v == v]
    if not vals:
        nan = float("nan")
        return nan, nan, nan
    return statistics.median(vals), min(vals), max(vals)


def fmt_spread(values: Sequence[float], digits: int = 2, unit: str = "") -> str:
    """``median (min-max)``, or just the value when there is one; ``-`` for none."""
    med, lo, hi = median_spread(values)
    if med != med:
        return "-"
    if len(values) == 1 or lo == hi:
        return f"{med:.{digits}f}{unit}"
    return f"{med:.{digits}f}{unit} ({lo:.{digits}f}-{hi:.{digits}f})"


def ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-repeat ratios num[i] / den[i] (pairs with a zero or missing value are left out)."""
    return [a / b for a, b in zip(num, den, strict=False) if b and a == a and b == b]


def overhead_pct(ratio: float) -> float:
    """Slowdown of catbatch against the plain loop in percent, from catbatch / plain images/s."""
    return (1.0 - ratio) * 100.0


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def shard_intervals(stats: Sequence[dict[str, Any]]) -> list[Interval]:
    """Intervals of committed shards from their stats files (``started_at`` when present, else
    ``written_at - seconds``; the latter starts late by the Parquet write, milliseconds)."""
    out = []
    for s in stats:
        end = float(s["written_at"])
        start = float(s["started_at"]) if "started_at" in s else end - float(s["seconds"])
        out.append(Interval(start, end, int(s["images_ok"])))
    return sorted(out, key=lambda iv: iv.end)


def first_commit_s(stats: Sequence[dict[str, Any]], launched_at: float) -> float:
    """Seconds from launch to the first commit marker written."""
    return min(float(s["written_at"]) for s in stats) - launched_at


def steady_rate(intervals: Sequence[Interval], actors: int) -> float:
    """Images/s once every actor is past its first shard: the window runs from the
    ``actors``-th commit to the last; each shard adds its images pro rata of its overlap."""
    ends = sorted(iv.end for iv in intervals)
    if len(ends) <= actors:
        return float("nan")
    w0, w1 = ends[actors - 1], ends[-1]
    if w1 <= w0:
        return float("nan")
    images = 0.0
    for iv in intervals:
        span = iv.end - iv.start
        overlap = max(0.0, min(iv.end, w1) - max(iv.start, w0))
        if span > 0:
            images += iv.images * overlap / span
    return images / (w1 - w0)


def plain_steady_rate(batches: Sequence[Interval], warmup: int = 1) -> float:
    """Images/s of the batches after ``warmup`` ones, over their wall time (gaps included)."""
    rest = list(batches)[warmup:]
    if not rest:
        return float("nan")
    span = rest[-1].end - rest[0].start
    return sum(b.images for b in rest) / span if span > 0 else float("nan")


def outside_share(pipe_s_per_image: float, steady_ips: float, actors: int = 1) -> float:
    """Share of an actor's (or the loop's) steady time spent outside the pipeline call: PNG
    encoding, Parquet and commit writes, dispatch gaps. Measured within one run, so a load that
    slows the pipeline and the rest alike leaves it unchanged."""
    return 1.0 - pipe_s_per_image * steady_ips / actors


def same_run_line(catbatch_outside: float, plain_outside: float) -> str:
    """catbatch / plain images/s had both run the pipeline at the same speed."""
    ratio = (1 - catbatch_outside) / (1 - plain_outside)
    over = overhead_pct(ratio)
    return (
        f"same-run estimate (share of steady time outside the pipeline call): catbatch 1 actor "
        f"{100 * catbatch_outside:.1f} %, plain {100 * plain_outside:.1f} % -> at equal pipeline "
        f"speed catbatch/plain {ratio:.3f}, overhead {over:.1f} % "
        f"(target <= {OVERHEAD_TARGET_PCT:g} %: {verdict(over <= OVERHEAD_TARGET_PCT)})"
    )


def idle_share(calls: Sequence[tuple[float, float]]) -> float:
    """Share of one actor's (or the plain loop's) steady wall time with no pipeline call
    running. ``calls`` are ``(wall-clock start, seconds)``; the window runs from the end of the
    first call (the warm-up batch) to the end of the last; NaN with fewer than two calls."""
    calls = sorted(calls)
    if len(calls) < 2:
        return float("nan")
    w0 = calls[0][0] + calls[0][1]
    w1 = max(start + s for start, s in calls)
    if w1 <= w0:
        return float("nan")
    busy = sum(max(0.0, min(start + s, w1) - max(start, w0)) for start, s in calls[1:])
    return max(0.0, 1.0 - busy / (w1 - w0))


def calls_rate(calls: Sequence[tuple[float, float, int]]) -> float:
    """Steady images/s of one actor (or the plain loop) from its pipeline calls ``(start,
    seconds, images)``: the images of the calls after the first (the warm-up batch) over the
    time from the end of the first call to the end of the last; NaN with fewer than two."""
    calls = sorted(calls)
    if len(calls) < 2:
        return float("nan")
    w0 = calls[0][0] + calls[0][1]
    w1 = max(start + s for start, s, _ in calls)
    return sum(n for _, _, n in calls[1:]) / (w1 - w0) if w1 > w0 else float("nan")


def actor_calls(events: Sequence[dict[str, Any]]) -> list[tuple[float, float, int]]:
    """``(start, seconds, images)`` of the pipeline calls in one actor's events (``batch``
    events that carry ``call_start`` / ``call_s``)."""
    return [
        (float(e["call_start"]), float(e["call_s"]), int(e["size"]))
        for e in events
        if e.get("event") == "batch" and "call_start" in e
    ]


def fmt_actors(per_repeat: Sequence[Sequence[float]]) -> str:
    """Per repeat, the actors' values in percent joined by ``/``; repeats by ``;``."""
    if not per_repeat:
        return "-"
    return "; ".join(" / ".join(f"{100 * v:.1f}" for v in vals) for vals in per_repeat)


def load_note(loads: Sequence[float], cores: int) -> str | None:
    """A warning when the 1-minute load average exceeded the core count during the runs."""
    worst = max(loads, default=0.0)
    if worst <= cores:
        return None
    return (
        f"LOADED MACHINE: load average up to {worst:.1f} on {cores} cores during the runs; "
        "images/s ratios between variants measure the scheduler as much as catbatch (the "
        "same-run estimate is the less disturbed overhead figure); rerun on an idle machine"
    )


def first_n_images_s(batches: Sequence[Interval], n: int, launched_at: float) -> float:
    """Seconds from launch until ``n`` images are done (the plain loop's "first shard")."""
    done = 0
    for b in batches:
        done += b.images
        if done >= n:
            return b.end - launched_at
    return float("nan")


def manifest_text(cfg: dict[str, Any]) -> str:
    """The benchmark's manifest (YAML is a superset of JSON)."""
    return json.dumps(
        {
            "name": "throughput",
            "model": {"id": cfg["model"], "dtype": "float32", "device": "cpu"},
            "prompts": {"path": cfg["prompts_path"], "format": "text"},
            "seed": 0,
            "width": cfg["size"],
            "height": cfg["size"],
            "steps": cfg["steps"],
            "guidance_scale": 7.0,
            "batch_size": cfg["batch_size"],
            "shard_size": cfg["shard_size"],
            "ray": {"address": "local", "actors": 1, "resources": {"cpus": 1, "gpus": 0}},
            "metrics": {"macs": cfg["macs"], "clip": {"enabled": cfg["clip"]}},
            "output": cfg["output"],
        },
        indent=2,
    )


# -- runs ----------------------------------------------------------------------------------
@dataclass
class RunResult:
    variant: str
    repeat: int
    images: int = 0
    wall_s: float = float("nan")
    steady_ips: float = float("nan")
    first_commit_s: float = float("nan")
    pipe_s_per_image: float = float("nan")  # pipeline call, warm-up batch left out
    outside: float = float("nan")  # outside_share of the steady state
    idle: list[float] = field(default_factory=list)  # idle_share per actor (plain: one)
    calls_ips: float = float("nan")  # calls_rate, summed over the actors
    driver_s: float | None = None  # catbatch: Summary.seconds (submit() start to end)
    load_before: float = 0.0
    load_after: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def wall_ips(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else float("nan")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        RAY_USAGE_STATS_ENABLED="0",
        OMP_NUM_THREADS="1",  # Ray gives a 1-CPU actor the same
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


def _run(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """Run a variant in a new session: with the kernel's autogroup scheduling a session is one
    group, and Ray's raylet (whose children are the actors) makes its own; without this the
    plain loop would share our session's share of a loaded CPU while the actors do not."""
    launched = time.time()
    with log.open("w") as fh:
        rc = subprocess.call(
            cmd,
            cwd=ROOT,
            env=_child_env(),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return launched, time.time(), rc


def _tail(log: Path, n: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def run_catbatch(work: Path, variant: str, actors: int, repeat: int, num_cpus: int) -> RunResult:
    res = RunResult(variant, repeat, load_before=os.getloadavg()[0])
    out = work / f"out-{variant}-{repeat}"
    manifest = work / ("manifest-metrics.yaml" if "metrics" in variant else "manifest.yaml")
    log = work / f"{variant}-{repeat}.log"
    cmd = [sys.executable, "-m", "catbatch.cli", "submit", str(manifest), "--quiet"]
    cmd += ["--output", str(out), "--actors", str(actors), "--num-cpus", str(num_cpus)]
    launched, ended, rc = _run(cmd, log)
    res.load_after = os.getloadavg()[0]
    res.wall_s = ended - launched
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("variants/*/*.stats.json"))]
    if rc != 0 or not stats:
        res.error = f"exit {rc}: {_tail(log)}"
        return res
    res.images = sum(int(s["images_ok"]) for s in stats)
    res.steady_ips = steady_rate(shard_intervals(stats), actors)
    res.first_commit_s = first_commit_s(stats, launched)
    res.pipe_s_per_image = _pipeline_s_per_image(out)
    res.outside = outside_share(res.pipe_s_per_image, res.steady_ips, actors)
    calls = [actor_calls(ev) for ev in _actor_events(out)]
    res.idle = [idle_share([(start, sec) for start, sec, _ in c]) for c in calls]
    res.calls_ips = sum(calls_rate(c) for c in calls) if calls else float("nan")
    record = json.loads((out / "run.json").read_text())
    res.driver_s = record["submissions"][-1]["summary"].get("seconds")
    info = record.get("pipeline", {}).get("metrics", {})
    res.metrics = {
        "macs": info.get("macs") == "counted",
        "clip": info.get("clip", {}).get("available"),
    }
    return res


def _actor_events(out: Path) -> list[list[dict[str, Any]]]:
    """Each actor's events from the run's log folder (``logs/<run id>/actor-N.jsonl``)."""
    files = sorted(out.glob("logs/*/actor-*.jsonl"), key=lambda p: int(p.stem.split("-")[1]))
    return [[json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] for f in files]


def _pipeline_s_per_image(out: Path) -> float:
    """Mean ``latency_s`` of the ok rows that are not warm-up (the batch's pipeline call, plus
    row metrics when on, per image; PNG encoding and writes are not in it)."""
    import pyarrow.parquet as pq

    vals = []
    for p in out.glob("variants/*/*.parquet"):
        t = pq.read_table(p, columns=["latency_s", "warmup", "status"]).to_pylist()
        vals += [r["latency_s"] for r in t if r["status"] == "ok" and not r["warmup"]]
    return statistics.fmean(vals) if vals else float("nan")


def run_plain(work: Path, repeat: int, shard_size: int) -> RunResult:
    res = RunResult("plain", repeat, load_before=os.getloadavg()[0])
    result_file = work / f"plain-{repeat}.json"
    log = work / f"plain-{repeat}.log"
    cmd = [sys.executable, "-m", "bench.throughput", "--plain-child", str(work / "manifest.yaml")]
    launched, ended, rc = _run([*cmd, "--child-result", str(result_file)], log)
    res.load_after = os.getloadavg()[0]
    res.wall_s = ended - launched
    if rc != 0 or not result_file.exists():
        res.error = f"exit {rc}: {_tail(log)}"
        return res
    child = json.loads(result_file.read_text())
    batches = [Interval(*b) for b in child["batches"]]
    res.images = sum(b.images for b in batches)
    res.steady_ips = plain_steady_rate(batches)
    res.pipe_s_per_image = sum(child["pipe_s"][1:]) / sum(b.images for b in batches[1:])
    res.outside = outside_share(res.pipe_s_per_image, res.steady_ips)
    calls = [(b.start, s, b.images) for b, s in zip(batches, child["pipe_s"], strict=True)]
    res.idle = [idle_share([(start, sec) for start, sec, _ in calls])]
    res.calls_ips = calls_rate(calls)
    res.first_commit_s = first_n_images_s(batches, shard_size, launched)
    res.metrics = {"macs": False, "clip": False}
    return res


def plain_child(manifest_path: str, result_path: str) -> int:
    """The plain loop: the worker's pipeline call, batch after batch (each variant in turn, its
    pruning applied once), PNG-encoded, one thread."""
    import numpy as np
    import torch

    from catbatch.job.manifest import load_manifest
    from catbatch.job.prompts import read_prompts
    from catbatch.job.seeds import image_generator, image_seed
    from catbatch.job.worker import encode_png
    from catbatch.models.loader import describe_source, load_pipeline, pipeline_call_kwargs
    from catbatch.pruning import CATConfig, apply_cat, remove_cat

    torch.set_num_threads(1)
    m = load_manifest(manifest_path)
    source = describe_source(m.model.id, m.model.revision, m.base_dir)
    pipe = load_pipeline(source, m.model.dtype, "cpu")
    extra = pipeline_call_kwargs(pipe)
    prompts = read_prompts(m.prompts, m.base_dir)
    batches, pipe_s = [], []
    for settings in m.resolved_variants().values():
        if settings.pruning is not None:
            apply_cat(pipe, CATConfig.from_dict(settings.pruning))
        kwargs = dict(extra)
        if settings.max_sequence_length is not None:
            kwargs["max_sequence_length"] = settings.max_sequence_length
        for b in range(0, len(prompts), m.batch_size):
            batch = prompts[b : b + m.batch_size]
            start = time.time()
            out = pipe(
                prompt=[p.prompt for p in batch],
                negative_prompt=[settings.negative_prompt] * len(batch),
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                height=settings.height,
                width=settings.width,
                generator=[image_generator(image_seed(m.seed, p.sample_id, 0)) for p in batch],
                output_type="np",
                **kwargs,
            )
            pipe_s.append(time.time() - start)
            for img in np.asarray(out.images):
                encode_png((np.clip(img, 0.0, 1.0) * 255).round().astype("uint8"))
            batches.append((start, time.time(), len(batch)))
        if settings.pruning is not None:
            remove_cat(pipe)
    Path(result_path).write_text(json.dumps({"batches": batches, "pipe_s": pipe_s}))
    return 0


# -- report --------------------------------------------------------------------------------
def _col(results: list[RunResult], variant: str, attr: str) -> list[float]:
    return [getattr(r, attr) for r in results if r.variant == variant and r.error is None]


def report(results: list[RunResult], variants: list[str]) -> str:
    lines = [
        "| variant | row metrics (MACs / CLIP) | images | steady images/s, median (min-max) "
        "| end-to-end s | end-to-end images/s | launch to first committed shard s "
        "| pipeline s per image | outside the pipeline % "
        "| steady images/s from the pipeline calls | no pipeline call %, per actor (steady) "
        "| load avg (1 min) at start |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in variants:
        runs = [r for r in results if r.variant == v and r.error is None]
        if not runs:
            lines.append(f"| {v} | - | - | failed | - | - | - | - | - | - | - | - |")
            continue
        m = runs[0].metrics
        met = " / ".join("on" if m.get(k) else "off" for k in ("macs", "clip"))
        lines.append(
            f"| {v} | {met} | {runs[0].images} | {fmt_spread(_col(results, v, 'steady_ips'))} "
            f"| {fmt_spread(_col(results, v, 'wall_s'), 1)} "
            f"| {fmt_spread(_col(results, v, 'wall_ips'))} "
            f"| {fmt_spread(_col(results, v, 'first_commit_s'), 1)} "
            f"| {fmt_spread(_col(results, v, 'pipe_s_per_image'), 3)} "
            f"| {fmt_spread([100 * x for x in _col(results, v, 'outside')], 1)} "
            f"| {fmt_spread(_col(results, v, 'calls_ips'))} "
            f"| {fmt_actors([r.idle for r in runs])} "
            f"| {fmt_spread(_col(results, v, 'load_before'))} |"
        )
    lines.append("")
    lines += summary_lines(results, variants)
    return "\n".join(lines)


def _paired(results: list[RunResult], a: str, b: str, attr: str) -> list[float]:
    """Per-repeat ratios a/b of ``attr`` (repeats where both ran)."""
    by = {(r.variant, r.repeat): getattr(r, attr) for r in results if r.error is None}
    reps = sorted({r.repeat for r in results})
    pairs = [(by[(a, i)], by[(b, i)]) for i in reps if (a, i) in by and (b, i) in by]
    return ratios([p[0] for p in pairs], [p[1] for p in pairs])


def summary_lines(results: list[RunResult], variants: list[str]) -> list[str]:
    out = []
    if {"plain", "catbatch-1"} <= set(variants):
        steady = _paired(results, "catbatch-1", "plain", "steady_ips")
        wall = _paired(results, "catbatch-1", "plain", "wall_ips")
        if steady:
            med = median_spread(steady)[0]
            out.append(
                f"catbatch 1 actor / plain, steady images/s: {fmt_spread(steady, 3)} per repeat "
                f"-> overhead {overhead_pct(med):.1f} % (target <= {OVERHEAD_TARGET_PCT:g} %: "
                f"{verdict(overhead_pct(med) <= OVERHEAD_TARGET_PCT)}); end-to-end images/s "
                f"ratio {fmt_spread(wall, 3)}"
            )
        cb, pl = _col(results, "catbatch-1", "outside"), _col(results, "plain", "outside")
        if cb and pl:
            out.append(same_run_line(median_spread(cb)[0], median_spread(pl)[0]))
    if {"catbatch-1", "catbatch-2"} <= set(variants):
        steady = _paired(results, "catbatch-2", "catbatch-1", "steady_ips")
        wall = _paired(results, "catbatch-2", "catbatch-1", "wall_ips")
        if steady:
            med = median_spread(steady)[0]
            out.append(
                f"2 actors / 1 actor, steady images/s: {fmt_spread(steady, 2, 'x')} per repeat "
                f"(target >= {SPEEDUP_TARGET:g}x: {verdict(med >= SPEEDUP_TARGET)}); end-to-end "
                f"images/s ratio {fmt_spread(wall, 2, 'x')}"
            )
    one = "catbatch-1+metrics" if "catbatch-1+metrics" in variants else "catbatch-1"
    idle = [x for r in results if r.variant == one and r.error is None for x in r.idle]
    if idle:
        med = median_spread(idle)[0]
        out.append(
            f"{one}, share of steady time with no pipeline call: {fmt_spread(idle, 3)} "
            f"-> {100 * med:.1f} % (target <= {IDLE_TARGET_PCT:g} %: "
            f"{verdict(100 * med <= IDLE_TARGET_PCT)})"
        )
    if {one, "plain"} <= set(variants):
        steady = _paired(results, one, "plain", "calls_ips")
        if steady:
            med = median_spread(steady)[0]
            out.append(
                f"{one} / plain, steady images/s from the pipeline calls: "
                f"{fmt_spread(steady, 3)} per repeat (target >= 1: {verdict(med >= 1.0)})"
            )
    if {"catbatch-1", "catbatch-1+metrics"} <= set(variants):
        steady = _paired(results, "catbatch-1+metrics", "catbatch-1", "steady_ips")
        if steady:
            out.append(f"row metrics on / off (1 actor), steady: {fmt_spread(steady, 3)}")
    for v in variants:
        if v.startswith("catbatch"):
            vals = _col(results, v, "first_commit_s")
            out.append(f"{v}: launch to first committed shard {fmt_spread(vals, 1)} s")
    note = load_note(
        [x for r in results for x in (r.load_before, r.load_after)], os.cpu_count() or 1
    )
    if note:
        out.append(note)
    for r in results:
        if r.error:
            out.append(f"FAILED {r.variant} repeat {r.repeat}: {r.error}")
    return out


# -- main ----------------------------------------------------------------------------------
def write_job(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    base = [ln for ln in PROMPTS_FILE.read_text().splitlines() if ln.strip()]
    lines = [
        base[i % len(base)] + (f" #{i // len(base)}" if i >= len(base) else "")
        for i in range(args.prompts)
    ]
    (work / "prompts.txt").write_text("\n".join(lines) + "\n")
    cfg = {
        "model": args.model,
        "prompts_path": str(work / "prompts.txt"),
        "size": args.size,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "macs": False,
        "clip": False,
        "output": str(work / "out"),
    }
    (work / "manifest.yaml").write_text(manifest_text(cfg))
    (work / "manifest-metrics.yaml").write_text(manifest_text({**cfg, "macs": True, "clip": True}))
    return cfg


def write_demo_job(work: Path, quick: bool = False) -> dict[str, Any]:
    """``manifests/demo.yaml`` as it is (catbatch-shapes, both variants, MACs, CLIP and
    adherence), on the CPU with one thread per actor, writing into ``work``; ``quick``: a
    smoke test (4 prompts, 2 steps, batches and shards of 2)."""
    import yaml

    m = yaml.safe_load(DEMO_MANIFEST.read_text())
    if quick:
        m["prompts"]["limit"], m["steps"], m["batch_size"], m["shard_size"] = 4, 2, 2, 2
    m["prompts"]["path"] = str((DEMO_MANIFEST.parent / m["prompts"]["path"]).resolve())
    m["model"]["device"] = "cpu"
    m["ray"] = {"address": "local", "actors": 1, "resources": {"cpus": 1, "gpus": 0}}
    m["output"] = str(work / "out")
    (work / "manifest.yaml").write_text(json.dumps(m, indent=2))
    return m


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-sd3")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="width = height, pixels")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the private Ray cluster")
    parser.add_argument(
        "--with-metrics", action="store_true", help="also 1 and 2 actors with MACs+CLIP on"
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="manifests/demo.yaml's configuration instead (its model, prompts, variants, metrics)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke: 64 px, 2 steps, 8 prompts (--demo: 4)"
    )
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--plain-child", help=argparse.SUPPRESS)
    parser.add_argument("--child-result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain_child:
        return plain_child(args.plain_child, args.child_result)
    if args.quick:
        args.prompts, args.repeats, args.size, args.steps = 8, 1, 64, 2
        args.batch_size, args.shard_size = 2, 2

    import catbatch
    from catbatch.models.loader import describe_source

    variants = ["plain", "catbatch-1", "catbatch-2"]
    if args.with_metrics and not args.demo:
        variants += ["catbatch-1+metrics", "catbatch-2+metrics"]
    work = Path(tempfile.mkdtemp(prefix="catbatch-throughput-"))
    if args.demo:
        cfg = write_demo_job(work, args.quick)
        args.model, args.shard_size = cfg["model"]["id"], cfg["shard_size"]
        what = (
            f"{DEMO_MANIFEST.relative_to(ROOT)}: {args.model}, {cfg['width']}x{cfg['height']}, "
            f"{cfg['steps']} steps, {cfg['prompts'].get('limit')} prompts x variants "
            f"{', '.join(v['name'] for v in cfg['variants'])}, batch {cfg['batch_size']}, shard "
            f"{cfg['shard_size']}, metrics {json.dumps(cfg.get('metrics'))}"
        )
    else:
        cfg = write_job(work, args)
        what = (
            f"{args.model}, {args.size}x{args.size}, {args.steps} steps, {args.prompts} prompts, "
            f"batch {args.batch_size}, shard {args.shard_size}"
        )
    describe_source(args.model)  # builds a preset once, before anything is timed
    print(
        f"{what}, fp32 CPU, 1 thread per actor / in the plain loop; Ray cluster of "
        f"{args.num_cpus} CPUs; plain loop PNG-encodes its images (no Parquet, no row metrics); "
        f"{os.cpu_count()} cores; catbatch {catbatch.__version__} from "
        f"{Path(catbatch.__file__).parent}; work dir {work}",
        flush=True,
    )
    results: list[RunResult] = []
    for rep in range(args.repeats):
        order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
        for v in order:
            if v == "plain":
                r = run_plain(work, rep, args.shard_size)
            else:
                actors = 2 if v.startswith("catbatch-2") else 1
                r = run_catbatch(work, v, actors, rep, args.num_cpus)
            results.append(r)
            print(
                f"repeat {rep} {v}: steady {r.steady_ips:.3f} images/s, wall {r.wall_s:.1f} s, "
                f"first {r.first_commit_s:.1f} s, no pipeline call {fmt_actors([r.idle])} %, "
                f"load {r.load_before:.2f}->{r.load_after:.2f}"
                + (f" ERROR {r.error.splitlines()[0]}" if r.error else ""),
                flush=True,
            )
        if rep < args.repeats - 1:  # long runs: a table so far, in case they are stopped
            print(f"\nafter repeat {rep}:\n{report(results, variants)}\n", flush=True)
    print()
    print(report(results, variants))
    if args.json:
        raw = {"config": cfg, "results": [{**asdict(r), "wall_ips": r.wall_ips} for r in results]}
        Path(args.json).write_text(json.dumps(raw, indent=2))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
