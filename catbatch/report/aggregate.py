"""Per-variant aggregates of a run and their comparison with the baseline (unpruned) variant.

What each number means is in :data:`DEFINITIONS` (also written into ``report.json``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from catbatch.metrics import adherence
from catbatch.report.load import METRIC_COLUMNS, RunData, VariantData
from catbatch.report.pairs import GridRow, ShardCache, fidelity, fill_grid, grid_rows

REPORT_VERSION = 1
DEFINITIONS = {
    "images / failures / invalid": (
        "committed rows with ``status`` ok / failed / invalid (a prompt that cannot be "
        "generated: empty, or with a NUL byte)."
    ),
    "latency": (
        "``latency_s`` of ok rows that are not warm-up (``warmup`` true); p50/p95 are "
        "numpy's linear-interpolation percentiles. Throughput from latency is ``1 / "
        "mean latency`` (per actor)."
    ),
    "images/s from shard seconds": (
        "ok images over the sum of the committed shards' ``seconds`` (per actor; shards "
        "run in parallel, so this is not the run's wall-clock rate)."
    ),
    "MACs": (
        "mean and sum over ok rows of ``macs_paper`` (linear layers and patch "
        "embedding, as the paper counts) and ``macs_total`` (including attention)."
    ),
    "GPU-seconds and cost per image": (
        "the sum over all rows (failed ones cost too) over ok images."
    ),
    "CLIP": (
        "mean ``clip_score`` of ok rows with a score; 95% percentile bootstrap of the "
        "mean: ``rng = numpy.random.default_rng(seed)``, ``idx = rng.integers(0, n, "
        "(resamples, n))``, ``numpy.percentile(scores[idx].mean(1), [2.5, 97.5])``."
    ),
    "adherence": (
        "with ``metrics.adherence``: the sum of ``adherence_facts_met`` over the sum of facts "
        "counted (``adherence_facts_stated`` + 3 x ``adherence_unstated_shapes``) over ok rows "
        "that carry them; 95% percentile bootstrap of that ratio, resampling rows as for CLIP; "
        "``background``: share of those rows whose stated background holds."
    ),
    "speed-up": (
        "baseline mean latency / variant mean latency; MACs ratio: variant mean MACs / "
        "baseline mean MACs."
    ),
    "fidelity": (
        "PSNR and luminance SSIM (catbatch.metrics.fidelity) of each ok variant image against "
        "the ok baseline image of the same (sample_id, image_index) and seed; identical "
        "pairs have infinite PSNR, reported as ``null`` with ``identical: true`` and "
        "counted in ``psnr_identical``; ``psnr_mean`` averages the finite values."
    ),
}
STAGES = {"text": "t_text_s", "denoise": "t_denoise_s", "vae": "t_vae_s", "score": "t_score_s"}


class ReportError(ValueError):
    """The report cannot be made (no variants, unknown baseline); the message is for the user."""


@dataclass
class ReportOptions:
    baseline: str | None = None  # default: the first variant without pruning
    bootstrap: int = 1000  # resamples of the CLIP bootstrap
    seed: int = 0  # of the bootstrap
    pairs: int = 8  # samples in the HTML image grid
    thumb_px: int = 512  # longest side of the grid's images


@dataclass
class Report:
    data: dict[str, Any]  # what report.json holds
    latencies: dict[str, list[float]]  # per variant, for the latency plot
    grid: list[GridRow]


# -- small statistics -----------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def bootstrap_ci(
    values: list[float], resamples: int, seed: int, confidence: float = 0.95
) -> list[float] | None:
    """Percentile bootstrap interval of the mean (see the module docstring)."""
    if not values or resamples < 1:
        return None
    x = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(x[idx].mean(1), [tail, 100 - tail])
    return [float(lo), float(hi)]


def bootstrap_ratio_ci(
    num: np.ndarray, den: np.ndarray, resamples: int, seed: int, confidence: float = 0.95
) -> list[float] | None:
    """Percentile bootstrap interval of ``sum(num) / sum(den)``, resampling rows as
    :func:`bootstrap_ci` does."""
    if not len(num) or resamples < 1:
        return None
    idx = np.random.default_rng(seed).integers(0, len(num), (resamples, len(num)))
    tail = (1.0 - confidence) / 2 * 100
    ratios = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return [float(lo), float(hi)]


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def _present(rows: list[dict], column: str) -> list:
    return [r[column] for r in rows if r.get(column) is not None]


# -- per variant ----------------------------------------------------------------------------


def _macs(ok: list[dict], column: str) -> dict[str, float] | None:
    values = _present(ok, column)
    if not values:
        return None
    return {"mean": float(np.mean(values)), "total": float(np.sum(values)), "n": len(values)}


def _devices(rows: list[dict]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dev in sorted({r["device"] or "unknown" for r in rows}):
        mine = [r for r in rows if (r["device"] or "unknown") == dev]
        ok = [r for r in mine if r["status"] == "ok"]
        timed = [r for r in ok if not r.get("warmup")]
        gpu, cost = _present(mine, "gpu_seconds"), _present(mine, "cost_usd")
        out[dev] = {
            "images": len(ok),
            "failures": sum(r["status"] == "failed" for r in mine),
            "latency_mean_s": _mean([r["latency_s"] for r in timed]),
            "gpu_seconds": float(np.sum(gpu)) if gpu else None,
            "cost_usd": float(np.sum(cost)) if cost else None,
        }
    return out


def aggregate_variant(vd: VariantData, opts: ReportOptions) -> dict[str, Any]:
    rows = vd.rows
    ok = [r for r in rows if r["status"] == "ok"]
    timed = [r for r in ok if not r.get("warmup")]
    lat = [float(r["latency_s"]) for r in timed]
    mean_lat = _mean(lat)
    shard_seconds = float(sum(s.get("seconds", 0.0) for s in vd.stats.values()))
    gpu, cost = _present(rows, "gpu_seconds"), _present(rows, "cost_usd")
    clip = [float(v) for v in _present(ok, "clip_score")]
    settings = vd.settings
    out: dict[str, Any] = {
        "settings": settings,
        "pruning": settings.get("pruning"),
        "columns_missing": [c for c in _METRIC_NAMES if c not in vd.columns],
        "shards_committed": len(vd.stats),
        "uncommitted_files": vd.uncommitted,
        "unreadable_shards": vd.unreadable,
        "rows": len(rows),
        "images": len(ok),
        "failures": sum(r["status"] == "failed" for r in rows),
        "invalid": sum(r["status"] == "invalid" for r in rows),
        "failure_examples": [
            {"sample_id": r["sample_id"], "image_index": r["image_index"], "error": r["error"]}
            for r in rows
            if r["status"] != "ok"
        ][:5],
        "macs": {"paper": _macs(ok, "macs_paper"), "all": _macs(ok, "macs_total")},
        "latency_s": {
            "n": len(lat),
            "warmup_excluded": len(ok) - len(timed),
            "mean": mean_lat,
            "p50": percentile(lat, 50),
            "p95": percentile(lat, 95),
            "min": min(lat) if lat else None,
            "max": max(lat) if lat else None,
        },
        "stage_s": {
            name: _mean([float(r[col]) for r in timed if r.get(col) is not None])
            for name, col in STAGES.items()
            if col in vd.columns
        },
        "images_per_s": {
            "from_latency": _ratio(1.0, mean_lat),
            "from_shard_seconds": _ratio(len(ok), shard_seconds),
            "shard_seconds": shard_seconds,
        },
        "gpu_seconds": {
            "total": float(np.sum(gpu)) if gpu else None,
            "per_image": _ratio(float(np.sum(gpu)), len(ok)) if gpu else None,
        },
        "cost_usd": {
            "total": float(np.sum(cost)) if cost else None,
            "per_image": _ratio(float(np.sum(cost)), len(ok)) if cost else None,
            "rows_priced": len(cost),
        },
        "devices": _devices(rows),
        "clip": None,
        "prompts_truncated": (
            sum(bool(r.get("prompt_truncated")) for r in rows)
            if "prompt_truncated" in vd.columns
            else None
        ),
    }
    out["adherence"] = _adherence(ok, opts)
    if clip:
        out["clip"] = {
            "n": len(clip),
            "mean": float(np.mean(clip)),
            "ci95": bootstrap_ci(clip, opts.bootstrap, opts.seed),
            "models": sorted({r["clip_model"] for r in ok if r.get("clip_model")}),
        }
    return out


def _adherence(ok: list[dict], opts: ReportOptions) -> dict[str, Any] | None:
    rows = [r for r in ok if r.get("adherence_facts_stated") is not None]
    if not rows:
        return None
    met, total = adherence.counted(rows)
    backgrounds = [
        bool(r["adherence_background"]) for r in rows if r.get("adherence_background") is not None
    ]
    return {
        "n": len(rows),
        "mean": adherence.adherence(rows),
        "ci95": bootstrap_ratio_ci(met, total, opts.bootstrap, opts.seed),
        "facts_met": int(met.sum()),
        "facts_counted": int(total.sum()),
        "unstated_shapes_per_image": float(np.mean([r["adherence_unstated_shapes"] for r in rows])),
        "background": float(np.mean(backgrounds)) if backgrounds else None,
    }


_METRIC_NAMES = tuple(c for c in METRIC_COLUMNS if c != "clip_model")


def against_baseline(agg: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    def macs_mean(a: dict, kind: str) -> float | None:
        m = a["macs"][kind]
        return m["mean"] if m else None

    return {
        "speedup": _ratio(base["latency_s"]["mean"], agg["latency_s"]["mean"]),
        "macs_ratio": _ratio(macs_mean(agg, "paper"), macs_mean(base, "paper")),
        "macs_all_ratio": _ratio(macs_mean(agg, "all"), macs_mean(base, "all")),
    }


# -- the whole report -----------------------------------------------------------------------


def default_baseline(variants: dict[str, VariantData]) -> str | None:
    """The first variant without pruning: by its rows' settings, else by the run record."""
    for name, vd in variants.items():
        if vd.settings and vd.settings.get("pruning") is None:
            return name
    return None


