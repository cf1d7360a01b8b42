"""The transformer step of CAT pruning for SD3 / SD3.5 and PixArt-Sigma.

One function per model family runs a step in the "K-row stream" form: patch embedding (with
its position embedding) on all tokens, then only the ``K`` computed image rows of each batch row
go through diffusers' own block forwards (with the CAT attention processors installed), the
final norm and projection; their outputs are scattered into the previous step's merged output
and unpatchified. ``idx_rows=None`` is a full step: all tokens in order, which fills the caches
and is the unpatched computation.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from torch import Tensor

from .processors import (
    CATCrossAttnProcessor,
    CATJointAttnProcessor,
    CATSelfAttnProcessor,
    PruneContext,
    check_attention_module,
    gather_tokens,
    scatter_tokens,
)

SUPPORTED = "SD3Transformer2DModel (SD3, SD3.5) or PixArtTransformer2DModel"


def model_family(model: torch.nn.Module) -> str:
    """``"sd3"`` or ``"pixart"``; TypeError for anything else."""
    if isinstance(model, SD3Transformer2DModel):
        return "sd3"
    if isinstance(model, PixArtTransformer2DModel):
        return "pixart"
    raise TypeError(f"CAT pruning supports {SUPPORTED}, not {type(model).__name__}")


def cat_processors(model: torch.nn.Module, ctx: PruneContext) -> dict[Attention, Any]:
    """The CAT processor for every attention module of ``model``, sharing ``ctx``."""
    family = model_family(model)
    processors: dict[Attention, Any] = {}
    for i, block in enumerate(model.transformer_blocks):
        if family == "sd3":
            processors[block.attn] = CATJointAttnProcessor(ctx, f"{i}.attn")
            if block.attn2 is not None:
                processors[block.attn2] = CATSelfAttnProcessor(ctx, f"{i}.attn2")
        else:
            processors[block.attn1] = CATSelfAttnProcessor(ctx, f"{i}.attn1")
            if block.attn2 is not None:
                processors[block.attn2] = CATCrossAttnProcessor(ctx, f"{i}.attn2")
    for attn in processors:
        check_attention_module(attn)
    return processors


def attention_module_name(model: torch.nn.Module, block: int) -> str:
    """Name of the image self-attention of ``block`` (-1: the middle block)."""
    n_blocks = len(model.transformer_blocks)
    if block < 0:
        block = n_blocks // 2
    if block >= n_blocks:
        raise ValueError(f"attention_block {block} >= number of blocks {n_blocks}")
    return f"{block}.attn" if model_family(model) == "sd3" else f"{block}.attn1"


def token_grid(model: torch.nn.Module, hidden_states: Tensor) -> tuple[int, int]:
    """``(h, w)`` token grid of latents ``(R, C, H, W)``."""
    p = model.config.patch_size
    return hidden_states.shape[-2] // p, hidden_states.shape[-1] // p


def noise_channels(model: torch.nn.Module, tokens: Tensor) -> Tensor:
    """The noise-prediction part of output tokens ``(R, N, p*p*C_out)``.

    With PixArt's learned sigma (``C_out == 2 * C_in``) the last ``C_in`` channels of every
    patch position are variances, not noise: they are dropped from the score.
    """
    c_out, c_in = model.out_channels, model.config.in_channels
    if c_out != 2 * c_in:
        return tokens
    r, n, _ = tokens.shape
    return tokens.view(r, n, -1, c_out)[..., :c_in].reshape(r, n, -1)


def _finish(
    model: torch.nn.Module,
    ctx: PruneContext,
    tokens: Tensor,
    prev_tokens: Tensor | None,
    grid: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """Merge the computed rows into the previous output and unpatchify."""
    if ctx.idx_flat is not None:
        r, n = tokens.shape[0], grid[0] * grid[1]
        if prev_tokens is None:  # a pruned step without history (MAC counting only)
            prev_tokens = tokens.new_zeros(r, n, tokens.shape[-1])
        tokens = scatter_tokens(prev_tokens, ctx.idx_flat, tokens)
    return unpatchify(tokens, grid, model.config.patch_size, model.out_channels), tokens


def unpatchify(tokens: Tensor, grid: tuple[int, int], patch: int, channels: int) -> Tensor:
    """``(R, h*w, p*p*C)`` -> ``(R, C, h*p, w*p)``, as diffusers does."""
    h, w = grid
    x = tokens.reshape(tokens.shape[0], h, w, patch, patch, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * patch, w * patch)


def sd3_step(
    model: SD3Transformer2DModel,
    ctx: PruneContext,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    pooled_projections: Tensor,
    timestep: Tensor,
    idx_rows: Tensor | None = None,
    prev_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One SD3 / SD3.5 step; returns ``(output (R, C, H, W), merged tokens (R, N, p*p*C))``."""
    grid = token_grid(model, hidden_states)
    tokens = model.pos_embed(hidden_states).contiguous()
    temb = model.time_text_embed(timestep, pooled_projections)
    context = model.context_embedder(encoder_hidden_states)
    ctx.begin(idx_rows, grid[0] * grid[1])
    if ctx.idx_flat is not None:
        tokens = gather_tokens(tokens, ctx.idx_flat)
    for block in model.transformer_blocks:
        context, tokens = block(hidden_states=tokens, encoder_hidden_states=context, temb=temb)
    tokens = model.proj_out(model.norm_out(tokens, temb))
    return _finish(model, ctx, tokens, prev_tokens, grid)


