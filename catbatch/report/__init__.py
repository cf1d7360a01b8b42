"""Reports that compare the variants of a run, like the paper's tables.

    from catbatch.report import ReportOptions, make_report
    report, files = make_report("out/run", options=ReportOptions(baseline="full"))

Reads a run's output (local path or any fsspec URL) and writes ``report.json``, ``report.md``,
``card.md`` (dataset card), ``report.html`` (self-contained) and ``pairs.png`` (the HTML page's
paired images: a row per variant) to ``out`` (default ``OUTPUT/report``). Works on partial runs
and says so.
"""

from __future__ import annotations

from catbatch.job.layout import OutputLayout
from catbatch.report.aggregate import Report, ReportError, ReportOptions, build, to_json
from catbatch.report.card import render_card
from catbatch.report.load import load_run
from catbatch.report.pairs import pairs_png
from catbatch.report.render_html import render_html
from catbatch.report.render_md import render_markdown

__all__ = ["Report", "ReportError", "ReportOptions", "make_report"]


def make_report(
    output: str, out: str | None = None, options: ReportOptions | None = None
) -> tuple[Report, dict[str, str]]:
    """Build the report of the run at ``output`` and write its files; returns where they went."""
    layout = OutputLayout(output)
    run = load_run(layout)
    report = build(run, options or ReportOptions())
    sample_row = next((r for vd in run.variants.values() for r in vd.rows), {})
    target = OutputLayout(out or f"{output.rstrip('/')}/report")
    files: dict[str, str | bytes | None] = {
        "report.json": to_json(report),
        "report.md": render_markdown(report.data),
        "card.md": render_card(report.data, run.record, sample_row),
        "report.html": render_html(report),
        "pairs.png": pairs_png(report.grid, report.data["variants_order"]),
    }
    written = {}
    for name, content in files.items():
        if content is None:
            continue
        path = target.path(name)
        target.write_bytes(path, content.encode("utf-8") if isinstance(content, str) else content)
        written[name] = target.display(path)
    return report, written
