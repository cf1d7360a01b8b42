"""Speed benchmark of CAT pruning: wall-clock of the denoising loop, counted MACs, selection share.

An SD3 transformer (random weights) is driven over ``N`` steps with classifier-free guidance
(batch 2 = ``[uncond, cond]``) and a flow-matching Euler update, once bare ("full") and once per
CAT variant (``--streams``): :func:`catbatch.pruning.apply_cat` applied once to a copy of the
transformer that shares its weights, the state reset per generation (buffers kept, as in a
pipeline). ``--model flux`` drives a FLUX.1 transformer instead (4 double- and 8 single-stream
blocks, 4096 image + 512 text tokens, one row per image: its guidance is an input). Runs are
interleaved in rounds (full, then every variant, their order rotating each round) after one
warm-up of each; the table gives medians and min-max spreads. MACs come from
:func:`catbatch.pruning.count_step_macs` on the ``meta`` device for a full and a pruned step,
times the timeline (``s + 3`` full steps, then pruned). The selector's ``set_reference`` /
``start`` (KMeans, cluster graph, first pick) / ``step`` calls are timed by wrapping them.

    python -m bench.engine_speed                 # the issue's CPU configuration (slow: minutes)
    python -m bench.engine_speed --streams full krow   # both residual streams, interleaved
    python -m bench.engine_speed --model flux --steps 28   # FLUX.1 blocks (issue 17)
    python -m bench.engine_speed --smoke [--model flux]    # a tiny configuration, seconds
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from torch import Tensor

from catbatch.pruning import CATConfig, apply_cat, count_step_macs, remove_cat
from catbatch.pruning.config import STREAMS
from catbatch.pruning.selection import Selector, make_selector

CLIP_TOKENS, T5_TOKENS = 77, 256


@dataclass(frozen=True)
class SpeedSetup:
    """Transformer size, inputs and CAT settings of one benchmark.

    ``family``: ``sd3`` (``layers`` joint blocks, CFG: two rows per prompt) or ``flux``
    (``layers`` double-stream and ``single_layers`` single-stream blocks, latents packed 2x2
    into 64 channels, one row per prompt, ``guidance`` embedded).
    """

    layers: int = 8
    heads: int = 6
    head_dim: int = 64
    latent: int = 128  # latent side; 128 -> 64x64 patches = 4096 image tokens
    patch: int = 2
    text_tokens: int = CLIP_TOKENS + T5_TOKENS
    joint_dim: int = 4096  # SD3's text embedding width (T5-XXL)
    pooled_dim: int = 2048  # SD3's pooled CLIP width
    samples: int = 1  # prompts per batch; CFG doubles the rows
    guidance: float = 7.0
    alpha: float = 0.3
    shift: float = 3.0
    seed: int = 0
    family: str = "sd3"
    single_layers: int = 0  # FLUX's single-stream blocks
    rope_axes: tuple[int, int, int] = (8, 28, 28)  # FLUX's rotary axes, summing to head_dim

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def image_tokens(self) -> int:
        return (self.latent // self.patch) ** 2

    @property
    def cfg(self) -> bool:
        """Whether each prompt runs as two rows ``[uncond, cond]`` (FLUX: one row)."""
        return self.family != "flux"

    @property
    def rows(self) -> int:
        return 2 * self.samples if self.cfg else self.samples

    def transformer_kwargs(self) -> dict[str, Any]:
        if self.family == "flux":
            return {
                "patch_size": 1,
                "in_channels": 16 * self.patch**2,  # packed latents
                "num_layers": self.layers,
                "num_single_layers": self.single_layers,
                "attention_head_dim": self.head_dim,
                "num_attention_heads": self.heads,
                "joint_attention_dim": self.joint_dim,
                "pooled_projection_dim": self.pooled_dim,
                "guidance_embeds": True,
                "axes_dims_rope": self.rope_axes,
            }
        return {
            "sample_size": self.latent,
            "patch_size": self.patch,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": self.layers,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.heads,
            "joint_attention_dim": self.joint_dim,
            "caption_projection_dim": self.width,
            "pooled_projection_dim": self.pooled_dim,
            "pos_embed_max_size": max(96, self.latent // self.patch),
        }


SMOKE = SpeedSetup(
    layers=1, heads=2, head_dim=16, latent=32, text_tokens=8, joint_dim=32, pooled_dim=32
)
# FLUX.1's block structure at the SD3 configuration's width: 4 double + 8 single blocks of
# 6 heads x 64, 4096 image tokens (1024px: 128x128 latent packed 2x2), 512 T5 tokens (FLUX.1-dev's
# maximum) of width 4096, pooled CLIP 768, embedded guidance 3.5.
FLUX = SpeedSetup(
    family="flux",
    layers=4,
    single_layers=8,
    text_tokens=512,
    pooled_dim=768,
    guidance=3.5,
)
FLUX_SMOKE = replace(
    FLUX,
    layers=1,
    single_layers=1,
    heads=2,
    head_dim=16,
    rope_axes=(4, 6, 6),
    latent=32,
    text_tokens=8,
    joint_dim=32,
)
SETUPS = {"sd3": (SpeedSetup(), SMOKE), "flux": (FLUX, FLUX_SMOKE)}


def build_transformer(
    setup: SpeedSetup, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """A random-weight SD3 or FLUX transformer of ``setup``'s size (on ``meta``: no weights)."""
    cls = FluxTransformer2DModel if setup.family == "flux" else SD3Transformer2DModel
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(setup.seed)
        model = cls(**setup.transformer_kwargs())
    return model.to(dtype=dtype).eval().requires_grad_(False)