def pixart_step(
    model: PixArtTransformer2DModel,
    ctx: PruneContext,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    timestep: Tensor,
    added_cond_kwargs: dict[str, Tensor] | None = None,
    encoder_attention_mask: Tensor | None = None,
    idx_rows: Tensor | None = None,
    prev_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One PixArt step; returns ``(output (R, C, H, W), merged tokens (R, N, p*p*C))``."""
    if model.use_additional_conditions and added_cond_kwargs is None:
        raise ValueError("`added_cond_kwargs` cannot be None when using additional conditions")
    if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
        bias = (1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0
        encoder_attention_mask = bias.unsqueeze(1)
    batch = hidden_states.shape[0]
    grid = token_grid(model, hidden_states)
    tokens = model.pos_embed(hidden_states)
    timestep, embedded_timestep = model.adaln_single(
        timestep, added_cond_kwargs, batch_size=batch, hidden_dtype=tokens.dtype
    )
    if model.caption_projection is not None:
        encoder_hidden_states = model.caption_projection(encoder_hidden_states)
        encoder_hidden_states = encoder_hidden_states.view(batch, -1, tokens.shape[-1])
    ctx.begin(idx_rows, grid[0] * grid[1])
    if ctx.idx_flat is not None:
        tokens = gather_tokens(tokens, ctx.idx_flat)
    for block in model.transformer_blocks:
        tokens = block(
            tokens,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            timestep=timestep,
        )
    shift, scale = (model.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
    tokens = model.norm_out(tokens) * (1 + scale) + shift
    tokens = model.proj_out(tokens)
    return _finish(model, ctx, tokens, prev_tokens, grid)


# Inputs of the diffusers forwards that the pruned step does not reproduce.
_UNSUPPORTED = {
    "sd3": ("block_controlnet_hidden_states", "joint_attention_kwargs", "skip_layers"),
    "pixart": ("attention_mask", "cross_attention_kwargs"),
}


def run_step(
    model: torch.nn.Module,
    ctx: PruneContext,
    inputs: dict[str, Any],
    idx_rows: Tensor | None,
    prev_tokens: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Dispatch ``inputs`` (the bound arguments of the diffusers forward) to the family's step."""
    family = model_family(model)
    for name in _UNSUPPORTED[family]:
        value = inputs.get(name)
        if value is not None and not (isinstance(value, (dict, list, tuple)) and not value):
            raise NotImplementedError(f"CAT pruning does not support `{name}`")
    if family == "sd3":
        return sd3_step(
            model,
            ctx,
            inputs["hidden_states"],
            inputs["encoder_hidden_states"],
            inputs["pooled_projections"],
            inputs["timestep"],
            idx_rows,
            prev_tokens,
        )
    return pixart_step(
        model,
        ctx,
        inputs["hidden_states"],
        inputs["encoder_hidden_states"],
        inputs["timestep"],
        inputs.get("added_cond_kwargs"),
        inputs.get("encoder_attention_mask"),
        idx_rows,
        prev_tokens,
    )
