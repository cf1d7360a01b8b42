"""Attention processors of the pruned step: image Q/K/V for the computed rows only, K/V caches.

At a pruned step the image stream carries only the ``K`` computed rows of every batch row
(the "K-row stream"). Each processor computes image queries, keys and values for those rows,
writes keys and values into a per-module cache holding all ``N`` image tokens (filled in full at
full steps) and attends with the computed rows (plus SD3's text tokens) as queries over all image
tokens (fresh + cached, plus text) as keys and values. Layouts and op order follow diffusers'
``JointAttnProcessor2_0`` / ``AttnProcessor2_0`` so a full step is the unpatched computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor


class PruneContext:
    """What the processors of one transformer share during a step.

    Attributes:
        idx_flat: ``(R * K,)`` rows of the flattened ``(R * N)`` image tokens computed this step,
            or ``None`` at a full step (all tokens, in order).
        n_tokens: ``N``, image tokens per row.
        caches: module name -> ``(keys, values)``, each ``(R, N, D)``, all image tokens.
        text_kv: module name -> ``(keys, values)`` of PixArt's cross-attention (text only; they
            do not change between the steps of one generation).
        attention_module: name of the module whose attention probabilities to record, or None.
        attention: recorded probabilities ``(R, Sq, N)``: image query rows over image keys,
            averaged over heads.
    """

    def __init__(self) -> None:
        self.idx_flat: Tensor | None = None
        self.n_tokens = 0
        self.caches: dict[str, tuple[Tensor, Tensor]] = {}
        self.text_kv: dict[str, tuple[Tensor, Tensor]] = {}
        self.attention_module: str | None = None
        self.attention: Tensor | None = None

    def begin(self, idx_rows: Tensor | None, n_tokens: int) -> None:
        """Set this step's index set: ``idx_rows`` is ``(R, K)`` token indices, or None (full)."""
        self.n_tokens = n_tokens
        self.attention = None
        if idx_rows is None:
            self.idx_flat = None
            return
        offsets = torch.arange(idx_rows.shape[0], device=idx_rows.device) * n_tokens
        self.idx_flat = (idx_rows + offsets[:, None]).reshape(-1)

    def clear(self) -> None:
        """Drop all caches (a new generation)."""
        self.idx_flat = None
        self.caches = {}
        self.text_kv = {}
        self.attention_module = None
        self.attention = None


def gather_tokens(x: Tensor, idx_flat: Tensor) -> Tensor:
    """Rows ``idx_flat`` of ``x`` ``(R, N, D)`` flattened, as ``(R, K, D)``."""
    r, n, d = x.shape
    return x.reshape(r * n, d).index_select(0, idx_flat).view(r, -1, d)


def scatter_tokens(base: Tensor, idx_flat: Tensor, rows: Tensor) -> Tensor:
    """A copy of ``base`` ``(R, N, D)`` with the rows ``idx_flat`` replaced by ``rows``."""
    r, n, d = base.shape
    return base.reshape(r * n, d).index_copy(0, idx_flat, rows.reshape(-1, d)).view(r, n, d)


def _scatter_tokens_(base: Tensor, idx_flat: Tensor, rows: Tensor) -> None:
    r, n, d = base.shape
    base.view(r * n, d).index_copy_(0, idx_flat, rows.reshape(-1, d))


