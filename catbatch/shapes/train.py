"""Train the ``catbatch-shapes`` models from a seed: VAE, SD3 transformer (rectified flow), CLIP.

    python -m catbatch.shapes.train --seed 0 --out DIR            # everything (about 40 min)
    python -m catbatch.shapes.train --seed 0 --out DIR --stage clip

Writes ``DIR/catbatch-shapes`` (a StableDiffusion3Pipeline folder, fp16 safetensors) and
``DIR/catbatch-shapes-clip`` (an open_clip config and weights), each with ``training.json`` (the
settings and the loss curve). Training data is streamed from :mod:`catbatch.shapes.scenes` with
string seeds ``train-<seed>-<stage>``; evaluation uses the disjoint seed ``heldout``.

Model: 64x64 images; an ``AutoencoderKL`` with scale factor 4 and 4 latent channels; an
``SD3Transformer2DModel`` on the 16x16 latent (patch 2: 64 image tokens); the two tiny frozen
CLIP text encoders of the tiny presets (random, deterministic weights: the transformer learns
from their token features); no T5 (``text_encoder_3=None``). With no T5 the pipeline appends
``max_sequence_length`` (256) all-zero text tokens; 256 identical keys act exactly as one key
whose attention logit is raised by ``log(256)``, so training uses one zero token and that bias
(:func:`zero_token_bias`), 5x cheaper and numerically the same model. Torch uses one thread by
default: on a shared 2-core machine two threads can be ten times slower.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from catbatch.models import tiny
from catbatch.models.tokenizers import build_clip_tokenizer, build_t5_tokenizer

from .scenes import caption, render, scenes

NAME = "catbatch-shapes"
CLIP_NAME = "catbatch-shapes-clip"
IMAGE_SIZE = 64
LATENT_CHANNELS = 3
VAE_FACTOR = 2
PATCH = 4
TEXT_LENGTH = 32  # CLIP tokens; the longest caption is 30
ZERO_TOKENS = 256  # the pipeline's default max_sequence_length
CAPTION_DROPOUT = 0.1
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": IMAGE_SIZE,
        "layers": 2,
        "width": 96,
        "patch_size": 8,
        "head_width": 32,
    },
    "text_cfg": {
        "context_length": TEXT_LENGTH,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}


def log(message: str) -> None:
    print(message, flush=True)


# -- components ------------------------------------------------------------------------------
def build_vae() -> AutoencoderKL:
    """An ``AutoencoderKL`` (scale factor 2, 3 latent channels) set by hand, not trained.

    Encoder: 2x2 average pooling of the RGB image in [-1, 1] (log-variance -30, so sampling is
    the mean). Decoder: nearest 2x upsampling smoothed by a [1, 2, 1] x [1, 2, 1] / 16 kernel.
    Every resnet's second conv is zero (the block is the identity); the output group norms see a
    group whose channels are ``r, g, b, -(r + g + b), K, -K``: its mean is exactly 0 and its
    variance ``K^2 / 3`` up to ``O(1 / K^2)``, so norm, SiLU (shifted by ``OFFSET`` into its
    linear range) and conv pass colours through. A learned VAE did not converge in the minutes a
    2-core machine has for it; this one is exact and costs nothing.
    """
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(6, 6),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=1,
        sample_size=IMAGE_SIZE,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        scaling_factor=1.0,
        shift_factor=0.0,
    )
    big, offset = 100.0, 20.0
    smooth = torch.tensor([1.0, 2.0, 1.0])
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.fill_(1.0)

        def lift(conv: torch.nn.Conv2d) -> None:  # rgb -> r, g, b, -(r+g+b), K, -K
            for c in range(3):
                conv.weight[c, c, 1, 1] = 1
                conv.weight[3, c, 1, 1] = -1
            conv.bias[4], conv.bias[5] = big, -big

        def out(norm: torch.nn.GroupNorm, conv: torch.nn.Conv2d) -> None:
            norm.weight.fill_(big / math.sqrt(3))
            norm.bias.fill_(offset)
            for c in range(3):
                conv.weight[c, c, 1, 1] = 1
                conv.bias[c] = -offset

        enc, dec = vae.encoder, vae.decoder
        lift(enc.conv_in)
        for block in enc.down_blocks:
            for down in block.downsamplers or []:
                for c in range(6):
                    down.conv.weight[c, c, :2, :2] = 0.25
        out(enc.conv_norm_out, enc.conv_out)
        enc.conv_out.bias[LATENT_CHANNELS:] = -30.0  # log-variance
        lift(dec.conv_in)
        for block in dec.up_blocks:
            for up in block.upsamplers or []:
                for c in range(6):
                    up.conv.weight[c, c] = torch.outer(smooth, smooth) / 16
        out(dec.conv_norm_out, dec.conv_out)
    return vae.eval()


def build_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // VAE_FACTOR,
        patch_size=PATCH,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=2 * tiny.CLIP_HIDDEN,
        caption_projection_dim=128,
        pooled_projection_dim=2 * tiny.CLIP_HIDDEN,
        pos_embed_max_size=16,  # patches per side: up to 128px
    )


def build_pipeline(seed: int) -> StableDiffusion3Pipeline:
    """The untrained pipeline: seeded components, frozen tiny text encoders, no T5."""

    def tokenizer() -> Any:
        tok = build_clip_tokenizer()
        tok.model_max_length = TEXT_LENGTH
        return tok

    def seeded(component: str, factory: Any) -> Any:
        return tiny._seeded(NAME, component, seed, factory)

    return StableDiffusion3Pipeline(
        transformer=seeded("transformer", build_transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        vae=seeded("vae", build_vae),
        text_encoder=seeded("text_encoder", tiny._clip_text_encoder),
        tokenizer=tokenizer(),
        text_encoder_2=seeded("text_encoder_2", tiny._clip_text_encoder),
        tokenizer_2=tokenizer(),
        text_encoder_3=seeded("text_encoder_3", zero_t5),
        tokenizer_3=build_t5_tokenizer(),
    )


def zero_t5() -> Any:
    """A tiny T5 whose output is exactly zero (final norm weight 0): the T5 slot stays filled,
    so the folder loads with a plain ``from_pretrained``, and the text tokens it adds equal the
    zeros SD3 uses when T5 is dropped. The model is conditioned on the CLIP encoders only."""
    model = tiny._t5_encoder(len(build_t5_tokenizer()))
    with torch.no_grad():
        model.encoder.final_layer_norm.weight.zero_()
    return model


# -- data -------------------------------------------------------------------------------------
def batches(seed: str, batch: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Endless ``(images (B, 3, 64, 64) in [0, 1], captions)`` from one string seed."""
    stream = scenes(seed)  # type: ignore[arg-type]
    while True:
        items = [next(stream) for _ in range(batch)]
        pixels = np.stack([np.asarray(render(s, IMAGE_SIZE)) for s in items])
        yield (
            torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255,
            [caption(s) for s in items],
        )


