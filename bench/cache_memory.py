"""CAT's buffer memory per generation for the real transformers, from their configs on the meta
device (no weights, no memory): ``python -m bench.cache_memory`` prints the README table.

Each row: batch images at 1024x1024 with CFG (two rows per image; FLUX.1: one, its guidance
is an input), fp16, the pipeline's default text length (SD3 333 tokens, PixArt-Sigma 300,
FLUX.1 512), both streams (``full`` keeps the attention / feed-forward outputs of every token
as well). Counting, not timing: safe to run anywhere.
"""

from __future__ import annotations

import argparse

import torch

from catbatch.metrics.paper_configs import FLUX_1_DEV, PIXART_SIGMA, SD3_MEDIUM, SD35_LARGE
from catbatch.pruning import CATConfig, cache_bytes

MODELS = {
    "SD3-medium": {**SD3_MEDIUM, "_class_name": "SD3Transformer2DModel"},
    "SD3.5-large": {**SD35_LARGE, "_class_name": "SD3Transformer2DModel"},
    "PixArt-Sigma": {**PIXART_SIGMA, "_class_name": "PixArtTransformer2DModel"},
    "FLUX.1-dev": {**FLUX_1_DEV, "_class_name": "FluxTransformer2DModel"},
}
GB = 1e9


def rows(resolution: int, batches: tuple[int, ...]) -> list[tuple[str, int, dict, dict]]:
    out = []
    for name, config in MODELS.items():
        for batch in batches:
            size = dict(batch=batch, height=resolution, width=resolution, dtype=torch.float16)
            full = cache_bytes(config, **size, config=CATConfig(stream="full"))
            krow = cache_bytes(config, **size, config=CATConfig(stream="krow"))
            out.append((name, batch, full.to_dict(), krow.to_dict()))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args(argv)
    print("| model | images per call | K/V caches | stream: full (total) | stream: krow (total) |")
    print("| --- | --- | --- | --- | --- |")
    for name, batch, full, krow in rows(args.resolution, tuple(args.batches)):
        print(
            f"| {name} | {batch} | {full['kv'] / GB:.2f} GB | {full['total'] / GB:.2f} GB "
            f"| {krow['total'] / GB:.2f} GB |"
        )


if __name__ == "__main__":
    main()
