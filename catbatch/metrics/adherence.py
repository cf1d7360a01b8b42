"""Prompt adherence per image (``metrics.adherence``): which facts its caption states hold.

``shapes``: :mod:`catbatch.shapes.checker` on captions of the ``catbatch-shapes`` domain ("a
large red circle on the left, on a white background"). Per image, the row gets the shape, colour
and position facts that hold (``adherence_facts_met``) of those the caption states
(``adherence_facts_stated``), the shapes drawn that the caption does not state
(``adherence_unstated_shapes``; each counts as as many failed facts as a stated shape, so
clutter cannot buy adherence) and whether the background is the stated one. A variant's
adherence is the checker's: facts met over facts counted, summed over its images
(:func:`adherence`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

COLUMNS = (
    "adherence_facts_met",
    "adherence_facts_stated",
    "adherence_unstated_shapes",
    "adherence_background",
)
FACTS_PER_SHAPE = 3  # shape, colour, position: catbatch.shapes.checker.ADHERENCE_FACTS

Scorer = Callable[[np.ndarray, str], dict[str, Any]]


def shapes_adherence(image: np.ndarray, prompt: str) -> dict[str, Any]:
    """The checker's result for one uint8 ``(H, W, 3)`` image as row columns."""
    from catbatch.shapes.checker import ADHERENCE_FACTS, check

    report = check(image, prompt)
    met, _ = report.held()
    return {
        "adherence_facts_met": met,
        "adherence_facts_stated": len(report.facts) * len(ADHERENCE_FACTS),
        "adherence_unstated_shapes": report.extra,
        "adherence_background": report.background,
    }


SCORERS: dict[str, Scorer] = {"shapes": shapes_adherence}


def scorer(kind: str | None) -> Scorer | None:
    """The per-image scorer of ``metrics.adherence`` (None when off)."""
    return None if kind is None else SCORERS[kind]


def counted(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Per row with adherence columns: facts met, and facts counted (stated + the failed facts
    of unstated shapes)."""
    met = np.array([r["adherence_facts_met"] for r in rows], dtype=np.float64)
    stated = np.array([r["adherence_facts_stated"] for r in rows], dtype=np.float64)
    extra = np.array([r["adherence_unstated_shapes"] for r in rows], dtype=np.float64)
    return met, stated + FACTS_PER_SHAPE * extra


def adherence(rows: list[dict[str, Any]]) -> float | None:
    """Facts met over facts counted, over ``rows``."""
    met, total = counted(rows)
    return float(met.sum() / total.sum()) if total.sum() else None