@contextlib.contextmanager
def zero_token_bias(tokens: int, copies: int = ZERO_TOKENS) -> Iterator[None]:
    """Joint attention over ``tokens`` keys whose last one stands for ``copies`` equal keys."""
    bias = torch.zeros(1, 1, 1, tokens)
    bias[..., -1] = math.log(copies)
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):  # type: ignore[no-untyped-def]
        if attn_mask is None and k.shape[-2] == tokens:
            attn_mask = bias.to(q.dtype)
        return original(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs
        )

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@torch.no_grad()
def encode_text(pipe: StableDiffusion3Pipeline, captions: list[str]) -> tuple[torch.Tensor, ...]:
    """Prompt embeddings as the pipeline makes them, with one zero T5 token instead of 256."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        captions,
        captions,
        None,
        do_classifier_free_guidance=False,
        max_sequence_length=1,
        device=torch.device("cpu"),
    )
    return embeds, pooled


# -- stages -----------------------------------------------------------------------------------
def set_latent_stats(pipe: StableDiffusion3Pipeline, seed: int) -> None:
    """The pipeline's shift and scaling factors from the latents of 512 training images."""
    vae = pipe.vae
    with torch.no_grad():
        images, _ = next(batches(f"train-{seed}-stats", 512))
        z = vae.encode(images * 2 - 1).latent_dist.mode()
    vae.register_to_config(
        shift_factor=round(z.mean().item(), 4), scaling_factor=round(1 / z.std().item(), 4)
    )
    log(f"vae latents: shift {vae.config.shift_factor} scaling {vae.config.scaling_factor}")


