"""The pruned step really computes K image rows: torch's FLOP counter vs an analytic count."""

from __future__ import annotations

import pytest
import torch
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel
from sd3_tiny import TINY_SD3, analytic_sd3_macs, tiny_sd3_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from catbatch.pruning import count_step_macs, pruned_forward

ROWS, TEXT, LATENT = 2, 7, 16  # 16x16 latent, patch 2: 64 image tokens


@pytest.fixture(scope="module")
def tiny_sd3():
    model = tiny_sd3_model()
    inputs = (
        torch.randn(ROWS, 16, LATENT, LATENT),
        torch.full((ROWS,), 700.0),
        torch.randn(ROWS, TEXT, 24),
        torch.randn(ROWS, 20),
    )
    return model, inputs


@pytest.mark.parametrize("stream", ["full", "krow"])
@pytest.mark.parametrize("k", [64, 19, 5])
def test_counter_matches_analytic_count(tiny_sd3, k, stream):
    model, inputs = tiny_sd3
    n = (LATENT // 2) ** 2
    idx = None if k == n else torch.stack([torch.randperm(n)[:k] for _ in range(ROWS)])
    macs = count_step_macs(model, *inputs, idx=idx, stream=stream)
    expected = analytic_sd3_macs(TINY_SD3, ROWS, n, k, TEXT, stream if idx is not None else "full")
    for key, value in expected.items():
        assert macs[key] == value, key
    assert macs["total"] == macs["paper"] + macs["attention"]


def test_full_step_costs_what_diffusers_costs(tiny_sd3):
    model, (x, t, text, pooled) = tiny_sd3
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, text, pooled, t)
    assert count_step_macs(model, x, t, text, pooled)["total"] * 2 == counter.get_total_flops()


def test_pruned_forward_full_step_equals_diffusers(tiny_sd3):
    model, (x, t, text, pooled) = tiny_sd3
    with torch.no_grad():
        expected = model(x, text, pooled, t).sample
    assert torch.allclose(pruned_forward(model, x, t, text, pooled), expected, atol=1e-6)
    assert type(model.transformer_blocks[0].attn.processor).__name__ == "JointAttnProcessor2_0"


def test_meta_sd3_medium_matches_the_paper():
    """SD3-medium, 1024px, meta device: the paper's 168.28T (full) / 90.28T (CAT) in 28 steps."""
    with torch.device("meta"):
        model = SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
        )
        args = (
            torch.randn(2, 16, 128, 128),
            torch.full((2,), 500.0),
            torch.randn(2, 77 + 256, 4096),  # CLIP + T5 tokens
            torch.randn(2, 2048),
        )
    k = int(0.3 * 4096)
    full = count_step_macs(model, *args)
    pruned = count_step_macs(model, *args, idx=torch.arange(k, device="meta"))
    assert full["paper"] * 28 == pytest.approx(168.28e12, rel=0.01)
    assert 8 * full["paper"] + 20 * pruned["paper"] == pytest.approx(90.28e12, rel=0.01)
    assert pruned["attention"] < full["attention"]


def test_meta_pixart_sigma_matches_the_paper():
    """PixArt-Sigma at 1024px: 120.68T (full) / 60.08T (CAT, text K/V reused), 28 steps."""
    with torch.device("meta"):
        model = PixArtTransformer2DModel(
            num_attention_heads=16,
            attention_head_dim=72,
            in_channels=4,
            out_channels=8,
            num_layers=28,
            cross_attention_dim=1152,
            sample_size=128,
            patch_size=2,
            norm_type="ada_norm_single",
            use_additional_conditions=False,
            caption_channels=4096,
            interpolation_scale=2,
        )
        args = (torch.randn(2, 4, 128, 128), torch.full((2,), 500.0), torch.randn(2, 300, 4096))
        mask = torch.ones(2, 300)
    idx = torch.arange(int(0.3 * 4096), device="meta")
    full = count_step_macs(model, *args, encoder_attention_mask=mask)
    pruned = count_step_macs(
        model, *args, idx=idx, encoder_attention_mask=mask, text_kv_cached=True
    )
    assert full["paper"] * 28 == pytest.approx(120.68e12, rel=0.01)
    assert 8 * full["paper"] + 20 * pruned["paper"] == pytest.approx(60.08e12, rel=0.01)
