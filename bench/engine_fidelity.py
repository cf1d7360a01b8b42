"""Fidelity benchmark: every selection strategy at the same budget against the unpruned run.

A PROXY, NOT IMAGE QUALITY: all weights are random, so the numbers say how far each strategy's
cache-and-reuse drifts from the unpruned trajectory of the same model, not how good an image is.

A tiny SD3 pipeline (catbatch.models.tiny's text encoders, tokenizers and VAE) with a larger
transformer (4 layers, 4 heads x 64 = width 256) at 512x512 (64x64 latent -> 1024 image tokens,
77 + 256 text tokens), 28 steps, guidance 7, fp32 on the CPU, 16 PartiPrompts prompts, one seed
per prompt. Each strategy (cat, noise, random, sequential, at-edm) runs at alpha 0.3 in the
default residual stream, or in each of ``--streams full krow`` (the full-length stream scoring
the raw output, the K-row stream scoring the merged output); the final image and the final
latent are compared with the unpruned run of the same prompts and seeds. With both streams it
also prints, per strategy, on how many prompts the full-length stream's latent PSNR is higher
(issue 13's decision rule: the full-length stream is the default if ``cat`` wins on >= 12 of 16
prompts).

    python -m bench.engine_fidelity              # the issue's configuration (minutes)
    python -m bench.engine_fidelity --streams full krow   # both streams, and who wins
    python -m bench.engine_fidelity --model flux # FLUX.1 blocks (issue 17)
    python -m bench.engine_fidelity --smoke [--model flux]  # a tiny preset, 1 prompt, seconds
    python -m bench.engine_fidelity --shapes     # the trained catbatch-shapes model (minutes)

``--model flux``: the tiny-flux pipeline (its CLIP / T5 encoders, tokenizers and 16-channel VAE)
with a FLUX.1 transformer of 6 heads x 64 (width 384, the speed benchmark's), 2 double- and 4
single-stream blocks (FLUX.1-dev's 1:2 ratio), 512x512 (1024 image tokens), 128 T5 tokens,
embedded guidance 3.5 (no CFG: one row per image); latents are compared unpacked
``(16, 64, 64)``.

``--shapes`` measures on a model with real (trained) weights: the shipped ``catbatch-shapes``
pipeline on held-out captions of its domain. Per variant (every strategy at ``--alpha``, and
``cat`` at alphas 0.1-0.7): the shapes checker's prompt adherence, the CLIP score with the
shipped ``catbatch-shapes-clip``, and image PSNR / SSIM against the unpruned images. The work
goes in chunks of 40 captions over ``--workers`` processes; ``--save-dir DIR`` keeps each finished
chunk, so a stopped run (500 captions x 10 variants is hours of CPU) resumes where it stopped:

    python -m bench.engine_fidelity --shapes --prompts 500 --save-dir out/shapes-500
    python -m bench.engine_fidelity --shapes --variants cat sequential   # these and unpruned
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from torch import Tensor

from catbatch.metrics.fidelity import latent_psnr, psnr_batch, ssim_batch
from catbatch.models.tiny import CLIP_HIDDEN, T5_D_MODEL, build_tiny_pipeline
from catbatch.pruning import STRATEGIES, CATConfig, apply_cat, remove_cat
from catbatch.pruning.config import STREAMS

PARTI_PATH = Path("/work/shared/data/PartiPrompts.tsv")
BUILTIN_PROMPTS = (
    "a red bicycle leaning against a brick wall",
    "an astronaut riding a horse on the moon",
    "a bowl of ramen with a soft-boiled egg, studio lighting",
    "a lighthouse on a cliff at sunset, oil painting",
    "a corgi wearing sunglasses on a beach",
    "the skyline of a futuristic city at night",
    "a watercolor painting of a fox in a snowy forest",
    "a steaming cup of coffee on a wooden table",
    "a vintage car parked in front of a diner",
    "a close-up photo of a dew-covered spider web",
    "a medieval castle surrounded by a moat",
    "a robot reading a book in a library",
    "a field of sunflowers under a blue sky",
    "a sailboat on a calm lake at dawn",
    "a plate of sushi arranged on a black slate",
    "a hot air balloon over a desert canyon",
)


def load_prompts(count: int, path: Path = PARTI_PATH) -> tuple[list[str], str]:
    """``count`` PartiPrompts prompts spread evenly over the file (rows ``i * total // count``),
    or the built-in list when the file is absent."""
    if path.is_file():
        try:
            from catbatch.job.prompts import PromptSource, read_prompts
        except ImportError:  # e.g. no pydantic/fsspec: read the TSV's Prompt column directly
            header, *lines = path.read_text(encoding="utf-8").splitlines()
            column = header.split("\t").index("Prompt")
            rows = [line.split("\t")[column] for line in lines if line.strip()]
        else:
            rows = [r.prompt for r in read_prompts(PromptSource(path=str(path), format="parti"))]
        picked = [rows[i * len(rows) // count] for i in range(count)]
        return picked, f"PartiPrompts ({path.name}), rows i*{len(rows)}//{count}"
    print(f"{path} not found: using {count} built-in prompts instead")
    return list(BUILTIN_PROMPTS[:count]), "built-in prompts (PartiPrompts file absent)"


def tiny_sd3(saved: str | None = None, preset: str = "tiny-sd3") -> Any:
    """A tiny preset (seed 0; ``tiny-sd3`` or ``tiny-flux``), built here or loaded from a
    ``save_pretrained`` folder."""
    if saved is None:
        return build_tiny_pipeline(preset, seed=0)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(saved, local_files_only=True)


def build_pipeline(
    layers: int = 4, heads: int = 4, head_dim: int = 64, latent: int = 64, saved: str | None = None
) -> Any:
    """The tiny SD3 pipeline with its transformer replaced by one of the given size."""
    pipe = tiny_sd3(saved)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        transformer = SD3Transformer2DModel(
            sample_size=latent,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=T5_D_MODEL,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=2 * CLIP_HIDDEN,
            pos_embed_max_size=96,
        ).eval()
    pipe.register_modules(transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


FLUX_TEXT_TOKENS = 128


def build_flux_pipeline(
    double: int = 2, single: int = 4, heads: int = 6, head_dim: int = 64, saved: str | None = None
) -> Any:
    """The tiny-flux pipeline with its transformer replaced by FLUX.1 blocks of the given size
    (random weights, seed 1)."""
    pipe = tiny_sd3(saved, "tiny-flux")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=double,
            num_single_layers=single,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=T5_D_MODEL,
            pooled_projection_dim=CLIP_HIDDEN,
            guidance_embeds=True,
            axes_dims_rope=(head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16),
        ).eval()
    pipe.register_modules(transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_flux(pipe: Any) -> bool:
    return isinstance(pipe.transformer, FluxTransformer2DModel)


@torch.no_grad()
def generate(
    pipe: Any, prompts: Sequence[str], seeds: Sequence[int], size: int, steps: int, batch: int
) -> tuple[Tensor, Tensor]:
    """Final latents ``(P, 16, h, w)`` and images ``(P, 3, H, W)`` in ``[0, 1]``. SD3: CFG
    guidance 7; FLUX: embedded guidance 3.5, ``FLUX_TEXT_TOKENS`` T5 tokens, latents unpacked."""
    flux = is_flux(pipe)
    call: dict[str, Any] = {"guidance_scale": 7.0}
    if flux:
        call = {"guidance_scale": 3.5, "max_sequence_length": FLUX_TEXT_TOKENS}
    latents, images = [], []
    for at in range(0, len(prompts), batch):
        chunk = list(prompts[at : at + batch])
        generators = [torch.Generator().manual_seed(s) for s in seeds[at : at + batch]]
        out = pipe(
            prompt=chunk,
            height=size,
            width=size,
            num_inference_steps=steps,
            generator=generators,
            output_type="latent",
            **call,
        ).images
        if flux:  # packed (B, N, 64) -> (B, 16, h, w), as the pipeline does before decoding
            out = pipe._unpack_latents(out, size, size, pipe.vae_scale_factor)
        latents.append(out.cpu())
        decoded = pipe.vae.decode(
            out / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor, return_dict=False
        )[0]
        images.append(pipe.image_processor.postprocess(decoded, output_type="pt").cpu())
    return torch.cat(latents), torch.cat(images)


def latent_ssim(latent: Tensor, reference: Tensor) -> float:
    """SSIM of a latent ``(C, h, w)``: both mapped by the reference's range to [0, 1] (clamped),
    each channel a grey image, averaged over channels."""
    lo, hi = reference.min(), reference.max()
    scale = (hi - lo).clamp_min(1e-12)

    def norm(t: Tensor) -> Tensor:
        return ((t.double() - lo) / scale).clamp(0, 1)[:, None]

    return statistics.fmean(ssim_batch(norm(latent), norm(reference)))


def compare(latents: Tensor, images: Tensor, ref_latents: Tensor, ref_images: Tensor) -> dict:
    """Per-prompt image PSNR/SSIM and latent PSNR/SSIM against the reference."""
    return {
        "image_psnr": psnr_batch(images, ref_images),
        "image_ssim": ssim_batch(images, ref_images),
        "latent_psnr": [latent_psnr(x, y) for x, y in zip(latents, ref_latents, strict=True)],
        "latent_ssim": [latent_ssim(x, y) for x, y in zip(latents, ref_latents, strict=True)],
    }


def _stat(values: Sequence[float], digits: int = 2) -> str:
    mean, lo, hi = statistics.fmean(values), min(values), max(values)
    return f"{mean:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """One row per ``"strategy"`` or ``"strategy (stream)"`` key."""
    lines = [
        "| strategy | image PSNR dB | image SSIM | latent PSNR dB | latent SSIM | s / prompt |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {_stat(row['image_psnr'])} | {_stat(row['image_ssim'], 4)} | "
            f"{_stat(row['latent_psnr'])} | {_stat(row['latent_ssim'], 4)} | "
            f"{row['seconds']:.2f} |"
        )
    lines.append("")
    lines.append("Mean over prompts (min-max). Random weights: a proxy for drift from the unpruned")
    lines.append("run, NOT image quality.")
    return "\n".join(lines)


def stream_wins(rows: dict[str, dict[str, Any]], strategies: Sequence[str]) -> list[str]:
    """Per strategy: prompts on which the full-length stream's latent PSNR beats the K-row
    stream's, and the mean difference (dB)."""
    lines = []
    for strategy in strategies:
        full, krow = rows.get(f"{strategy} (full)"), rows.get(f"{strategy} (krow)")
        if full is None or krow is None:
            continue
        pairs = list(zip(full["latent_psnr"], krow["latent_psnr"], strict=True))
        wins = sum(f > k for f, k in pairs)
        gain = statistics.fmean(f - k for f, k in pairs)
        image = statistics.fmean(
            f - k for f, k in zip(full["image_psnr"], krow["image_psnr"], strict=True)
        )
        lines.append(
            f"{strategy}: full-length stream higher latent PSNR on {wins} of {len(pairs)} "
            f"prompts; mean latent gain {gain:+.2f} dB, image {image:+.2f} dB"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--batch", type=int, default=4, help="prompts per pipeline call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--strategies", nargs="*", default=list(STRATEGIES), help="none: the reference only"
    )
    parser.add_argument(
        "--streams",
        nargs="+",
        default=[CATConfig.stream],
        choices=STREAMS,
        help="residual streams to run each strategy in (both: full krow)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 128px, 1 prompt")
    parser.add_argument(
        "--model", choices=["sd3", "flux"], default="sd3", help="SD3 (default) or FLUX.1 blocks"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pipeline-dir", help="a saved tiny-sd3 pipeline (no open_clip needed)")
    parser.add_argument("--parti", default=str(PARTI_PATH), help="PartiPrompts TSV")
    parser.add_argument("--json", help="also write per-prompt results here")
    parser.add_argument(
        "--reference",
        help="a file for the unpruned run: loaded when it holds this configuration's, else "
        "computed and saved (so strategies can run in separate commands)",
    )
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON", help="print one table from --json files, run nothing"
    )
    parser.add_argument("--shapes", action="store_true", help="the trained catbatch-shapes model")
    parser.add_argument("--guidance", type=float, default=7.0, help="--shapes only")
    parser.add_argument("--workers", type=int, default=2, help="--shapes: processes")
    parser.add_argument(
        "--save-dir",
        help="--shapes: keep each finished chunk of images here; a rerun computes only the rest",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME",
        help="--shapes: only these variants (with the unpruned reference), e.g. cat sequential "
        "'cat a=0.5'",
    )
    args = parser.parse_args(argv)
    if args.merge:
        return merge_main(args.merge)
    if args.shapes:
        if "--prompts" not in (argv if argv is not None else sys.argv):
            args.prompts = 64
        return shapes_main(args)
    torch.set_num_threads(args.threads)

    flux = args.model == "flux"
    if args.smoke:
        pipe = tiny_sd3(args.pipeline_dir, "tiny-flux" if flux else "tiny-sd3")
        pipe.set_progress_bar_config(disable=True)
        size, count, steps = 128, 1, 10
        label = "tiny-sd3 preset (2 layers, width 64), 128x128"
        if flux:
            label = "tiny-flux preset (2 double + 2 single blocks, width 64), 128x128"
    elif flux:
        pipe = build_flux_pipeline(saved=args.pipeline_dir)
        size, count, steps = 512, args.prompts, args.steps
        label = (
            "FLUX.1 transformer 2 double + 4 single blocks x 6 heads x 64 (width 384), 512x512 "
            f"(1024 tokens), {FLUX_TEXT_TOKENS} T5 tokens, guidance 3.5 embedded"
        )
    else:
        pipe = build_pipeline(saved=args.pipeline_dir)
        size, count, steps = 512, args.prompts, args.steps
        label = "SD3 transformer 4 layers x 4 heads x 64 (width 256), 512x512 (1024 tokens)"
    pipe.to(args.device)
    prompts, source = load_prompts(count, Path(args.parti))
    seeds = [1000 + i for i in range(len(prompts))]
    print(
        f"{label}; {steps} steps; alpha {args.alpha}; {len(prompts)} prompts from {source}; "
        f"fp32 {args.device}, {args.threads} threads; RANDOM WEIGHTS: a proxy, not image quality",
        flush=True,
    )

    key = [label, prompts, seeds, size, steps]
    ref_latents, ref_images, full_seconds = reference(
        args.reference, key, lambda: generate(pipe, prompts, seeds, size, steps, args.batch)
    )
    print(f"unpruned: {full_seconds:.2f} s / prompt", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for strategy in args.strategies:
        for stream in args.streams:
            config = CATConfig(alpha=args.alpha, strategy=strategy, stream=stream)
            state = apply_cat(pipe, config)
            start = time.perf_counter()
            try:
                latents, images = generate(pipe, prompts, seeds, size, steps, args.batch)
            finally:
                remove_cat(pipe)
            seconds = (time.perf_counter() - start) / len(prompts)
            if state.pruned_steps == 0:
                raise RuntimeError(f"{strategy}: no pruned step ran")
            name = strategy if len(args.streams) == 1 else f"{strategy} ({stream})"
            rows[name] = {
                **compare(latents, images, ref_latents, ref_images),
                "seconds": seconds,
                "strategy": strategy,
                "stream": stream,
            }
            print(f"{name}: {seconds:.2f} s / prompt", flush=True)
    print()
    print(format_table(rows))
    print(f"(unpruned: {full_seconds:.2f} s / prompt)")
    for line in stream_wins(rows, args.strategies):
        print(line)
    if args.json:
        data = {"setup": f"{label}; {steps} steps; alpha {args.alpha}", "prompts": prompts}
        data["rows"] = rows
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 0


def reference(path: str | None, key: list[Any], run: Any) -> tuple[Tensor, Tensor, float]:
    """The unpruned latents, images and s / prompt: from ``path`` when it holds ``key``'s run,
    else ``run()`` (then saved to ``path``)."""
    if path and Path(path).is_file():
        saved = torch.load(path, weights_only=False)
        if saved["key"] != key:
            raise SystemExit(f"{path} holds another configuration's reference; remove it")
        print(f"unpruned run loaded from {path}", flush=True)
        return saved["latents"], saved["images"], saved["seconds"]
    start = time.perf_counter()
    latents, images = run()
    seconds = (time.perf_counter() - start) / len(key[1])
    if path:
        torch.save({"key": key, "latents": latents, "images": images, "seconds": seconds}, path)
    return latents, images, seconds


def merge_main(paths: Sequence[str]) -> int:
    """One table from the ``--json`` files of separate runs (same setup and prompts); a
    strategy run in both streams gets a row per stream."""
    files = [json.loads(Path(p).read_text()) for p in paths]
    if any(
        (f.get("setup"), f["prompts"]) != (files[0].get("setup"), files[0]["prompts"])
        for f in files
    ):
        raise SystemExit("--merge: the files are runs of different setups or prompts")
    runs = [row for f in files for row in f["rows"].values()]
    streams: dict[str, set[str]] = {}
    for row in runs:
        streams.setdefault(row["strategy"], set()).add(row["stream"])
    rows = {}
    for row in runs:
        name = row["strategy"]
        rows[name if len(streams[name]) == 1 else f"{name} ({row['stream']})"] = row
    print(f"{files[0].get('setup')}; {len(files[0]['prompts'])} prompts")
    print(format_table(rows))
    for line in stream_wins(rows, list(streams)):
        print(line)
    return 0


# -- the trained catbatch-shapes model: adherence, CLIP score and fidelity per strategy ---------
SHAPES_SWEEP = (0.1, 0.2, 0.3, 0.5, 0.7)


CHUNK = 40  # captions per job: a multiple of the batch (8), so chunks batch as one run would


def _shapes_job(job: tuple[str | None, float, list[str], int, float]) -> tuple[Any, float, int]:
    """One variant on a chunk of captions in its own process: ``(uint8 images, seconds,
    pruned steps)``; ``strategy=None`` is the unpruned run."""
    from catbatch.shapes.evaluate import generate, load

    strategy, alpha, captions, steps, guidance = job
    torch.set_num_threads(1)
    pipe = load("catbatch-shapes")
    state = apply_cat(pipe, CATConfig(alpha=alpha, strategy=strategy)) if strategy else None
    start = time.perf_counter()
    images = generate(pipe, captions, steps=steps, guidance=guidance)
    return images, time.perf_counter() - start, state.pruned_steps if state else 0


def _slug(name: str) -> str:
    return name.replace(" ", "-").replace("=", "")


class ShapesStore:
    """Finished chunks of a ``--shapes`` run in a folder: ``<variant>/<first caption>.npz``
    (images, seconds, pruned steps) under a ``setup.json`` naming what they were made with, so a
    stopped run resumes where it stopped and a changed setup never mixes with an old one."""

    def __init__(self, folder: Path, setup: dict[str, Any]) -> None:
        self.folder = folder
        marker = folder / "setup.json"
        if marker.exists() and json.loads(marker.read_text()) != setup:
            raise SystemExit(
                f"{folder} holds a run of another setup ({marker}); pass another --save-dir "
                "or delete it"
            )
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(setup, indent=1))

    def path(self, variant: str, first: int) -> Path:
        return self.folder / _slug(variant) / f"{first:06d}.npz"

    def load(self, variant: str, first: int) -> tuple[Any, float, int] | None:
        import numpy as np

        path = self.path(variant, first)
        if not path.exists():
            return None
        with np.load(path) as data:
            return data["images"], float(data["seconds"]), int(data["pruned"])

    def save(self, variant: str, first: int, result: tuple[Any, float, int]) -> None:
        import numpy as np

        path = self.path(variant, first)
        path.parent.mkdir(exist_ok=True)
        images, seconds, pruned = result
        partial = path.with_suffix(".part.npz")
        np.savez_compressed(partial, images=images, seconds=seconds, pruned=pruned)
        partial.replace(path)  # a chunk is there whole or not at all


def shapes_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | alpha | adherence % | shape % | colour % | position % | extra / caption | "
        "CLIP score | PSNR dB | SSIM | s / prompt |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        fidelity = (
            "- | -"
            if r["name"] == "unpruned"
            else f"{statistics.median(r['psnr']):.2f} | {statistics.fmean(r['ssim']):.4f}"
        )
        a = r["adherence"]
        lines.append(
            f"| {r['name']} | {r['alpha']} | {100 * a['adherence']:.1f} | {100 * a['shape']:.1f} "
            f"| {100 * a['colour']:.1f} | {100 * a['position']:.1f} | {a['extra']:.2f} | "
            f"{r['clip']:.2f} | "
            f"{fidelity} | {r['seconds']:.2f} |"
        )
    lines.append("")
    lines.append(
        "Adherence: the shapes checker's shape+colour+position facts that hold; each unstated"
    )
    lines.append("shape found (extra / caption) adds three failed facts. CLIP score:")
    lines.append("catbatch-shapes-clip, mean. PSNR: median over prompts (identical images count as")
    lines.append("100 dB); SSIM: mean. Both against the unpruned images of the same seeds.")
    return "\n".join(lines)


