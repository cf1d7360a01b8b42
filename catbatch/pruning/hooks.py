"""CAT pruning as a diffusers hook: state, the transformer hook, ``apply_cat`` / ``remove_cat``.

Shaped like diffusers' ``hooks/`` techniques: a config (:class:`CATConfig`), a state with
``reset()`` (:class:`CATState`), a stateful :class:`CATHook` whose ``new_forward`` replaces the
transformer forward with the CAT step of :mod:`catbatch.pruning.engine`, and one public
:func:`apply_cat`. The state owns the timeline and the selection; the engine owns the buffers.

Which generation, and which step of it, a transformer call belongs to (no device reads):

* From a diffusers pipeline (any pipeline whose ``transformer`` is the model: the one given to
  :func:`apply_cat`, another built from its ``components``, img2img / inpaint): the pipeline
  call is found on the Python call stack. Its scheduler's ``timesteps`` tensor, made anew by
  ``set_timesteps`` at the start of every call, identifies the generation; the step index is
  the scheduler's position (``step_index``, or ``begin_index`` before the first step) less the
  position of the generation's first call.
* From a bare transformer: ``state.reset()`` or ``with state.generation():`` starts a
  generation, and each call is the next step.
* Several calls at one step. A call with a context name (diffusers' ``cache_context(name)``,
  e.g. FLUX's ``"cond"`` / ``"uncond"`` calls, or ``with state.context(name):``) not seen yet
  at the step is a *secondary* call: it has its own buffers, follows the same timeline and
  computes the index set of the step's first (*primary*) context, which alone feeds the
  selector. A further call of a context already seen at the step (SD3.5's skip-layer guidance
  call) is an *extra* call: it computes the current index set over copies of the primary's
  caches (its conditional rows when it has half the rows) and changes no state. On a bare
  transformer a context already seen at the step starts the next step instead.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    FusedJointAttnProcessor2_0,
    JointAttnProcessor2_0,
)
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from torch import Tensor

from .config import CATConfig
from .core import CATProcessor, IndexSet, noise_channels
from .engine import Engine, StepResult, attention_module_name, cat_processors, family_of
from .selection import Selector, make_selector

HOOK_NAME = "cat_pruning"

SelectorFactory = Callable[[CATConfig, tuple[int, int], int, torch.device], Selector]

# diffusers' processors whose computation the CAT step reproduces: one of them set after
# apply_cat (``fuse_qkv_projections()`` sets the fused ones) is replaced by CAT's again.
REPRODUCED_PROCESSORS = (
    AttnProcessor,
    AttnProcessor2_0,
    JointAttnProcessor2_0,
    FusedAttnProcessor2_0,
    FusedJointAttnProcessor2_0,
    FluxAttnProcessor,  # FLUX.1's (it reads fused projections itself)
    CATProcessor,
)


@dataclasses.dataclass(frozen=True)
class CallSource:
    """Where a transformer call comes from: ``key`` identifies the generation (the scheduler's
    ``timesteps`` of the calling pipeline, or the bare generation's token), ``position`` the
    scheduler's position (None: count calls), ``cfg`` the pipeline call's classifier-free
    guidance (None: the state's setting)."""

    key: Any
    position: int | None = None
    cfg: bool | None = None


class CATState(BaseState):
    """Everything CAT keeps between the calls of one generation; ``reset()`` starts a new one.

    Settings (kept across generations):
        config: the :class:`CATConfig`.
        cfg: on a bare transformer, whether the batch is ``[uncond..., cond...]`` (2B rows;
            sample ``b`` is rows ``b`` and ``B + b``) or B conditional rows. A pipeline call
            sets it from its ``guidance_scale``.
        force_indices: ``None`` (the selector decides), ``"all"`` (every token, in order, at
            every pruned step: ``K = N``) or a ``(B, K)`` int64 tensor used at every pruned step.
            A forced index set bypasses the selector.
        engine: the primary calls' :class:`~catbatch.pruning.engine.Engine` (buffers kept
            across generations); secondary contexts and extra calls have their own.

    Per generation:
        step: 0-based index of the current step (-1 before the first call).
        reference: conditional output of step ``s + 1`` (what the selector compares against).
        full_steps, pruned_steps: steps of each kind the primary calls ran (readable after a
            pipeline call: diffusers resets stateful hooks at its end, which only ends the
            generation).
        secondary_calls, extra_calls: calls of the other two kinds (see the module docstring).
    """

    def __init__(
        self,
        config: CATConfig,
        *,
        cfg: bool = True,
        selector_factory: SelectorFactory | None = None,
    ):
        self.config = config
        self.cfg = cfg
        self.force_indices: str | Tensor | None = None
        self.selector_factory = selector_factory or make_selector
        self.selector: Selector | None = None
        self.engine: Engine | None = None
        self.generations = 0
        self.context_name: str | None = None  # the calling context (cache_context / context())
        self._engines: dict[str | None, Engine] = {}  # secondary contexts' and extra calls'
        self._selector_key: tuple[Any, ...] | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the current generation (indices, outputs, selector state, counters): the next
        call starts a new one. The buffers stay allocated and are rewritten by its full steps."""
        self._token = object()  # a new bare generation
        self._clear()

    def end_generation(self) -> None:
        """The next call starts a new generation; counters stay readable until then."""
        self._source = None

    def _clear(self) -> None:
        self.step = -1
        self.reference: Tensor | None = None
        self.full_steps = 0
        self.pruned_steps = 0
        self.secondary_calls = 0
        self.extra_calls = 0
        self._source: Callable[[], Any] | None = None  # -> the current generation's key
        self._first_position = 0
        self._primary: str | None = None
        self._seen: set[str | None] = set()  # contexts that ran at the current step
        self._primary_step = -1  # last pruned step the primary ran
        self._has_index = False
        self._shape: tuple[int, int] | None = None
        for engine in (self.engine, *self._engines.values()):
            if engine is not None:
                engine.new_generation()
        if self.selector is not None:
            self.selector.reset()

    @contextmanager
    def generation(self) -> Iterator[CATState]:
        """``with state.generation(): ...``: the transformer calls inside are one generation
        (for a bare transformer; a pipeline call is one by itself)."""
        self.reset()
        try:
            yield self
        finally:
            self.end_generation()

    @contextmanager
    def context(self, name: str | None) -> Iterator[CATState]:
        """``with state.context("uncond"): model(...)``: the call's context (see the module
        docstring), as diffusers' ``cache_context(name)`` gives it on models that have it."""
        previous, self.context_name = self.context_name, name
        try:
            yield self
        finally:
            self.context_name = previous

    def bare_source(self) -> CallSource:
        return CallSource(self._token)

    # -- one transformer call --------------------------------------------------------------
    def run(self, model: torch.nn.Module, inputs: dict[str, Any], source: CallSource) -> Tensor:
        """Run one call on the bound forward ``inputs``; returns the output latents."""
        role, i = self._place(source, self.context_name)
        if role == "extra":
            output = self._extra(model, inputs, i)
            self.extra_calls += 1
            return output
        if role == "primary":
            return self._step(model, inputs, self._engine(model), i, primary=True)
        engine = self._engines.get(self.context_name)
        if engine is None:
            engine = self._engines[self.context_name] = self._new_engine(model)
        self.secondary_calls += 1
        return self._step(model, inputs, engine, i, primary=False)

    def _place(self, source: CallSource, context: str | None) -> tuple[str, int]:
        """The call's role (``primary``, ``secondary`` or ``extra``) and step index."""
        position = source.position
        same = self._source is not None and self._source() is source.key
        if same and position is not None and position - self._first_position < self.step:
            same = False  # the schedule went back: a new run over the same timesteps
        if not same:
            self._clear()
            self._source = _reference(source.key)
            self._first_position = position or 0
            self._primary = context
            self.generations += 1
            if source.cfg is not None:
                self.cfg = source.cfg
        if position is None:  # counted calls: a context seen at this step starts the next
            i = self.step + 1 if context in self._seen or self.step < 0 else self.step
        else:
            i = position - self._first_position
        if i != self.step:
            self.step, self._seen = i, set()
        elif context in self._seen:
            return "extra", i
        self._seen.add(context)
        return ("primary" if context == self._primary else "secondary"), i

    def _step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        engine: Engine,
        i: int,
        *,
        primary: bool,
    ) -> Tensor:
        """Step ``i`` of a primary call (with the selector) or a secondary one."""
        hidden_states: Tensor = inputs["hidden_states"]
        rows = hidden_states.shape[0]
        if self.cfg and rows % 2:
            raise ValueError(f"cfg=True needs an even number of batch rows, got {rows}")
        batch = rows // 2 if self.cfg else rows
        buffers = engine.prepare(model, inputs, batch)
        n_tokens = buffers.key.n_tokens
        if primary:
            if self._shape is not None and self._shape != (rows, n_tokens):
                raise RuntimeError(
                    "the input shape changed within a generation; call reset() first"
                )
            self._shape = (rows, n_tokens)

        config = self.config
        grid = engine.grid(model, inputs)
        indices = buffers.index_set(self._k(n_tokens))
        pruned = i >= config.first_pruned_step and (
            self.force_indices is not None or self._has_index
        )
        if pruned and primary:
            self._load_forced(indices, batch, n_tokens)
        elif pruned:
            indices.index.copy_(self._primary_indices(i, indices.k, batch))
        selector = None
        if primary and self.force_indices is None and i >= config.reference_step:
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

        graphs = None
        if (pruned or record is None) and not inputs.get("skip_layers"):
            graphs = engine.graphs_for(buffers)
        names = engine.family.step_inputs
        if pruned:
            if graphs is None:
                output = pruned_step(inputs)
            else:
                key = ("pruned", indices.k, id(selector), record, engine.stream, self.cfg)
                output = graphs.run(key, pruned_step, inputs, names)
            if primary:
                self._primary_step = i
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
            if primary:
                self.full_steps += 1
        return output

    def _extra(self, model: torch.nn.Module, inputs: dict[str, Any], i: int) -> Tensor:
        """A further call at step ``i`` (see the module docstring): the current index set over
        copies of the primary's caches; the primary's state is left as it was."""
        primary = self.engine.buffers if self.engine is not None else None
        rows = inputs["hidden_states"].shape[0]
        if primary is None:
            raise RuntimeError("an extra call before any step of the generation")
        if rows == primary.key.rows:
            source, batch = slice(None), primary.key.batch
        elif self.cfg and 2 * rows == primary.key.rows:  # the conditional half
            source, batch = slice(rows, None), rows
        else:
            raise ValueError(
                f"a second call at step {i} with {rows} batch rows; the step's first call had "
                f"{primary.key.rows} (CAT takes the same rows or, with CFG, the conditional half)"
            )
        engine = self._engines.get(_EXTRA)
        if engine is None:
            engine = self._engines[_EXTRA] = self._new_engine(model)
        buffers = engine.prepare(model, inputs, batch)
        indices = None
        if i >= self.config.first_pruned_step and (
            self.force_indices is not None or self._has_index
        ):
            buffers.mirror(primary, source)
            indices = buffers.index_set(self._k(buffers.key.n_tokens))
            indices.index.copy_(self._primary_indices(i, indices.k, batch))
        return engine.step(model, inputs, buffers, indices).output

    def _primary_indices(self, i: int, k: int, batch: int) -> Tensor:
        """The index set the primary computes at step ``i`` (already, or next)."""
        buffers = self.engine.buffers if self.engine is not None else None
        if buffers is None or buffers.key.batch != batch:
            raise RuntimeError(
                f"a call with {batch} samples at step {i}; the step's primary call has "
                f"{None if buffers is None else buffers.key.batch}"
            )
        indices = buffers.index_set(k)
        forced = self.force_indices
        if self._primary_step == i:
            return indices.current
        if isinstance(forced, str):
            return torch.arange(k, device=indices.index.device).expand(batch, -1)
        return indices.index if forced is None else forced

    def _engine(self, model: torch.nn.Module) -> Engine:
        if self.engine is None:
            self.engine = self._new_engine(model)
        return self.engine

    def _new_engine(self, model: torch.nn.Module) -> Engine:
        return Engine(model, self.config.stream, self.config.cuda_graphs)

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
        """Write a forced index set for this pruned step (or keep what the selector wrote)."""
        forced = self.force_indices
        if isinstance(forced, str):
            indices.index.copy_(
                torch.arange(n_tokens, device=indices.index.device).expand(batch, -1)
            )
        elif forced is not None:
            if forced.dim() != 2 or forced.shape[0] != batch:
                raise ValueError(f"force_indices must be ({batch}, K), got {tuple(forced.shape)}")
            indices.index.copy_(forced)

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


