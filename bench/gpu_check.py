"""GPU check of CAT pruning: SD3-medium layer sizes in fp16 (random weights), one prepared run.

Sections, each on its own (one failing does not lose the others), written to ``--out`` (JSON)
after every section:

1. ``correctness``: a tiny SD3 in fp32 (unpruned vs CAT at alpha = 1, eager and captured, both
   residual streams: target <= 1e-5) and the SD3-medium model in fp16 (CAT captured vs eager at
   alpha 0.3; CAT at alpha 1 captured vs unpruned).
2. ``speed``: 24 layers of 24 heads x 64 (width 1536), 1024px (4096 image tokens), 333 text
   tokens, alpha 0.3, CFG; at 1 and 4 prompts, 28 and 50 steps: the unpruned transformer and
   CAT, each eager and captured as CUDA graphs (``cuda_graphs="on"``), in interleaved rounds
   (order rotating); medians, speed-ups, and the selection share of the eager CAT run (inside a
   graph the selector cannot be timed apart).
3. ``macs``: the counted MAC ratios of the timeline (meta device).

A time budget (``--budget``, default 190 s of measurement) skips rounds that would not fit, so
the whole run stays under 4 minutes on an H100/H200 (model set-up and imports included).
Needs torch with CUDA and diffusers; not Ray, pydantic or open_clip.

    python -m bench.gpu_check --out gpu_check.json
    python -m bench.gpu_check --profile            # host vs device time per step, top ops
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import Tensor

from bench.engine_speed import (
    CatRunner,
    Clock,
    Runner,
    SelectorTimer,
    SpeedSetup,
    build_transformer,
    describe,
    make_inputs,
    step_macs,
    timed_generation,
    timeline_macs,
)
from catbatch.pruning import CATConfig

SD3_MEDIUM = SpeedSetup(
    layers=24, heads=24, head_dim=64, latent=128, joint_dim=4096, pooled_dim=2048
)
TINY = SpeedSetup(
    layers=2, heads=2, head_dim=16, latent=16, text_tokens=8, joint_dim=32, pooled_dim=32
)
VARIANTS = ("full eager", "full captured", "CAT eager", "CAT captured")
# Where and in what precision the model runs; ``--dry-run`` sets the CPU and fp32 to test this
# script's plumbing without a GPU (nothing is captured there, so "captured" runs eagerly).
DEVICE = torch.device("cuda")
DTYPE = torch.float16


class GraphRunner(Runner):
    """The unpruned transformer forward captured as one CUDA graph (static inputs copied in,
    output cloned out); warm-up on the capture stream first. A failed capture runs eagerly and
    says so in ``error``."""

    label = "full captured"

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        cuda = DEVICE.type == "cuda"
        self.stream = torch.cuda.Stream() if cuda else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[Tensor, ...] | None = None
        self.output: Tensor | None = None
        self.warm = False
        self.error: str | None = None if cuda else "no CUDA device (dry run)"

    def __call__(self, hidden: Tensor, timestep: Tensor, text: Tensor, pooled: Tensor) -> Tensor:
        args = (hidden, timestep, text, pooled)
        if self.error is not None:
            return super().__call__(*args)
        if self.graph is None:
            current = torch.cuda.current_stream()
            self.stream.wait_stream(current)
            if not self.warm:
                self.warm = True
                with torch.cuda.stream(self.stream):
                    out = super().__call__(*args)
                current.wait_stream(self.stream)
                out.record_stream(current)
                return out
            try:
                self.static = tuple(t.clone() for t in args)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self.output = super().__call__(*self.static)
                current.wait_stream(self.stream)
                self.graph = graph
            except Exception as error:  # noqa: BLE001 - report, run eagerly
                self.error = f"{type(error).__name__}: {error}"
                print(f"  unpruned capture failed, running eagerly: {self.error}", flush=True)
                return super().__call__(*args)
        for static, value in zip(self.static, args, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.output.clone()


def graph_error(runner: Runner) -> str | None:
    """Why a runner that should capture did not (None if it captured)."""
    if isinstance(runner, GraphRunner):
        return runner.error if runner.graph is not None or runner.error else "never captured"
    if isinstance(runner, CatRunner) and runner.config.cuda_graphs == "on":
        graphs = runner.state.engine.graphs
        if graphs is None:
            return "no graphs"
        return graphs.error or (None if graphs.captures else "never captured")
    return None


class Report:
    """Results by section, written to ``path`` after every section; a failing section is
    recorded with its traceback and the others still run."""

    def __init__(self, path: str | None, header: dict[str, Any]):
        self.path = path
        self.data: dict[str, Any] = {"header": header}

    def section(self, name: str, fn: Callable[[], Any]) -> Any:
        print(f"\n== {name} ==", flush=True)
        try:
            self.data[name] = fn()
        except Exception as error:  # noqa: BLE001 - one failure must not lose the rest
            traceback.print_exc()
            self.data[name] = {"error": f"{type(error).__name__}: {error}"}
        self.write()
        return self.data[name]

    def write(self) -> None:
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.data, f, indent=1, default=str)


def _free() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def _max_diff(a: Tensor, b: Tensor) -> dict[str, float]:
    a, b = a.float(), b.float()
    diff = (a - b).abs().max().item()
    return {"max_abs": diff, "max_rel": diff / max(b.abs().max().item(), 1e-12)}


def generation(runner: Runner, setup: SpeedSetup, steps: int, inputs: Any) -> Tensor:
    return timed_generation(runner, inputs, steps, setup, Clock(DEVICE))[0]


# -- 1. correctness --------------------------------------------------------------------------


def correctness(model: torch.nn.Module, setup: SpeedSetup) -> dict[str, Any]:
    """alpha = 1 vs unpruned (tiny, fp32; 1e-5), captured vs eager (tiny and SD3-medium)."""
    out: dict[str, Any] = {}
    steps = 10
    tiny = build_transformer(TINY, DEVICE, torch.float32)
    inputs = make_inputs(replace(TINY, samples=2), DEVICE, torch.float32)
    base = generation(Runner(tiny), TINY, steps, inputs)
    for stream in ("full", "krow"):
        for graphs in ("off", "on"):
            config = CATConfig(alpha=1.0, stream=stream, cuda_graphs=graphs, last_full_step=2)
            runner = CatRunner(tiny, config)
            generation(runner, TINY, steps, inputs)  # warm-up / capture
            got = generation(runner, TINY, steps, inputs)
            key = f"tiny fp32 alpha=1 {stream} stream, graphs {graphs}, vs unpruned"
            out[key] = {**_max_diff(got, base), "graph_error": graph_error(runner)}
            out[key]["ok"] = out[key]["max_abs"] <= 1e-5
            runner.close()
            print(f"  {key}: {out[key]}", flush=True)

    inputs = make_inputs(setup, DEVICE, DTYPE)
    steps = 12
    eager = CatRunner(model, CATConfig(alpha=0.3, cuda_graphs="off", last_full_step=2))
    captured = CatRunner(model, CATConfig(alpha=0.3, cuda_graphs="on", last_full_step=2))
    want = generation(eager, setup, steps, inputs)
    generation(captured, setup, steps, inputs)
    got = generation(captured, setup, steps, inputs)
    key = "model alpha=0.3 CAT captured vs eager"
    out[key] = {**_max_diff(got, want), "graph_error": graph_error(captured)}
    print(f"  {key}: {out[key]}", flush=True)
    for runner in (eager, captured):
        runner.close()
    base = generation(Runner(model), setup, steps, inputs)
    one = CatRunner(model, CATConfig(alpha=1.0, cuda_graphs="on", last_full_step=2))
    generation(one, setup, steps, inputs)
    key = "model alpha=1 CAT captured vs unpruned"
    got = generation(one, setup, steps, inputs)
    out[key] = {**_max_diff(got, base), "graph_error": graph_error(one)}
    print(f"  {key}: {out[key]}", flush=True)
    one.close()
    _free()
    return out


# -- 2. speed --------------------------------------------------------------------------------


def speed(
    model: torch.nn.Module,
    setup: SpeedSetup,
    samples: Sequence[int],
    steps_list: Sequence[int],
    rounds: dict[int, int],
    deadline: float,
) -> dict[str, Any]:
    """Interleaved rounds of the four variants per (prompts, steps), within the deadline."""
    results: dict[str, Any] = {}
    clock = Clock(DEVICE)
    for n in samples:
        run_setup = replace(setup, samples=n)
        inputs = make_inputs(run_setup, DEVICE, DTYPE)
        config = CATConfig(alpha=setup.alpha)
        timer = SelectorTimer(clock)
        runners = [
            Runner(model),
            GraphRunner(model),
            CatRunner(model, replace(config, cuda_graphs="off"), timer, "CAT eager"),
            CatRunner(model, replace(config, cuda_graphs="on"), None, "CAT captured"),
        ]
        runners[0].label = "full eager"
        try:
            warm_steps = min(steps_list)
            last: dict[str, float] = {}
            for runner in runners:  # warm-up; the captured variants capture here
                if time.perf_counter() > deadline:
                    raise TimeoutError("time budget spent during warm-up")
                _, times = timed_generation(runner, inputs, warm_steps, run_setup, clock)
                last[runner.label] = times.total / warm_steps
            for steps in steps_list:
                key = f"{n} prompt(s), {steps} steps"
                results[key] = measure(runners, inputs, run_setup, steps, rounds[n], last, deadline)
                print_speed(key, results[key])
        finally:
            for runner in runners:
                if isinstance(runner, CatRunner):
                    runner.close()
            del runners
            _free()
    return results


def measure(
    runners: list[Runner],
    inputs: Any,
    setup: SpeedSetup,
    steps: int,
    rounds: int,
    per_step: dict[str, float],
    deadline: float,
) -> dict[str, Any]:
    clock = Clock(DEVICE)
    times: dict[str, list[float]] = {r.label: [] for r in runners}
    selection: list[float] = []
    done = 0
    for r in range(rounds):
        estimate = 1.2 * steps * sum(per_step.values())
        if time.perf_counter() + estimate > deadline:
            if not done:
                return {"skipped": f"no time left (a round needs ~{estimate:.0f} s)"}
            break
        shift = r % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            _, t = timed_generation(runner, inputs, steps, setup, clock)
            times[runner.label].append(t.total)
            per_step[runner.label] = t.total / steps
            if t.selection:
                selection.append(sum(t.selection.values()) / t.total)
        done += 1
    med = {label: statistics.median(v) for label, v in times.items()}
    return {
        "rounds": done,
        "seconds": times,
        "median_s": med,
        "speedup_eager": med["full eager"] / med["CAT eager"],
        "speedup_captured": med["full captured"] / med["CAT captured"],
        "speedup_captured_vs_eager_full": med["full eager"] / med["CAT captured"],
        "capture_gain_full": med["full eager"] / med["full captured"],
        "capture_gain_cat": med["CAT eager"] / med["CAT captured"],
        "selection_share_eager": statistics.median(selection) if selection else None,
        "graph_errors": {r.label: graph_error(r) for r in runners if graph_error(r)},
    }


def print_speed(key: str, r: dict[str, Any]) -> None:
    if "skipped" in r:
        print(f"  {key}: skipped ({r['skipped']})", flush=True)
        return
    med = r["median_s"]
    cells = ", ".join(f"{label} {med[label]:.3f} s" for label in VARIANTS)
    share = r["selection_share_eager"]
    share_text = "-" if share is None else f"{100 * share:.2f}%"
    print(
        f"  {key} ({r['rounds']} rounds): {cells}; CAT speed-up eager {r['speedup_eager']:.2f}x, "
        f"captured {r['speedup_captured']:.2f}x (captured CAT vs eager full "
        f"{r['speedup_captured_vs_eager_full']:.2f}x); capture gain full "
        f"{r['capture_gain_full']:.2f}x, CAT {r['capture_gain_cat']:.2f}x; selection "
        f"{share_text} of the eager CAT run"
        + (f"; graph errors {r['graph_errors']}" if r["graph_errors"] else ""),
        flush=True,
    )


def speed_table(results: dict[str, Any]) -> str:
    lines = [
        "| prompts, steps | rounds | full eager s | full captured s | CAT eager s | CAT captured s "
        "| speed-up eager | speed-up captured | selection share (eager CAT) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, r in results.items():
        if not isinstance(r, dict) or "median_s" not in r:
            continue
        med = r["median_s"]
        share = r["selection_share_eager"]
        lines.append(
            f"| {key} | {r['rounds']} | "
            + " | ".join(f"{med[v]:.3f}" for v in VARIANTS)
            + f" | {r['speedup_eager']:.2f}x | {r['speedup_captured']:.2f}x | "
            + (f"{100 * share:.2f} % |" if share is not None else "- |")
        )
    return "\n".join(lines)


# -- 3. MACs ---------------------------------------------------------------------------------


def macs(setup: SpeedSetup, steps_list: Sequence[int]) -> dict[str, Any]:
    config = CATConfig(alpha=setup.alpha)
    per_step = step_macs(setup, config)
    out = {}
    for steps in steps_list:
        tl = timeline_macs(per_step, steps, config)
        out[f"{steps} steps"] = {k: v["ratio"] for k, v in tl.items()}
        print(
            f"  {steps} steps: MACs ratio total {tl['total']['ratio']:.2f}x, paper "
            f"{tl['paper']['ratio']:.2f}x",
            flush=True,
        )
    return out


# -- profile (optional) ----------------------------------------------------------------------


def profile(setup: SpeedSetup, model: torch.nn.Module, steps: int = 12) -> None:
    """Host enqueue time vs device time per step, eager; top operators of a CAT generation."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from bench.engine_speed import denoise

    dev = torch.device("cuda")
    inputs = make_inputs(setup, dev, torch.float16)
    for runner in (
        Runner(model),
        CatRunner(model, CATConfig(alpha=setup.alpha, cuda_graphs="off")),
    ):
        _, times = timed_generation(runner, inputs, steps, setup, Clock(dev))
        runner.begin()
        torch.cuda.synchronize()
        start = time.perf_counter()
        _, marks = denoise(runner, inputs, steps, setup, Clock(torch.device("cpu")))
        host = [b - a for a, b in zip(marks, marks[1:], strict=False)]
        torch.cuda.synchronize()
        print(
            f"{runner.label}: device ms/step {[round(1000 * t, 1) for t in times.steps]}; host "
            f"enqueue ms/step {[round(1000 * t, 1) for t in host]}; "
            f"{time.perf_counter() - start:.2f} s",
            flush=True,
        )
        if isinstance(runner, CatRunner):
            runner.begin()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                denoise(runner, inputs, steps, setup, Clock(dev))
                torch.cuda.synchronize()
            events = prof.key_averages()
            for key in ("self_cpu_time_total", "self_device_time_total"):
                try:
                    print(events.table(sort_by=key, row_limit=20, max_name_column_width=50))
                except Exception as error:  # noqa: BLE001 - sort keys differ between versions
                    print(f"(no table sorted by {key}: {error})")
            runner.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results (JSON) here, after every section")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4], help="prompts (CFG x2)")
    parser.add_argument("--steps", type=int, nargs="+", default=[28, 50])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds at 1 prompt")
    parser.add_argument("--budget", type=float, default=190.0, help="seconds of measurement")
    parser.add_argument("--smoke", action="store_true", help="a small model (still on the GPU)")
    parser.add_argument("--profile", action="store_true", help="host vs device time, top ops")
    parser.add_argument("--skip", nargs="*", default=[], choices=["correctness", "speed", "macs"])
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny model, CPU fp32: test this script, no GPU"
    )
    args = parser.parse_args(argv)
    global DEVICE, DTYPE
    if args.dry_run:
        DEVICE, DTYPE = torch.device("cpu"), torch.float32
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--dry-run tests the script on the CPU)")
        return 1
    else:
        DEVICE, DTYPE = torch.device("cuda"), torch.float16
    start = time.perf_counter()
    deadline = start + args.budget
    setup = SD3_MEDIUM
    if args.smoke:
        setup = SpeedSetup(layers=2, heads=4)
    if args.dry_run:
        setup = TINY
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU (dry run)"
    import diffusers

    header = {
        "device": name,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "setup": asdict(setup),
        "default_stream": CATConfig.stream,
    }
    print(f"device: {name}; torch {torch.__version__}; diffusers {diffusers.__version__}")
    print(describe(setup, DEVICE.type, DTYPE, None), flush=True)
    report = Report(args.out, header)
    model = build_transformer(setup, DEVICE, DTYPE)
    if args.profile:
        profile(setup, model)
        return 0
    if "correctness" not in args.skip:
        report.section("correctness", lambda: correctness(model, setup))
    if "speed" not in args.skip:
        rounds = {n: args.rounds if n == 1 else max(1, args.rounds - 1) for n in args.samples}
        results = report.section(
            "speed", lambda: speed(model, setup, args.samples, args.steps, rounds, deadline)
        )
        if isinstance(results, dict) and "error" not in results:
            print()
            print(speed_table(results))
    if "macs" not in args.skip and time.perf_counter() < deadline + 15:
        report.section("macs", lambda: macs(setup, args.steps))
    report.data["seconds"] = time.perf_counter() - start
    report.write()
    print(f"\ndone in {report.data['seconds']:.0f} s on {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
