"""Counting path: one stateless CAT step with a given index set, and its MACs.

Both work on the ``meta`` device, so real model sizes (SD3-medium, PixArt-Sigma, FLUX.1-dev)
are counted without weights: ``with torch.device("meta"): model = SD3Transformer2DModel(**config)``.
A pruned step here starts from zero caches and a zero previous output (only its cost matters).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .config import CATConfig
from .engine import Engine, cat_processors

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
def _cat_processors(model: torch.nn.Module) -> Iterator[None]:
    """CAT processors installed for the duration; the previous processors come back."""
    processors = cat_processors(model)
    previous = {attn: attn.processor for attn in processors}
    try:
        for attn, processor in processors.items():
            attn.set_processor(processor)
        yield
    finally:
        for attn, processor in previous.items():
            attn.set_processor(processor)


class _Step:
    """One stateless step, set up: ``run()`` does what a step of a generation does (the
    per-generation text work too, unless ``text_kv_cached``, when it is done in advance)."""

    @torch.no_grad()
    def __init__(
        self,
        transformer: torch.nn.Module,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor | None = None,
        idx: Tensor | None = None,
        *,
        text_kv_cached: bool = False,
        stream: str = CATConfig.stream,
        **inputs: Any,
    ):
        rows = hidden_states.shape[0]
        if idx is not None:
            idx = idx.to(device=hidden_states.device, dtype=torch.long)
            idx = idx.expand(rows, -1) if idx.dim() == 1 else idx
        self.transformer, self.idx, self.rows = transformer, idx, rows
        self.inputs: dict[str, Any] = {
            "hidden_states": hidden_states,
            "timestep": timestep,
            "encoder_hidden_states": encoder_hidden_states,
            "pooled_projections": pooled_projections,
            **inputs,
        }
        self.engine = Engine(transformer, stream)
        if text_kv_cached:
            self.engine.prepare(transformer, self.inputs, rows)

    @torch.no_grad()
    def run(self) -> Tensor:
        with _cat_processors(self.transformer):
            buffers = self.engine.prepare(self.transformer, self.inputs, self.rows)
            indices = None
            if self.idx is not None:
                indices = buffers.index_set(self.idx.shape[1])
                indices.index.copy_(self.idx)
            return self.engine.step(self.transformer, self.inputs, buffers, indices).output


def pruned_forward(
    transformer: torch.nn.Module,
    hidden_states: Tensor,
    timestep: Tensor,
    encoder_hidden_states: Tensor,
    pooled_projections: Tensor | None = None,
    idx: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """One step with fresh caches: full (``idx=None``) or computing tokens ``idx``.

    ``idx`` is ``(K,)`` (the same tokens in every batch row) or ``(R, K)``. Returns the output
    latents ``(R, C_out, H, W)`` (FLUX: packed ``(R, N, C_out)``); at a pruned step the other
    tokens are zero. Keywords: the family's other forward inputs (PixArt's
    ``encoder_attention_mask`` / ``added_cond_kwargs``, FLUX's ``guidance`` / ``img_ids`` /
    ``txt_ids``); ``text_kv_cached``: the
    per-generation text work (SD3's context embedding and pooled projection, PixArt's caption
    projection and cross-attention text keys/values) is done beforehand, as at every step
    after the first of a generation in the engine; ``stream``: the stream of a pruned step
    (``full`` runs the final norm and projection for all tokens).
    """
    args = (hidden_states, timestep, encoder_hidden_states, pooled_projections, idx)
    return _Step(transformer, *args, **kwargs).run()


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
    step = _Step(
        transformer,
        hidden_states,
        timestep,
        encoder_hidden_states,
        pooled_projections,
        idx,
        **kwargs,
    )
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step.run()
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
