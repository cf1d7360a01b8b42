"""A pruned step compiles as one graph (no host sync, no graph break) and matches eager."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel
from torch._dynamo.testing import CompileCounterWithBackend

from catbatch.pruning.engine import Engine, cat_processors

ROWS, N_TOKENS, K = 4, 64, 19  # CFG batch of 2 samples, 16x16 latent with patch 2


def cache_tensors(buffers):
    """Every cache tensor the step writes, by a unique name."""
    tensors = {f"kv {n}": (c.key, c.value) for n, c in buffers.kv.items()}
    return tensors | {f"branch {n}": (c.full,) for n, c in buffers.branches.items()}


def snapshot(buffers):
    return {name: tuple(t.clone() for t in ts) for name, ts in cache_tensors(buffers).items()}


def restore(buffers, saved):
    for name, targets in cache_tensors(buffers).items():
        for target, value in zip(targets, saved[name], strict=True):
            target.copy_(value)


@torch.no_grad()
@pytest.mark.parametrize("stream", ["full", "krow"])
def test_pruned_step_compiles_fullgraph_and_matches_eager(stream):
    torch.manual_seed(0)
    model = SD3Transformer2DModel(  # SD3.5 features: QK RMSNorm and a dual-attention block
        sample_size=16,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    ).eval()
    for attn, processor in cat_processors(model).items():
        attn.set_processor(processor)
    x = torch.randn(ROWS, 16, 16, 16)
    text, pooled = torch.randn(ROWS, 7, 32), torch.randn(ROWS, 32)
    inputs = dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled)
    engine = Engine(model, stream)
    buffers = engine.prepare(model, inputs, batch=ROWS // 2)
    engine.step(model, inputs | {"timestep": torch.full((ROWS,), 800.0)}, buffers, None, fill=True)
    full = snapshot(buffers)
    indices = buffers.index_set(K)

    def pruned(latents, timestep):
        step_inputs = inputs | {"hidden_states": latents, "timestep": timestep}
        result = engine.step(model, step_inputs, buffers, indices)
        return result.output, result.scores

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(pruned, fullgraph=True, backend=counter)
    for seed in (1, 2):  # new index values, same shapes: no recompilation
        g = torch.Generator().manual_seed(seed)
        indices.index.copy_(
            torch.stack([torch.randperm(N_TOKENS, generator=g)[:K] for _ in range(2)])
        )
        args = (x * 0.9, torch.full((ROWS,), 700.0))
        restore(buffers, full)
        eager_out, eager_scores = (t.clone() for t in pruned(*args))
        eager = snapshot(buffers)
        restore(buffers, full)
        out, scores = compiled(*args)
        assert torch.allclose(out, eager_out, atol=1e-6)
        assert torch.allclose(scores, eager_scores, atol=1e-6)
        for name, tensors in snapshot(buffers).items():
            for got, want in zip(tensors, eager[name], strict=True):
                assert torch.allclose(got, want, atol=1e-6), name
        assert not torch.equal(buffers.kv["0.attn2"].key, full["kv 0.attn2"][0])
    assert counter.frame_count == 1
    torch._dynamo.reset()
