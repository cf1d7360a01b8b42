"""Per-sample metrics: MACs from the forward passes a sample ran, phase timings and cost.

MACs are counted with the pruning engine's counting path (:func:`count_step_macs`, torch's
FLOP counter) on a ``meta``-device copy of the transformer, so counting needs no memory and no
weights. A generation is counted once per input shape, schedule and pruning setting and the
result is cached: counting costs nothing per sample. Two figures per image, CFG included:

* ``paper``: linear layers and the patch-embedding convolution (how the CAT paper counts);
* ``total``: every counted product, attention (QK^T and PV) included.

Schedule (the engine's timeline): steps ``0..s+2`` full, the rest pruned at ``K`` tokens per
sample; with CAT, PixArt's cross-attention text keys/values are computed at the first step only
and reused after that (SD3's and FLUX's text streams always run in full). FLUX has one row per
image (its guidance is an input, not CFG).
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from catbatch.models.loader import pipeline_call_kwargs
from catbatch.pruning import CATConfig, count_step_macs

# Arguments of the transformer forward that the counting path takes.
_STEP_ARGS = (
    "hidden_states",
    "timestep",
    "encoder_hidden_states",
    "pooled_projections",
    "encoder_attention_mask",
    "added_cond_kwargs",
    "guidance",  # FLUX
    "img_ids",
    "txt_ids",
)
_UNBATCHED = ("img_ids", "txt_ids")  # FLUX's position ids: one per token, shared by all rows


@dataclass(frozen=True)
class Macs:
    """MACs of one image: ``paper`` (linear + patch embedding) and ``total`` (with attention)."""

    paper: float
    total: float

    def __add__(self, other: Macs) -> Macs:
        return Macs(self.paper + other.paper, self.total + other.total)

    def __mul__(self, n: float) -> Macs:
        return Macs(self.paper * n, self.total * n)


def schedule(calls: int, pruning: CATConfig | None) -> tuple[int, int]:
    """``(full steps, pruned steps)`` of a generation of ``calls`` transformer calls."""
    if pruning is None:
        return calls, 0
    full = min(calls, pruning.first_pruned_step)
    return full, calls - full


def is_pixart(model: torch.nn.Module) -> bool:
    from diffusers import PixArtTransformer2DModel

    return isinstance(model, PixArtTransformer2DModel)


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same transformer class and config, on the ``meta`` device (no weights)."""
    with torch.device("meta"):
        return type(model).from_config(dict(model.config)).eval()


def step_macs(
    model: torch.nn.Module, inputs: dict[str, Any], idx: Tensor | None = None, **kw: Any
) -> Macs:
    """MACs of one step of ``model`` on ``inputs`` (a dict of the forward's arguments)."""
    args = {k: inputs.get(k) for k in _STEP_ARGS}
    counted = count_step_macs(model, idx=idx, **args, **kw)
    return Macs(float(counted["paper"]), float(counted["total"]))


@dataclass(frozen=True)
class StepCosts:
    """MACs of each kind of step of one generation (one image's rows)."""

    first_full: Macs  # step 0 (computes PixArt's text keys/values)
    later_full: Macs  # a full step after the first (with CAT: PixArt's text K/V reused)
    pruned: Macs | None  # a pruned step at K tokens (None without pruning)

    def generation(self, full_steps: int, pruned_steps: int) -> Macs:
        total = Macs(0.0, 0.0)
        if full_steps:
            total = self.first_full + self.later_full * (full_steps - 1)
        if pruned_steps:
            if self.pruned is None:
                raise ValueError("pruned steps without a pruning config")
            total = total + self.pruned * pruned_steps
        return total


def step_costs(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    pruning: CATConfig | None,
) -> StepCosts:
    """Count one full step and, with ``pruning``, one pruned step at ``K`` tokens.

    With CAT, PixArt's cross-attention text keys/values are computed at the first step of a
    generation and reused afterwards (the engine's behaviour), so its later steps cost less.
    """
    full = step_macs(model, inputs)
    if pruning is None:
        return StepCosts(full, full, None)
    pixart = is_pixart(model)
    later_full = step_macs(model, inputs, None, text_kv_cached=True) if pixart else full
    from catbatch.pruning.engine import family_of

    hidden = inputs["hidden_states"]
    n_tokens = family_of(model).n_tokens(model, inputs)
    idx = torch.arange(pruning.num_selected(n_tokens), device=hidden.device)
    pruned = step_macs(model, inputs, idx, text_kv_cached=pixart, stream=pruning.stream)
    return StepCosts(full, later_full, pruned)


