"""The benchmarks in bench/ run end to end in their tiny --smoke configurations (no timings)."""

from __future__ import annotations

import sys
from pathlib import Path

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
