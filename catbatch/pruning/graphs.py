"""CUDA-graph capture of CAT steps (``CATConfig(cuda_graphs="auto" | "on" | "off")``).

A step reads only its inputs' tensors, persistent buffers and the selector's state, and writes
them in place (see :mod:`.core`), so it can be recorded once and replayed. :class:`StepGraphs`
keeps one graph per kind of step (a key: full step; pruned step with its selector step; the
shapes and settings they depend on): the first call of a key runs eagerly on the capture
stream (the warm-up CUDA graphs need), the second captures and replays, later calls copy their
inputs into the graph's static inputs and replay. A capture that fails turns graphs off for the
engine with a warning (``error`` says why) and the step runs eagerly: never a failed
generation for an optimisation. The CPU always runs eagerly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

# ``auto`` captures when batch rows x tokens in attention (image + text) is at most this:
# 4 prompts with CFG at 1024px for SD3 (8 x (4096 + 333) = 35,432). Larger steps are bound by
# the GPU, where launches matter less and graphs keep their activations allocated.
# Measured with `python -m bench.gpu_check` (eager vs captured at 1 and 4 prompts).
AUTO_MAX_TOKENS = 8 * (4096 + 333)

StepFn = Callable[[dict[str, Any]], Tensor]


def wants_graphs(mode: str, device: torch.device, tokens: int) -> bool:
    """Whether ``mode`` captures a step of ``tokens`` (rows x attention tokens) on ``device``."""
    if mode == "off" or device.type != "cuda":
        return False
    return mode == "on" or tokens <= AUTO_MAX_TOKENS


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _load(static: Any, value: Any) -> None:
    """Copy ``value`` into the static tensors ``static`` (same structure)."""
    if isinstance(static, Tensor):
        static.copy_(value)
    elif isinstance(static, dict):
        for k, v in static.items():
            _load(v, value[k])


def _signature(value: Any) -> Any:
    if isinstance(value, Tensor):
        return (tuple(value.shape), value.dtype, value.device)
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in sorted(value.items()))
    return value


class _Graph:
    """A captured step: its static inputs, its output, and how to replay it."""

    def __init__(self, static: dict[str, Any], replay: Callable[[], Tensor]):
        self.static, self._replay = static, replay

    def replay(self, inputs: dict[str, Any]) -> Tensor:
        for name, static in self.static.items():
            _load(static, inputs[name])
        return self._replay().clone()  # the graph's output is rewritten by the next replay


class StepGraphs:
    """CUDA graphs of one engine's steps, by key (see the module docstring).

    Args:
        device: the CUDA device.
        emulate: record the step function and re-run it on the static inputs instead of a
            CUDA graph (the data flow of a graph, on any device; for tests).
    """

    def __init__(self, device: torch.device, emulate: bool = False):
        self.device = device
        self.emulate = emulate
        self.stream = None if emulate else torch.cuda.Stream(device)
        self.pool = None if emulate else torch.cuda.graph_pool_handle()
        self.graphs: dict[Any, _Graph] = {}
        self.warm: set[Any] = set()
        self.error: str | None = None
        self.captures = 0
        self.replays = 0

    @property
    def enabled(self) -> bool:
        return self.error is None

    def run(
        self, key: Any, fn: StepFn, inputs: dict[str, Any], static_names: Iterable[str]
    ) -> Tensor:
        """The output of ``fn(inputs)``, through the graph of ``key`` when there is one.

        ``fn`` must read from its argument only the tensors named ``static_names`` (the rest
        of the step's reads are persistent buffers) and return a tensor it allocates.
        """
        names = tuple(static_names)
        key = (key, tuple((n, _signature(inputs.get(n))) for n in names))
        graph = self.graphs.get(key)
        if graph is not None:
            self.replays += 1
            return graph.replay(inputs)
        if key not in self.warm:
            self.warm.add(key)
            return self._eager(fn, inputs)
        try:
            graph = self._capture(fn, inputs, names)
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager
            self.disable(f"{type(error).__name__}: {error}")
            return fn(inputs)
        self.graphs[key] = graph
        self.captures += 1
        self.replays += 1
        return graph.replay(inputs)

    def disable(self, reason: str) -> None:
        """Stop capturing (graphs already captured are dropped); steps run eagerly."""
        self.error = reason
        self.graphs.clear()
        warnings.warn(
            f"CAT: CUDA-graph capture failed, running eagerly from now on ({reason})",
            RuntimeWarning,
            stacklevel=3,
        )

    def _eager(self, fn: StepFn, inputs: dict[str, Any]) -> Tensor:
        """A warm-up run on the capture stream (lazy library state is created there)."""
        if self.stream is None:
            return fn(inputs)
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            output = fn(inputs)
        current.wait_stream(self.stream)
        output.record_stream(current)
        return output

    def _capture(self, fn: StepFn, inputs: dict[str, Any], names: tuple[str, ...]) -> _Graph:
        static = {name: _clone(inputs[name]) for name in names}
        # What the step sees at capture, and at every replay: the static tensors, and the
        # capture call's other inputs (which it must not read as tensors).
        view = {**inputs, **static}
        if self.emulate:
            return _Graph(static, lambda: fn(view))
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            output = fn(view)
        current.wait_stream(self.stream)

        def replay() -> Tensor:
            graph.replay()
            return output

        return _Graph(static, replay)