@dataclass
class Inputs:
    latents: Tensor  # SD3: (B, 16, H, W); FLUX: packed (B, N, 64); the starting noise
    text: Tensor  # (rows, T, joint_dim): SD3 [uncond..., cond...]
    pooled: Tensor  # (rows, pooled_dim)
    extra: dict[str, Tensor] = field(default_factory=dict)  # FLUX: guidance, img_ids, txt_ids


def make_inputs(
    setup: SpeedSetup, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Inputs:
    g = torch.Generator().manual_seed(setup.seed + 1)
    b, side, rows = setup.samples, setup.latent, setup.rows
    if setup.family == "flux":
        grid = side // setup.patch
        latents = torch.randn(b, grid * grid, 16 * setup.patch**2, generator=g)
    else:
        latents = torch.randn(b, 16, side, side, generator=g)
    text = torch.randn(rows, setup.text_tokens, setup.joint_dim, generator=g)
    pooled = torch.randn(rows, setup.pooled_dim, generator=g)
    tensors = [t.to(device=device, dtype=dtype) for t in (latents, text, pooled)]
    extra = {}
    if setup.family == "flux":
        ids = torch.zeros(grid, grid, 3)
        ids[..., 1] += torch.arange(grid)[:, None]
        ids[..., 2] += torch.arange(grid)[None, :]
        extra = {
            "guidance": torch.full((b,), setup.guidance, device=device),
            "img_ids": ids.view(-1, 3).to(device=device, dtype=dtype),
            "txt_ids": torch.zeros(setup.text_tokens, 3, device=device, dtype=dtype),
        }
    return Inputs(*tensors, extra)


def flow_sigmas(steps: int, shift: float) -> list[float]:
    """FlowMatchEulerDiscreteScheduler's shifted sigmas for ``steps`` steps, plus the final 0."""
    sigmas = [1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1) for i in range(steps)]
    return [shift * s / (1.0 + (shift - 1.0) * s) for s in sigmas] + [0.0]


