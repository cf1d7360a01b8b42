#!/usr/bin/env python3
"""Run a manifest from Python (catbatch's API, not the command), write its report and print the
report's folder on stdout (the last line), e.g. for an orchestrator task to pass on::

    python jobs/submit_python.py [manifests/coco.yaml] [--output s3://bucket/coco]

The manifest defaults to the COCO 2017 run, ``manifests/coco.yaml`` (SD3-medium, unpruned
against CAT at alpha 0.3; see the README's "Running on your cluster" for its weights and
prompts).

Resumes like ``catbatch submit`` (committed shards are skipped). Exit codes are the command's:
0 done, 1 some shards failed, 2 bad input, 3 another submission writes the output, 143 / 130
stopped by SIGTERM / SIGINT; the error goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import catbatch

COCO = Path(__file__).resolve().parents[1] / "manifests" / "coco.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "manifest", nargs="?", default=str(COCO), help=f"the job manifest (default: {COCO})"
    )
    parser.add_argument("--output", help="override the manifest's output (path or URL)")
    args = parser.parse_args(argv)
    overrides = {"output": args.output} if args.output else {}
    try:
        summary = catbatch.submit(args.manifest, messages=print_err, **overrides)
    except catbatch.CatbatchError as e:
        print_err(f"error: {e}")
        return e.exit_code
    for line in summary.lines():
        print_err(line)

    from catbatch.report import ReportError, make_report  # loaded once the run is done

    folder = f"{summary.output.rstrip('/')}/report"
    try:
        make_report(summary.output, folder)
    except (ReportError, OSError) as e:
        print_err(f"error: {e}")
        return 2
    print(folder)
    return 0


def print_err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
