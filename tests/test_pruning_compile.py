"""A pruned step compiles as one graph (no host sync, no graph break) and matches eager."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel
from torch._dynamo.testing import CompileCounterWithBackend

from catbatch.pruning.forward import cat_processors, sd3_step
from catbatch.pruning.processors import PruneContext

ROWS, N_TOKENS, K = 4, 64, 19  # CFG batch of 2 samples, 16x16 latent with patch 2


def clone_caches(caches: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    return {name: (k.clone(), v.clone()) for name, (k, v) in caches.items()}


@torch.no_grad()
def test_pruned_step_compiles_fullgraph_and_matches_eager():
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
    ctx = PruneContext()
    for attn, processor in cat_processors(model, ctx).items():
        attn.set_processor(processor)
    x = torch.randn(ROWS, 16, 16, 16)
    text, pooled = torch.randn(ROWS, 7, 32), torch.randn(ROWS, 32)
    _, prev = sd3_step(model, ctx, x, text, pooled, torch.full((ROWS,), 800.0))  # fills caches
    full_caches = clone_caches(ctx.caches)

    def pruned(latents, timestep, idx):
        return sd3_step(model, ctx, latents, text, pooled, timestep, idx, prev)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(pruned, fullgraph=True, backend=counter)
    for seed in (1, 2):  # new index values, same shapes: no recompilation
        g = torch.Generator().manual_seed(seed)
        idx = torch.stack([torch.randperm(N_TOKENS, generator=g)[:K] for _ in range(ROWS)])
        args = (x * 0.9, torch.full((ROWS,), 700.0), idx)
        ctx.caches = clone_caches(full_caches)
        eager_out, eager_tokens = pruned(*args)
        eager_caches = clone_caches(ctx.caches)
        ctx.caches = clone_caches(full_caches)
        out, tokens = compiled(*args)
        assert torch.allclose(out, eager_out, atol=1e-6)
        assert torch.allclose(tokens, eager_tokens, atol=1e-6)
        for name, (k, v) in eager_caches.items():
            assert torch.allclose(ctx.caches[name][0], k, atol=1e-6), name
            assert torch.allclose(ctx.caches[name][1], v, atol=1e-6), name
        assert not torch.equal(ctx.caches["0.attn2"][0], full_caches["0.attn2"][0])
    assert counter.frame_count == 1
    torch._dynamo.reset()
