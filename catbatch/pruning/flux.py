"""CAT step for FLUX.1 (``FluxTransformer2DModel``): double- and single-stream blocks with RoPE.

Double-stream blocks run as SD3's joint attention: the image rows in the stream (``K`` at a
pruned step) compute their modulation, Q/K/V, attention output projection and feed-forward;
the text stream runs in full; image keys/values of all tokens come from the block's cache
(image rows, then this step's text rows), stored after the QK RMSNorm and the rotary embedding.
Single-stream blocks (text and image in one sequence; attention and MLP in parallel, one output
projection) run the text rows in full and the image rows in the stream, over the block's cache
in the same way. Rotary embeddings are per token: queries and fresh keys get the rotation of
their own positions (gathered for the computed rows); cached keys keep theirs.

FLUX.1 is guidance-distilled: ``guidance`` is an input embedding, not classifier-free guidance,
so a batch has one row (and one index set) per image. Latents come packed ``(B, N, 64)``; the
token grid is read from ``img_ids`` (once per generation, on the host). The context embedding,
the pooled-text and guidance embeddings and the rotary tables depend only on the prompt and
the ids: computed once per generation. The order of operations follows diffusers'
``FluxTransformerBlock`` / ``FluxSingleTransformerBlock`` so that a full step is the unpatched
computation (keys in cache order, image then text: equal up to float rounding).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from torch import Tensor

from .core import (
    Buffers,
    Family,
    KVCache,
    StepContext,
    heads_view,
    modulate,
    modulation,
    project_added_qkv,
    project_qkv,
    tensor_key,
)

T5_TOKENS = 512  # FluxPipeline's default max_sequence_length
FP16_MAX = 65504.0  # diffusers clips FLUX's residual streams to this in float16


class Flux(Family):
    name = "flux"
    model_class = FluxTransformer2DModel
    unsupported = (
        "joint_attention_kwargs",  # IP-Adapter; its LoRA ``scale`` is honoured
        "controlnet_block_samples",
        "controlnet_single_block_samples",
    )
    attention_kwargs = "joint_attention_kwargs"
    cfg = False

    @staticmethod
    def attention_modules(model: FluxTransformer2DModel) -> dict[str, torch.nn.Module]:
        modules = {f"{i}.attn": b.attn for i, b in enumerate(model.transformer_blocks)}
        for i, block in enumerate(model.single_transformer_blocks):
            modules[f"single.{i}.attn"] = block.attn
        return modules

    @staticmethod
    def attention_name(model: FluxTransformer2DModel, block: int) -> str:
        return f"{block}.attn"  # a double-stream block: joint attention as SD3's

    @staticmethod
    def grid(model: FluxTransformer2DModel, inputs: dict[str, Any]) -> tuple[int, int]:
        """``(h, w)`` from ``img_ids`` (``[0, row, col]`` per packed token, row-major), read on
        the host; anything else (e.g. reference-image tokens appended) is an error."""
        ids = _ids(inputs["img_ids"]).detach()
        n = inputs["hidden_states"].shape[1]
        if ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] < 3 or n == 0:
            raise ValueError(
                f"img_ids: expected ({n}, 3) position ids of the {n} image tokens, "
                f"got {tuple(ids.shape)}"
            )
        rows, cols = ids[:, 1].to("cpu", torch.float64), ids[:, 2].to("cpu", torch.float64)
        h, w = int(rows.max().item()) + 1, int(cols.max().item()) + 1
        token = torch.arange(n, dtype=torch.float64)
        raster = h * w == n and torch.equal(rows, token.div(w, rounding_mode="floor"))
        if not raster or not torch.equal(cols, token.remainder(w)):
            raise ValueError(
                "img_ids: CAT pruning needs one row-major token grid (ids [_, row, col] with "
                f"rows 0..h-1 and columns 0..w-1 in order) for its {n} image tokens"
            )
        return h, w

    @staticmethod
    def grid_key(inputs: dict[str, Any]) -> Any:
        return (tensor_key(inputs["img_ids"]), inputs["hidden_states"].shape[1])

    @classmethod
    def n_tokens(cls, model: FluxTransformer2DModel, inputs: dict[str, Any]) -> int:
        return inputs["hidden_states"].shape[1]

    @classmethod
    def output(
        cls, model: FluxTransformer2DModel, tokens: Tensor, inputs: dict[str, Any]
    ) -> Tensor:
        return tokens.clone()  # packed latents: FLUX's output is its tokens

    @staticmethod
    def text_lengths(model: FluxTransformer2DModel, inputs: dict[str, Any]) -> tuple[int, int]:
        n_text = inputs["encoder_hidden_states"].shape[1]
        return n_text, n_text

    @staticmethod
    def text_key(inputs: dict[str, Any]) -> tuple[Any, ...]:
        names = ("encoder_hidden_states", "pooled_projections", "guidance", "txt_ids", "img_ids")
        return tuple(tensor_key(inputs.get(name)) for name in names)

    @staticmethod
    def text_tokens(config: Any, max_sequence_length: int | None) -> int:
        return max_sequence_length or T5_TOKENS

    @staticmethod
    def example_inputs(
        model: FluxTransformer2DModel, rows: int, latent: tuple[int, int], text_tokens: int
    ) -> dict[str, Any]:
        config, dtype = model.config, model.dtype
        n = (latent[0] // 2) * (latent[1] // 2)  # 2 x 2 latent patches packed per token
        inputs = {
            "hidden_states": torch.zeros(rows, n, config.in_channels, dtype=dtype),
            "timestep": torch.zeros(rows),
            "encoder_hidden_states": torch.zeros(
                rows, text_tokens, config.joint_attention_dim, dtype=dtype
            ),
            "pooled_projections": torch.zeros(rows, config.pooled_projection_dim, dtype=dtype),
            "img_ids": torch.zeros(n, 3),
            "txt_ids": torch.zeros(text_tokens, 3),
        }
        if config.guidance_embeds:
            inputs["guidance"] = torch.zeros(rows)
        return inputs

    @staticmethod
    def prepare_text(
        model: FluxTransformer2DModel, buffers: Buffers, inputs: dict[str, Any]
    ) -> None:
        embed = model.time_text_embed
        pooled: Tensor = inputs["pooled_projections"]
        guidance: Tensor | None = inputs.get("guidance")
        if hasattr(embed, "guidance_embedder") != (guidance is not None):
            raise ValueError(
                "guidance: "
                + (
                    "this FLUX transformer embeds guidance (guidance_embeds): pass `guidance`"
                    if guidance is None
                    else "this FLUX transformer has no guidance embedding: pass guidance=None"
                )
            )
        context = model.context_embedder(inputs["encoder_hidden_states"])
        rows = buffers.key.rows  # one prompt row for every image row broadcasts, as in diffusers
        context = context.expand(rows, -1, -1).contiguous() if len(context) != rows else context
        buffers.keep_text("context", context)
        buffers.keep_text("pooled", embed.text_embedder(pooled))
        if guidance is not None:  # as the forward: scaled like the timestep, in its dtype
            projected = embed.time_proj(guidance.to(buffers.key.dtype) * 1000)
            buffers.keep_text("guidance", embed.guidance_embedder(projected.to(pooled.dtype)))
        else:
            buffers.text.pop("guidance", None)
        ids = torch.cat((_ids(inputs["txt_ids"]), _ids(inputs["img_ids"])), dim=0)
        cos, sin = model.pos_embed(ids)  # (T + N, head dim), text rows first
        buffers.keep_text("rope_cos", cos)
        buffers.keep_text("rope_sin", sin)

    @staticmethod
    def step(model: FluxTransformer2DModel, ctx: StepContext, inputs: dict[str, Any]) -> Tensor:
        text = ctx.buffers.text
        embed = model.time_text_embed
        tokens = model.x_embedder(inputs["hidden_states"])
        timestep = inputs["timestep"].to(tokens.dtype) * 1000
        projected = embed.time_proj(timestep).to(dtype=inputs["pooled_projections"].dtype)
        temb = embed.timestep_embedder(projected)
        if "guidance" in text:
            temb = temb + text["guidance"]
        temb = temb + text["pooled"]
        silu_temb = F.silu(temb)  # every AdaLN of every block starts with it
        rope = Rope(ctx)
        tokens = ctx.enter(tokens)
        context = text["context"]
        for i, block in enumerate(model.transformer_blocks):
            tokens, context = _double_block(block, i, ctx, tokens, context, silu_temb, rope)
        for i, block in enumerate(model.single_transformer_blocks):
            tokens, context = _single_block(block, i, ctx, tokens, context, silu_temb, rope)
        return ctx.finish(lambda x: model.proj_out(model.norm_out(x, temb)), tokens)


def _ids(ids: Tensor) -> Tensor:
    """Position ids ``(L, 3)``; diffusers still takes (and drops) a leading batch dimension."""
    return ids[0] if ids.dim() == 3 else ids


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """diffusers' ``apply_rotary_emb`` (real form, interleaved pairs) of ``x`` ``(R, S, H, Dh)``
    with ``cos`` / ``sin`` broadcast over rows and heads: ``(S, 1, Dh)`` or ``(R, S, 1, Dh)``."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Rope:
    """The rotary tables of one step: text rows, and the image rows in the stream (all tokens
    at a full step, each row's computed tokens, gathered, at a pruned step)."""

    def __init__(self, ctx: StepContext):
        key, text = ctx.buffers.key, ctx.buffers.text
        cos, sin = text["rope_cos"], text["rope_sin"]
        t = key.n_joint
        self.rows = ctx.rows
        self.text_table = (cos[:t, None], sin[:t, None])
        image_cos, image_sin = cos[t:], sin[t:]
        if ctx.pruned:  # (R, K, 1, Dh): each row's computed tokens (CFG halves share a set)
            index = ctx.indices.index
            groups = ctx.rows // key.batch
            positions = index.expand(groups, *index.shape).reshape(-1)
            shape = (ctx.rows, index.shape[1], 1, cos.shape[-1])
            image_cos = image_cos.index_select(0, positions).view(shape)
            image_sin = image_sin.index_select(0, positions).view(shape)
        else:
            image_cos, image_sin = image_cos[:, None], image_sin[:, None]
        self.image_table = (image_cos, image_sin)

    def image(self, x: Tensor, norm: torch.nn.Module, heads: int) -> Tensor:
        """Image queries or keys ``(R * S, D)``: per-head RMSNorm, then their rotation."""
        return rotate(norm(heads_view(x, self.rows, heads)), *self.image_table).view(x.shape)

    def text(self, x: Tensor, norm: torch.nn.Module, heads: int) -> Tensor:
        """Text queries or keys ``(R * T, D)``: per-head RMSNorm, then their rotation."""
        return rotate(norm(heads_view(x, self.rows, heads)), *self.text_table).view(x.shape)