def completeness(run: RunData) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per variant: planned and missing shards; and the notes that say why a run is partial."""
    from catbatch.job.commits import CommitStats
    from catbatch.job.status import planned_pieces
    from catbatch.job.verify import Pieces

    record = run.record or {}
    notes = []
    status = record.get("status")
    if run.record is None:
        notes.append("no run record (run.json): completeness unknown")
    elif status != "complete":
        notes.append(f"run status is {status!r}, not 'complete'")
    out = {}
    for name, vd in run.variants.items():
        committed = set(vd.stats)
        stats = {n: s for n, s in ((n, CommitStats.of(d)) for n, d in vd.stats.items()) if s}
        planned = [p.name for p in planned_pieces(record, name, Pieces(stats=stats))[0]]
        if planned:
            missing = sorted(set(planned) - committed)
            n_planned = len(planned)
        elif record.get("shards"):
            n_planned = int(record["shards"])
            missing = [f"{max(0, n_planned - len(committed))} shard(s)"] * (
                len(committed) < n_planned
            )
        else:
            n_planned, missing = None, []
        if missing:
            notes.append(f"variant {name}: {len(committed)} of {n_planned} shards committed")
        for shard, why in vd.unreadable.items():
            path = run.layout.display(run.shard_path(name, shard))
            notes.append(f"variant {name}: skipped unreadable shard {path} ({why})")
        out[name] = {"shards_planned": n_planned, "shards_missing": missing}
    return out, notes


def build(run: RunData, opts: ReportOptions) -> Report:
    if not run.variants:
        raise ReportError(f"no variants found under {run.layout.display()}/variants")
    names = list(run.variants)
    baseline = opts.baseline or default_baseline(run.variants)
    if opts.baseline and opts.baseline not in run.variants:
        raise ReportError(f"baseline {opts.baseline!r} is not a variant; variants: {names}")
    shards, notes = completeness(run)
    partial = bool(notes)
    if baseline is None:
        notes.append("no variant without pruning: no speed-up, MACs ratio or fidelity")
    aggs = {n: {**aggregate_variant(vd, opts), **shards[n]} for n, vd in run.variants.items()}
    grid = grid_rows(run, baseline, opts.pairs)
    cache = ShardCache(run.layout, fmt=run.fmt)
    for n, agg in aggs.items():
        if baseline is None:
            agg["vs_baseline"] = agg["fidelity"] = None
            continue
        agg["vs_baseline"] = against_baseline(agg, aggs[baseline])
        agg["fidelity"] = (
            None
            if n == baseline
            else fidelity(run.variants[baseline], run.variants[n], cache, grid, opts.thumb_px)
        )
    fill_grid(run, grid, cache, opts.thumb_px)
    record = run.record or {}
    data = {
        "report_version": REPORT_VERSION,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "output": run.layout.display(),
        "output_format": run.fmt.name,
        "run": {
            k: record.get(k)
            for k in (
                "name",
                "status",
                "fingerprint",
                "updated_at",
                "prompts",
                "images_per_prompt",
                "model_source",
                "versions",
            )
        },
        "partial": partial,
        "notes": notes,
        "baseline": baseline,
        "variants_order": names,
        "bootstrap": {"resamples": opts.bootstrap, "seed": opts.seed, "confidence": 0.95},
        "definitions": DEFINITIONS,
        "variants": aggs,
    }
    latencies = {
        n: [float(r["latency_s"]) for r in vd.rows if r["status"] == "ok" and not r.get("warmup")]
        for n, vd in run.variants.items()
    }
    return Report(data, latencies, list(grid.values()))


def to_json(report: Report) -> str:
    return json.dumps(report.data, indent=2, sort_keys=False, allow_nan=False) + "\n"
