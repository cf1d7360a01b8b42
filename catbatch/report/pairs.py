"""Paired images: PSNR/SSIM of each variant image against the baseline image of the same
sample and seed, the image grid of the HTML page (thumbnails as ``data:`` URIs) and the same
grid as one PNG (:func:`pairs_png`)."""

from __future__ import annotations

import base64
import io
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from catbatch.job.layout import OutputLayout
from catbatch.job.writer import PARQUET, ShardFormat
from catbatch.metrics.fidelity import compare_images
from catbatch.report.load import Key, RunData, VariantData, shard_images

COMPARE_BATCH = 8  # images per PSNR/SSIM call: bounds the float64 working memory


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


@dataclass
class GridRow:
    """One sample of the image grid: data URIs by variant (None when missing)."""

    sample_id: str
    image_index: int
    prompt: str
    images: dict[str, str | None] = field(default_factory=dict)
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)


class ShardCache:
    """PNG bytes of recently read shards (a few at a time, to bound memory)."""

    def __init__(self, layout: OutputLayout, size: int = 3, fmt: ShardFormat = PARQUET):
        self.layout, self.size, self.fmt = layout, size, fmt
        self.cache: OrderedDict[tuple[str, str], dict[Key, bytes]] = OrderedDict()

    def get(self, variant: str, shard: str) -> dict[Key, bytes]:
        key = (variant, shard)
        if key not in self.cache:
            self.cache[key] = shard_images(self.layout, variant, shard, self.fmt)
            while len(self.cache) > self.size:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        return self.cache[key]


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def thumbnail_uri(png: bytes, max_px: int) -> str:
    """A ``data:`` URI of the image, shrunk to ``max_px`` on its longest side if larger."""
    img = Image.open(io.BytesIO(png))
    if max(img.size) > max_px:
        img = img.convert("RGB")
        img.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        png = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def fidelity(
    base: VariantData,
    vd: VariantData,
    cache: ShardCache,
    grid: dict[Key, GridRow],
    thumb_px: int,
) -> dict[str, Any]:
    """PSNR/SSIM of each ok pair; fills the grid's images of the pairs it reads."""
    base_ok = {(r["sample_id"], r["image_index"]): r for r in base.rows if r["status"] == "ok"}
    mine_ok = {(r["sample_id"], r["image_index"]): r for r in vd.rows if r["status"] == "ok"}
    common = sorted(base_ok.keys() & mine_ok.keys())
    seed_mismatch = [k for k in common if base_ok[k]["seed"] != mine_ok[k]["seed"]]
    paired = [k for k in common if base_ok[k]["seed"] == mine_ok[k]["seed"]]
    by_shard: dict[str, list[Key]] = {}
    for k in paired:
        by_shard.setdefault(vd.key_shard[k], []).append(k)
    values: list[dict[str, Any]] = []
    size_mismatch = 0
    for shard, keys in sorted(by_shard.items()):
        mine = cache.get(vd.name, shard)
        xs, ys, done = [], [], []
        for k in keys:
            theirs = cache.get(base.name, base.key_shard[k])
            if k not in mine or k not in theirs:
                continue
            x, y = decode(mine[k]), decode(theirs[k])
            if x.shape != y.shape:
                size_mismatch += 1
                continue
            xs.append(x)
            ys.append(y)
            done.append(k)
            if k in grid:
                grid[k].images[vd.name] = thumbnail_uri(mine[k], thumb_px)
                grid[k].images[base.name] = thumbnail_uri(theirs[k], thumb_px)
        for k, p, s in _compare(xs, ys, done):
            values.append(
                {
                    "sample_id": k[0],
                    "image_index": k[1],
                    "psnr": None if math.isinf(p) else p,
                    "identical": math.isinf(p),
                    "ssim": s,
                }
            )
            if k in grid:
                grid[k].scores[vd.name] = {"psnr": None if math.isinf(p) else p, "ssim": s}
    finite = [v["psnr"] for v in values if v["psnr"] is not None]
    return {
        "pairs": len(values),
        "psnr_mean": _mean(finite),
        "psnr_identical": sum(v["identical"] for v in values),
        "ssim_mean": _mean([v["ssim"] for v in values]),
        "unpaired": len(mine_ok) - len(common),
        "seed_mismatch": len(seed_mismatch),
        "size_mismatch": size_mismatch,
        "values": values,
    }


def _compare(xs: list, ys: list, keys: list[Key]) -> list[tuple[Key, float, float]]:
    """Per-pair PSNR and SSIM, batched by image shape, a few images at a time (float64)."""
    out = []
    shapes: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        shapes.setdefault(x.shape, []).append(i)
    for same in shapes.values():
        for b in range(0, len(same), COMPARE_BATCH):
            idx = same[b : b + COMPARE_BATCH]
            scores = compare_images(np.stack([xs[i] for i in idx]), np.stack([ys[i] for i in idx]))
            out += zip([keys[i] for i in idx], scores["psnr"], scores["ssim"], strict=True)
    return sorted(out)


def grid_rows(run: RunData, baseline: str | None, n: int) -> dict[Key, GridRow]:
    """The first ``n`` samples (by id) that the baseline (else the first variant) has ok."""
    first = run.variants[baseline or next(iter(run.variants))]
    ok = [r for r in first.rows if r["status"] == "ok"]
    return {
        (r["sample_id"], r["image_index"]): GridRow(r["sample_id"], r["image_index"], r["prompt"])
        for r in ok[: max(0, n)]
    }


def fill_grid(run: RunData, grid: dict[Key, GridRow], cache: ShardCache, thumb_px: int) -> None:
    """Images of the grid that the fidelity pass did not read (failed pairs, baseline only)."""
    for k, row in grid.items():
        for name, vd in run.variants.items():
            if name in row.images:
                continue
            shard = vd.key_shard.get(k)
            png = cache.get(name, shard).get(k) if shard else None
            row.images[name] = thumbnail_uri(png, thumb_px) if png else None


def pairs_png(grid: list[GridRow], names: list[str], gap: int = 4) -> bytes | None:
    """The grid as one PNG: a row per variant (in ``names`` order, labelled), a column per
    sample, white where an image is missing; None when the grid holds no image."""
    from PIL import ImageDraw

    tiles = {
        (i, name): decode(base64.b64decode(uri.split(",", 1)[1]))
        for i, row in enumerate(grid)
        for name, uri in row.images.items()
        if uri and name in names
    }
    if not tiles:
        return None
    h = max(t.shape[0] for t in tiles.values())
    w = max(t.shape[1] for t in tiles.values())
    label = 8 + 7 * max(len(n) for n in names)
    sheet = Image.new("RGB", (label + len(grid) * (w + gap), len(names) * (h + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, name in enumerate(names):
        y = r * (h + gap)
        draw.text((4, y + h // 2 - 5), name, fill="black")
        for c in range(len(grid)):
            tile = tiles.get((c, name))
            if tile is not None:
                sheet.paste(Image.fromarray(tile), (label + c * (w + gap), y))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()
