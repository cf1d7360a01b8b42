"""The engine: which family a transformer belongs to, its persistent buffers, one CAT step.

A family is one module (:mod:`.sd3`, :mod:`.pixart`) with a :class:`~.core.Family` subclass;
adding a model family means adding it to :data:`FAMILIES`. :class:`Engine` turns a diffusers
forward call into a step: buffers for the call's shape (kept across generations), the
per-generation text work when the prompt embeddings change, the family's blocks, then the
merge of the computed rows into the previous output (output reuse) and the unpatchify.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import Tensor

from .core import (
    BufferKey,
    Buffers,
    CATProcessor,
    Family,
    IndexSet,
    StepContext,
    check_attention_module,
)
from .pixart import PixArt
from .sd3 import SD3

FAMILIES: tuple[type[Family], ...] = (SD3, PixArt)
SUPPORTED = "SD3Transformer2DModel (SD3, SD3.5) or PixArtTransformer2DModel"


def family_of(model: torch.nn.Module) -> type[Family]:
    """The :class:`Family` of ``model``; TypeError for an unsupported model."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    raise TypeError(f"CAT pruning supports {SUPPORTED}, not {type(model).__name__}")


def cat_processors(model: torch.nn.Module) -> dict[Attention, CATProcessor]:
    """A CAT processor for every attention module the step runs (each checked)."""
    modules = family_of(model).attention_modules(model)
    for attn in modules.values():
        check_attention_module(attn)
    return {attn: CATProcessor(name) for name, attn in modules.items()}


def attention_module_name(model: torch.nn.Module, block: int) -> str:
    """Name of the image self-attention of ``block`` (-1: the middle block)."""
    n_blocks = len(model.transformer_blocks)
    if block < 0:
        block = n_blocks // 2
    if block >= n_blocks:
        raise ValueError(f"attention_block {block} >= number of blocks {n_blocks}")
    return family_of(model).attention_name(model, block)


def _compute_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    """The dtype projections produce: autocast's when it is on, else the model's."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.dtype


@dataclass
class StepResult:
    output: Tensor  # the transformer's output latents (R, C_out, H, W)
    scores: Tensor  # output tokens to score (R, N, p*p*C_out): raw (full-length) or merged
    attention: Tensor | None  # recorded probabilities (at-edm), else None


class Engine:
    """Runs CAT steps of one transformer.

    Args:
        model: the transformer.
        stream: ``"full"`` or ``"krow"`` (see :class:`~.config.CATConfig`).
    """

    def __init__(self, model: torch.nn.Module, stream: str = "full"):
        self.family = family_of(model)
        self.stream = stream
        self.buffers: Buffers | None = None
        self._text_key: tuple[Any, ...] | None = None

    def new_generation(self) -> None:
        """The next step starts a generation: recompute the per-generation text work."""
        self._text_key = None

    def prepare(self, model: torch.nn.Module, inputs: dict[str, Any], batch: int) -> Buffers:
        """Check ``inputs``; the buffers for their shape (text work done if the prompt
        embeddings changed)."""
        family = self.family
        for name in family.unsupported:
            value = inputs.get(name)
            if value is not None and not (isinstance(value, (dict, list, tuple)) and not value):
                raise NotImplementedError(f"CAT pruning does not support `{name}`")
        hidden: Tensor = inputs["hidden_states"]
        h, w = family.grid(model, inputs)
        n_joint, n_text = family.text_lengths(model, inputs)
        key = BufferKey(
            rows=hidden.shape[0],
            batch=batch,
            n_tokens=h * w,
            n_joint=n_joint,
            n_text=n_text,
            out_dim=family.output_dim(model),
            dtype=_compute_dtype(model, hidden.device),
            device=hidden.device,
        )
        if self.buffers is None or self.buffers.key != key:
            self.buffers = None  # free the old buffers before allocating new ones
            self.buffers = Buffers(key)
            self._text_key = None
        text_key = family.text_key(inputs)
        if text_key != self._text_key:
            family.prepare_text(model, self.buffers, inputs)
            self._text_key = text_key
        return self.buffers

    def step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        buffers: Buffers,
        indices: IndexSet | None,
        *,
        fill: bool = False,
        record: str | None = None,
    ) -> StepResult:
        """One step: full (``indices=None``) or computing ``indices`` (``update`` is run here);
        ``fill``: keep the branch outputs for the next (pruned) step."""
        if indices is not None:
            indices.update()
        ctx = StepContext(
            buffers, indices, full_length=self.stream == "full", fill=fill, record=record
        )
        tokens = self.family.step(model, ctx, inputs)
        merged = buffers.merged
        if indices is None:
            merged.copy_(tokens)
            scores = merged
        else:
            rows = indices.rows_index
            flat = tokens.view(-1, tokens.shape[-1])
            if ctx.full_length:  # raw output of every token: score it, merge the computed rows
                buffers.merged_flat.index_copy_(0, rows, flat.index_select(0, rows))
                scores = tokens
            else:
                buffers.merged_flat.index_copy_(0, rows, flat)
                scores = merged
        output = self.family.output(model, merged, self.family.grid(model, inputs))
        return StepResult(output, scores, ctx.attention)