# -- clocks: wall-clock on the CPU, CUDA events on a GPU (no sync inside the loop) -------------


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds between two marks (call :meth:`sync` first on a GPU)."""
        return start.elapsed_time(end) / 1000.0 if self.cuda else end - start


class SelectorTimer:
    """A selector factory whose selectors record the time of each call, by method name."""

    METHODS = ("set_reference", "start", "step")

    def __init__(self, clock: Clock):
        self.clock = clock
        self.spans: list[tuple[str, Any, Any]] = []

    def factory(
        self, config: CATConfig, grid: tuple[int, int], batch: int, device: torch.device
    ) -> Selector:
        selector = make_selector(config, grid, batch, device)
        for name in self.METHODS:
            setattr(selector, name, self._timed(name, getattr(selector, name)))
        return selector

    def _timed(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = self.clock.mark()
            result = method(*args, **kwargs)
            self.spans.append((name, start, self.clock.mark()))
            return result

        return timed

    def totals(self) -> dict[str, float]:
        """Seconds per method since the last :meth:`clear` (sync first on a GPU)."""
        out = dict.fromkeys(self.METHODS, 0.0)
        for name, start, end in self.spans:
            out[name] += self.clock.seconds(start, end)
        return out

    def clear(self) -> None:
        self.spans = []


# -- the denoising loop -------------------------------------------------------------------------


class Runner:
    """Calls the transformer of one variant of the benchmark."""

    label = "full"
    config: CATConfig | None = None

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def begin(self) -> None:
        """A new generation starts."""

    def check(self, steps: int) -> None:
        """Raise if the generation just run was not what it should be."""

    def __call__(
        self, hidden: Tensor, timestep: Tensor, text: Tensor, pooled: Tensor, **extra: Tensor
    ) -> Tensor:
        return self.model(
            hidden_states=hidden,
            timestep=timestep,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            return_dict=False,
            **extra,
        )[0]


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A second transformer object sharing ``model``'s parameters and buffers (no memory)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class CatRunner(Runner):
    """CAT applied once to a weight-sharing copy of the transformer (buffers, and CUDA graphs
    where on, are kept across generations); the state is reset per generation, as a pipeline
    does (no timestep read). Rows pair as CFG halves for SD3, not for FLUX (the family's
    default)."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: CATConfig,
        timer: SelectorTimer | None = None,
        label: str = "CAT",
    ):
        super().__init__(shared_copy(model))
        self.config, self.label, self.timer = config, label, timer
        factory = timer.factory if timer is not None else None
        self.state = apply_cat(self.model, config, selector_factory=factory)

    def begin(self) -> None:
        self.state.reset()
        if self.timer is not None:
            self.timer.clear()

    def check(self, steps: int) -> None:
        expected = max(0, steps - self.config.first_pruned_step)
        if self.state.pruned_steps != expected:
            raise RuntimeError(f"expected {expected} pruned steps, got {self.state.pruned_steps}")

    def close(self) -> None:
        remove_cat(self.model)


@torch.no_grad()
def denoise(
    runner: Runner, inputs: Inputs, steps: int, setup: SpeedSetup, clock: Clock
) -> tuple[Tensor, list[Any]]:
    """``steps`` Euler steps from ``inputs.latents`` (SD3: CFG over two rows per prompt; FLUX:
    one row, timestep as the pipeline passes it, ``t / 1000``); latents and per-step marks."""
    latents = inputs.latents.clone()
    sigmas = flow_sigmas(steps, setup.shift)
    marks = [clock.mark()]
    rows = latents.shape[0] * (2 if setup.cfg else 1)  # the inputs' batch, not the setup's
    for i in range(steps):
        if setup.cfg:
            timestep = torch.full((rows,), sigmas[i] * 1000.0, device=latents.device)
            hidden = torch.cat([latents, latents])
            uncond, cond = runner(hidden, timestep, inputs.text, inputs.pooled).chunk(2)
            velocity = uncond + setup.guidance * (cond - uncond)
        else:
            timestep = torch.full((rows,), sigmas[i], device=latents.device)
            velocity = runner(latents, timestep, inputs.text, inputs.pooled, **inputs.extra)
        latents = latents + (sigmas[i + 1] - sigmas[i]) * velocity
        marks.append(clock.mark())
    return latents, marks


@dataclass
class RunTimes:
    total: float
    steps: list[float]
    selection: dict[str, float] = field(default_factory=dict)


def timed_generation(
    runner: Runner, inputs: Inputs, steps: int, setup: SpeedSetup, clock: Clock
) -> tuple[Tensor, RunTimes]:
    """One generation of ``runner``, timed."""
    runner.begin()
    clock.sync()
    start = time.perf_counter()
    latents, marks = denoise(runner, inputs, steps, setup, clock)
    clock.sync()
    total = time.perf_counter() - start
    runner.check(steps)
    per_step = [clock.seconds(a, b) for a, b in zip(marks, marks[1:], strict=False)]
    timer = getattr(runner, "timer", None)
    selection = timer.totals() if timer is not None else {}
    return latents, RunTimes(total, per_step, selection)


# -- MACs ---------------------------------------------------------------------------------------