# -- recording what the pipeline fed the transformer -------------------------------------------


def _per_image(value: Any, rows: int, per_image: int) -> Any:
    """``value`` with its batch dimension cut from ``rows`` to ``per_image``, on ``meta``."""
    if isinstance(value, Tensor):
        shape = list(value.shape)
        if shape and shape[0] == rows:
            shape[0] = per_image
        return torch.zeros(shape, dtype=value.dtype, device="meta")
    if isinstance(value, dict):
        return {k: _per_image(v, rows, per_image) for k, v in value.items()}
    return value


def _signature(value: Any) -> Any:
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if isinstance(value, dict):
        return tuple(sorted((k, _signature(v)) for k, v in value.items()))
    return repr(value)


class MacsCounter:
    """Counts the MACs per image of a pipeline's generations, cached per shape and schedule.

    Use::

        counter = MacsCounter(pipe.transformer)
        with counter.recording():
            pipe(...)
        macs = counter.per_image(batch_size, pruning_config)

    :meth:`count` right after a call counts its step costs ahead of :meth:`per_image` (the
    worker does it inside its warm-up call's time, so no count runs between later calls).
    """

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self._signature = inspect.signature(type(transformer).forward)
        self._meta: torch.nn.Module | None = None
        self._costs: dict[str, StepCosts] = {}
        self.calls = 0
        self.first_inputs: dict[str, Any] | None = None

    def prepare(self) -> None:
        """Build the meta-device copy the counting runs on (else made at the first count)."""
        if self._meta is None:
            self._meta = meta_copy(self.transformer)

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        if self.first_inputs is None:
            bound = self._signature.bind_partial(module, *args, **kwargs)
            self.first_inputs = {  # shapes only: no reference to the real tensors is kept
                k: _per_image(v, -1, -1) for k, v in bound.arguments.items() if k in _STEP_ARGS
            }

    @contextmanager
    def recording(self) -> Iterator[MacsCounter]:
        """Record the transformer calls of one pipeline call (their number and first inputs)."""
        self.calls, self.first_inputs = 0, None
        handle = self.transformer.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def count(self, batch_size: int, pruning: CATConfig | None) -> None:
        """Count the recorded call's step costs now (cached; :meth:`per_image` then only adds
        them up)."""
        self._step_costs(batch_size, pruning)

    def _step_costs(
        self, batch_size: int, pruning: CATConfig | None
    ) -> tuple[StepCosts, bool] | None:
        """The recorded call's per-image step costs (counted once per distinct key) and whether
        its rows are shared evenly (an odd layout: not one row block per image)."""
        if self.first_inputs is None:
            return None
        hidden = self.first_inputs["hidden_states"]
        rows = hidden.shape[0]
        per_image = rows // batch_size if rows % batch_size == 0 else rows
        inputs = {
            k: v if k in _UNBATCHED else _per_image(v, rows, per_image)
            for k, v in self.first_inputs.items()
        }
        shared = per_image == rows and batch_size > 1  # odd layout: share the rows evenly
        config = None if pruning is None else pruning.to_dict()
        key = json.dumps([_signature(inputs), config], default=str)
        if key not in self._costs:
            self.prepare()
            self._costs[key] = step_costs(self._meta, inputs, pruning)
        return self._costs[key], shared

    def per_image(
        self,
        batch_size: int,
        pruning: CATConfig | None,
        steps: tuple[int, int] | None = None,
    ) -> Macs | None:
        """MACs of one image of the recorded call; ``steps`` overrides ``(full, pruned)``.

        None when nothing was recorded. Counting runs once per distinct key (cached).
        """
        if self.first_inputs is None or not self.calls:
            return None
        costs, shared = self._step_costs(batch_size, pruning)
        full, pruned = steps if steps is not None else schedule(self.calls, pruning)
        macs = costs.generation(full, pruned)
        return macs * (1.0 / batch_size) if shared else macs


