"""``report.md``: the paper-style comparison table, then details per variant."""

from __future__ import annotations

from typing import Any

from catbatch.report.fmt import DASH, num, table2


def md_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def _status_lines(data: dict[str, Any]) -> list[str]:
    run = data["run"]
    lines = [
        f"- Output: `{data['output']}`",
        f"- Run status: **{run.get('status') or 'unknown'}**"
        + (" — **partial results**" if data["partial"] else ""),
    ]
    lines += [f"  - {n}" for n in data["notes"]]
    lines.append(f"- Baseline (speed-up, MACs ratio, PSNR/SSIM against): `{data['baseline']}`")
    return lines


def _details(data: dict[str, Any]) -> str:
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
    return md_table(header, rows)


def _sci(value: float | None) -> str:
    return DASH if not value else f"{value:.4g}"


def render_markdown(data: dict[str, Any]) -> str:
    header, rows = table2(data)
    name = data["run"].get("name") or "run"
    parts = [
        f"# Report: {name}",
        "",
        *_status_lines(data),
        "",
        "## Comparison (shaped like the paper's Table 2)",
        "",
        md_table(header, rows),
        "",
        "MACs: mean per image, linear layers and patch embedding (the paper's count). "
        "Throughput: 1 / mean latency (per actor, warm-up excluded). Speed-up: baseline mean "
        "latency / variant mean latency. PSNR/SSIM: each image against the baseline image of "
        "the same sample and seed.",
        "",
        "## Details",
        "",
        _details(data),
        "",
    ]
    failures = [
        (n, e) for n in data["variants_order"] for e in data["variants"][n]["failure_examples"]
    ]
    if failures:
        parts += ["## Failures (first ones)", ""]
        parts += [f"- `{n}` {e['sample_id']}#{e['image_index']}: {e['error']}" for n, e in failures]
        parts.append("")
    missing = {n: v["columns_missing"] for n, v in data["variants"].items() if v["columns_missing"]}
    if missing:
        parts += ["## Columns not in this output (older schema)", ""]
        parts += [f"- `{n}`: {', '.join(cols)}" for n, cols in missing.items()]
        parts.append("")
    return "\n".join(parts)