def step_macs(setup: SpeedSetup, config: CATConfig) -> dict[str, dict[str, int]]:
    """MACs of one full and one pruned step (all rows of a batch), counted on the ``meta``
    device."""
    model = build_transformer(setup, "meta")
    with torch.device("meta"):
        inputs = make_inputs(setup, "meta")
        hidden = torch.cat([inputs.latents, inputs.latents]) if setup.cfg else inputs.latents
        timestep = torch.full((hidden.shape[0],), 500.0 if setup.cfg else 0.5)
        idx = torch.arange(config.num_selected(setup.image_tokens))
    args = (model, hidden, timestep, inputs.text, inputs.pooled)
    pruned = count_step_macs(*args, idx=idx, stream=config.stream, **inputs.extra)
    return {"full": count_step_macs(*args, **inputs.extra), "pruned": pruned}


def timeline_macs(
    per_step: dict[str, dict[str, int]], steps: int, config: CATConfig
) -> dict[str, dict[str, float]]:
    """Generation MACs, full vs CAT (``s + 3`` full steps, then pruned), for each count."""
    n_full = min(steps, config.first_pruned_step)
    out: dict[str, dict[str, float]] = {}
    for key in ("paper", "total", "attention"):
        full = steps * per_step["full"][key]
        cat = n_full * per_step["full"][key] + (steps - n_full) * per_step["pruned"][key]
        out[key] = {"full": full, "cat": cat, "ratio": full / cat if cat else math.nan}
    return out


# -- the benchmark ------------------------------------------------------------------------------


@dataclass
class StepsResult:
    label: str  # the CAT variant (e.g. its stream)
    steps: int
    full: list[float]
    cat: list[float]
    selection: list[dict[str, float]]
    full_step: float  # median seconds of a step of a full run
    cat_full_step: float  # median seconds of the full steps of CAT runs
    cat_pruned_step: float  # median seconds of the pruned steps of CAT runs
    macs: dict[str, dict[str, float]]
    step_macs_ratio: float  # total MACs full step / pruned step
    latent_rel_error: float

    @property
    def speedups(self) -> list[float]:
        return [f / c for f, c in zip(self.full, self.cat, strict=True)]

    @property
    def speedup(self) -> float:
        return statistics.median(self.full) / statistics.median(self.cat)

    @property
    def selection_share(self) -> list[float]:
        return [sum(s.values()) / t for s, t in zip(self.selection, self.cat, strict=True)]


def run_benchmark(
    setup: SpeedSetup,
    steps_list: Sequence[int],
    pairs: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    configs: dict[str, CATConfig] | None = None,
    model: torch.nn.Module | None = None,
    log: Callable[[str], None] = print,
    warmup: int | None = None,
    baseline: Runner | None = None,
) -> list[StepsResult]:
    """Warm up, then ``pairs`` interleaved rounds (full, then each CAT variant, in an order
    that rotates every round) for each step count; one :class:`StepsResult` per variant."""
    configs = configs or {"CAT": CATConfig(alpha=setup.alpha)}
    dev = torch.device(device)
    clock = Clock(dev)
    model = model if model is not None else build_transformer(setup, dev, dtype)
    inputs = make_inputs(setup, dev, dtype)
    full_runner = baseline or Runner(model)
    runners = [CatRunner(model, c, SelectorTimer(clock), label) for label, c in configs.items()]
    first = next(iter(configs.values()))
    per_step_macs = {label: step_macs(setup, c) for label, c in configs.items()}
    warm = first.first_pruned_step + 2 if warmup is None else warmup
    if warm:
        log(f"warm-up ({warm} steps each)")
        for runner in [full_runner, *runners]:
            timed_generation(runner, inputs, warm, setup, clock)

    results = []
    try:
        for steps in steps_list:
            full: list[RunTimes] = []
            cat: dict[str, list[RunTimes]] = {r.label: [] for r in runners}
            outs: dict[str, Tensor] = {}
            for pair in range(pairs):
                ref, times = timed_generation(full_runner, inputs, steps, setup, clock)
                full.append(times)
                shift = pair % len(runners)
                line = f"  {steps} steps, round {pair + 1}/{pairs}: full {times.total:.2f} s"
                for runner in runners[shift:] + runners[:shift]:
                    outs[runner.label], times = timed_generation(
                        runner, inputs, steps, setup, clock
                    )
                    cat[runner.label].append(times)
                    share = 100 * sum(times.selection.values()) / times.total
                    ratio = full[-1].total / times.total
                    line += (
                        f"; {runner.label} {times.total:.2f} s ({ratio:.2f}x, sel. {share:.2f}%)"
                    )
                log(line)
            for runner in runners:
                config, runs = runner.config, cat[runner.label]
                n_full = config.first_pruned_step
                out = outs[runner.label]
                step = per_step_macs[runner.label]
                results.append(
                    StepsResult(
                        label=runner.label,
                        steps=steps,
                        full=[r.total for r in full],
                        cat=[r.total for r in runs],
                        selection=[r.selection for r in runs],
                        full_step=statistics.median(s for r in full for s in r.steps),
                        cat_full_step=statistics.median(s for r in runs for s in r.steps[:n_full]),
                        cat_pruned_step=statistics.median(
                            s for r in runs for s in r.steps[n_full:]
                        ),
                        macs=timeline_macs(step, steps, config),
                        step_macs_ratio=step["full"]["total"] / step["pruned"]["total"],
                        latent_rel_error=float(
                            (out.float() - ref.float()).norm() / ref.float().norm()
                        ),
                    )
                )
    finally:
        for runner in runners:
            runner.close()
    return results


