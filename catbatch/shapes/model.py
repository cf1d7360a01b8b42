"""The ``catbatch-shapes`` pipeline: architecture, domain tokenizer, fixed VAE, saving.

A diffusers ``StableDiffusion3Pipeline`` sized for the demo on two CPU cores:

- 128x128 images; a fixed pooling ``AutoencoderKL`` (scale factor 2, 3 latent channels; see
  :func:`build_vae`); an ``SD3Transformer2DModel`` of 4 blocks, width 128 (4 heads x 32), QK RMS
  norm, on the 64x64 latent with patch 2: **1024 image tokens**. Its position embedding is
  relative to the image (``pos_embed_max_size=None``: the sincos grid is rescaled to the 32x32
  tokens of 128 px), so a model trained at 64 px (256 tokens) draws the same layout at 128 px.
- Two trainable CLIP text encoders (3 layers, width 40) on a domain tokenizer of ~600 entries
  (:func:`build_tokenizer`): every word of the captions is one token, any other text falls back
  to bytes as in CLIP's BPE; 32 tokens per caption.
- The T5 slot holds a stand-in whose output is exactly zero (:func:`zero_t5`), so the folder
  loads with a plain ``DiffusionPipeline.from_pretrained``; its tokenizer declares
  ``model_max_length=1``, and the pipeline must be called with ``max_sequence_length=1``
  (:data:`CALL_KWARGS`; :func:`catbatch.models.loader.pipeline_call_kwargs` reads it from the
  T5 tokenizer): **33 text tokens**, 32 CLIP + one zero token that the context embedder turns
  into a learned constant. Called with the default 256, the model would see 256 identical
  tokens it was never trained with.
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from .scenes import BACKGROUNDS, COLOURS, PHRASES, SHAPES, SIZES

NAME = "catbatch-shapes"
IMAGE_SIZE = 128  # the demo's resolution (1024 image tokens)
LOW_SIZE = 64  # the first training stage's resolution (256 image tokens)
VAE_FACTOR = 2
LATENT_CHANNELS = 3
PATCH = 2
WIDTH, HEADS, LAYERS = 128, 4, 4
TEXT_HIDDEN, TEXT_LAYERS = 40, 3
TEXT_LENGTH = 32  # CLIP tokens per caption; the longest caption of the domain is 30
T5_LENGTH = 1  # one zero T5 token instead of 256
CALL_KWARGS = {"max_sequence_length": T5_LENGTH}
SCHEDULER_SHIFT = 2.0  # sqrt(1024 / 256): SD3's resolution shift, relative to 64 px
WORDS = (
    "a",
    "and",
    "on",
    "background",
    *SIZES,
    *COLOURS,
    *SHAPES,
    *BACKGROUNDS,
    *sorted({w for phrase in PHRASES.values() for w in phrase.split()}),
)


def image_tokens(size: int = IMAGE_SIZE) -> int:
    """Image tokens of the transformer at ``size`` x ``size`` pixels."""
    return (size // VAE_FACTOR // PATCH) ** 2


# -- tokenizer --------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the best-ranked adjacent pair until none applies."""
    while len(symbols) > 1:
        adjacent = zip(symbols, symbols[1:], strict=False)
        pairs = [(ranks.get(p, math.inf), i) for i, p in enumerate(adjacent)]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def tokenizer_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary with one token per word of :data:`WORDS` (and ``,``).

    Base entries are CLIP's: the 256 byte characters and their end-of-word forms, so any text
    still tokenizes; each domain word gets the merges that join it into one token.
    """
    base = list(_bytes_to_unicode().values())
    tokens = [*base, *(t + "</w>" for t in base)]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in WORDS:
        symbols = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols = [pair[0] + pair[1], *symbols[2:]]
            if symbols[0] not in tokens:
                tokens.append(symbols[0])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer() -> CLIPTokenizer:
    vocab, merges = tokenizer_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_LENGTH)


# -- components -------------------------------------------------------------------------------
def build_text_encoder(vocab_size: int) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        projection_dim=TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModelWithProjection(config)


def zero_t5() -> T5EncoderModel:
    """A one-layer T5 whose output is exactly zero (final norm weight 0), width = the joint
    attention width: it fills the T5 slot so the folder loads with a plain ``from_pretrained``,
    and with ``max_sequence_length=1`` it adds one zero text token."""
    from catbatch.models.tokenizers import T5_EOS_ID, T5_PAD_ID, T5_VOCAB_SIZE

    config = T5Config(
        vocab_size=T5_VOCAB_SIZE,
        d_model=2 * TEXT_HIDDEN,
        d_kv=8,
        d_ff=8,
        num_layers=1,
        num_heads=1,
        relative_attention_num_buckets=8,
        feed_forward_proj="relu",
        dropout_rate=0.0,
        pad_token_id=T5_PAD_ID,
        eos_token_id=T5_EOS_ID,
        decoder_start_token_id=T5_PAD_ID,
        is_encoder_decoder=False,
    )
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.encoder.final_layer_norm.weight.zero_()
    return model.requires_grad_(False)


def build_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // VAE_FACTOR,
        patch_size=PATCH,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=LAYERS,
        attention_head_dim=WIDTH // HEADS,
        num_attention_heads=HEADS,
        joint_attention_dim=2 * TEXT_HIDDEN,
        caption_projection_dim=WIDTH,
        pooled_projection_dim=2 * TEXT_HIDDEN,
        pos_embed_max_size=None,  # sincos positions relative to the image, at any size
        qk_norm="rms_norm",
    )


def build_vae() -> AutoencoderKL:
    """An ``AutoencoderKL`` (scale factor 2, 3 latent channels) set by hand, not trained.

    Encoder: 2x2 average pooling of the RGB image in [-1, 1] (log-variance -30, so sampling is
    the mean). Decoder: nearest 2x upsampling smoothed by a [1, 2, 1] x [1, 2, 1] / 16 kernel.
    Every resnet's second conv is zero (the block is the identity); the output group norms see a
    group whose channels are ``r, g, b, -(r + g + b), K, -K``: its mean is exactly 0 and its
    variance ``K^2 / 3`` up to ``O(1 / K^2)``, so norm, SiLU (shifted by ``OFFSET`` into its
    linear range) and conv pass colours through. Run it in float32: the trick needs the range.
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
    return vae.eval().requires_grad_(False)


