"""``report.md``: the paper-style comparison table, then details per variant."""

from __future__ import annotations

from typing import Any

from catbatch.report.fmt import details, table2


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
    return md_table(*details(data))


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