def compare_streams(results: Sequence[StepsResult]) -> list[str]:
    """The full-length stream's loop speed-up against the K-row stream's, per step count
    (issue 13: within 3%), from the same interleaved rounds."""
    lines = []
    by_key = {(r.label, r.steps): r for r in results}
    for steps in sorted({r.steps for r in results}):
        full, krow = by_key.get(("full", steps)), by_key.get(("krow", steps))
        if full is None or krow is None:
            continue
        per_round = [k / f for f, k in zip(full.cat, krow.cat, strict=True)]
        ratio = full.speedup / krow.speedup
        lines.append(
            f"{steps} steps: full-length stream {full.speedup:.2f}x vs K-row stream "
            f"{krow.speedup:.2f}x: {100 * ratio:.1f}% (per round, K-row time / full-length time "
            f"{_spread(per_round, '{:.3f}')}); within 3%: {'MET' if ratio >= 0.97 else 'MISSED'}"
        )
    return lines


def step_pairs(
    setup: SpeedSetup, pairs: int, streams: Sequence[str] = ("full",), alpha: float | None = None
) -> dict:
    """Interleaved single steps on the CPU: the unpatched transformer's full step, then a CAT
    pruned step (K random tokens, the engine's persistent buffers filled by one full step
    beforehand) in each stream: per-step ratios measured under the same load, and the loop
    times they imply."""
    from catbatch.pruning.engine import Engine

    model = build_transformer(setup)
    inputs = make_inputs(setup)
    batch = setup.samples
    step_inputs = {
        "hidden_states": torch.cat([inputs.latents] * (setup.rows // batch)),
        "timestep": torch.full((setup.rows,), 500.0 if setup.cfg else 0.5),
        "encoder_hidden_states": inputs.text,
        "pooled_projections": inputs.pooled,
        **inputs.extra,
    }
    k = CATConfig(alpha=alpha or setup.alpha).num_selected(setup.image_tokens)
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(setup.image_tokens, generator=g)[:k] for _ in range(batch)])

    def pruned_step(stream: str) -> Callable[[], Tensor]:
        engine = Engine(model, stream)
        buffers = engine.prepare(model, step_inputs, batch)
        engine.step(model, step_inputs, buffers, None, fill=True)  # caches of every token
        indices = buffers.index_set(k)
        indices.index.copy_(idx)
        return lambda: engine.step(model, step_inputs, buffers, indices).output

    with torch.no_grad():
        steppers = {s: pruned_step(s) for s in streams}
        full: list[float] = []
        pruned: dict[str, list[float]] = {s: [] for s in streams}
        for pair in range(pairs):
            start = time.perf_counter()
            model(**step_inputs, return_dict=False)
            full.append(time.perf_counter() - start)
            line = f"  step pair {pair + 1}/{pairs}: full {full[-1]:.2f} s"
            for stream, step in steppers.items():
                start = time.perf_counter()
                step()
                pruned[stream].append(time.perf_counter() - start)
                line += f", pruned ({stream}) {pruned[stream][-1]:.2f} s"
            print(line, flush=True)
    ratios = {s: [f / p for f, p in zip(full, pruned[s], strict=True)] for s in streams}
    return {"full": full, "pruned": pruned, "ratios": ratios}


