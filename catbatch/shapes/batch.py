"""Training batches of shape scenes made on any torch device: sampling, drawing, token ids.

The same scenes as :mod:`catbatch.shapes.scenes` (same distribution, same geometry), but a
whole batch at once from a ``torch.Generator``, so a GPU trains without waiting on PIL::

    g = torch.Generator(device).manual_seed(step_seed(0, step))
    batch = sample(g, 512, max_shapes=3, device=device)
    pixels = draw(batch, 64)                      # (512, 3, 64, 64) in [0, 1]
    ids = token_ids(batch, tokenizer)             # (512, 32), as tokenizer(caption) gives

Drawing follows PIL's rules for ``scenes.render`` (4x supersampled, box-filtered) and matches
it to within anti-aliasing rounding; :func:`to_scenes` gives the ``Scene`` objects.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from .scenes import (
    ANCHORS,
    BACKGROUNDS,
    BASE,
    COLOURS,
    HALF_SIDE,
    JITTER,
    PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    SUPERSAMPLE,
    Scene,
    Shape,
)

MAX_SHAPES = 3


def step_seed(seed: int, step: int) -> int:
    """The seed of training step ``step``'s batch: the data stream is a function of both."""
    return zlib.crc32(f"catbatch-shapes/{seed}/{step}".encode())


@dataclass
class SceneBatch:
    """Scenes as index tensors; slot ``j`` of a scene is its ``j``-th phrase (``j < count``)."""

    count: torch.Tensor  # (B,) 1..MAX_SHAPES
    kind: torch.Tensor  # (B, MAX_SHAPES) index into SHAPES
    colour: torch.Tensor  # into COLOURS
    size: torch.Tensor  # into SIZES
    position: torch.Tensor  # into POSITIONS, distinct within a scene
    half: torch.Tensor  # half side in 64px units
    dx: torch.Tensor
    dy: torch.Tensor
    background: torch.Tensor  # (B,) into BACKGROUNDS

    def __len__(self) -> int:
        return len(self.count)


