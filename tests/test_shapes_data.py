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


# -- training batches made on a torch device (catbatch.shapes.batch) ---------------------------


def _batch(seed: int, n: int, max_shapes: int = 3):
    import torch

    from catbatch.shapes.batch import sample

    return sample(torch.Generator().manual_seed(seed), n, max_shapes)


def test_sampled_batches_follow_the_scene_distribution():
    from catbatch.shapes.batch import to_scenes

    items = to_scenes(_batch(0, 600))
    assert {len(s.shapes) for s in items} == {1, 2, 3}
    assert all(len({x.position for x in s.shapes}) == len(s.shapes) for s in items)
    for s in items:
        for x in s.shapes:
            lo, hi = (4, 5) if x.size == "small" else (8, 9)
            assert lo <= x.half <= hi and abs(x.dx) <= 1 and abs(x.dy) <= 1
    assert {len(s.shapes) for s in to_scenes(_batch(1, 200, max_shapes=1))} == {1}
    assert {s.background for s in items} == set(BACKGROUNDS)
    assert {x.kind for s in items for x in s.shapes} == set(SHAPES)
    assert {x.colour for s in items for x in s.shapes} == set(COLOURS)


@pytest.mark.parametrize("size", [64, 128])
def test_drawn_batches_match_the_pil_renderer(size):
    from catbatch.shapes.batch import draw, to_scenes

    batch = _batch(2, 60)
    ours = (draw(batch, size).permute(0, 2, 3, 1) * 255).round().byte().numpy()
    items = to_scenes(batch)
    pil = np.stack([np.asarray(render(s, size)) for s in items])
    diff = np.abs(ours.astype(int) - pil)
    assert diff.mean() < 0.05 and (diff.max(-1) > 0).mean() < 0.01, (diff.mean(), diff.max())
    for mine, theirs, s in zip(ours, pil, items, strict=True):  # the checker sees the same
        assert check(mine, caption(s)).facts == check(theirs, caption(s)).facts, caption(s)


def test_token_ids_equal_the_tokenizer_on_captions():
    import torch

    from catbatch.shapes.batch import to_scenes, token_ids
    from catbatch.shapes.model import TEXT_LENGTH, WORDS, build_tokenizer

    tokenizer = build_tokenizer()
    assert all(len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1 for w in WORDS)
    batch = _batch(3, 200)
    drop = torch.arange(200) % 7 == 0
    texts = ["" if d else caption(s) for s, d in zip(to_scenes(batch), drop.tolist(), strict=True)]
    expected = tokenizer(texts, padding="max_length", max_length=TEXT_LENGTH, truncation=True)
    assert token_ids(batch, tokenizer, drop).tolist() == expected["input_ids"]
    # any other text still tokenizes (bytes), as CLIP's BPE does
    assert len(tokenizer("a zebra")["input_ids"]) > 4


def test_batches_are_a_function_of_seed_and_step():
    import torch

    from catbatch.shapes.batch import sample, step_seed

    def at(step: int):
        return sample(torch.Generator().manual_seed(step_seed(0, step)), 8).kind

    assert torch.equal(at(5), at(5)) and not torch.equal(at(5), at(6))
    assert step_seed(0, 5) != step_seed(1, 5)
