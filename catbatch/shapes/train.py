"""Train the ``catbatch-shapes`` pipeline (rectified flow), resumably, on a CPU or a GPU.

    python -m catbatch.shapes.train --steps 20000 --out DIR                  # CPU, 1 thread
    python -m catbatch.shapes.train --resume training/catbatch-shapes.pt --out DIR
    python -m catbatch.shapes.train --device cuda --dtype bf16 --steps auto \\
        --time-budget 360 --checkpoint CKPT --out DIR                        # a GPU (see scripts/)

The plan (:class:`Plan`) fixes the whole schedule from the start: a curriculum of one shape per
caption, then up to two, then three; most steps at 64 px (256 image tokens), the last ones at
128 px (1024 tokens; the position embedding is relative, so layout carries over); the text
encoders train from the first step. Every step's batch is a function of ``(seed, step)``
(:func:`catbatch.shapes.batch.step_seed`): scenes, caption dropout, noise levels and noise.

The checkpoint (one file, default ``training/catbatch-shapes.pt``, overwritten) holds the plan,
the step, the weights and their EMA in fp16 and AdamW's moments in bf16 (fp16 would flush the
second moments to zero): ``--resume`` continues with the next step's batch. ``--time-budget``
stops early enough to write the checkpoint and export; ``--steps auto`` fits the plan to the
budget from a few timed steps. ``--out DIR`` exports the EMA weights as the shipped pipeline
folder. Imports only torch, diffusers, transformers, numpy, scipy and PIL (no Ray, no open_clip).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
import transformers

from . import model as shapes_model
from .batch import draw, sample, step_seed, token_ids
from .model import IMAGE_SIZE, LOW_SIZE, SCHEDULER_SHIFT

CHECKPOINT = Path("training") / "catbatch-shapes.pt"
CHECKPOINT_FORMAT = 1
PROBE_SEED = 2_000_000_000  # the layout probe's batch: far from any training step's seed


def log(message: str) -> None:
    print(message, flush=True)


@dataclass
class Plan:
    """The whole schedule; fractions are of ``steps``. Stored in the checkpoint."""

    seed: int = 0
    steps: int = 20000
    batch: int = 32  # at 64 px
    high_batch: int = 16  # at 128 px
    high_from: float = 0.85  # the last 15% of the steps at 128 px
    two_shapes_from: float = 0.05  # curriculum: one shape per caption before this
    three_shapes_from: float = 0.12
    lr: float = 6e-4
    final_lr: float = 6e-5  # cosine decay to this; equal to lr: constant after warm-up
    warmup: int = 200
    weight_decay: float = 0.01
    ema: float = 0.999
    caption_dropout: float = 0.1
    uniform_t: float = 0.25  # share of noise levels uniform in (0, 1); the rest logit-normal

    def stage(self, step: int) -> tuple[int, int, int]:
        """``(image size, batch, max shapes per caption)`` of 1-based ``step``."""
        frac = (step - 1) / self.steps
        shapes = 1 + (frac >= self.two_shapes_from) + (frac >= self.three_shapes_from)
        if frac >= self.high_from:
            return IMAGE_SIZE, self.high_batch, shapes
        return LOW_SIZE, self.batch, shapes

    def lr_at(self, step: int) -> float:
        if step <= self.warmup:
            return self.lr * step / self.warmup
        frac = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.final_lr + (self.lr - self.final_lr) * 0.5 * (1 + math.cos(math.pi * frac))


@dataclass
class State:
    """What a run carries from step to step (besides the weights)."""

    step: int = 0
    curve: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # training seconds before this process (resumed runs)


# -- one step ---------------------------------------------------------------------------------
def noise_levels(g: torch.Generator, n: int, size: int, uniform: float, device: str):
    """Noise levels t in (0, 1): logit-normal (SD3) with a ``uniform`` share drawn uniformly;
    at 128 px shifted by SD3's resolution shift (more tokens keep more signal at equal t)."""
    logit_normal = torch.sigmoid(torch.randn(n, generator=g, device=device))
    flat = torch.rand(n, generator=g, device=device)
    t = torch.where(torch.rand(n, generator=g, device=device) < uniform, flat, logit_normal)
    if size == IMAGE_SIZE:
        t = SCHEDULER_SHIFT * t / (1 + (SCHEDULER_SHIFT - 1) * t)
    return t.clamp(1e-4, 1.0)