def projected(ratio: float, steps: int, config: CATConfig) -> float:
    """Loop speed-up implied by a per-step ratio (selection time not included)."""
    n_full = min(steps, config.first_pruned_step)
    return steps / (n_full + (steps - n_full) / ratio)


# -- report -------------------------------------------------------------------------------------

TARGET_SPEEDUP = {28: 1.75, 50: 2.05}
TARGET_MACS_FRACTION = 0.95
TARGET_SELECTION_SHARE = 0.03


def _spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    return (
        f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-"
        f"{fmt.format(max(values))})"
    )


def format_report(results: Sequence[StepsResult], setup: SpeedSetup, targets: bool = True) -> str:
    """Markdown tables: timings, MACs, per-step times and (optionally) the targets."""
    lines = [
        "| steps | full s, median (min-max) | CAT s, median (min-max) | speed-up, ratio of "
        "medians | per-pair speed-up (min-max) | MACs ratio, total incl. attention | MACs "
        "ratio, paper (linear+conv) | selection+clustering share of CAT run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        share = [100 * s for s in r.selection_share]
        lines.append(
            f"| {r.steps} | {_spread(r.full)} | {_spread(r.cat)} | {r.speedup:.2f}x | "
            f"{min(r.speedups):.2f}-{max(r.speedups):.2f}x | {r.macs['total']['ratio']:.2f}x | "
            f"{r.macs['paper']['ratio']:.2f}x | {_spread(share, '{:.2f}')} % |"
        )
    lines += [
        "",
        "| steps | MACs full (total / paper) | MACs CAT (total / paper) | full step s | CAT: "
        "full step s | CAT: pruned step s | step time ratio full/pruned | step MACs ratio "
        "(total) | set_reference / start (KMeans) / step s, median | final latent rel. diff "
        "vs full |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        sel = {k: statistics.median(s[k] for s in r.selection) for k in SelectorTimer.METHODS}
        lines.append(
            f"| {r.steps} | {_g(r.macs['total']['full'])} / {_g(r.macs['paper']['full'])} | "
            f"{_g(r.macs['total']['cat'])} / {_g(r.macs['paper']['cat'])} | "
            f"{r.full_step:.4f} | {r.cat_full_step:.4f} | {r.cat_pruned_step:.4f} | "
            f"{r.full_step / r.cat_pruned_step:.2f}x | {r.step_macs_ratio:.2f}x | "
            f"{sel['set_reference']:.4f} / {sel['start']:.4f} / {sel['step']:.3f} | "
            f"{r.latent_rel_error:.3f} |"
        )
    if targets:
        goals = TARGET_SPEEDUP if setup.family == "sd3" else {}  # FLUX: the MACs ratio only
        lines += ["", "Targets:"]
        for r in results:
            lines += [f"- {line}" for line in target_lines(r, goals)]
    return "\n".join(lines)


def _g(macs: float) -> str:
    return f"{macs / 1e12:.2f}T" if macs >= 1e12 else f"{macs / 1e9:.1f}G"


def target_lines(r: StepsResult, goals: dict[int, float] = TARGET_SPEEDUP) -> list[str]:
    def verdict(ok: bool) -> str:
        return "MET" if ok else "MISSED"

    bound = TARGET_MACS_FRACTION * r.macs["total"]["ratio"]
    paper = TARGET_MACS_FRACTION * r.macs["paper"]["ratio"]
    lines = [
        f"{r.steps} steps: speed-up {r.speedup:.2f}x >= 95% of the total-MACs ratio "
        f"({bound:.2f}x): {verdict(r.speedup >= bound)} (paper-count ratio "
        f"{r.macs['paper']['ratio']:.2f}x, 95% = {paper:.2f}x: {verdict(r.speedup >= paper)})",
    ]
    if r.steps in goals:
        goal = goals[r.steps]
        lines.append(
            f"{r.steps} steps: speed-up {r.speedup:.2f}x >= {goal}x: {verdict(r.speedup >= goal)}"
        )
    share = statistics.median(r.selection_share)
    lines.append(
        f"{r.steps} steps: selection+clustering {100 * share:.2f}% <= 3%: "
        f"{verdict(share <= TARGET_SELECTION_SHARE)}"
    )
    return lines


def results_json(results: Sequence[StepsResult], setup: SpeedSetup, **extra: Any) -> str:
    rows = []
    for r in results:
        row = asdict(r)
        row.update(speedup=r.speedup, speedups=r.speedups, selection_share=r.selection_share)
        rows.append(row)
    return json.dumps({"setup": asdict(setup), **extra, "results": rows}, indent=1)


def describe(setup: SpeedSetup, device: str, dtype: torch.dtype, threads: int | None) -> str:
    k = CATConfig(alpha=setup.alpha).num_selected(setup.image_tokens)
    if setup.family == "flux":
        blocks = f"FLUX.1 transformer, random weights: {setup.layers} double + "
        blocks += f"{setup.single_layers} single blocks"
        rows = f"batch {setup.rows} (one row per image, guidance {setup.guidance} embedded)"
    else:
        blocks = f"SD3 transformer, random weights: {setup.layers} layers"
        rows = f"CFG batch {setup.rows}"
    return (
        f"{blocks} of {setup.heads} heads x {setup.head_dim} (width {setup.width}), latent "
        f"{setup.latent}x{setup.latent} patch {setup.patch} -> {setup.image_tokens} image "
        f"tokens, {setup.text_tokens} text tokens, {rows}; alpha {setup.alpha} (K = {k}), "
        f"timeline s = 5 (8 full steps); {device} {str(dtype).removeprefix('torch.')}"
        + (f", {threads} threads" if threads else "")
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[28, 50])
    parser.add_argument("--pairs", type=int, default=3, help="interleaved (full, CAT) pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps of each kind")
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 10 steps, 1 pair")
    parser.add_argument(
        "--model", choices=sorted(SETUPS), default="sd3", help="SD3 (default) or FLUX.1 blocks"
    )
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument(
        "--step-pairs", type=int, default=0, help="only interleaved single steps (N pairs)"
    )
    parser.add_argument(
        "--streams",
        nargs="+",
        default=[CATConfig.stream],
        choices=STREAMS,
        help="CAT variants by residual stream, interleaved in every round",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    full_setup, smoke_setup = SETUPS[args.model]
    setup = replace(full_setup, alpha=args.alpha)
    steps, pairs = args.steps, args.pairs
    if args.smoke:
        setup = replace(smoke_setup, alpha=args.alpha)
        steps, pairs = [10], 1
    print(describe(setup, "cpu", torch.float32, args.threads), flush=True)
    if args.step_pairs:
        out = step_pairs(setup, args.step_pairs, args.streams)
        for stream in args.streams:
            ratios = out["ratios"][stream]
            ratio = statistics.median(ratios)
            print(
                f"stream {stream}: per-step ratio full/pruned: median {ratio:.2f}x "
                f"({min(ratios):.2f}-{max(ratios):.2f}); full step {_spread(out['full'])} s, "
                f"pruned step {_spread(out['pruned'][stream])} s"
            )
            config = CATConfig(alpha=setup.alpha, stream=stream)
            macs = step_macs(setup, config)
            for n in steps:
                tl = timeline_macs(macs, n, config)
                print(
                    f"  {n} steps: implied loop speed-up {projected(ratio, n, config):.2f}x; "
                    f"total-MACs ratio {tl['total']['ratio']:.2f}x, paper "
                    f"{tl['paper']['ratio']:.2f}x"
                )
        return 0
    configs = {s: CATConfig(alpha=setup.alpha, stream=s) for s in args.streams}
    results: list[StepsResult] = []
    for n in steps:  # one step count at a time, each table printed as soon as it is measured
        results += run_benchmark(
            setup,
            [n],
            pairs,
            configs=configs,
            log=lambda s: print(s, flush=True),
            warmup=args.warmup,
        )
        for r in results[-len(configs) :]:
            print(f"\nstream {r.label}:")
            print(format_report([r], setup), flush=True)
        for line in compare_streams(results[-len(configs) :]):
            print(line)
        if args.json:
            with open(args.json, "w") as f:
                f.write(results_json(results, setup, device="cpu", threads=args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
