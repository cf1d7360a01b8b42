"""Counting path: one stateless CAT step with a given index set, and its MACs.

Both work on the ``meta`` device, so real model sizes (SD3-medium, PixArt-Sigma) are counted
without weights: ``with torch.device("meta"): model = SD3Transformer2DModel(**config)``.
A pruned step here starts from zero caches and a zero previous output (only its cost matters).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .forward import cat_processors, run_step
from .processors import CATCrossAttnProcessor, PruneContext

_aten = torch.ops.aten
LINEAR_OPS = {_aten.mm, _aten.addmm}
CONV_OPS = {
    _aten.convolution,
    _aten._convolution,
    _aten.convolution_overrideable,
    _aten.cudnn_convolution,
    _aten._slow_conv2d_forward,
}
ATTENTION_OPS = {
    _aten.bmm,
    _aten.baddbmm,
    _aten._scaled_dot_product_flash_attention,
    _aten._scaled_dot_product_efficient_attention,
    _aten._scaled_dot_product_cudnn_attention,
    _aten._flash_attention_forward,
    _aten._efficient_attention_forward,
}


@contextmanager
def _fresh_processors(model: torch.nn.Module, ctx: PruneContext) -> Iterator[dict[Attention, Any]]:
    """CAT processors bound to ``ctx`` for the duration; the previous processors come back."""
    processors = cat_processors(model, ctx)
    previous = {attn: attn.processor for attn in processors}
    try:
        for attn, processor in processors.items():
            attn.set_processor(processor)
        yield processors
    finally:
        for attn, processor in previous.items():
            attn.set_processor(processor)


@torch.no_grad()
def pruned_forward(
    transformer: torch.nn.Module,
    hidden_states: Tensor,
    timestep: Tensor,
    encoder_hidden_states: Tensor,
    pooled_projections: Tensor | None = None,
    idx: Tensor | None = None,
    *,
    encoder_attention_mask: Tensor | None = None,
    added_cond_kwargs: dict[str, Tensor] | None = None,
    text_kv_cached: bool = False,
) -> Tensor:
    """One step with fresh caches: full (``idx=None``) or computing tokens ``idx``.

    ``idx`` is ``(K,)`` (the same tokens in every batch row) or ``(R, K)``. Returns the output
    latents ``(R, C_out, H, W)``; at a pruned step the other tokens are zero.
    ``text_kv_cached``: PixArt's cross-attention text keys/values count as already computed, as
    at every step after the first of a generation in the engine (no effect on SD3, whose text
    stream runs in full).
    """
    rows = hidden_states.shape[0]
    if idx is not None:
        idx = idx.to(device=hidden_states.device, dtype=torch.long)
        idx = idx.expand(rows, -1) if idx.dim() == 1 else idx
    inputs: dict[str, Any] = {
        "hidden_states": hidden_states,
        "timestep": timestep,
        "encoder_hidden_states": encoder_hidden_states,
        "pooled_projections": pooled_projections,
        "encoder_attention_mask": encoder_attention_mask,
        "added_cond_kwargs": added_cond_kwargs,
    }
    ctx = PruneContext()
    with _fresh_processors(transformer, ctx) as processors:
        if text_kv_cached:
            for attn, processor in processors.items():
                if isinstance(processor, CATCrossAttnProcessor):
                    shape = (rows, encoder_hidden_states.shape[1], attn.to_k.out_features)
                    empty = hidden_states.new_zeros(shape)
                    ctx.text_kv[processor.name] = (empty, empty)
        output, _ = run_step(transformer, ctx, inputs, idx, None)
    return output


def count_step_macs(
    transformer: torch.nn.Module,
    hidden_states: Tensor,
    timestep: Tensor,
    encoder_hidden_states: Tensor,
    pooled_projections: Tensor | None = None,
    idx: Tensor | None = None,
    **kwargs: Any,
) -> dict[str, int]:
    """MACs (FLOPs / 2, torch's FLOP counter) of one :func:`pruned_forward` step.

    Keys: ``linear`` (matrix products of linear layers), ``conv`` (patch embedding),
    ``attention`` (the QK^T and PV products), ``paper`` (= linear + conv, the paper's count)
    and ``total``. Attention runs on the math backend so its products are visible to the counter.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        pruned_forward(
            transformer,
            hidden_states,
            timestep,
            encoder_hidden_states,
            pooled_projections,
            idx,
            **kwargs,
        )
    flops = counter.get_flop_counts().get("Global", {})
    totals = {"linear": 0, "conv": 0, "attention": 0, "total": 0}
    for op, count in flops.items():
        kind = (
            "linear"
            if op in LINEAR_OPS
            else "conv"
            if op in CONV_OPS
            else "attention"
            if op in ATTENTION_OPS
            else None
        )
        if kind is not None:
            totals[kind] += count
        totals["total"] += count
    macs = {key: value // 2 for key, value in totals.items()}
    macs["paper"] = macs["linear"] + macs["conv"]
    return macs