def make_batch(pipe: Any, plan: Plan, step: int, device: str) -> dict[str, torch.Tensor]:
    """The batch of ``step``: latents, token ids, noise levels and noise."""
    g = torch.Generator(device).manual_seed(step_seed(plan.seed, step))
    size, n, shapes = plan.stage(step)
    scenes = sample(g, n, shapes, device)
    drop = torch.rand(n, generator=g, device=device) < plan.caption_dropout
    x0 = latents(pipe, draw(scenes, size))
    return {
        "x0": x0,
        "ids": token_ids(scenes, pipe.tokenizer, drop),
        "t": noise_levels(g, n, size, plan.uniform_t, device),
        "noise": torch.randn(x0.shape, generator=g, device=device),
    }


@torch.no_grad()
def latents(pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latents of images in [0, 1], as the pipeline decodes them (VAE in float32)."""
    vae = pipe.vae
    z = vae.encode(pixels * 2 - 1).latent_dist.mode()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def encode_text(text_encoders: list[torch.nn.Module], ids: torch.Tensor):
    """Prompt embeddings as ``StableDiffusion3Pipeline.encode_prompt`` makes them with
    ``max_sequence_length=1``: each CLIP's penultimate hidden states side by side, then one
    zero token (the T5 stand-in); pooled: both projections."""
    outs = [te(ids, output_hidden_states=True) for te in text_encoders]
    embeds = torch.cat([o.hidden_states[-2] for o in outs], -1)
    zero = embeds.new_zeros(embeds.shape[0], 1, embeds.shape[-1])
    return torch.cat([embeds, zero], 1), torch.cat([o.text_embeds for o in outs], -1)


def predict(modules: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The velocity prediction at ``x_t = (1 - t) x0 + t noise``."""
    t = batch["t"].view(-1, 1, 1, 1)
    xt = (1 - t) * batch["x0"] + t * batch["noise"]
    embeds, pooled = encode_text([modules["text_encoder"], modules["text_encoder_2"]], batch["ids"])
    return modules["transformer"](
        hidden_states=xt,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        timestep=batch["t"] * 1000,
    ).sample


# -- the run ----------------------------------------------------------------------------------
class Trainer:
    def __init__(self, plan: Plan, device: str = "cpu", dtype: str = "fp32"):
        self.plan, self.device = plan, device
        self.pipe = shapes_model.build_pipeline(plan.seed).to(device)
        self.modules = shapes_model.trainable(self.pipe)
        for m in self.modules.values():
            m.train().requires_grad_(True)
        self.ema = {
            k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in self.modules.items()
        }
        self.params = [p for m in self.modules.values() for p in m.parameters()]
        self.opt = torch.optim.AdamW(
            self.params,
            lr=plan.lr,
            betas=(0.9, 0.99),
            weight_decay=plan.weight_decay,
            fused=device.startswith("cuda"),
        )
        self.autocast = (
            torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
            if dtype == "bf16"
            else nullcontext()
        )
        self.state = State()

    # -- steps --------------------------------------------------------------------------------
    def step(self, step: int) -> torch.Tensor:
        """One optimizer step on ``step``'s batch; returns the loss as a device tensor (read
        only when logging, so the GPU is not synchronised every step)."""
        batch = make_batch(self.pipe, self.plan, step, self.device)
        for group in self.opt.param_groups:
            group["lr"] = self.plan.lr_at(step)
        with self.autocast:
            pred = predict(self.modules, batch)
        loss = F.mse_loss(pred.float(), batch["noise"] - batch["x0"])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        decay = min(self.plan.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self._ema_params(), self.params, 1 - decay)
        return loss.detach()

    def _ema_params(self) -> list[torch.Tensor]:
        return [p for m in self.ema.values() for p in m.parameters()]

    @torch.no_grad()
    def layout_probe(self, step: int) -> dict[str, float]:
        """The EMA model's clean-image prediction at pure noise (t = 1) on 32 fixed scenes of
        the current stage: ``layout`` = 1 - its squared error / that of the flat background.
        A model that knows only the background scores ~0; one that puts the stated colours
        at the stated places scores clearly above 0 (the prediction is the blurry mean)."""
        size, _, shapes = self.plan.stage(step)
        g = torch.Generator(self.device).manual_seed(PROBE_SEED + shapes)
        scenes = sample(g, 32, shapes, self.device)
        x0 = latents(self.pipe, draw(scenes, size))
        flat = scenes.__class__(**{**vars(scenes), "count": torch.zeros_like(scenes.count)})
        background = latents(self.pipe, draw(flat, size))
        noise = torch.randn(x0.shape, generator=g, device=self.device)
        batch = {"x0": x0, "ids": token_ids(scenes, self.pipe.tokenizer), "noise": noise}
        batch["t"] = torch.ones(len(scenes), device=self.device)
        with self.autocast:
            v = predict(self.ema, batch).float()
        guess = noise - v
        err = (guess - x0).pow(2).mean()
        base = (background - x0).pow(2).mean()
        return {"layout": float(1 - err / base), "x0_error": float(err)}

    def ema_pipeline(self) -> Any:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(**{**self.pipe.components, **self.ema})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def evaluate(self, step: int, count: int, preview: Path | None = None) -> dict[str, float]:
        """Adherence of the EMA pipeline on ``count`` held-out captions at the stage's size."""
        from .checker import check, summary
        from .evaluate import generate, grid, heldout_captions

        size = self.plan.stage(step)[0]
        captions = heldout_captions(count)
        images = generate(self.ema_pipeline(), captions, size=size, batch=min(count, 256))
        result = summary([check(im, c) for im, c in zip(images, captions, strict=True)])
        if preview is not None:
            preview.parent.mkdir(parents=True, exist_ok=True)
            grid(images[:32]).save(preview)
        return {"step": step, "image_size": size, "captions": count, **result}

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, path: Path) -> float:
        """Write the checkpoint atomically; returns the seconds it took."""
        start = time.perf_counter()

        def half(module: torch.nn.Module) -> dict[str, torch.Tensor]:
            return {k: v.detach().to("cpu", torch.float16) for k, v in module.state_dict().items()}

        opt = self.opt.state_dict()
        opt["state"] = {
            i: {k: v.to("cpu", torch.bfloat16) if v.dim() else v.cpu() for k, v in s.items()}
            for i, s in opt["state"].items()
        }
        payload = {
            "format": CHECKPOINT_FORMAT,
            "plan": asdict(self.plan),
            "state": asdict(self.state),
            "weights": {k: half(m) for k, m in self.modules.items()},
            "ema": {k: half(m) for k, m in self.ema.items()},
            "optimizer": opt,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        return time.perf_counter() - start

    def load_checkpoint(self, payload: dict[str, Any]) -> None:
        for name, module in self.modules.items():
            module.load_state_dict(payload["weights"][name])
            self.ema[name].load_state_dict(payload["ema"][name])
        self.opt.load_state_dict(payload["optimizer"])  # moments are cast back to float32
        self.state = State(**payload["state"])

    def export(self, path: Path, record: dict[str, Any]) -> Path:
        return shapes_model.save_pipeline(self.pipe, path, self.ema, record)

    def record(self, **extra: Any) -> dict[str, Any]:
        return {
            "plan": asdict(self.plan),
            "steps_done": self.state.step,
            "seconds": round(self.state.seconds, 1),
            "curve": self.state.curve,
            "evals": self.state.evals,
            **extra,
        }

    # -- calibration --------------------------------------------------------------------------
    def seconds_per_step(self, repeats: int = 6) -> dict[int, float]:
        """Seconds per training step at each image size, timed on real steps; the weights,
        EMA and optimizer are put back afterwards."""
        saved = (
            {k: copy.deepcopy(m.state_dict()) for k, m in self.modules.items()},
            {k: copy.deepcopy(m.state_dict()) for k, m in self.ema.items()},
            copy.deepcopy(self.opt.state_dict()),
        )
        out = {}
        for size, first in ((LOW_SIZE, 1), (IMAGE_SIZE, self.plan.steps)):
            for _ in range(2):
                self.step(first)
            self._sync()
            start = time.perf_counter()
            for _ in range(repeats):
                loss = self.step(first)
            float(loss)
            out[size] = (time.perf_counter() - start) / repeats
        for name, module in self.modules.items():
            module.load_state_dict(saved[0][name])
            self.ema[name].load_state_dict(saved[1][name])
        self.opt.load_state_dict(saved[2])
        return out

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def fit_steps(plan: Plan, step: int, seconds: float, per_step: dict[int, float]) -> int:
    """The most steps (<= ``plan.steps``, > ``step``) whose rest, from ``step`` on, takes at
    most ``seconds`` at ``per_step`` seconds per step of each image size; the stages keep
    their fractions of the plan, so a shorter plan still ends at 128 px."""

    def rest(total: int) -> float:
        high_start = max(step, math.ceil(plan.high_from * total))
        low = max(0, high_start - step)
        return low * per_step[LOW_SIZE] + (total - high_start) * per_step[IMAGE_SIZE]

    total = plan.steps
    while total > step + 1 and rest(total) > seconds:
        total = max(step + 1, int(total * 0.98))
    return total


def refit(plan: Plan, target: int, step: int, seconds: float, per_step: dict[int, float]) -> int:
    """:func:`fit_steps` of the plan at ``target`` steps, without ever going back from 128 px
    to 64 px: once the high-resolution stage began, the plan only shortens."""
    fitted = fit_steps(dataclasses.replace(plan, steps=target), step, seconds, per_step)
    if plan.stage(step)[0] == IMAGE_SIZE:
        return min(fitted, plan.steps)
    return fitted


class Clock:
    """The time budget of a run: how long is left for training steps, and the pace per image
    size (calibrated once, then scaled by the pace observed since)."""

    def __init__(self, budget: float | None, reserve: float):
        self.started = time.perf_counter()
        self.budget, self.reserve = budget, reserve
        self.per_step = {LOW_SIZE: 1.0, IMAGE_SIZE: 2.0}  # relative, until calibrated
        self.save_seconds = 5.0
        self.eval_seconds = 0.0  # the last in-training evaluation

    def left(self, evals_to_come: int = 0) -> float:
        """Seconds left for steps, after the final checkpoint and export and the evaluations."""
        if not self.budget:
            return math.inf
        used = time.perf_counter() - self.started
        return (
            self.budget
            - used
            - self.reserve
            - 2 * self.save_seconds
            - (evals_to_come * self.eval_seconds)
        )

    def observe(self, size: int, seconds_per_step: float) -> None:
        scale = seconds_per_step / self.per_step[size]
        self.per_step = {k: v * scale for k, v in self.per_step.items()}


def run(args: argparse.Namespace) -> int:
    clock = Clock(args.time_budget, args.reserve)
    payload = None
    given = {f.name: getattr(args, f.name) for f in fields(Plan) if f.name != "steps"}
    given = {k: v for k, v in given.items() if v is not None}
    if args.steps not in (None, "auto"):
        given["steps"] = int(args.steps)
    if args.resume:
        payload = torch.load(args.resume, map_location="cpu", weights_only=True)
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise SystemExit(f"{args.resume}: not a catbatch-shapes checkpoint (format)")
        # flags given now change the saved plan from here on (e.g. a CPU's smaller batches, or
        # more steps: the schedule stretches); the data stream stays a function of seed and step
        plan = Plan(**{**payload["plan"], **given})
    else:
        plan = Plan(**given)
    trainer = Trainer(plan, args.device, args.dtype)
    if payload is not None:
        trainer.load_checkpoint(payload)
        changed = {k: v for k, v in given.items() if payload["plan"][k] != v}
        log(f"resumed {args.resume} at step {trainer.state.step}; plan changes: {changed or None}")
    if args.steps == "auto":
        if not args.time_budget or payload is not None:
            raise SystemExit("--steps auto needs --time-budget and a fresh run")
        clock.per_step = trainer.seconds_per_step()
        plan.steps = 10**9
        plan.steps = fit_steps(plan, 0, clock.left() * 0.95, clock.per_step)
        log(
            f"calibrated: {clock.per_step[LOW_SIZE]:.4f} s/step at {LOW_SIZE} px (batch "
            f"{plan.batch}), {clock.per_step[IMAGE_SIZE]:.4f} s/step at {IMAGE_SIZE} px (batch "
            f"{plan.high_batch}): {plan.steps} steps"
        )
    log(f"plan: {json.dumps(asdict(plan))}")
    target = plan.steps  # a budgeted run shortens the plan when slower, up to this when faster
    state, checkpoint = trainer.state, Path(args.checkpoint)
    last_save = time.perf_counter()
    window, losses, window_start = 0, [], time.perf_counter()
    run_start = time.perf_counter()
    stopped_early = False
    while state.step < plan.steps:
        if clock.left() <= 0:
            stopped_early = True
            log(f"time budget: stopping at step {state.step} of {plan.steps}")
            break
        state.step += 1
        losses.append(trainer.step(state.step))
        window += 1
        if state.step % args.log_every == 0 or state.step == plan.steps:
            trainer._sync()
            now = time.perf_counter()
            size, batch, shapes = plan.stage(state.step)
            if plan.stage(state.step - window + 1)[0] == size:
                clock.observe(size, (now - window_start) / window)
            point = {
                "step": state.step,
                "loss": float(torch.stack(losses).mean()),
                "lr": plan.lr_at(state.step),
                "size": size,
                "shapes": shapes,
                "steps_per_s": window / (now - window_start),
                "s": round(state.seconds + now - run_start, 1),
                **trainer.layout_probe(state.step),
            }
            state.curve.append(point)
            log(
                f"step {state.step}/{plan.steps} {size}px <= {shapes} shapes loss "
                f"{point['loss']:.4f} lr {point['lr']:.2e} {point['steps_per_s']:.2f} steps/s "
                f"({point['steps_per_s'] * batch:.0f} images/s) layout {point['layout']:+.3f} "
                f"{point['s']:.0f} s"
            )
            evals = (plan.steps - state.step) // args.eval_every if args.eval_every else 0
            fitted = refit(plan, target, state.step, clock.left(evals), clock.per_step)
            if fitted != plan.steps:
                log(f"at the pace so far, the plan now ends at step {fitted}")
                plan.steps = fitted
            window, losses, window_start = 0, [], time.perf_counter()
        if args.eval_every and state.step % args.eval_every == 0:
            eval_start = time.perf_counter()
            result = trainer.evaluate(state.step, args.eval_count, args.preview)
            state.evals.append(result)
            log(f"eval: {json.dumps({k: round(v, 4) for k, v in result.items()})}")
            clock.eval_seconds = time.perf_counter() - eval_start
            window_start += clock.eval_seconds  # the pace counts training steps only
        if time.perf_counter() - last_save > args.checkpoint_every:
            state.seconds += time.perf_counter() - run_start
            run_start = time.perf_counter()
            clock.save_seconds = trainer.save_checkpoint(checkpoint)
            last_save = time.perf_counter()
    state.seconds += time.perf_counter() - run_start
    clock.save_seconds = trainer.save_checkpoint(checkpoint)
    size_mb = checkpoint.stat().st_size / 1e6
    log(
        f"checkpoint {checkpoint} at step {state.step} ({size_mb:.1f} MB, "
        f"{clock.save_seconds:.1f} s)"
    )
    if args.out:
        record = trainer.record(
            device=str(args.device),
            dtype=args.dtype,
            stopped_early=stopped_early,
            resumed_from=str(args.resume) if args.resume else None,
        )
        trainer.export(Path(args.out), record)
        log(f"exported the EMA pipeline to {args.out}")
    log(f"done in {(time.perf_counter() - clock.started) / 60:.1f} min")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", help="steps of the plan, or 'auto' (fit --time-budget)")
    for f in fields(Plan):
        if f.name != "steps":
            flag = "--" + f.name.replace("_", "-")
            parser.add_argument(flag, type=type(f.default), help=f"plan (default {f.default})")
    parser.add_argument("--resume", type=Path, help="continue from this checkpoint")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="written here")
    parser.add_argument("--out", type=Path, help="export the EMA pipeline to this folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--time-budget", type=float, help="seconds for the whole run")
    parser.add_argument("--reserve", type=float, default=10.0, help="seconds kept for the end")
    parser.add_argument("--checkpoint-every", type=float, default=600.0, help="seconds")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=0, help="steps (0: never)")
    parser.add_argument("--eval-count", type=int, default=64, help="held-out captions")
    parser.add_argument("--preview", type=Path, help="contact sheet of each evaluation's images")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for lib in (diffusers, transformers):  # the 1-token T5's truncation warnings; no bars
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