def paired_difference(
    a: Sequence[Any], b: Sequence[Any], resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float, int, int]:
    """Adherence of checker reports ``a`` minus ``b`` (the same captions and seeds), in points,
    with a 95% paired bootstrap interval over captions, and the captions on which ``a`` holds a
    larger / smaller share of its counted facts: ``(difference, low, high, better, worse)``."""
    import numpy as np

    held = np.array([[*x.held(), *y.held()] for x, y in zip(a, b, strict=True)], dtype=float)

    def diff(rows: Any) -> Any:
        sums = rows.sum(axis=-2)
        return 100 * (sums[..., 0] / sums[..., 1] - sums[..., 2] / sums[..., 3])

    picks = np.random.default_rng(seed).integers(0, len(held), (resamples, len(held)))
    low, high = np.percentile(diff(held[picks]), [2.5, 97.5])
    # per caption, facts held over facts counted (unstated shapes count as failed facts)
    cross = held[:, 0] * held[:, 3] - held[:, 2] * held[:, 1]
    better, worse = int((cross > 0).sum()), int((cross < 0).sum())
    return float(diff(held)), float(low), float(high), better, worse


def shapes_main(args: argparse.Namespace) -> int:
    """Every strategy at ``args.alpha`` and a ``cat`` alpha sweep on the shipped model, in
    chunks of :data:`CHUNK` captions over ``args.workers`` processes; with ``--save-dir`` each
    finished chunk is kept and a rerun computes only what is missing."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import numpy as np

    from catbatch.models.tiny import PRESET_VERSION
    from catbatch.shapes.evaluate import heldout_captions
    from catbatch.shapes.model import IMAGE_SIZE, image_tokens

    captions = heldout_captions(args.prompts)
    steps = args.steps
    variants: list[tuple[str, str | None, float]] = [("unpruned", None, 1.0)]
    variants += [(s, s, args.alpha) for s in args.strategies]
    variants += [(f"cat a={a}", "cat", a) for a in SHAPES_SWEEP if a != args.alpha]
    if args.variants:
        known = {name for name, _, _ in variants}
        unknown = sorted(set(args.variants) - known)
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; known: {sorted(known)}")
        by_name = {v[0]: v for v in variants}  # in the order asked for, after the reference
        variants = [variants[0]] + [by_name[n] for n in args.variants if n != "unpruned"]
    print(
        f"catbatch-shapes (trained SD3 architecture, {IMAGE_SIZE}x{IMAGE_SIZE}, "
        f"{image_tokens()} image tokens + 33 text tokens); {len(captions)} held-out captions, "
        f"seeds 1000+i; {steps} steps; guidance {args.guidance}; fp32 CPU, "
        f"{args.workers} worker processes x 1 thread",
        flush=True,
    )
    store = None
    if args.save_dir:
        setup = {"preset": PRESET_VERSION, "torch": torch.__version__, "steps": steps}
        setup.update(guidance=args.guidance, chunk=CHUNK, captions=captions)
        store = ShapesStore(Path(args.save_dir), setup)
    firsts = range(0, len(captions), CHUNK)
    done: dict[tuple[str, int], tuple[Any, float, int]] = {}
    todo = []
    for name, strategy, alpha in variants:
        for first in firsts:
            kept = store.load(name, first) if store else None
            if kept is not None:
                done[name, first] = kept
            else:
                chunk = captions[first : first + CHUNK]
                todo.append(((name, first), (strategy, alpha, chunk, steps, args.guidance)))
    if store:
        total = len(variants) * len(firsts)
        print(f"{total - len(todo)} of {total} chunks kept in {args.save_dir}", flush=True)
    with ProcessPoolExecutor(args.workers) as pool:
        futures = {pool.submit(_shapes_job, job): key for key, job in todo}
        for future in as_completed(futures):
            key = futures[future]
            done[key] = future.result()
            if store:
                store.save(*key, done[key])
            print(f"{key[0]} captions {key[1]}+: {done[key][1]:.0f} s", flush=True)

    from catbatch.metrics.clipscore import ClipScorer, clip_setup
    from catbatch.shapes.checker import check, summary

    def joined(name: str) -> tuple[Any, float, int]:
        parts = [done[name, first] for first in firsts]
        images = np.concatenate([p[0] for p in parts])
        seconds = sum(p[1] for p in parts) / len(captions)
        return images, seconds, min(p[2] for p in parts)

    scorer = ClipScorer(clip_setup("catbatch-shapes-clip"))
    reference = joined("unpruned")[0]
    rows = []
    reports: dict[str, list[Any]] = {}
    for name, strategy, alpha in variants:
        images, seconds, pruned = joined(name)
        if strategy and pruned == 0:
            raise RuntimeError(f"{name}: no pruned step ran")
        psnr = [min(p, 100.0) for p in psnr_batch(images, reference)]
        reports[name] = [check(im, c) for im, c in zip(images, captions, strict=True)]
        rows.append(
            {
                "name": name,
                "alpha": alpha if strategy else "-",
                "adherence": summary(reports[name]),
                "clip": statistics.fmean(scorer.score(images, captions)),
                "psnr": psnr,
                "ssim": ssim_batch(images, reference),
                "seconds": seconds,
            }
        )
    print()
    print(shapes_table(rows))
    if "cat" in reports:
        print()
        for other in [n for n in reports if n not in ("cat", "unpruned")] + ["unpruned"]:
            d, lo, hi, better, worse = paired_difference(reports["cat"], reports[other])
            print(
                f"cat (alpha {args.alpha}) - {other}: {d:+.1f} adherence points (95% paired "
                f"bootstrap over captions {lo:+.1f} to {hi:+.1f}); cat's share of facts held is "
                f"higher on {better} captions, lower on {worse}",
                flush=True,
            )
    if args.json:
        data = {"setup": f"catbatch-shapes; {steps} steps; guidance {args.guidance}"}
        data.update(captions=captions, rows=rows)
        Path(args.json).write_text(json.dumps(data, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
