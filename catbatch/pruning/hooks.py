"""CAT pruning as a diffusers hook: state, the transformer hook, ``apply_cat`` / ``remove_cat``.

Shaped like diffusers' ``hooks/`` techniques: a config (:class:`CATConfig`), a state with
``reset()`` (:class:`CATState`), a stateful :class:`CATHook` whose ``new_forward`` replaces the
transformer forward with the CAT step of :mod:`catbatch.pruning.engine`, and one public
:func:`apply_cat`. The state owns the timeline and the selection; the engine owns the buffers.
The per-step path has no host synchronisation (except the timestep read that detects a new
generation on a bare transformer; see :class:`CATState`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import Tensor

from .config import CATConfig
from .core import IndexSet, noise_channels
from .engine import Engine, StepResult, attention_module_name, cat_processors, family_of
from .selection import Selector, make_selector

HOOK_NAME = "cat_pruning"

SelectorFactory = Callable[[CATConfig, tuple[int, int], int, torch.device], Selector]


class CATState(BaseState):
    """Everything CAT keeps between the steps of one generation; ``reset()`` starts a new one.

    Settings (kept across generations):
        config: the :class:`CATConfig`.
        cfg: whether the batch is ``[uncond..., cond...]`` (2B rows; sample ``b`` is rows ``b``
            and ``B + b``) or B conditional rows. A hooked pipeline sets it at every call.
        auto_reset: start a new generation when the timestep does not decrease from the
            previous call (bare transformers; reads the timestep on the host).
        force_indices: ``None`` (the selector decides), ``"all"`` (every token, in order, at
            every pruned step: ``K = N``) or a ``(B, K)`` int64 tensor used at every pruned step.
            A forced index set bypasses the selector.
        engine: the :class:`~catbatch.pruning.engine.Engine` (buffers kept across generations).

    Per generation:
        step: 0-based index of the next transformer call.
        reference: conditional output of step ``s + 1`` (what the selector compares against).
        full_steps, pruned_steps: how many steps of each kind the current (or, after it, the
            last) generation ran; zeroed by its first step, not by ``reset()``, because
            diffusers resets stateful hooks at the end of a call (FLUX's ``CacheMixin``).
    """

    def __init__(
        self,
        config: CATConfig,
        *,
        cfg: bool = True,
        auto_reset: bool = True,
        selector_factory: SelectorFactory | None = None,
    ):
        self.config = config
        self.cfg = cfg
        self.auto_reset = auto_reset
        self.force_indices: str | Tensor | None = None
        self.selector_factory = selector_factory or make_selector
        self.selector: Selector | None = None
        self.engine: Engine | None = None
        self.generations = 0
        self.full_steps = 0
        self.pruned_steps = 0
        self._selector_key: tuple[Any, ...] | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the current generation (indices, outputs, selector state); the buffers stay
        allocated and are rewritten by the next generation's full steps."""
        self.step = 0
        self.reference: Tensor | None = None
        self._has_index = False
        self._shape: tuple[int, int] | None = None
        self._last_timestep: float | None = None
        if self.engine is not None:
            self.engine.new_generation()
        if self.selector is not None:
            self.selector.reset()

    # -- one transformer call --------------------------------------------------------------
    def run(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Tensor:
        """Run step ``self.step`` on the bound forward ``inputs``; returns the output latents."""
        hidden_states: Tensor = inputs["hidden_states"]
        if self.auto_reset:
            self._reset_if_new_generation(inputs["timestep"])
        rows = hidden_states.shape[0]
        if self.cfg and rows % 2:
            raise ValueError(f"cfg=True needs an even number of batch rows, got {rows}")
        batch = rows // 2 if self.cfg else rows
        engine = self._engine(model)
        buffers = engine.prepare(model, inputs, batch)
        n_tokens = buffers.key.n_tokens
        if self._shape is not None and self._shape != (rows, n_tokens):
            raise RuntimeError("the input shape changed within a generation; call reset() first")
        self._shape = (rows, n_tokens)
        if self.step == 0:
            self.generations += 1
            self.full_steps = self.pruned_steps = 0

        i, config = self.step, self.config
        grid = engine.grid(model, inputs)
        indices = buffers.index_set(self._k(n_tokens))
        pruned = i >= config.first_pruned_step
        if pruned:
            self._load_forced(indices, batch, n_tokens)
        selector = None
        if self.force_indices is None and i >= config.reference_step:
            selector = self._selector(grid, batch, hidden_states.device)
        record = None
        if selector is not None and selector.needs_attention and i >= config.cluster_step:
            record = attention_module_name(model, config.attention_block)

        def full_step(view: dict[str, Any], fill: bool) -> StepResult:
            return engine.step(model, view, buffers, None, fill=fill, record=record)

        def pruned_step(view: dict[str, Any]) -> Tensor:
            result = engine.step(model, view, buffers, indices, record=record)
            if selector is not None:  # the selector step, in the same (captured) call
                self._select(selector, i, result, indices, batch, model)
            return result.output

        graphs = engine.graphs_for(buffers) if pruned or record is None else None
        names = engine.family.step_inputs
        if pruned:
            if graphs is None:
                output = pruned_step(inputs)
            else:
                key = ("pruned", indices.k, id(selector), record, engine.stream, self.cfg)
                output = graphs.run(key, pruned_step, inputs, names)
            self.pruned_steps += 1
        else:
            if graphs is None:
                fill = i + 1 >= config.first_pruned_step
                result = full_step(inputs, fill)
            else:  # one graph for every full step: it always keeps the branch outputs
                output = graphs.run(("full",), lambda v: full_step(v, True).output, inputs, names)
                result = StepResult(output, buffers.merged, None)
            if selector is not None:
                self._select(selector, i, result, indices, batch, model)
            output = result.output
            self.full_steps += 1
        self.step += 1
        return output

    def _engine(self, model: torch.nn.Module) -> Engine:
        if self.engine is None:
            self.engine = Engine(model, self.config.stream, self.config.cuda_graphs)
        return self.engine

    def _k(self, n_tokens: int) -> int:
        forced = self.force_indices
        if isinstance(forced, str):
            if forced != "all":
                raise ValueError(f"force_indices must be None, 'all' or a tensor, got {forced!r}")
            return n_tokens
        if forced is not None:
            return forced.shape[-1]
        return self.config.num_selected(n_tokens)

    def _load_forced(self, indices: IndexSet, batch: int, n_tokens: int) -> None:
        """Write a forced index set for this pruned step (or check the selector wrote one)."""
        forced = self.force_indices
        if isinstance(forced, str):
            indices.index.copy_(
                torch.arange(n_tokens, device=indices.index.device).expand(batch, -1)
            )
        elif forced is not None:
            if forced.dim() != 2 or forced.shape[0] != batch:
                raise ValueError(f"force_indices must be ({batch}, K), got {tuple(forced.shape)}")
            indices.index.copy_(forced)
        elif not self._has_index:
            raise RuntimeError("no index set for a pruned step; was the selector skipped?")

    def _selector(self, grid: tuple[int, int], batch: int, device: torch.device) -> Selector:
        key = (grid, batch, device)
        if self.selector is None or self._selector_key != key:
            self.selector = self.selector_factory(self.config, grid, batch, device)
            self._selector_key = key
        return self.selector

    def _select(
        self,
        selector: Selector,
        i: int,
        result: StepResult,
        indices: IndexSet,
        batch: int,
        model: torch.nn.Module,
    ) -> None:
        """Feed the step's conditional output to the selector on the notes' timeline."""
        config = self.config
        cond = noise_channels(model, result.scores[batch:] if self.cfg else result.scores)
        attn = result.attention
        if attn is not None and self.cfg:
            attn = attn[batch:]
        if i == config.reference_step:
            self.reference = cond
            selector.set_reference(cond)
        elif i == config.cluster_step:
            indices.index.copy_(selector.start(cond, attn))
            self._has_index = True
        elif i >= config.first_pruned_step:
            indices.index.copy_(selector.step(cond, indices.index, attn))

    def _reset_if_new_generation(self, timestep: Tensor | float) -> None:
        t = float(timestep.flatten()[0]) if isinstance(timestep, Tensor) else float(timestep)
        if self._last_timestep is not None and t >= self._last_timestep:
            self.reset()
        self._last_timestep = t


class CATHook(ModelHook):
    """Replaces the transformer forward by the CAT step and swaps in the CAT processors."""

    _is_stateful = True

    def __init__(self, state: CATState):
        super().__init__()
        self.state = state
        self._original_processors: dict[torch.nn.Module, Any] = {}
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._signature = inspect.signature(type(module).forward)
        processors = cat_processors(module)
        self._original_processors = {attn: attn.processor for attn in processors}
        for attn, processor in processors.items():
            attn.set_processor(processor)
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        for attn, processor in self._original_processors.items():
            attn.set_processor(processor)
        self._original_processors = {}
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = self._signature.bind(module, *args, **kwargs)
        bound.apply_defaults()
        inputs = dict(bound.arguments)
        with torch.no_grad():
            output = self.state.run(module, inputs)
        if not inputs.get("return_dict", True):
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.reset()
        return module


# -- pipelines: reset at every call --------------------------------------------------------------

_PIPELINE_CLASSES: dict[type, type] = {}


def _cat_pipeline_class(base: type) -> type:
    """A subclass of ``base`` (same name) whose ``__call__`` starts a new CAT generation."""
    if base not in _PIPELINE_CLASSES:
        original_call = base.__call__
        signature = inspect.signature(original_call)

        @functools.wraps(original_call)
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            state = get_cat_state(self)
            if state is not None:
                bound = signature.bind(self, *args, **kwargs)
                bound.apply_defaults()
                family = family_of(self.transformer)
                family.check_call(bound.arguments)
                state.reset()
                state.cfg = family.cfg and _uses_cfg(self, bound.arguments)
            return original_call(self, *args, **kwargs)

        attrs = {"__call__": __call__, "__module__": base.__module__, "_cat_base_class": base}
        subclass = type(base.__name__, (base,), attrs)
        subclass.__qualname__ = base.__qualname__
        _PIPELINE_CLASSES[base] = subclass
    return _PIPELINE_CLASSES[base]


def _uses_cfg(pipe: Any, arguments: dict[str, Any]) -> bool:
    """Whether this call of a CFG family's pipeline batches ``[uncond, cond]``: diffusers' rule
    ``guidance_scale > 1`` (guidance-distilled families, FLUX.1, never do: ``Family.cfg``).

    SD3 exposes it as ``pipe.do_classifier_free_guidance`` (set from the same argument);
    PixArt only has the local ``guidance_scale > 1.0``.
    """
    guidance_scale = arguments.get("guidance_scale")
    if guidance_scale is None:
        return bool(getattr(pipe, "do_classifier_free_guidance", True))
    return guidance_scale > 1.0


# -- public API ----------------------------------------------------------------------------------


def _split(obj: Any) -> tuple[torch.nn.Module, Any]:
    """``(transformer, pipeline or None)`` for a pipeline or a bare transformer."""
    if isinstance(obj, torch.nn.Module):
        family_of(obj)
        return obj, None
    transformer = getattr(obj, "transformer", None)
    if transformer is None:
        raise TypeError(f"expected a diffusers pipeline with a transformer, got {type(obj)!r}")
    family_of(transformer)
    return transformer, obj


def get_cat_state(obj: Any) -> CATState | None:
    """The :class:`CATState` of a pipeline or transformer with CAT applied, else None."""
    module = obj if isinstance(obj, torch.nn.Module) else getattr(obj, "transformer", None)
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return hook.state if isinstance(hook, CATHook) else None


def apply_cat(
    obj: Any,
    config: CATConfig | None = None,
    *,
    cfg: bool | None = None,
    selector_factory: SelectorFactory | None = None,
    **config_kwargs: Any,
) -> CATState:
    """Apply CAT pruning to a diffusers pipeline or its transformer (SD3, SD3.5, PixArt-Sigma,
    FLUX.1).

    ``apply_cat(pipe, CATConfig(alpha=0.3))`` or ``apply_cat(pipe, alpha=0.3)``. On a pipeline the
    state resets at every call and CFG follows the call's ``guidance_scale`` (FLUX.1's guidance
    is an input embedding: one row per image); on a bare transformer a new generation is
    detected when the timestep does not decrease, and ``cfg`` says whether the batch is
    ``[uncond..., cond...]`` (default: the family's, True except for FLUX.1). Applying again
    replaces the old setup.
    Returns the :class:`CATState` (counters, ``force_indices``, ``reset()``).
    """
    if config is None:
        config = CATConfig(**config_kwargs)
    elif config_kwargs:
        config = dataclasses.replace(config, **config_kwargs)
    transformer, pipeline = _split(obj)
    attention_module_name(transformer, config.attention_block)  # in range
    if cfg is None:
        cfg = family_of(transformer).cfg
    remove_cat(obj)
    state = CATState(
        config, cfg=cfg, auto_reset=pipeline is None, selector_factory=selector_factory
    )
    state.engine = Engine(transformer, config.stream, config.cuda_graphs)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    try:
        registry.register_hook(CATHook(state), HOOK_NAME)
    except Exception:
        if not registry.hooks:
            del transformer._diffusers_hook
        raise
    if pipeline is not None:
        pipeline.__class__ = _cat_pipeline_class(type(pipeline))
    return state


def remove_cat(obj: Any) -> None:
    """Undo :func:`apply_cat`: original processors, forward and pipeline class. No-op if absent."""
    transformer, pipeline = _split(obj)
    if pipeline is not None and "_cat_base_class" in type(pipeline).__dict__:
        pipeline.__class__ = type(pipeline)._cat_base_class
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is None or registry.get_hook(HOOK_NAME) is None:
        return
    registry.remove_hook(HOOK_NAME, recurse=False)
    forward = transformer.__dict__.get("forward")
    if getattr(forward, "__func__", None) is type(transformer).forward:
        del transformer.__dict__["forward"]  # the registry left the bound method behind
    if not registry.hooks:
        del transformer._diffusers_hook
