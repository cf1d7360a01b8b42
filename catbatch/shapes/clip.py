"""Train ``catbatch-shapes-clip``, the tiny open_clip model that scores the shapes domain.

    python -m catbatch.shapes.clip --seed 0 --out DIR      # DIR/catbatch-shapes-clip (~10 min)

Writes an open_clip config, fp16 weights and ``training.json`` (settings, loss curve, held-out
retrieval). Images are 64x64 (open_clip's preprocessing resizes larger ones); data is streamed
from :mod:`catbatch.shapes.scenes` with the string seed ``train-<seed>-clip``.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import caption, render, scenes

CLIP_NAME = "catbatch-shapes-clip"
IMAGE_SIZE = 64
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
        "context_length": 32,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}


def log(message: str) -> None:
    print(message, flush=True)


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


def train_clip(seed: int, steps: int, batch: int, out: Path) -> list[dict]:
    import open_clip
    from safetensors.torch import save_file

    path = out / CLIP_NAME
    path.mkdir(parents=True, exist_ok=True)
    config = path / f"{CLIP_NAME}.json"
    config.write_text(json.dumps(CLIP_CONFIG, indent=1) + "\n")
    open_clip.add_model_config(str(config))
    torch.manual_seed(zlib.crc32(f"{CLIP_NAME}/{seed}".encode()))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train_clip(args.seed, args.steps, args.batch, args.out)
    log(f"clip saved to {args.out / CLIP_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