def _joint_attention(
    ctx: StepContext,
    name: str,
    attn: torch.nn.Module,
    rope: Rope,
    h: Tensor,
    hc: Tensor,
    added: bool,
) -> tuple[Tensor, Tensor]:
    """Attention of image rows ``h`` and text ``hc`` (both ``(R * S, D)``) over the block's cache
    (image keys of all tokens, then this step's text keys). ``added``: the text has its own
    projections and norms (double-stream), else the image ones (single-stream)."""
    n_text = hc.shape[0] // ctx.rows
    cache: KVCache = ctx.buffers.kv_cache(name, attn, ctx.n_tokens, n_text)
    heads = attn.heads
    q, k, v = project_qkv(attn, h)
    q, k = rope.image(q, attn.norm_q, heads), rope.image(k, attn.norm_k, heads)
    ctx.write_image_kv(cache, k, v)
    if added:
        tq, tk, tv = project_added_qkv(attn, hc)
        tq, tk = rope.text(tq, attn.norm_added_q, heads), rope.text(tk, attn.norm_added_k, heads)
    else:
        tq, tk, tv = project_qkv(attn, hc)
        tq, tk = rope.text(tq, attn.norm_q, heads), rope.text(tk, attn.norm_k, heads)
    cache.text_key.copy_(tk.view(cache.text_key.shape))
    cache.text_value.copy_(tv.view(cache.text_value.shape))
    return ctx.attend_joint(name, attn, q, tq, cache)


