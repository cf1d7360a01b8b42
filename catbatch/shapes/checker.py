"""Prompt adherence for the shapes domain: which facts a caption states hold in an image.

Every pixel takes the nearest palette colour (shape colours and backgrounds). Connected regions of
one shape colour (at least ``MIN_AREA`` pixels at 64px) are blobs; each blob has a colour, a
position (the nearest anchor to its centroid, if within ``MAX_OFFSET``), a size (its bounding
box side) and a shape (the best intersection-over-union with a circle, square or upward triangle
fitted to its bounding box). The stated shapes are matched one-to-one to blobs so as to make the
most facts hold (Hungarian assignment); an unmatched statement holds no fact.

Facts per stated shape: ``shape``, ``colour``, ``position`` (adherence counts these three) and
``size``; per caption: ``background`` (the majority colour of the border). Size and background are
reported but not in :func:`adherence`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .scenes import ANCHORS, BACKGROUNDS, BASE, COLOURS, PHRASES, SHAPES, SIZES

ADHERENCE_FACTS = ("shape", "colour", "position")
ALL_FACTS = (*ADHERENCE_FACTS, "size")
MIN_AREA = 10  # pixels at 64px
MAX_OFFSET = 8.0  # pixels at 64px from the anchor
SIZE_SPLIT = 13.5  # bounding box side at 64px: small below, large above
_PALETTE_NAMES = (*COLOURS, *BACKGROUNDS)
_PALETTE = np.array([*COLOURS.values(), *BACKGROUNDS.values()], dtype=np.float32)
_PHRASE_TO_POSITION = {v: k for k, v in PHRASES.items()}
_OBJECT = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
    rf"({'|'.join(PHRASES.values())})"
)
_BACKGROUND = re.compile(rf"on a ({'|'.join(BACKGROUNDS)}) background")


@dataclass(frozen=True)
class Statement:
    kind: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Blob:
    colour: str
    centroid: tuple[float, float]  # (x, y) in 64px units
    side: float  # bounding box side in 64px units
    kind: str
    position: str | None


@dataclass
class Report:
    """Per stated shape, which facts hold; ``background`` is None when the caption has none."""

    statements: list[Statement]
    facts: list[dict[str, bool]]
    background: bool | None
    blobs: list[Blob] = field(default_factory=list)

    def held(self, kinds: Iterable[str] = ADHERENCE_FACTS) -> tuple[int, int]:
        """(facts that hold, facts stated) over ``kinds``."""
        kinds = tuple(kinds)
        good = sum(f[k] for f in self.facts for k in kinds)
        return good, len(self.facts) * len(kinds)


def parse_caption(text: str) -> tuple[list[Statement], str | None]:
    """The stated shapes and background of a caption of this domain."""
    statements = [
        Statement(kind, colour, size, _PHRASE_TO_POSITION[phrase])
        for size, colour, kind, phrase in _OBJECT.findall(text)
    ]
    background = _BACKGROUND.search(text)
    return statements, background.group(1) if background else None


def _labels(pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for every pixel ``(H, W)``."""
    flat = pixels.reshape(-1, 1, 3).astype(np.float32)
    return ((flat - _PALETTE[None]) ** 2).sum(-1).argmin(-1).reshape(pixels.shape[:2])


def _shape_of(mask: np.ndarray) -> str:
    """Best IoU among a circle, a square and an upward triangle fitted to the mask's box."""
    h, w = mask.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (x + 0.5 - w / 2) / (w / 2), (y + 0.5 - h / 2) / (h / 2)
    templates = {
        "circle": u**2 + v**2 <= 1.0,
        "square": np.ones_like(mask),
        "triangle": np.abs(u) <= (v + 1) / 2,
    }
    iou = {k: (t & mask).sum() / max((t | mask).sum(), 1) for k, t in templates.items()}
    return max(iou, key=iou.get)


def find_blobs(pixels: np.ndarray) -> list[Blob]:
    """The shape-coloured connected regions of an RGB image ``(H, W, 3)``."""
    labels = _labels(pixels)
    scale = pixels.shape[0] / BASE
    blobs = []
    for index, colour in enumerate(COLOURS):
        regions, count = ndimage.label(labels == index)
        for region, box in zip(range(1, count + 1), ndimage.find_objects(regions), strict=True):
            mask = regions[box] == region
            if mask.sum() < MIN_AREA * scale**2:
                continue
            cy, cx = ndimage.center_of_mass(mask)
            x, y = (box[1].start + cx + 0.5) / scale, (box[0].start + cy + 0.5) / scale
            side = max(mask.shape) / scale
            nearest = min(
                ANCHORS, key=lambda p: (ANCHORS[p][0] - x) ** 2 + (ANCHORS[p][1] - y) ** 2
            )
            ax, ay = ANCHORS[nearest]
            position = nearest if (ax - x) ** 2 + (ay - y) ** 2 <= MAX_OFFSET**2 else None
            blobs.append(Blob(colour, (x, y), side, _shape_of(mask), position))
    return blobs


def _facts(statement: Statement, blob: Blob) -> dict[str, bool]:
    return {
        "shape": blob.kind == statement.kind,
        "colour": blob.colour == statement.colour,
        "position": blob.position == statement.position,
        "size": (blob.side > SIZE_SPLIT) == (statement.size == "large"),
    }


def check(image: Image.Image | np.ndarray, text: str) -> Report:
    """Which facts of ``text`` hold in ``image`` (PIL or uint8 ``(H, W, 3)``)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    statements, background = parse_caption(text)
    blobs = find_blobs(pixels)
    facts = [dict.fromkeys(ALL_FACTS, False) for _ in statements]
    if statements and blobs:
        table = [[_facts(s, b) for b in blobs] for s in statements]
        cost = np.array(
            [
                [
                    -sum(f[k] for k in ADHERENCE_FACTS)
                    - 0.1 * f["size"]
                    + 1e-3
                    * np.hypot(
                        b.centroid[0] - ANCHORS[s.position][0],
                        b.centroid[1] - ANCHORS[s.position][1],
                    )
                    for f, b in zip(row, blobs, strict=True)
                ]
                for row, s in zip(table, statements, strict=True)
            ]
        )
        for i, j in zip(*linear_sum_assignment(cost), strict=True):
            facts[i] = table[i][j]
    bg = None
    if background is not None:
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        counts = np.bincount(_labels(border[None]).ravel(), minlength=len(_PALETTE))
        bg = _PALETTE_NAMES[int(counts.argmax())] == background
    return Report(statements, facts, bg, blobs)


def adherence(reports: Iterable[Report], kinds: Iterable[str] = ADHERENCE_FACTS) -> float:
    """Fraction of stated facts of ``kinds`` that hold, over all reports."""
    kinds = tuple(kinds)
    good = total = 0
    for report in reports:
        g, t = report.held(kinds)
        good, total = good + g, total + t
    return good / total if total else float("nan")


def summary(reports: list[Report]) -> dict[str, float]:
    """Adherence (shape+colour+position) and the rate of each fact kind and of backgrounds."""
    out = {"adherence": adherence(reports)}
    for kind in ALL_FACTS:
        out[kind] = adherence(reports, (kind,))
    bgs = [r.background for r in reports if r.background is not None]
    out["background"] = sum(bgs) / len(bgs) if bgs else float("nan")
    return out
