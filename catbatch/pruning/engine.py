"""The engine: which family a transformer belongs to, its persistent buffers, one CAT step.

A family is one module (:mod:`.sd3`, :mod:`.pixart`, :mod:`.flux`) with a :class:`~.core.Family`
subclass;
adding a model family means adding it to :data:`FAMILIES`. :class:`Engine` turns a diffusers
forward call into a step: buffers for the call's shape (kept across generations), the
per-generation text work when the prompt embeddings change, the family's blocks, then the
merge of the computed rows into the previous output (output reuse) and the unpatchify.
"""

from __future__ import annotations

import warnings
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
from .flux import Flux
from .graphs import StepGraphs, wants_graphs
from .pixart import PixArt
from .sd3 import SD3

FAMILIES: tuple[type[Family], ...] = (SD3, PixArt, Flux)
SUPPORTED = (
    "SD3Transformer2DModel (SD3, SD3.5), PixArtTransformer2DModel or FluxTransformer2DModel "
    "(FLUX.1)"
)


def family_of(model: torch.nn.Module) -> type[Family]:
    """The :class:`Family` of ``model``; TypeError for an unsupported model."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    raise TypeError(f"CAT pruning supports {SUPPORTED}, not {type(model).__name__}")


def family_named(class_name: str) -> type[Family]:
    """The :class:`Family` of a transformer class name (a ``config.json``'s ``_class_name``)."""
    for family in FAMILIES:
        if family.model_class.__name__ == class_name:
            return family
    raise TypeError(f"CAT pruning supports {SUPPORTED}, not {class_name}")


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


def _unsupported(name: str, value: Any, lora: bool) -> str:
    if isinstance(value, dict) and "ip_adapter_image_embeds" in value:
        return (
            f"CAT pruning does not support IP-Adapter (`{name}['ip_adapter_image_embeds']`): "
            "remove_cat() to generate with an IP-Adapter"
        )
    if isinstance(value, dict):
        keys = ", ".join(sorted(map(str, value)))
        only = " (only the LoRA `scale`)" if lora else ""
        return f"CAT pruning does not support `{name}` keys: {keys}{only}"
    return f"CAT pruning does not support `{name}`"


def _weights_signature(model: torch.nn.Module) -> tuple[Any, ...]:
    """Where the weights are (first and last parameter), to notice moved weights cheaply."""
    params = list(model.parameters())
    if not params:
        return ()
    ends = (params[0], params[-1])
    return tuple((p.device, p.dtype, p.data_ptr() if p.device.type != "meta" else 0) for p in ends)


def offloaded(model: torch.nn.Module) -> bool:
    """Whether accelerate's CPU offload hooks are on ``model`` or its modules (weights that
    move between calls: no CUDA graphs)."""
    return any(hasattr(module, "_hf_hook") for module in model.modules())


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
        cuda_graphs: ``"auto"``, ``"on"`` or ``"off"`` (see :mod:`.graphs`).

    Attributes:
        buffers: the :class:`~.core.Buffers` of the last call's shape.
        graphs: the :class:`~.graphs.StepGraphs` (captures, replays, ``error``), or None.
    """

    def __init__(self, model: torch.nn.Module, stream: str = "full", cuda_graphs: str = "off"):
        self.family = family_of(model)
        self.stream = stream
        self.cuda_graphs = cuda_graphs
        self.buffers: Buffers | None = None
        self.graphs: StepGraphs | None = None
        self._text_key: tuple[Any, ...] | None = None
        self._grid: tuple[Any, tuple[int, int]] | None = None  # (grid_key, grid)
        self._weights: tuple[Any, ...] | None = None
        self._new_generation = True
        self._offloaded = False
        self._warned = False

    def new_generation(self) -> None:
        """The next step starts a generation: recompute the per-generation text work."""
        self._text_key = None
        self._grid = None
        self._new_generation = True

    def grid(self, model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[int, int]:
        """The ``(h, w)`` token grid of this call, asked of the family once per generation and
        :meth:`~.core.Family.grid_key` (FLUX reads it from ``img_ids``, on the host)."""
        key = self.family.grid_key(inputs)
        if self._grid is None or self._grid[0] != key:
            self._grid = (key, self.family.grid(model, inputs))
        return self._grid[1]

    def graphs_for(self, buffers: Buffers) -> StepGraphs | None:
        """The graphs to run steps of ``buffers``' shape through, or None (eager)."""
        graphs = self.graphs
        if graphs is not None and graphs.emulate:
            return graphs if graphs.enabled else None
        key = buffers.key
        tokens = key.rows * (key.n_tokens + key.n_joint)
        if self._offloaded or not wants_graphs(self.cuda_graphs, key.device, tokens):
            if self.cuda_graphs == "on" and not self._warned:
                self._warned = True
                why = (
                    "does not combine with CPU offload (the weights move between calls)"
                    if self._offloaded
                    else "needs a CUDA device"
                )
                warnings.warn(f"CAT: cuda_graphs='on' {why}; running eagerly", stacklevel=3)
            return None
        if graphs is None or graphs.device != key.device:
            graphs = self.graphs = StepGraphs(key.device)
        return graphs if graphs.enabled else None

    def prepare(self, model: torch.nn.Module, inputs: dict[str, Any], batch: int) -> Buffers:
        """Check ``inputs``; the buffers for their shape (text work done if the prompt
        embeddings changed)."""
        family = self.family
        for name in family.unsupported:
            value = inputs.get(name)
            if value is not None and not (isinstance(value, (dict, list, tuple)) and not value):
                lora = name == family.attention_kwargs
                raise NotImplementedError(_unsupported(name, value, lora))
        hidden: Tensor = inputs["hidden_states"]
        n_joint, n_text = family.text_lengths(model, inputs)
        key = BufferKey(
            rows=hidden.shape[0],
            batch=batch,
            n_tokens=family.n_tokens(model, inputs),
            n_joint=n_joint,
            n_text=n_text,
            out_dim=family.output_dim(model),
            dtype=_compute_dtype(model, hidden.device),
            device=hidden.device,
        )
        if self._new_generation:
            self._new_generation = False
            self._offloaded = offloaded(model)
            weights = _weights_signature(model)
            if weights != self._weights:  # moved or reloaded weights: graphs are stale
                self._weights = weights
                self._drop_graphs()
        if self.buffers is None or self.buffers.key != key:
            self._drop_graphs()
            self.buffers = None  # free the old buffers before allocating new ones
            self.buffers = Buffers(key)
            self._text_key = None
        text_key = family.text_key(inputs)
        if text_key != self._text_key:
            family.prepare_text(model, self.buffers, inputs)
            self._text_key = text_key
        return self.buffers

    def _drop_graphs(self) -> None:
        graphs = self.graphs
        if graphs is None:
            return
        if graphs.emulate:
            graphs.graphs.clear()
            graphs.warm.clear()
            return
        torch.cuda.synchronize(graphs.device)  # nothing in flight still uses their memory
        self.graphs = None

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
        else:  # output reuse: the computed rows replace theirs in the previous output
            buffers.merged_flat.index_copy_(
                0, indices.rows_index, tokens.view(-1, tokens.shape[-1])
            )
            scores = merged if ctx.raw is None else ctx.raw
        output = self.family.output(model, merged, inputs)
        return StepResult(output, scores, ctx.attention)
