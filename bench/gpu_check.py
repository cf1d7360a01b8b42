"""GPU speed check: the speed benchmark in fp16 with SD3-medium layer sizes (random weights).

24 layers of 24 heads x 64 (width 1536), 1024px (128x128 latent, 4096 image tokens), 333 text
tokens, CFG batch 2, alpha 0.3; full vs CAT, interleaved, median and spread, with the card's
name. Needs torch with CUDA and diffusers (not Ray or open_clip).

    python -m bench.gpu_check [--steps 28 50] [--pairs 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from bench.engine_speed import (
    Clock,
    SelectorTimer,
    SpeedSetup,
    build_transformer,
    describe,
    format_report,
    make_inputs,
    results_json,
    run_benchmark,
    timed_generation,
)
from catbatch.pruning import CATConfig, apply_cat, remove_cat

SD3_MEDIUM = SpeedSetup(
    layers=24, heads=24, head_dim=64, latent=128, joint_dim=4096, pooled_dim=2048
)


class HostClock(Clock):
    """Marks with the host's clock only (no events, no sync): when the host enqueues a step."""

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start


def profile(setup: SpeedSetup, model: torch.nn.Module, steps: int = 12) -> None:
    """Is a pruned step bound by the host? Host enqueue time vs device time per step, and the
    top operators of a few pruned steps (torch.profiler)."""
    from bench.engine_speed import denoise

    dev = torch.device("cuda")
    inputs = make_inputs(setup, dev, torch.float16)
    config = CATConfig(alpha=setup.alpha)
    timer = SelectorTimer(Clock(dev))
    n_full = config.first_pruned_step
    for name, cfg in (("full", None), ("CAT", config)):
        _, times = timed_generation(model, inputs, steps, setup, Clock(dev), cfg, timer)
        if cfg is not None:
            state = apply_cat(model, cfg, cfg=True, selector_factory=timer.factory)
            state.auto_reset = False
        torch.cuda.synchronize()
        _, host = denoise(model, inputs, steps, setup, HostClock(dev))
        torch.cuda.synchronize()
        if cfg is not None:
            remove_cat(model)
        host_steps = [b - a for a, b in zip(host, host[1:], strict=False)]
        last = slice(n_full, None)
        print(
            f"{name}: device ms/step (last {steps - n_full}): "
            f"{[round(1000 * t, 1) for t in times.steps[last]]}; host enqueue ms/step: "
            f"{[round(1000 * t, 1) for t in host_steps[last]]}",
            flush=True,
        )
    state = apply_cat(model, config, cfg=True, selector_factory=timer.factory)
    state.auto_reset = False
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sync_names = (
        "cudaStreamSynchronize",
        "cudaDeviceSynchronize",
        "aten::item",
        "aten::_local_scalar_dense",
        "cudaMemcpyAsync",
        "cudaEventSynchronize",
    )
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with torch_profile(activities=acts) as prof:
        denoise(model, inputs, steps, setup, Clock(dev))
        torch.cuda.synchronize()
    remove_cat(model)
    events = prof.key_averages()
    print("host-sync-like calls in a CAT generation of", steps, "steps:")
    for e in events:
        if e.key in sync_names:
            print(f"  {e.key}: {e.count}")
    for key, rows in (("self_cpu_time_total", 22), ("self_device_time_total", 15)):
        try:
            print(events.table(sort_by=key, row_limit=rows, max_name_column_width=50))
        except Exception as error:  # the sort key's name differs between torch versions
            print(f"(no table sorted by {key}: {error})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[28, 50])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--out", help="write the raw results (JSON) here")
    parser.add_argument("--smoke", action="store_true", help="a small model (still on the GPU)")
    parser.add_argument("--profile", action="store_true", help="host vs device time, top ops")
    parser.add_argument("--samples", type=int, default=1, help="prompts per batch (CFG x2)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    setup = SpeedSetup(layers=2, heads=4) if args.smoke else SD3_MEDIUM
    if args.samples != 1:
        from dataclasses import replace

        setup = replace(setup, samples=args.samples)
    name = torch.cuda.get_device_name()
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    print(describe(setup, "cuda", torch.float16, None), flush=True)
    start = time.perf_counter()
    model = build_transformer(setup, "cuda", torch.float16)
    if args.profile:
        profile(setup, model)
    if not args.pairs:
        return 0
    results = run_benchmark(
        setup,
        args.steps,
        args.pairs,
        "cuda",
        torch.float16,
        model=model,
        log=lambda s: print(s, flush=True),
    )
    print(f"\nmeasured in {time.perf_counter() - start:.0f} s on {name}\n")
    print(format_report(results, setup, targets=False))
    if args.out:
        with open(args.out, "w") as f:
            f.write(results_json(results, setup, device=name, dtype="float16"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
