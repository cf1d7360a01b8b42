"""CAT step for SD3 / SD3.5 (``SD3Transformer2DModel``): joint attention, MMDiT-X blocks.

Per block, the image stream computes its modulation, Q/K/V, attention output projection and
feed-forward for the rows in the stream (``K`` rows at a pruned step); image keys/values of all
tokens come from the block's joint K/V cache (image rows, then this step's text rows), which
image queries and text queries read in one attention call (a joint query buffer, as
diffusers' processor concatenates them). The text stream runs in full.
SD3.5's second image-only attention (``attn2``) has its own cache. The context embedding and
the pooled text projection depend only on the prompt: computed once per generation.
``skip_layers`` (skip-layer guidance) leaves blocks out, as diffusers does.
The order of operations follows diffusers' ``JointTransformerBlock`` so that a full step is
the unpatched computation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from torch import Tensor

from .core import (
    Buffers,
    Family,
    StepContext,
    modulate,
    modulation,
    normed,
    project_added_qkv,
    project_qkv,
    tensor_key,
)

CLIP_TOKENS, T5_TOKENS = 77, 256  # StableDiffusion3Pipeline's prompt embeddings


class SD3(Family):
    name = "sd3"
    model_class = SD3Transformer2DModel
    unsupported = ("block_controlnet_hidden_states", "joint_attention_kwargs")
    attention_kwargs = "joint_attention_kwargs"

    @staticmethod
    def attention_modules(model: SD3Transformer2DModel) -> dict[str, Attention]:
        modules = {}
        for i, block in enumerate(model.transformer_blocks):
            modules[f"{i}.attn"] = block.attn
            if block.attn2 is not None:
                modules[f"{i}.attn2"] = block.attn2
        return modules

    @staticmethod
    def attention_name(model: SD3Transformer2DModel, block: int) -> str:
        return f"{block}.attn"

    @staticmethod
    def text_lengths(model: SD3Transformer2DModel, inputs: dict[str, Any]) -> tuple[int, int]:
        n_text = inputs["encoder_hidden_states"].shape[1]
        return n_text, n_text

    @staticmethod
    def text_key(inputs: dict[str, Any]) -> tuple[Any, ...]:
        return (
            tensor_key(inputs["encoder_hidden_states"]),
            tensor_key(inputs["pooled_projections"]),
        )

    @staticmethod
    def text_tokens(config: Any, max_sequence_length: int | None) -> int:
        return CLIP_TOKENS + (max_sequence_length or T5_TOKENS)  # CLIP, then T5

    @staticmethod
    def example_inputs(
        model: SD3Transformer2DModel, rows: int, latent: tuple[int, int], text_tokens: int
    ) -> dict[str, Any]:
        config, dtype = model.config, model.dtype
        return {
            "hidden_states": torch.zeros(rows, config.in_channels, *latent, dtype=dtype),
            "timestep": torch.zeros(rows),
            "encoder_hidden_states": torch.zeros(
                rows, text_tokens, config.joint_attention_dim, dtype=dtype
            ),
            "pooled_projections": torch.zeros(rows, config.pooled_projection_dim, dtype=dtype),
        }

    @staticmethod
    def prepare_text(
        model: SD3Transformer2DModel, buffers: Buffers, inputs: dict[str, Any]
    ) -> None:
        buffers.keep_text("context", model.context_embedder(inputs["encoder_hidden_states"]))
        pooled = model.time_text_embed.text_embedder(inputs["pooled_projections"])
        buffers.keep_text("pooled", pooled)

    @staticmethod
    def step(model: SD3Transformer2DModel, ctx: StepContext, inputs: dict[str, Any]) -> Tensor:
        text = ctx.buffers.text
        embed = model.time_text_embed
        timesteps = embed.time_proj(inputs["timestep"])
        dtype = inputs["pooled_projections"].dtype
        temb = embed.timestep_embedder(timesteps.to(dtype=dtype)) + text["pooled"]
        silu_temb = F.silu(temb)  # every AdaLN-Zero of every block starts with it
        tokens = ctx.enter(model.pos_embed(inputs["hidden_states"]).contiguous())
        context = text["context"]
        skip = inputs.get("skip_layers") or ()  # SD3.5 skip-layer guidance: blocks left out
        for i, block in enumerate(model.transformer_blocks):
            if i not in skip:
                tokens, context = _block(block, i, ctx, tokens, context, temb, silu_temb)
        return ctx.finish(lambda x: model.proj_out(model.norm_out(x, temb)), tokens)


def _block(
    block: torch.nn.Module,
    i: int,
    ctx: StepContext,
    x: Tensor,
    c: Tensor,
    temb: Tensor,
    silu_temb: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """One ``JointTransformerBlock``: image rows ``x`` ``(R, S, D)``, text ``c`` ``(R, T, D)``."""
    r, d = ctx.rows, x.shape[-1]
    attn: Attention = block.attn
    dual = block.attn2 is not None
    mods = modulation(block.norm1, silu_temb, 9 if dual else 6)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
    x_norm = block.norm1.norm(x)
    h = modulate(x_norm, shift_msa, scale_msa).view(-1, d)
    if block.context_pre_only:
        hc = block.norm1_context(c, temb)
    else:
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = modulation(
            block.norm1_context, silu_temb, 6
        )
        hc = modulate(block.norm1_context.norm(c), c_shift_msa, c_scale_msa)

    # Joint attention: image rows and text over the block's cache (image rows, then text).
    name = f"{i}.attn"
    n_joint = c.shape[1]
    cache = ctx.buffers.kv_cache(name, attn, ctx.n_tokens, n_joint)
    q, k, v = project_qkv(attn, h)
    q, k = normed(attn.norm_q, q, r, attn.heads), normed(attn.norm_k, k, r, attn.heads)
    ctx.write_image_kv(cache, k, v)
    tq, tk, tv = project_added_qkv(attn, hc.view(-1, d))
    tq = normed(attn.norm_added_q, tq, r, attn.heads)
    tk = normed(attn.norm_added_k, tk, r, attn.heads)
    cache.text_key.copy_(tk.view(cache.text_key.shape))
    cache.text_value.copy_(tv.view(cache.text_value.shape))
    out, text_out = ctx.attend_joint(name, attn, q, tq, cache)
    x = ctx.residual(name, x, attn.to_out[0](out), gate_msa)

    if dual:  # SD3.5 MMDiT-X: image-only attention on the same normed input
        shift_msa2, scale_msa2, gate_msa2 = mods[6:]
        attn2: Attention = block.attn2
        name2 = f"{i}.attn2"
        cache2 = ctx.buffers.kv_cache(name2, attn2, ctx.n_tokens, 0)
        h2 = modulate(x_norm, shift_msa2, scale_msa2).view(-1, d)
        q, k, v = project_qkv(attn2, h2)
        q, k = normed(attn2.norm_q, q, r, attn2.heads), normed(attn2.norm_k, k, r, attn2.heads)
        ctx.write_image_kv(cache2, k, v)
        out = ctx.attend(name2, attn2, q, cache2.key_heads, cache2.value_heads)
        x = ctx.residual(name2, x, attn2.to_out[0](out), gate_msa2)

    h = modulate(block.norm2(x), shift_mlp, scale_mlp)
    x = ctx.residual(f"{i}.ff", x, block.ff(h.view(-1, d)), gate_mlp)

    if block.context_pre_only:
        return x, None
    c = c + c_gate_msa * attn.to_add_out(text_out).view(c.shape)
    hc = modulate(block.norm2_context(c), c_shift_mlp, c_scale_mlp)
    c = c + c_gate_mlp * block.ff_context(hc.view(-1, d)).view(c.shape)
    return x, c
