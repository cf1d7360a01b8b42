"""Per-image seeds: any image can be regenerated alone, whatever batch it was made in.

``image_seed(seed, sample_id, image_index)`` is the first 8 bytes (big-endian) of
``sha256(f"{seed}\\x00{sample_id}\\x00{image_index}")`` with the top bit cleared, a 63-bit
integer. Each image's initial noise is drawn from its own CPU ``torch.Generator`` seeded with it,
so images-per-prompt > 1 gives different images and batch composition does not matter.
"""

from __future__ import annotations

import hashlib

import torch

SEED_BITS = 63


def image_seed(seed: int, sample_id: str, image_index: int) -> int:
    """The documented 63-bit seed of one image."""
    digest = hashlib.sha256(f"{seed}\x00{sample_id}\x00{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << SEED_BITS) - 1)


def image_generator(seed: int) -> torch.Generator:
    """A CPU generator for one image (diffusers draws each latent from its own generator)."""
    return torch.Generator("cpu").manual_seed(seed)
