"""Tiny SD3 transformers for tests, and the analytic MACs of one step."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

TINY_SD3 = dict(
    sample_size=16,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=24,
    caption_projection_dim=32,
    pooled_projection_dim=20,
)
SMALL_SD3 = dict(  # 8x8 latent, patch 2: 16 image tokens; text width 16
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    caption_projection_dim=16,
    pooled_projection_dim=16,
)


def tiny_sd3_model(config: dict = TINY_SD3, seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**config).eval()


def analytic_sd3_macs(
    cfg: dict, rows: int, n: int, k: int, text: int, stream: str = "full"
) -> dict[str, int]:
    """MACs of one step of SD3Transformer2DModel computing k of n image tokens per row.

    Per block: AdaLN-Zero modulation (6d^2 image, 6d^2 text; the last block's text norm is a
    continuous AdaLN, 2d^2), image q/k/v/out (4d^2 per computed token), image FF (8d^2), text
    q/k/v (3d^2 per text token) and, except in the last block, text out + FF (9d^2); attention
    has k + text queries over n + text keys (cached image keys included). Outside the blocks:
    timestep MLP (256d + d^2), pooled MLP (pd + d^2), context embedder, output AdaLN (2d^2),
    proj_out (on the computed tokens, and in the full-length stream of a pruned step once more
    on all tokens for the scores) and the patch-embedding conv on all tokens.
    """
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    p, layers = cfg["patch_size"], cfg["num_layers"]
    per_row = 256 * d + d * d + cfg["pooled_projection_dim"] * d + d * d  # time + pooled text
    per_row += text * cfg["joint_attention_dim"] * d  # context_embedder
    attention = 0
    for i in range(layers):
        last = i == layers - 1  # context_pre_only: no text output projection, no text FF
        per_row += 6 * d * d + (2 if last else 6) * d * d  # AdaLN modulation, image / text
        per_row += 4 * k * d * d + 8 * k * d * d  # image q, k, v, out; feed-forward (4x)
        per_row += 3 * text * d * d + (0 if last else text * d * d + 8 * text * d * d)
        attention += 2 * (k + text) * (n + text) * d  # QK^T and PV over all heads
    out_tokens = n + k if stream == "full" and k < n else k  # all tokens (scores) + computed
    per_row += 2 * d * d * (2 if out_tokens > n else 1)  # norm_out modulation, once per head
    per_row += out_tokens * d * p * p * cfg["out_channels"]  # proj_out
    conv = n * cfg["in_channels"] * p * p * d
    return {
        "linear": rows * per_row,
        "conv": rows * conv,
        "attention": rows * attention,
        "paper": rows * (per_row + conv),
    }
