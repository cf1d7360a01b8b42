"""Kernel launches (dispatched aten ops, bench.launch_count's rule) of the CAT steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[1])  # bench/ is not an installed package
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.launch_count import step_counts  # noqa: E402


@pytest.mark.parametrize("stream", ["full", "krow"])
def test_steps_dispatch_fewer_ops_than_diffusers(stream):
    counts = step_counts(layers=3, stream=stream)
    assert counts["selector"].total <= 40
    assert counts["cat_full"].total < counts["full"].total  # a full step of an applied CAT
    assert counts["pruned"].total < counts["full"].total  # pruned step, selector step included
    assert counts["pruned"].ops["cat"] <= 2  # the timestep embedding's; none per block


def test_fused_projections_dispatch_fewer_ops():
    plain, fused = step_counts(layers=3), step_counts(layers=3, fused=True)
    assert fused["pruned"].total < plain["pruned"].total
