"""Procedural scenes of simple shapes with captions that state every fact in the image.

A scene holds one to three shapes (circle, square, triangle) on a plain background; each shape has
a colour, a size (small or large) and a position (left, right, top, bottom or centre; no two
shapes share a position, so they never overlap). Scenes depend only on the seed; images are drawn
4x supersampled and box-filtered (anti-aliased edges) at 64 or 128 pixels::

    scene = sample_scene(random.Random(0))
    image = render(scene, 64)            # PIL RGB
    caption(scene)  # "a large red circle on the left and a small blue square at the top, on a
                    #  white background"
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
BASE = 64  # geometry below is in pixels of a 64x64 image; other sizes scale it
ANCHORS = {
    "left": (12, 32),
    "right": (52, 32),
    "top": (32, 12),
    "bottom": (32, 52),
    "centre": (32, 32),
}
HALF_SIDE = {"small": (4, 5), "large": (8, 9)}  # half the bounding box side, inclusive range
JITTER = 1  # centre offset in pixels, each axis
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    position: str
    half: int  # half side of the bounding box (64px units)
    dx: int = 0
    dy: int = 0

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.kind} {PHRASES[self.position]}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str


def sample_scene(rng: random.Random, max_shapes: int = 3) -> Scene:
    """One random scene: 1..max_shapes shapes at distinct positions."""
    count = rng.randint(1, max_shapes)
    positions = rng.sample(POSITIONS, count)
    shapes = []
    for position in positions:
        size = rng.choice(SIZES)
        shapes.append(
            Shape(
                kind=rng.choice(SHAPES),
                colour=rng.choice(tuple(COLOURS)),
                size=size,
                position=position,
                half=rng.randint(*HALF_SIDE[size]),
                dx=rng.randint(-JITTER, JITTER),
                dy=rng.randint(-JITTER, JITTER),
            )
        )
    return Scene(tuple(shapes), rng.choice(tuple(BACKGROUNDS)))


def scenes(seed: int | str, count: int | None = None) -> Iterator[Scene]:
    """Scenes from one seed; ``count=None`` is unlimited."""
    rng = random.Random(seed)
    made = 0
    while count is None or made < count:
        yield sample_scene(rng)
        made += 1


def caption(scene: Scene) -> str:
    """States every shape (size, colour, kind, position) and the background."""
    phrases = [s.phrase() for s in scene.shapes]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{body}, on a {scene.background} background"


def triangle_points(cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    """An upward triangle filling the bounding box of half side ``half``."""
    return [(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)]


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size`` pixels (64 or 128)."""
    k = size / BASE * SUPERSAMPLE
    big = Image.new("RGB", (round(BASE * k),) * 2, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(big)
    for s in scene.shapes:
        ax, ay = ANCHORS[s.position]
        cx, cy, h = (ax + s.dx) * k, (ay + s.dy) * k, s.half * k
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse([cx - h, cy - h, cx + h - 1, cy + h - 1], fill=fill)
        elif s.kind == "square":
            draw.rectangle([cx - h, cy - h, cx + h - 1, cy + h - 1], fill=fill)
        else:
            draw.polygon(triangle_points(cx, cy, h), fill=fill)
    return big.resize((size, size), Image.BOX)


def dataset(seed: int, count: int, size: int = 64) -> tuple[np.ndarray, list[str]]:
    """``count`` images ``(N, size, size, 3)`` uint8 and their captions."""
    items = list(scenes(seed, count))
    images = np.stack([np.asarray(render(s, size)) for s in items])
    return images, [caption(s) for s in items]