# Mean and 1 / std of the VAE's latents over 512 training images at 128 px (-0.027, 1 / 0.717),
# fixed here so that building the pipeline measures nothing.
LATENT_SHIFT, LATENT_SCALE = -0.03, 1.39


def _seeded(component: str, seed: int, factory: Callable[[], Any]) -> Any:
    """Build one component under a seed derived from (name, component, seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{NAME}/{component}/{seed}".encode()))
        return factory()


def build_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """The untrained pipeline, float32 on the CPU; equal seeds give equal weights."""
    from catbatch.models.tokenizers import build_t5_tokenizer

    vocab_size = len(build_tokenizer())
    t5_tokenizer = build_t5_tokenizer()
    t5_tokenizer.model_max_length = T5_LENGTH
    vae = build_vae()
    vae.register_to_config(shift_factor=LATENT_SHIFT, scaling_factor=LATENT_SCALE)
    return StableDiffusion3Pipeline(
        transformer=_seeded("transformer", seed, build_transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT),
        vae=vae,
        text_encoder=_seeded("text_encoder", seed, lambda: build_text_encoder(vocab_size)),
        tokenizer=build_tokenizer(),
        text_encoder_2=_seeded("text_encoder_2", seed, lambda: build_text_encoder(vocab_size)),
        tokenizer_2=build_tokenizer(),
        text_encoder_3=zero_t5(),
        tokenizer_3=t5_tokenizer,
    )


def trainable(pipe: StableDiffusion3Pipeline) -> dict[str, torch.nn.Module]:
    """The components that training updates (and that checkpoints and exports carry)."""
    return {
        "transformer": pipe.transformer,
        "text_encoder": pipe.text_encoder,
        "text_encoder_2": pipe.text_encoder_2,
    }


def save_pipeline(
    pipe: StableDiffusion3Pipeline,
    path: str | Path,
    weights: dict[str, torch.nn.Module] | None = None,
    record: dict[str, Any] | None = None,
) -> Path:
    """Write the pipeline folder (fp16 safetensors) and, with ``record``, ``training.json``.

    ``weights`` replaces components (e.g. the EMA copies); the live pipeline is left untouched.
    """
    path = Path(path)
    shipped = StableDiffusion3Pipeline(**{**pipe.components, **(weights or {})})
    shipped = copy.deepcopy(shipped).to("cpu", torch.float16)
    shipped.save_pretrained(path, safe_serialization=True)
    if record is not None:
        (path / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return path
