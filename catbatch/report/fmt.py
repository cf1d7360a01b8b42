"""Number formatting shared by the Markdown and HTML renderings, and the Table 2 rows."""

from __future__ import annotations

from typing import Any

DASH = "–"
_UNITS = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"), (1.0, ""))


def macs_unit(values: list[float | None]) -> tuple[float, str]:
    """One unit (T as the paper, or smaller for small models) for a column of MACs."""
    known = [v for v in values if v]
    top = max(known) if known else 1e12
    for scale, unit in _UNITS:
        if top >= scale:
            return scale, unit
    return 1.0, ""


def num(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return DASH if value is None else f"{value:.{digits}f}{suffix}"


def table2(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the paper-style comparison table (one row per variant); with
    ``metrics.adherence`` rows, an adherence column beside CLIP."""
    variants = data["variants"]
    scale, unit = macs_unit([_macs(v) for v in variants.values()])
    with_adherence = any(v.get("adherence") for v in variants.values())
    header = [
        "Variant",
        "Pruning",
        f"MACs ↓ ({unit or 'MACs'})",
        "Throughput ↑ (img/s)",
        "Speed-up ↑",
        "Latency p50 / p95 (s)",
        "CLIP ↑ (95% CI)",
        *(["Adherence ↑ (95% CI)"] if with_adherence else []),
        "PSNR ↑ (dB)",
        "SSIM ↑",
    ]
    rows = []
    for name in data["variants_order"]:
        v = variants[name]
        vs = v.get("vs_baseline") or {}
        fid = v.get("fidelity") or {}
        lat = v["latency_s"]
        macs = _macs(v)
        clip = v.get("clip")
        rows.append(
            [
                name + (" (baseline)" if name == data["baseline"] else ""),
                pruning_label(v.get("pruning")),
                DASH if macs is None else f"{macs / scale:.2f}{unit}",
                num(v["images_per_s"]["from_latency"], 3),
                num(vs.get("speedup"), 2, "×"),
                f"{num(lat['p50'], 3)} / {num(lat['p95'], 3)}",
                _clip(clip),
                *([_adherence(v.get("adherence"))] if with_adherence else []),
                _psnr(fid) if name != data["baseline"] else DASH,
                num(fid.get("ssim_mean"), 4) if name != data["baseline"] else DASH,
            ]
        )
    return header, rows


def _macs(v: dict[str, Any]) -> float | None:
    m = v["macs"]["paper"]
    return m["mean"] if m else None


def _clip(clip: dict[str, Any] | None) -> str:
    if not clip:
        return DASH
    ci = clip.get("ci95")
    return f"{clip['mean']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _adherence(adh: dict[str, Any] | None) -> str:
    """Percent of stated facts that hold, with its interval."""
    if not adh or adh.get("mean") is None:
        return DASH
    ci = adh.get("ci95")
    return f"{100 * adh['mean']:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _psnr(fid: dict[str, Any]) -> str:
    if not fid or not fid.get("pairs"):
        return DASH
    if fid["psnr_mean"] is None:
        return "∞ (identical)"
    extra = f" ({fid['psnr_identical']} identical)" if fid["psnr_identical"] else ""
    return f"{fid['psnr_mean']:.2f}{extra}"


def pruning_label(pruning: dict[str, Any] | None) -> str:
    if not pruning:
        return "none"
    label = f"{pruning.get('strategy', pruning.get('method', 'cat'))} α={pruning.get('alpha')}"
    return label


def details(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the per-variant detail table (counts, MACs, stage times, cost)."""
    header = [
        "Variant",
        "Images",
        "Failures",
        "Shards",
        "MACs total",
        "MACs incl. attention (mean)",
        "Latency mean (s)",
        "Stages text/denoise/VAE/score (s)",
        "img/s (shard time)",
        "GPU-s / image",
        "Cost / image (USD)",
        "Pairs",
    ]
    rows = []
    for name in data["variants_order"]:
        v = data["variants"][name]
        planned = v.get("shards_planned")
        stages = v["stage_s"]
        fid = v.get("fidelity") or {}
        rows.append(
            [
                name,
                str(v["images"]),
                str(v["failures"]),
                f"{v['shards_committed']}/{planned if planned is not None else '?'}",
                _sci(v["macs"]["paper"] and v["macs"]["paper"]["total"]),
                _sci(v["macs"]["all"] and v["macs"]["all"]["mean"]),
                num(v["latency_s"]["mean"], 4),
                "/".join(num(stages.get(s), 3) for s in ("text", "denoise", "vae", "score"))
                if stages
                else DASH,
                num(v["images_per_s"]["from_shard_seconds"], 3),
                num(v["gpu_seconds"]["per_image"], 4),
                num(v["cost_usd"]["per_image"], 6),
                str(fid.get("pairs", DASH)),
            ]
        )
    return header, rows


def _sci(value: float | None) -> str:
    return DASH if not value else f"{value:.4g}"