def sample(
    generator: torch.Generator, batch: int, max_shapes: int = MAX_SHAPES, device: str = "cpu"
) -> SceneBatch:
    """``batch`` scenes of 1..``max_shapes`` shapes, distributed as ``scenes.sample_scene``."""

    def ints(low: int, high: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(low, high + 1, shape, generator=generator, device=device)

    slots = (batch, MAX_SHAPES)
    count = ints(1, max_shapes, (batch,))
    order = torch.rand(batch, len(POSITIONS), generator=generator, device=device).argsort(1)
    size = ints(0, len(SIZES) - 1, slots)
    (small_lo, small_hi), (large_lo, large_hi) = (HALF_SIDE[s] for s in SIZES)
    half = torch.where(size == 0, ints(small_lo, small_hi, slots), ints(large_lo, large_hi, slots))
    return SceneBatch(
        count=count,
        kind=ints(0, len(SHAPES) - 1, slots),
        colour=ints(0, len(COLOURS) - 1, slots),
        size=size,
        position=order[:, :MAX_SHAPES],
        half=half,
        dx=ints(-JITTER, JITTER, slots),
        dy=ints(-JITTER, JITTER, slots),
        background=ints(0, len(BACKGROUNDS) - 1, (batch,)),
    )


def to_scenes(batch: SceneBatch) -> list[Scene]:
    cols = [
        t.tolist()
        for t in (batch.kind, batch.colour, batch.size, batch.position, batch.half, batch.dx)
    ]
    dys, counts, bgs = batch.dy.tolist(), batch.count.tolist(), batch.background.tolist()
    out = []
    for i, count in enumerate(counts):
        shapes = tuple(
            Shape(
                kind=SHAPES[cols[0][i][j]],
                colour=tuple(COLOURS)[cols[1][i][j]],
                size=SIZES[cols[2][i][j]],
                position=POSITIONS[cols[3][i][j]],
                half=cols[4][i][j],
                dx=cols[5][i][j],
                dy=dys[i][j],
            )
            for j in range(count)
        )
        out.append(Scene(shapes, tuple(BACKGROUNDS)[bgs[i]]))
    return out


def draw(batch: SceneBatch, size: int = 64) -> torch.Tensor:
    """Images ``(B, 3, size, size)`` in [0, 1] on the batch's device (``size`` a multiple of 16).

    PIL's pixel rules in supersampled pixels (centres at integer coordinates): a square fills
    ``[c - h, c + h - 1]``; a circle ``|p - (c - 0.5)| <= h``; the upward triangle the rows
    ``[cy - h, cy + h]`` with half width ``(y - cy + h) / 2``.
    """
    device = batch.count.device
    k = size * SUPERSAMPLE // BASE  # supersampled pixels per 64px unit
    big = BASE * k
    coords = torch.arange(big, device=device, dtype=torch.float32)
    x, y = coords.view(1, 1, big), coords.view(1, big, 1)
    anchors = torch.tensor([ANCHORS[p] for p in POSITIONS], device=device, dtype=torch.float32)
    palette = torch.tensor(list(COLOURS.values()), device=device, dtype=torch.float32) / 255
    backdrop = torch.tensor(list(BACKGROUNDS.values()), device=device, dtype=torch.float32) / 255
    image = backdrop[batch.background].view(-1, 3, 1, 1).expand(-1, -1, big, big).clone()
    for j in range(MAX_SHAPES):
        anchor = anchors[batch.position[:, j]]
        cx = ((anchor[:, 0] + batch.dx[:, j]) * k).view(-1, 1, 1)
        cy = ((anchor[:, 1] + batch.dy[:, j]) * k).view(-1, 1, 1)
        h = (batch.half[:, j] * k).float().view(-1, 1, 1)
        kind = batch.kind[:, j].view(-1, 1, 1)
        square = (x >= cx - h) & (x <= cx + h - 1) & (y >= cy - h) & (y <= cy + h - 1)
        circle = (x - cx + 0.5) ** 2 + (y - cy + 0.5) ** 2 <= h**2
        rows = (y >= cy - h) & (y <= cy + h)
        triangle = rows & ((x - cx).abs() <= (y - cy + h) / 2)
        inside = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
        inside &= (j < batch.count).view(-1, 1, 1)
        colour = palette[batch.colour[:, j]].view(-1, 3, 1, 1)
        image = torch.where(inside.unsqueeze(1), colour, image)
    pooled = F.avg_pool2d(image, SUPERSAMPLE)
    return (pooled * 255).round() / 255  # as the uint8 PIL image


def _word_ids(tokenizer: PreTrainedTokenizerBase, words: list[str]) -> list[int]:
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    bad = [w for w, i in zip(words, ids, strict=True) if len(i) != 1]
    if bad:
        raise ValueError(f"tokenizer splits the domain words {bad}: use shapes.model's tokenizer")
    return [i[0] for i in ids]


def token_ids(
    batch: SceneBatch, tokenizer: PreTrainedTokenizerBase, drop: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, model_max_length)`` ids of the scenes' captions, as ``tokenizer(caption(scene),
    padding="max_length")`` gives them; rows where ``drop`` is true are the empty caption."""
    device = batch.count.device
    length = tokenizer.model_max_length
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def table(words: list[str]) -> torch.Tensor:
        return torch.tensor(_word_ids(tokenizer, words), device=device)

    a, and_, comma = table(["a", "and", ","]).tolist()
    phrase = torch.stack([table(PHRASES[p].split()) for p in POSITIONS])  # (5, 3)
    objects = torch.cat(  # (B, MAX_SHAPES, 7): "a <size> <colour> <kind> <phrase>"
        [
            torch.full((*batch.kind.shape, 1), a, device=device),
            table(list(SIZES))[batch.size].unsqueeze(-1),
            table(list(COLOURS))[batch.colour].unsqueeze(-1),
            table(list(SHAPES))[batch.kind].unsqueeze(-1),
            phrase[batch.position],
        ],
        -1,
    )
    n = len(batch)
    background = torch.stack(
        [
            *(torch.full((n,), t, device=device) for t in (comma, *table(["on", "a"]).tolist())),
            table(list(BACKGROUNDS))[batch.background],
            torch.full((n,), _word_ids(tokenizer, ["background"])[0], device=device),
        ],
        -1,
    )

    def word(t: int) -> torch.Tensor:
        return torch.full((n, 1), t, device=device)

    ids = torch.full((n, length), eos, device=device)
    for count in range(1, MAX_SHAPES + 1):
        parts = [word(bos), objects[:, 0]]
        for j in range(1, count):
            parts += [word(and_ if j == count - 1 else comma), objects[:, j]]
        seq = torch.cat([*parts, background, word(eos)], 1)[:, :length]
        mine = (batch.count == count).unsqueeze(1)
        ids[:, : seq.shape[1]] = torch.where(mine, seq, ids[:, : seq.shape[1]])
    if drop is not None:
        empty = torch.full_like(ids, eos)
        empty[:, 0] = bos
        ids = torch.where(drop.unsqueeze(1), empty, ids)
    return ids