def _heads(x: Tensor, heads: int) -> Tensor:
    """``(R, S, D)`` -> ``(R, heads, S, D / heads)`` (a view, like diffusers)."""
    r, s, d = x.shape
    return x.view(r, s, heads, d // heads).transpose(1, 2)


def _image_qkv(
    attn: Attention, ctx: PruneContext, name: str, hidden_states: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Image queries of the computed rows and keys/values of all image tokens, in head layout."""
    query = _heads(attn.to_q(hidden_states), attn.heads)
    key = _heads(attn.to_k(hidden_states), attn.heads)
    value = attn.to_v(hidden_states)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    r, s, d = value.shape
    key = key.transpose(1, 2).reshape(r, s, d)
    if ctx.idx_flat is None:
        ctx.caches[name] = (key, value)
    else:
        if name not in ctx.caches:  # a pruned step without history (MAC counting only)
            empty = value.new_zeros(r, ctx.n_tokens, d)
            ctx.caches[name] = (empty, empty.clone())
        cached_key, cached_value = ctx.caches[name]
        _scatter_tokens_(cached_key, ctx.idx_flat, key)
        _scatter_tokens_(cached_value, ctx.idx_flat, value)
        key, value = cached_key, cached_value
    return query, _heads(key, attn.heads), _heads(value, attn.heads)


def _attend(
    ctx: PruneContext,
    name: str,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    n_image_queries: int,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Scaled dot-product attention ``(R, H, Sq, hd)`` -> ``(R, Sq, H * hd)``.

    In the module named by ``ctx.attention_module`` the probabilities are formed explicitly and
    the image-query / image-key part, averaged over heads, is kept in ``ctx.attention``.
    """
    if ctx.attention_module == name:
        scores = (query @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.float().softmax(dim=-1)
        ctx.attention = probs[:, :, :n_image_queries, : ctx.n_tokens].mean(dim=1)
        out = probs.to(value.dtype) @ value
    else:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
    r, h, s, hd = out.shape
    return out.transpose(1, 2).reshape(r, s, h * hd).to(query.dtype)


class CATJointAttnProcessor:
    """SD3 joint attention: image rows from the K-row stream, text stream in full."""

    def __init__(self, ctx: PruneContext, name: str):
        self.ctx = ctx
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if attention_mask is not None:
            raise NotImplementedError("CAT pruning does not support an SD3 attention mask")
        n_rows = hidden_states.shape[1]
        query, key, value = _image_qkv(attn, self.ctx, self.name, hidden_states)
        if encoder_hidden_states is not None:
            text_query = _heads(attn.add_q_proj(encoder_hidden_states), attn.heads)
            text_key = _heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
            text_value = _heads(attn.add_v_proj(encoder_hidden_states), attn.heads)
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)

        out = _attend(self.ctx, self.name, query, key, value, n_rows)
        if encoder_hidden_states is not None:
            out, text_out = out[:, :n_rows], out[:, n_rows:]
            if not attn.context_pre_only:
                text_out = attn.to_add_out(text_out)
        out = attn.to_out[1](attn.to_out[0](out))
        if encoder_hidden_states is not None:
            return out, text_out
        return out


class CATSelfAttnProcessor:
    """Image-only self-attention (PixArt ``attn1``, SD3.5 ``attn2``) over cached image K/V."""

    def __init__(self, ctx: PruneContext, name: str):
        self.ctx = ctx
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("CAT self-attention takes no context and no mask")
        query, key, value = _image_qkv(attn, self.ctx, self.name, hidden_states)
        out = _attend(self.ctx, self.name, query, key, value, hidden_states.shape[1])
        return attn.to_out[1](attn.to_out[0](out))


class CATCrossAttnProcessor:
    """PixArt cross-attention: queries for the computed rows, text K/V once per generation."""

    def __init__(self, ctx: PruneContext, name: str):
        self.ctx = ctx
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        if encoder_hidden_states is None:
            raise NotImplementedError("CAT cross-attention needs encoder_hidden_states")
        batch, text_len = encoder_hidden_states.shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, text_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query = _heads(attn.to_q(hidden_states), attn.heads)
        if self.name not in self.ctx.text_kv:
            context = encoder_hidden_states
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            self.ctx.text_kv[self.name] = (attn.to_k(context), attn.to_v(context))
        key, value = self.ctx.text_kv[self.name]
        key, value = _heads(key, attn.heads), _heads(value, attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        r, h, s, hd = out.shape
        out = out.transpose(1, 2).reshape(r, s, h * hd).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def check_attention_module(attn: Attention) -> None:
    """Raise if ``attn`` uses a feature the CAT processors do not reproduce."""
    unsupported = {
        "spatial_norm": attn.spatial_norm is not None,
        "group_norm": attn.group_norm is not None,
        "residual_connection": bool(attn.residual_connection),
        "rescale_output_factor": attn.rescale_output_factor != 1.0,
        "fused projections": bool(getattr(attn, "fused_projections", False)),
    }
    bad = [name for name, present in unsupported.items() if present]
    if bad:
        raise NotImplementedError(f"CAT pruning does not support attention with {', '.join(bad)}")