_EXTRA = object()  # the extra calls' engine key (never a context name)


def _reference(key: Any) -> Callable[[], Any]:
    """A reference to a generation key that does not keep a tensor alive."""
    try:
        return weakref.ref(key)
    except TypeError:
        return lambda: key


# -- where a call comes from ---------------------------------------------------------------------


def unwrap(module: Any) -> Any:
    """The module inside a ``torch.compile`` wrapper (``OptimizedModule``), else ``module``."""
    return getattr(module, "_orig_mod", module)


def calling_pipeline(model: torch.nn.Module, depth: int = 64) -> tuple[Any, dict] | None:
    """The diffusers pipeline whose ``__call__`` is calling ``model`` (its ``transformer``),
    with that call's local variables; None for a bare call. Reads the Python stack only."""
    from diffusers import DiffusionPipeline

    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        if frame.f_code.co_name == "__call__":
            local = frame.f_locals
            owner = local.get("self")
            if isinstance(owner, DiffusionPipeline):
                if unwrap(getattr(owner, "transformer", None)) is model:
                    return owner, local
        frame = frame.f_back
    return None


def pipeline_source(pipe: Any, arguments: dict[str, Any]) -> CallSource | None:
    """The :class:`CallSource` of a call from ``pipe`` (its scheduler's timesteps and
    position), or None when its scheduler has no timesteps."""
    scheduler = getattr(pipe, "scheduler", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if not isinstance(timesteps, Tensor):
        return None
    position = None
    if hasattr(scheduler, "step_index"):
        position = scheduler.step_index
        if position is None:
            position = getattr(scheduler, "begin_index", None) or 0
    cfg = family_of(unwrap(pipe.transformer)).cfg and _uses_cfg(pipe, arguments)
    return CallSource(timesteps, position, cfg)


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


@contextmanager
def lora_scale(model: torch.nn.Module, inputs: dict[str, Any], name: str | None) -> Iterator[None]:
    """diffusers' ``apply_lora_scale`` around the step: the ``scale`` of the attention kwargs
    input ``name`` scales the PEFT LoRA layers for the call (and leaves ``inputs[name]``)."""
    kwargs = inputs.get(name) if name else None
    if not kwargs or "scale" not in kwargs:
        yield
        return
    kwargs = dict(kwargs)
    scale = kwargs.pop("scale")
    inputs[name] = kwargs
    if not USE_PEFT_BACKEND:
        yield
        return
    scale_lora_layers(model, scale)
    try:
        yield
    finally:
        unscale_lora_layers(model, scale)


# -- the hook -----------------------------------------------------------------------------------


class _ContextReceiver(StateManager):
    """Takes diffusers' ``cache_context(name)`` (which sets the context on every
    ``StateManager`` of a stateful hook) as the CAT call context."""

    def __init__(self, state: CATState):
        super().__init__(BaseState)
        self.cat_state = state

    def set_context(self, context: CacheContext | None) -> None:
        super().set_context(context)
        self.cat_state.context_name = None if context is None else context.name


class CATHook(ModelHook):
    """Replaces the transformer forward by the CAT step and swaps in the CAT processors."""

    _is_stateful = True

    def __init__(self, state: CATState):
        super().__init__()
        self.state = state
        self.contexts = _ContextReceiver(state)
        self._processors: dict[torch.nn.Module, CATProcessor] = {}
        self._original_processors: dict[torch.nn.Module, Any] = {}
        self._signature: inspect.Signature | None = None
        self._warned = False

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._signature = inspect.signature(type(module).forward)
        self._processors = cat_processors(module)
        for attn, processor in self._processors.items():
            _check_processor(processor.name, attn.processor, "before apply_cat")
        self._original_processors = {attn: attn.processor for attn in self._processors}
        for attn, processor in self._processors.items():
            attn.set_processor(processor)
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        for attn, processor in self._original_processors.items():
            attn.set_processor(processor)
        self._original_processors = {}
        return module

    def check_processors(self) -> None:
        """Put CAT's processors back where one of diffusers' standard processors replaced them
        (``fuse_qkv_projections()``: the step uses the fused projections); raise for any other
        processor. ``remove_cat`` restores the processors set last."""
        for attn, processor in self._processors.items():
            current = attn.processor
            if current is processor:
                continue
            if not isinstance(current, CATProcessor):
                self._original_processors[attn] = current
            _check_processor(processor.name, current, "after apply_cat")
            attn.set_processor(processor)

    @torch.compiler.disable  # the timeline is Python; torch.compile runs it eagerly
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        self.check_processors()
        bound = self._signature.bind(module, *args, **kwargs)
        bound.apply_defaults()
        inputs = dict(bound.arguments)
        found = calling_pipeline(module)
        source = pipeline_source(*found) if found is not None else None
        if found is not None and found[0].transformer is not module and not self._warned:
            self._warned = True  # the pipeline holds a torch.compile wrapper of the model
            _warn_compiled()
        if source is None:
            source = self.state.bare_source()
        family = family_of(module)
        with torch.no_grad(), lora_scale(module, inputs, family.attention_kwargs):
            output = self.state.run(module, inputs, source)
        if not inputs.get("return_dict", True):
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # diffusers calls this at the end of a pipeline call (CacheMixin models): the next
        # call starts a new generation, the counters of this one stay readable.
        self.state.end_generation()
        return module


def _check_processor(name: str, processor: Any, when: str) -> None:
    """Raise unless the CAT step reproduces ``processor`` (see :data:`REPRODUCED_PROCESSORS`)."""
    if type(processor) in REPRODUCED_PROCESSORS:  # a subclass may run code of its own
        return
    cls = type(processor).__name__
    if "IPAdapter" in cls:
        raise NotImplementedError(
            f"attention {name}: CAT pruning does not support IP-Adapter ({cls}, set {when}); "
            "remove_cat() to generate with an IP-Adapter"
        )
    allowed = ", ".join(c.__name__ for c in REPRODUCED_PROCESSORS[:-1])
    raise NotImplementedError(
        f"attention {name}: processor {cls} (set {when}) cannot run in the CAT step, which "
        f"computes attention itself and reproduces only {allowed}; remove_cat() to use it"
    )


@contextmanager
def _beneath_accelerate(module: torch.nn.Module) -> Iterator[None]:
    """Take accelerate's hook (CPU offload) off ``module`` meanwhile and put it back on top, so
    it runs around the forward installed meanwhile (the CAT step) in either order of setup."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        yield
        return
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    remove_hook_from_module(module)
    try:
        yield
    finally:
        add_hook_to_module(module, hook)


# -- public API ----------------------------------------------------------------------------------


def _split(obj: Any) -> tuple[torch.nn.Module, Any]:
    """``(transformer, pipeline or None)`` for a pipeline or a bare transformer (the module
    inside a ``torch.compile`` wrapper)."""
    if isinstance(obj, torch.nn.Module):
        module = unwrap(obj)
        family_of(module)
        return module, None
    transformer = getattr(obj, "transformer", None)
    if transformer is None:
        raise TypeError(f"expected a diffusers pipeline with a transformer, got {type(obj)!r}")
    transformer = unwrap(transformer)
    family_of(transformer)
    return transformer, obj


def _hook(module: Any) -> CATHook | None:
    registry = getattr(unwrap(module), "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return hook if isinstance(hook, CATHook) else None


def get_cat_state(obj: Any) -> CATState | None:
    """The :class:`CATState` of a pipeline or transformer with CAT applied, else None."""
    module = obj if isinstance(obj, torch.nn.Module) else getattr(obj, "transformer", None)
    hook = _hook(module) if module is not None else None
    return hook.state if hook is not None else None


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

    ``apply_cat(pipe, CATConfig(alpha=0.3))`` or ``apply_cat(pipe, alpha=0.3)``. The hook is on
    the transformer: every pipeline that calls it (this one, others built from its components)
    starts a generation per call and takes CFG from the call's ``guidance_scale`` (FLUX.1's
    guidance is an input embedding: one row per image). A bare transformer's generation starts
    with ``state.reset()`` / ``with state.generation():`` and ``cfg`` says whether its batch is
    ``[uncond..., cond...]`` (default: the family's, True except for FLUX.1). Works beneath
    accelerate's CPU offload hooks and inside ``torch.compile`` wrappers, in either order.
    Applying again replaces the old setup. Returns the :class:`CATState` (counters,
    ``force_indices``, ``reset()``).
    """
    if config is None:
        config = CATConfig(**config_kwargs)
    elif config_kwargs:
        config = dataclasses.replace(config, **config_kwargs)
    transformer, _ = _split(obj)
    attention_module_name(transformer, config.attention_block)  # in range
    if cfg is None:
        cfg = family_of(transformer).cfg
    remove_cat(obj)
    if _is_compiled(obj):
        _warn_compiled()
    state = CATState(config, cfg=cfg, selector_factory=selector_factory)
    state.engine = Engine(transformer, config.stream, config.cuda_graphs)
    with _beneath_accelerate(transformer):
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        try:
            registry.register_hook(CATHook(state), HOOK_NAME)
        except Exception:
            if not registry.hooks:
                del transformer._diffusers_hook
            raise
    return state


def remove_cat(obj: Any) -> None:
    """Undo :func:`apply_cat`: original processors and forward. No-op if absent."""
    transformer, _ = _split(obj)
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is None or registry.get_hook(HOOK_NAME) is None:
        return
    with _beneath_accelerate(transformer):
        registry.remove_hook(HOOK_NAME, recurse=False)
        forward = transformer.__dict__.get("forward")
        if getattr(forward, "__func__", None) is type(transformer).forward:
            del transformer.__dict__["forward"]  # the registry left the bound method behind
    if not registry.hooks:
        del transformer._diffusers_hook


def _is_compiled(obj: Any) -> bool:
    module = obj if isinstance(obj, torch.nn.Module) else getattr(obj, "transformer", None)
    return module is not None and unwrap(module) is not module


def _warn_compiled() -> None:
    warnings.warn(
        "CAT: torch.compile does not compile the CAT step (its timeline is Python and runs "
        "eagerly inside the compiled module); the images are CAT's. Use CATConfig.cuda_graphs "
        "on a GPU instead",
        stacklevel=3,
    )
