"""CAT step for PixArt-Sigma (``PixArtTransformer2DModel``): self- and cross-attention blocks.

Per block (``BasicTransformerBlock`` with ``ada_norm_single``): the image rows in the stream
compute the self-attention's Q/K/V (keys/values of all tokens from the block's cache), the
cross-attention's queries, both output projections and the feed-forward. The caption
projection, every block's cross-attention keys/values of the text and the text mask bias
depend only on the prompt: computed once per generation. The order of operations follows
diffusers so that a full step is the unpatched computation.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from torch import Tensor

from .core import (
    Buffers,
    Family,
    StepContext,
    modulate,
    normed,
    project_kv,
    project_qkv,
    tensor_key,
    weights_of,
)

T5_TOKENS = 300  # PixArtSigmaPipeline's default max_sequence_length


class PixArt(Family):
    name = "pixart"
    model_class = PixArtTransformer2DModel
    unsupported = ("attention_mask", "cross_attention_kwargs")
    step_inputs = ("hidden_states", "timestep", "added_cond_kwargs")

    @staticmethod
    def attention_modules(model: PixArtTransformer2DModel) -> dict[str, Attention]:
        modules = {}
        for i, block in enumerate(model.transformer_blocks):
            if block.norm_type != "ada_norm_single":
                raise NotImplementedError(
                    f"CAT pruning needs ada_norm_single blocks, not {block.norm_type}"
                )
            modules[f"{i}.attn1"] = block.attn1
            if block.attn2 is not None:
                modules[f"{i}.attn2"] = block.attn2
        return modules

    @staticmethod
    def attention_name(model: PixArtTransformer2DModel, block: int) -> str:
        return f"{block}.attn1"

    @staticmethod
    def text_lengths(model: PixArtTransformer2DModel, inputs: dict[str, Any]) -> tuple[int, int]:
        return 0, inputs["encoder_hidden_states"].shape[1]

    @staticmethod
    def text_key(inputs: dict[str, Any]) -> tuple[Any, ...]:
        return (
            tensor_key(inputs["encoder_hidden_states"]),
            tensor_key(inputs.get("encoder_attention_mask")),
        )

    @staticmethod
    def text_tokens(config: Any, max_sequence_length: int | None) -> int:
        return max_sequence_length or T5_TOKENS

    @staticmethod
    def example_inputs(
        model: PixArtTransformer2DModel, rows: int, latent: tuple[int, int], text_tokens: int
    ) -> dict[str, Any]:
        config, dtype = model.config, model.dtype
        return {
            "hidden_states": torch.zeros(rows, config.in_channels, *latent, dtype=dtype),
            "timestep": torch.zeros(rows),
            "encoder_hidden_states": torch.zeros(
                rows, text_tokens, config.caption_channels, dtype=dtype
            ),
            "encoder_attention_mask": torch.ones(rows, text_tokens, dtype=dtype),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }

    @staticmethod
    def prepare_text(
        model: PixArtTransformer2DModel, buffers: Buffers, inputs: dict[str, Any]
    ) -> None:
        context: Tensor = inputs["encoder_hidden_states"]
        rows, dim = context.shape[0], model.inner_dim
        if model.caption_projection is not None:
            context = model.caption_projection(context).view(rows, -1, dim)
        n_text = context.shape[1]
        flat = context.reshape(-1, dim)
        for i, block in enumerate(model.transformer_blocks):
            attn = block.attn2
            if attn is None:
                continue
            cache = buffers.kv_cache(f"{i}.attn2", attn, 0, n_text)
            key, value = project_kv(attn, flat)
            key = normed(attn.norm_k, key, rows, attn.heads)
            cache.text_key.copy_(key.view(cache.text_key.shape))
            cache.text_value.copy_(value.view(cache.text_value.shape))
        mask = inputs.get("encoder_attention_mask")
        if mask is not None:
            if mask.ndim == 2:  # 1 = keep, 0 = discard -> an additive bias, as diffusers does
                mask = ((1 - mask.to(buffers.key.dtype)) * -10000.0).unsqueeze(1)
            buffers.keep_text("mask", mask.unsqueeze(1))  # (R, 1, 1, T): every head and query
        else:
            buffers.text.pop("mask", None)

    @staticmethod
    def step(model: PixArtTransformer2DModel, ctx: StepContext, inputs: dict[str, Any]) -> Tensor:
        if model.use_additional_conditions and inputs.get("added_cond_kwargs") is None:
            raise ValueError("`added_cond_kwargs` cannot be None when using additional conditions")
        hidden = inputs["hidden_states"]
        rows = hidden.shape[0]
        tokens = model.pos_embed(hidden).contiguous()
        timestep, embedded_timestep = model.adaln_single(
            inputs["timestep"],
            inputs.get("added_cond_kwargs"),
            batch_size=rows,
            hidden_dtype=tokens.dtype,
        )
        modulation = timestep.view(rows, 6, -1)
        tokens = ctx.enter(tokens)
        mask = ctx.buffers.text.get("mask")
        for i, block in enumerate(model.transformer_blocks):
            tokens = _block(block, i, ctx, tokens, modulation, mask)
        shift, scale = (model.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        return ctx.finish(
            lambda x: model.proj_out(modulate(model.norm_out(x), shift, scale)), tokens
        )


def _block(
    block: torch.nn.Module,
    i: int,
    ctx: StepContext,
    x: Tensor,
    modulation: Tensor,
    mask: Tensor | None,
) -> Tensor:
    """One ``BasicTransformerBlock`` (``ada_norm_single``) on image rows ``x`` ``(R, S, D)``."""
    r, d = ctx.rows, x.shape[-1]
    with weights_of(block):  # its own table (sequential CPU offload loads it here)
        table = block.scale_shift_table + modulation
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table.split(1, dim=1)

    attn: Attention = block.attn1
    name = f"{i}.attn1"
    cache = ctx.buffers.kv_cache(name, attn, ctx.n_tokens, 0)
    h = modulate(block.norm1(x), shift_msa, scale_msa).view(-1, d)
    q, k, v = project_qkv(attn, h)
    q, k = normed(attn.norm_q, q, r, attn.heads), normed(attn.norm_k, k, r, attn.heads)
    ctx.write_image_kv(cache, k, v)
    out = ctx.attend(name, attn, q, cache.key_heads, cache.value_heads)
    x = ctx.residual(name, x, attn.to_out[0](out), gate_msa)

    if block.attn2 is not None:  # cross-attention: no norm before it in ada_norm_single
        attn2: Attention = block.attn2
        name2 = f"{i}.attn2"
        text = ctx.buffers.kv[name2]
        q = normed(attn2.norm_q, attn2.to_q(x.view(-1, d)), r, attn2.heads)
        out = ctx.attend(
            name2, attn2, q, text.key_heads, text.value_heads, mask, image_queries=False
        )
        x = ctx.residual(name2, x, attn2.to_out[0](out))

    h = modulate(block.norm2(x), shift_mlp, scale_mlp)
    return ctx.residual(f"{i}.ff", x, block.ff(h.view(-1, d)), gate_mlp)
