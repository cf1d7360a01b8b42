"""The shapes generator is deterministic and the checker is right where the truth is known."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from catbatch.shapes.checker import ADHERENCE_FACTS, check, parse_caption, summary
from catbatch.shapes.scenes import BACKGROUNDS, COLOURS, SHAPES, caption, dataset, render, scenes


def test_generator_is_deterministic_and_seeded():
    a_images, a_captions = dataset(3, 20)
    b_images, b_captions = dataset(3, 20)
    c_images, c_captions = dataset(4, 20)
    assert a_captions == b_captions and np.array_equal(a_images, b_images)
    assert a_captions != c_captions
    assert a_images.shape == (20, 64, 64, 3) and a_images.dtype == np.uint8


def test_scenes_are_varied_and_captions_state_every_shape():
    items = list(scenes(0, 200))
    assert {len(s.shapes) for s in items} == {1, 2, 3}
    for s in items:
        statements, background = parse_caption(caption(s))
        assert [(t.kind, t.colour, t.size, t.position) for t in statements] == [
            (x.kind, x.colour, x.size, x.position) for x in s.shapes
        ]
        assert background == s.background
        assert len({x.position for x in s.shapes}) == len(s.shapes)


@pytest.mark.parametrize("size", [64, 128])
def test_checker_accepts_true_captions(size):
    items = list(scenes(11, 150))
    reports = [check(render(s, size), caption(s)) for s in items]
    rates = summary(reports)
    assert rates.pop("extra") == 0
    assert rates == dict.fromkeys(rates, 1.0)


def _swap(value, options):
    return next(o for o in options if o != value)


def test_checker_rejects_each_false_fact():
    for s in scenes(12, 60):
        image = render(s)
        first = s.shapes[0]
        for fact, wrong in (
            ("colour", dataclasses.replace(first, colour=_swap(first.colour, tuple(COLOURS)))),
            ("shape", dataclasses.replace(first, kind=_swap(first.kind, SHAPES))),
        ):
            lie = dataclasses.replace(s, shapes=(wrong, *s.shapes[1:]))
            report = check(image, caption(lie))
            assert not report.facts[0][fact], (caption(lie), report)
        free = [
            p
            for p in ("left", "right", "top", "bottom", "centre")
            if p not in {x.position for x in s.shapes}
        ]
        moved = dataclasses.replace(
            s, shapes=(dataclasses.replace(first, position=free[0]), *s.shapes[1:])
        )
        assert not check(image, caption(moved)).facts[0]["position"]


def test_checker_on_a_blank_image_holds_nothing():
    s = next(scenes(1))
    blank = np.full((64, 64, 3), 240, np.uint8)
    report = check(blank, caption(s))
    assert report.held() == (0, 3 * len(s.shapes))


def test_unstated_shapes_count_against_adherence():
    s = next(x for x in scenes(13, 100) if len(x.shapes) == 3)
    image = render(s)
    stated = dataclasses.replace(s, shapes=s.shapes[:1])  # the caption names one of three
    report = check(image, caption(stated))
    assert report.extra == 2 and all(report.facts[0][k] for k in ADHERENCE_FACTS)
    assert report.held() == (3, 9)  # 3 facts hold, 2 unstated shapes fail 3 facts each


def test_clutter_of_palette_colours_scores_low():
    """Scattered blocks of every palette colour contain, somewhere, a blob of the right colour
    near each stated position: the extra blobs must make that worth nothing."""
    rng = np.random.default_rng(0)
    palette = np.array([*COLOURS.values(), *BACKGROUNDS.values()], np.uint8)
    captions = [caption(s) for s in scenes("clutter", 100)]
    blocks = palette[rng.integers(0, len(palette), (100, 8, 8))].repeat(8, 1).repeat(8, 2)
    assert (
        summary([check(im, c) for im, c in zip(blocks, captions, strict=True)])["adherence"] < 0.1
    )
