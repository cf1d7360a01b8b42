"""CAT's buffer memory known before a run (issue 14 item 7): :func:`cache_bytes` from the config
equals what a pipeline call allocates on the tiny presets, and the real models' K/V caches match
the analytic ``2 x rows x (image + text tokens) x width x blocks`` bytes."""

from __future__ import annotations

import pytest
import torch

from catbatch.metrics.paper_configs import FLUX_1_DEV, PIXART_SIGMA, SD3_MEDIUM, SD35_LARGE
from catbatch.models.tiny import build_tiny_pipeline, pipeline_call_kwargs
from catbatch.pruning import CATConfig, apply_cat, cache_bytes, remove_cat


def allocated(state) -> tuple[int, int, int]:
    """``(kv, branches, total)`` bytes of the buffers the last call allocated."""
    buffers = state.engine.buffers
    kv = sum(t.numel() * t.element_size() for c in buffers.kv.values() for t in (c.key, c.value))
    branches = sum(c.full.numel() * c.full.element_size() for c in buffers.branches.values())
    return kv, branches, buffers.nbytes()


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-pixart", "tiny-flux"])
@pytest.mark.parametrize("stream", ["full", "krow"])
def test_cache_bytes_equal_the_allocated_buffers(name, stream):
    pipe = build_tiny_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    config = CATConfig(alpha=0.5, stream=stream)
    state = apply_cat(pipe, config)
    text = {"max_sequence_length": 32} if name == "tiny-flux" else {}  # FLUX: one row per image
    pipe(
        ["a red cube", "a dog"],
        num_inference_steps=10,
        height=128,
        width=96,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **pipeline_call_kwargs(pipe),
        **text,
    )
    assert state.pruned_steps > 0
    kv, branches, total = allocated(state)
    size = dict(batch=2, height=128, width=96, dtype=torch.float32, config=config, **text)
    predicted = cache_bytes(pipe.transformer, **size)
    assert (predicted.kv, predicted.branches, predicted.total) == (kv, branches, total)
    assert kv > 0 and (branches > 0) == (stream == "full")
    # from the saved config.json mapping: the same figure, no model needed
    mapping = {**pipe.transformer.config, "_class_name": type(pipe.transformer).__name__}
    assert cache_bytes(mapping, **size) == predicted
    remove_cat(pipe)


@pytest.mark.parametrize(
    "config, class_name, blocks, width, text, rows",
    [
        (SD3_MEDIUM, "SD3Transformer2DModel", 24, 1536, 77 + 256, 8),
        (SD35_LARGE, "SD3Transformer2DModel", 38, 2432, 77 + 256, 8),
        (PIXART_SIGMA, "PixArtTransformer2DModel", 28, 1152, 300, 8),
        (FLUX_1_DEV, "FluxTransformer2DModel", 19 + 38, 3072, 512, 4),  # no CFG rows
    ],
)
def test_real_models_kv_bytes_are_the_analytic_figure(
    config, class_name, blocks, width, text, rows
):
    mapping = {**config, "_class_name": class_name}
    got = cache_bytes(mapping, batch=4, height=1024, width=1024, config=CATConfig(stream="krow"))
    image = (1024 // 16) ** 2
    # keys and values (2) of every row's image and text tokens (SD3, FLUX: joint attention;
    # PixArt: self-attention over the image, cross-attention over the prompt), fp16 (2 bytes)
    assert got.kv == 2 * rows * (image + text) * width * 2 * blocks
    assert got.branches == 0 and got.other < got.kv // 10