# -- phase timings ------------------------------------------------------------------------------


class PhaseTimer:
    """Times text encoding (``pipe.encode_prompt``) and VAE decoding (``pipe.vae.decode``).

    Installed as instance attributes for the duration of a ``with`` block and removed after.
    ``sync`` runs before each clock read (``torch.cuda.synchronize`` on GPUs).
    """

    def __init__(self, pipe: Any, sync: Callable[[], None] | None = None):
        self.pipe = pipe
        self.sync = sync or (lambda: None)
        self.seconds = {"text": 0.0, "vae": 0.0}

    def _timed(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[phase] += time.perf_counter() - start

        return wrapper

    def __enter__(self) -> PhaseTimer:
        self.seconds = {"text": 0.0, "vae": 0.0}
        self._installed: list[tuple[Any, str]] = []
        targets = [(self.pipe, "encode_prompt", "text")]
        vae = getattr(self.pipe, "vae", None)
        if vae is not None:
            targets.append((vae, "decode", "vae"))
        for obj, name, phase in targets:
            fn = getattr(obj, name, None)
            if fn is not None and name not in vars(obj):
                object.__setattr__(obj, name, self._timed(phase, fn))
                self._installed.append((obj, name))
        return self

    def __exit__(self, *exc: Any) -> None:
        for obj, name in self._installed:
            object.__delattr__(obj, name)
        self._installed = []


# -- cost and prompt limits -----------------------------------------------------------------------


def devices_held(device: str, gpus_per_actor: float) -> float:
    """GPUs an actor holds: its Ray GPU share on CUDA, 1 on a CPU.

    On a CPU the whole actor counts as one device, so ``gpu_seconds`` is then device-seconds.
    """
    if device.startswith("cuda") and gpus_per_actor > 0:
        return float(gpus_per_actor)
    return 1.0


def price_for(price: float | dict[str, float] | None, device_name: str) -> float | None:
    """Price per GPU-hour of ``device_name``: one number for all, or a mapping by device name
    (exact name, else the key ``default``); None when unknown."""
    if price is None or isinstance(price, (int, float)):
        return price
    return price.get(device_name, price.get("default"))


def cost_usd(gpu_seconds: float, price_per_gpu_hour: float | None) -> float | None:
    return None if price_per_gpu_hour is None else gpu_seconds / 3600.0 * price_per_gpu_hour


def prompt_limits(pipe: Any, max_sequence_length: int | None = None) -> list[tuple[Any, int]]:
    """``(tokenizer, token limit)`` of each text encoder of ``pipe``.

    CLIP tokenizers: their ``model_max_length`` (77). T5 tokenizers: ``max_sequence_length``
    (the manifest's), else the one :func:`pipeline_call_kwargs` sets, else the call's default
    (SD3: 256, PixArt-Sigma: 300, FLUX: 512), as the worker calls it; a length of 1 holds only
    the end token, so that T5 reads no prompt (``catbatch-shapes``' zero stand-in) and is left out.
    """
    max_seq = max_sequence_length
    if max_seq is None:
        try:
            params = inspect.signature(type(pipe).__call__).parameters
            max_seq = params["max_sequence_length"].default
        except (KeyError, TypeError, ValueError):
            max_seq = None
        max_seq = pipeline_call_kwargs(pipe).get("max_sequence_length", max_seq)
    limits = []
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, name, None)
        if tok is None:
            continue
        if "T5" in type(tok).__name__ and isinstance(max_seq, int):
            if max_seq > 1:
                limits.append((tok, max_seq))
        elif 0 < getattr(tok, "model_max_length", 0) < 100_000:
            limits.append((tok, int(tok.model_max_length)))
    return limits


def is_truncated(prompt: str, limits: list[tuple[Any, int]]) -> bool:
    """Whether any text encoder sees only part of ``prompt`` (special tokens included)."""
    for tok, limit in limits:
        if len(tok(prompt, truncation=False, verbose=False)["input_ids"]) > limit:
            return True
    return False