def train_transformer(
    pipe: StableDiffusion3Pipeline,
    seed: int,
    steps: int,
    batch: int,
    lr: float,
    out: Path,
    stream: str = "flow",
) -> tuple[list[dict], SD3Transformer2DModel]:
    model = pipe.transformer.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    vae, rng = pipe.vae, torch.Generator().manual_seed(seed)
    pyrng = random.Random(f"dropout-{seed}")
    empty = encode_text(pipe, [""])
    data, curve, acc = batches(f"train-{seed}-{stream}", batch), [], []
    start = time.perf_counter()
    tokens = (IMAGE_SIZE // VAE_FACTOR // PATCH) ** 2 + TEXT_LENGTH + 1
    with zero_token_bias(tokens):
        for step in range(1, steps + 1):
            images, captions = next(data)
            with torch.no_grad():
                z = vae.encode(images * 2 - 1).latent_dist.mode()
                x0 = (z - vae.config.shift_factor) * vae.config.scaling_factor
            embeds, pooled = encode_text(pipe, captions)
            drop = torch.tensor([pyrng.random() < CAPTION_DROPOUT for _ in captions])
            embeds = torch.where(drop[:, None, None], empty[0], embeds)
            pooled = torch.where(drop[:, None], empty[1], pooled)
            t = torch.sigmoid(torch.randn(batch, generator=rng))  # logit-normal, as SD3
            noise = torch.randn(x0.shape, generator=rng)
            xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
            pred = model(
                hidden_states=xt,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                timestep=t * 1000,
            ).sample
            loss = F.mse_loss(pred, noise - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            decay = min(0.995, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
            acc.append(loss.item())
            if step % 25 == 0 or step == steps:
                point = {
                    "step": step,
                    "loss": float(np.mean(acc)),
                    "s": time.perf_counter() - start,
                }
                curve.append(point)
                log(f"flow step {step}/{steps} loss {point['loss']:.4f} ({point['s']:.0f} s)")
                acc = []
            if step % 100 == 0 or step == steps:
                record = {"flow_curve": curve, "flow_steps_done": step, "seed": seed}
                save_pipeline(pipe, ema, out / NAME, record)
    return curve, ema


def save_pipeline(
    pipe: StableDiffusion3Pipeline, transformer: SD3Transformer2DModel, path: Path, record: dict
) -> None:
    """fp16 safetensors, the EMA transformer; the live pipeline is left untouched."""
    shipped = StableDiffusion3Pipeline(**{**pipe.components, "transformer": transformer})
    shipped = copy.deepcopy(shipped).to(torch.float16)
    shipped.save_pretrained(path, safe_serialization=True)
    (path / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def train_clip(seed: int, steps: int, batch: int, out: Path) -> list[dict]:
    import open_clip
    from safetensors.torch import save_file

    path = out / CLIP_NAME
    path.mkdir(parents=True, exist_ok=True)
    config = path / f"{CLIP_NAME}.json"
    config.write_text(json.dumps(CLIP_CONFIG, indent=1) + "\n")
    open_clip.add_model_config(str(config))
    torch.manual_seed(zlib_seed(f"{CLIP_NAME}/{seed}"))
    model = open_clip.create_model(CLIP_NAME)
    tokenizer = open_clip.get_tokenizer(CLIP_NAME)
    mean, std = torch.tensor(OPENAI_MEAN)[:, None, None], torch.tensor(OPENAI_STD)[:, None, None]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    data, curve, acc, start = batches(f"train-{seed}-clip", batch), [], [], time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        images, captions = next(data)
        image_features, text_features, scale = model((images - mean) / std, tokenizer(captions))
        logits = scale * image_features @ text_features.T
        labels = torch.arange(len(captions))
        same = torch.tensor([[a == b for b in captions] for a in captions])
        logits = logits.masked_fill(same & ~torch.eye(len(captions), dtype=torch.bool), -1e4)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc.append(loss.item())
        if step % 25 == 0 or step == steps:
            point = {"step": step, "loss": float(np.mean(acc)), "s": time.perf_counter() - start}
            curve.append(point)
            log(f"clip step {step}/{steps} loss {point['loss']:.4f} ({point['s']:.0f} s)")
            acc = []
    model.eval()
    with torch.no_grad():
        images, captions = next(batches("heldout-clip", 256))
        image_features = F.normalize(model.encode_image((images - mean) / std), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        sims = image_features @ text_features.T
        top1 = (sims.argmax(1) == torch.arange(len(captions))).float().mean().item()
        matched = (100 * sims.diag().clamp(min=0)).mean().item()
        shuffled = (100 * sims.roll(1, 1).diag().clamp(min=0)).mean().item()
    log(
        f"clip held-out: image->text top-1 {top1:.3f} over 256; score matched {matched:.1f} "
        f"vs shuffled {shuffled:.1f}"
    )
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "open_clip_model.safetensors"))
    record = {
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "curve": curve,
        "heldout_top1": top1,
        "heldout_score_matched": matched,
        "heldout_score_shuffled": shuffled,
    }
    (path / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return curve


def zlib_seed(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage", choices=("all", "pipeline", "clip"), default="all")
    parser.add_argument("--flow-steps", type=int, default=1200)
    parser.add_argument("--clip-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--init", type=Path, help="continue training this saved pipeline (fresh data stream)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    diffusers.utils.logging.set_verbosity_error()  # no truncation warning for the 1-token T5
    start = time.perf_counter()
    if args.stage in ("all", "pipeline"):
        pipe = build_pipeline(args.seed)
        stream, before = "flow", 0
        if args.init:  # continue from a saved pipeline: its VAE, text encoders and transformer
            from diffusers import DiffusionPipeline

            saved = DiffusionPipeline.from_pretrained(args.init, dtype=torch.float32)
            pipe = StableDiffusion3Pipeline(**saved.components)
            before = json.loads((args.init / "training.json").read_text())["flow_steps_done"]
            stream = f"flow-after-{before}"
        pipe.text_encoder.requires_grad_(False)
        pipe.text_encoder_2.requires_grad_(False)
        if not args.init:
            set_latent_stats(pipe, args.seed)
        settings = {k: str(v) for k, v in vars(args).items()}
        flow_curve, ema = train_transformer(
            pipe, args.seed, args.flow_steps, args.batch, args.lr, args.out, stream
        )
        record = {
            "settings": settings,
            "flow_curve": flow_curve,
            "flow_steps_done": before + args.flow_steps,
            "continued_from": str(args.init) if args.init else None,
            "minutes": (time.perf_counter() - start) / 60,
        }
        save_pipeline(pipe, ema, args.out / NAME, record)
        log(f"pipeline saved to {args.out / NAME} ({record['minutes']:.1f} min)")
    if args.stage in ("all", "clip"):
        train_clip(args.seed, args.clip_steps, 128, args.out)
        log(f"clip saved to {args.out / CLIP_NAME}")
    log(f"done in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
