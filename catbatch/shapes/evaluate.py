"""Prompt adherence of a text-to-image pipeline on held-out captions of the shapes domain.

    python -m catbatch.shapes.evaluate --count 500              # the shipped catbatch-shapes
    python -m catbatch.shapes.evaluate --model DIR --count 64 --grid grid.png
    python -m catbatch.shapes.evaluate --model DIR --device cuda --count 500 --batch 250

Captions come from the seed ``heldout`` (the training streams use ``train-<seed>-<stage>``);
caption ``i`` is generated with the seed ``1000 + i``. Prints the checker's summary: adherence
(shape, colour and position facts that hold; each unstated shape adds three failed facts), the
rate of each fact kind and ``extra``, the unstated shapes per caption. Images are 128x128 (the
preset's size; ``--size`` changes it). Imports no Ray and no open_clip (runs on a bare GPU box).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image

from catbatch.models.loader import pipeline_call_kwargs

from .checker import check, summary
from .model import IMAGE_SIZE
from .scenes import caption, scenes

HELDOUT_SEED = "heldout"
FIRST_SEED = 1000


def heldout_captions(count: int, seed: str = HELDOUT_SEED) -> list[str]:
    return [caption(s) for s in scenes(seed, count)]  # type: ignore[arg-type]


def load(
    model: str = "catbatch-shapes", dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> Any:
    """A shipped preset by name, or a pipeline folder, on ``device``; progress bars off."""
    import diffusers
    import transformers

    from catbatch.models import tiny

    for lib in (diffusers, transformers):  # the 1-token T5's truncation warnings; no bars
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    if tiny.is_preset(model):
        pipe = tiny.load_tiny_pipeline(model, torch_dtype=dtype)
    else:
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            model, local_files_only=True, dtype=dtype
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate(
    pipe: Any,
    captions: Sequence[str],
    seeds: Sequence[int] | None = None,
    *,
    steps: int = 28,
    guidance: float = 7.0,
    batch: int = 8,
    size: int = IMAGE_SIZE,
) -> np.ndarray:
    """uint8 images ``(N, size, size, 3)``; one CPU generator per caption (seed ``1000 + i``),
    so the images do not depend on the device's random numbers."""
    seeds = list(seeds) if seeds is not None else [FIRST_SEED + i for i in range(len(captions))]
    out = []
    for at in range(0, len(captions), batch):
        chunk = list(captions[at : at + batch])
        images = pipe(
            prompt=chunk,
            negative_prompt=[""] * len(chunk),
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(s) for s in seeds[at : at + batch]],
            output_type="np",
            **pipeline_call_kwargs(pipe),
        ).images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def _worker(job: tuple[str, list[str], list[int], dict]) -> np.ndarray:
    model, captions, seeds, kwargs = job
    torch.set_num_threads(1)
    return generate(load(model), captions, seeds, **kwargs)


def generate_parallel(
    model: str, captions: Sequence[str], workers: int = 1, device: str = "cpu", **kwargs: Any
) -> np.ndarray:
    """:func:`generate` split over ``workers`` CPU processes of one thread each, or in this
    process on ``device`` (a GPU: one process)."""
    seeds = [FIRST_SEED + i for i in range(len(captions))]
    if device != "cpu":
        return generate(load(model, device=device), captions, seeds, **kwargs)
    if workers <= 1:
        torch.set_num_threads(1)
        return generate(load(model), captions, seeds, **kwargs)
    parts = np.array_split(np.arange(len(captions)), workers)
    jobs = [(model, [captions[i] for i in p], [seeds[i] for i in p], kwargs) for p in parts]
    with ProcessPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(_worker, jobs)))


def grid(images: np.ndarray, columns: int = 8, scale: int = 2) -> Image.Image:
    """A contact sheet of uint8 images, each enlarged ``scale`` times."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    sheet = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    return Image.fromarray(sheet).resize((columns * w * scale, rows * h * scale), Image.NEAREST)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="catbatch-shapes")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=IMAGE_SIZE, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=2, help="CPU processes")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one process)")
    parser.add_argument("--grid", help="write a contact sheet of the first 64 images here")
    args = parser.parse_args(argv)
    captions = heldout_captions(args.count)
    start = time.perf_counter()
    images = generate_parallel(
        args.model,
        captions,
        args.workers,
        args.device,
        steps=args.steps,
        guidance=args.guidance,
        batch=args.batch,
        size=args.size,
    )
    seconds = time.perf_counter() - start
    result = summary([check(im, c) for im, c in zip(images, captions, strict=True)])
    where = args.device if args.device != "cpu" else f"{args.workers} CPU workers"
    print(
        f"{args.model}: {args.count} held-out captions, {args.size} px, {args.steps} steps, "
        f"guidance {args.guidance}, {seconds:.0f} s ({where})",
        flush=True,
    )
    print(json.dumps({k: round(v, 4) for k, v in result.items()}))
    if args.grid:
        grid(images[:64]).save(args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