def _clip16(x: Tensor) -> Tensor:
    return x.clip(-FP16_MAX, FP16_MAX) if x.dtype == torch.float16 else x


def _double_block(
    block: torch.nn.Module,
    i: int,
    ctx: StepContext,
    x: Tensor,
    c: Tensor,
    silu_temb: Tensor,
    rope: Rope,
) -> tuple[Tensor, Tensor]:
    """One ``FluxTransformerBlock``: image rows ``x`` ``(R, S, D)``, text ``c`` ``(R, T, D)``."""
    d = x.shape[-1]
    attn = block.attn
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(
        block.norm1, silu_temb, 6
    )
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = modulation(
        block.norm1_context, silu_temb, 6
    )
    h = modulate(block.norm1.norm(x), shift_msa, scale_msa).view(-1, d)
    hc = modulate(block.norm1_context.norm(c), c_shift_msa, c_scale_msa).view(-1, d)
    name = f"{i}.attn"
    out, text_out = _joint_attention(ctx, name, attn, rope, h, hc, added=True)
    x = ctx.residual(name, x, attn.to_out[0](out), gate_msa)
    h = modulate(block.norm2(x), shift_mlp, scale_mlp)
    x = ctx.residual(f"{i}.ff", x, block.ff(h.view(-1, d)), gate_mlp)

    c = c + c_gate_msa * attn.to_add_out(text_out).view(c.shape)
    hc = modulate(block.norm2_context(c), c_shift_mlp, c_scale_mlp)
    c = c + c_gate_mlp * block.ff_context(hc.view(-1, d)).view(c.shape)
    return x, _clip16(c)


def _single_block(
    block: torch.nn.Module,
    i: int,
    ctx: StepContext,
    x: Tensor,
    c: Tensor,
    silu_temb: Tensor,
    rope: Rope,
) -> tuple[Tensor, Tensor]:
    """One ``FluxSingleTransformerBlock`` on image rows ``x`` and text ``c``: one modulation,
    attention and MLP in parallel, one output projection of both."""
    d = x.shape[-1]
    shift, scale, gate = modulation(block.norm, silu_temb, 3)
    h = modulate(block.norm.norm(x), shift, scale).view(-1, d)
    hc = modulate(block.norm.norm(c), shift, scale).view(-1, d)
    name = f"single.{i}.attn"
    out, text_out = _joint_attention(ctx, name, block.attn, rope, h, hc, added=False)
    mlp = block.act_mlp(block.proj_mlp(h))
    x = ctx.residual(name, x, block.proj_out(torch.cat([out, mlp], dim=1)), gate)
    mlp = block.act_mlp(block.proj_mlp(hc))
    c = c + gate * block.proj_out(torch.cat([text_out, mlp], dim=1)).view(c.shape)
    if ctx.shadow is not None and ctx.shadow.dtype == torch.float16:
        ctx.shadow.clamp_(-FP16_MAX, FP16_MAX)
    return _clip16(x), _clip16(c)
