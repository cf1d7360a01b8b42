"""Tiny random-weight pipeline presets, built offline from configs and cached on local disk.

Presets (same pipeline classes and component layouts as the real models, tiny widths):

- ``tiny-sd3``: StableDiffusion3Pipeline (SD3Transformer2DModel, two CLIP text encoders with
  projection, a T5 encoder, 16-channel 4-level VAE, FlowMatchEulerDiscreteScheduler).
- ``tiny-sd35``: as ``tiny-sd3`` with SD3.5's ``qk_norm="rms_norm"`` and dual-attention blocks.
- ``tiny-pixart``: PixArtSigmaPipeline (PixArtTransformer2DModel with learned sigma, T5 encoder,
  4-channel VAE, DPMSolverMultistepScheduler).
- ``tiny-flux``: FluxPipeline (FluxTransformer2DModel with guidance embedding, two double-stream
  and two single-stream blocks, a CLIP text encoder for the pooled embedding, a T5 encoder,
  16-channel VAE, FlowMatchEulerDiscreteScheduler with FLUX.1-dev's resolution-dependent shift).

Trained presets ship with the package as diffusers pipeline folders under ``models/data`` and are
loaded from there (no cache, no build):

- ``catbatch-shapes``: a StableDiffusion3Pipeline trained on :mod:`catbatch.shapes` scenes
  (128x128 images of circles, squares and triangles, 1024 image tokens; called with
  ``max_sequence_length=1``, see :mod:`catbatch.shapes.model`); ``python -m
  catbatch.shapes.train`` trains it.

Weights depend only on ``(name, seed)``: every component is built under its own seed inside
``torch.random.fork_rng``, so the caller's global RNG is left untouched. Bump ``PRESET_VERSION``
whenever a config or the tokenizers change, so stale caches are not reused, and whenever a
shipped preset's weights change (it is the presets' revision in a run's fingerprint).
"""

from __future__ import annotations

import os
import shutil
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from packaging.version import Version
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from catbatch.models.loader import pipeline_call_kwargs  # noqa: F401  (re-exported)
from catbatch.models.tokenizers import (
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    T5_EOS_ID,
    T5_PAD_ID,
    build_clip_tokenizer,
    build_t5_tokenizer,
)

PRESET_VERSION = 4  # 3: catbatch-shapes at 128 px; 4: its weights trained to draw (4425 steps)
PRESETS: tuple[str, ...] = ("tiny-sd3", "tiny-sd35", "tiny-pixart", "tiny-flux")  # random, built
SHIPPED_DIR = Path(__file__).resolve().parent / "data"
SHIPPED_PRESETS: tuple[str, ...] = ("catbatch-shapes",)  # trained, shipped in the package
CACHE_ENV = "CATBATCH_CACHE"
DEFAULT_CACHE = Path("~/.cache/catbatch/presets")
_DIFFUSERS_VERSION = Version(diffusers.__version__)  # 0.42 renamed from_pretrained's torch_dtype

SAMPLE_SIZE = 32  # latent side: default image 256px with the VAE's scale factor 8
HEADS, HEAD_DIM = 2, 32  # transformer width 64
NUM_LAYERS = 2
CLIP_HIDDEN = 32  # two CLIPs: concatenated width 64 == T5 width == joint_attention_dim
T5_D_MODEL = 64


def is_preset(name: str) -> bool:
    """Whether ``name`` is one of the built-in presets (random or shipped)."""
    return name in PRESETS or name in SHIPPED_PRESETS


def shipped_dir(name: str) -> Path:
    """The folder of a trained preset that ships with the package."""
    if name not in SHIPPED_PRESETS:
        raise ValueError(f"{name!r} is not a shipped preset ({', '.join(SHIPPED_PRESETS)})")
    path = SHIPPED_DIR / name
    if not _is_saved(path):
        raise FileNotFoundError(f"shipped preset {name!r} is missing from {path}")
    return path


def _check_preset(name: str) -> None:
    if not is_preset(name):
        names = ", ".join((*PRESETS, *SHIPPED_PRESETS))
        raise ValueError(f"unknown preset {name!r}; choose one of {names}")


def _seeded(name: str, component: str, seed: int, factory: Callable[[], Any]) -> Any:
    """Build one component under a seed derived from (preset, component, seed)."""
    component_seed = zlib.crc32(f"{name}/{component}/{seed}".encode())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed)
        return factory()


def _clip_text_encoder(projection: bool = True) -> CLIPTextModel | CLIPTextModelWithProjection:
    """SD3's CLIPs have a text projection; FLUX's CLIP is a plain ``CLIPTextModel`` (pooled)."""
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=64,
        projection_dim=CLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5_encoder(vocab_size: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=T5_D_MODEL,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=64,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=T5_PAD_ID,
        eos_token_id=T5_EOS_ID,
        decoder_start_token_id=T5_PAD_ID,
        is_encoder_decoder=False,
    )
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int, **kwargs: Any) -> AutoencoderKL:
    """A 4-level VAE (scale factor 8) with 8-16 channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=SAMPLE_SIZE * 8,
        **kwargs,
    ).eval()


def _build_sd3(name: str, seed: int, sd35: bool) -> StableDiffusion3Pipeline:
    def transformer() -> SD3Transformer2DModel:
        return SD3Transformer2DModel(
            sample_size=SAMPLE_SIZE,
            patch_size=2,
            in_channels=16,
            num_layers=NUM_LAYERS,  # diffusers makes the last block context_pre_only
            attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS,
            joint_attention_dim=T5_D_MODEL,
            caption_projection_dim=HEADS * HEAD_DIM,
            pooled_projection_dim=2 * CLIP_HIDDEN,
            out_channels=16,
            pos_embed_max_size=96,  # images up to 1536px (96 patches of 16px)
            dual_attention_layers=(0,) if sd35 else (),
            qk_norm="rms_norm" if sd35 else None,
        ).eval()

    t5_tokenizer = build_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=_seeded(name, "transformer", seed, transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_seeded(
            name,
            "vae",
            seed,
            lambda: _vae(
                16,
                scaling_factor=1.5305,
                shift_factor=0.0609,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
        ),
        text_encoder=_seeded(name, "text_encoder", seed, _clip_text_encoder),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=_seeded(name, "text_encoder_2", seed, _clip_text_encoder),
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=_seeded(
            name, "text_encoder_3", seed, lambda: _t5_encoder(len(t5_tokenizer))
        ),
        tokenizer_3=t5_tokenizer,
    )


def _build_pixart(name: str, seed: int) -> PixArtSigmaPipeline:
    def transformer() -> PixArtTransformer2DModel:
        return PixArtTransformer2DModel(
            num_attention_heads=HEADS,
            attention_head_dim=HEAD_DIM,
            in_channels=4,
            out_channels=8,  # learned sigma: the pipeline keeps the first 4 channels
            num_layers=NUM_LAYERS,
            cross_attention_dim=HEADS * HEAD_DIM,
            sample_size=SAMPLE_SIZE,
            patch_size=2,
            norm_type="ada_norm_single",
            use_additional_conditions=False,
            caption_channels=T5_D_MODEL,
        ).eval()

    scheduler = DPMSolverMultistepScheduler(  # PixArt-Sigma's published scheduler settings
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        solver_order=2,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        timestep_spacing="linspace",
    )
    tokenizer = build_t5_tokenizer()
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=_seeded(name, "text_encoder", seed, lambda: _t5_encoder(len(tokenizer))),
        vae=_seeded(name, "vae", seed, lambda: _vae(4, scaling_factor=0.13025)),
        transformer=_seeded(name, "transformer", seed, transformer),
        scheduler=scheduler,
    )


def _build_flux(name: str, seed: int) -> FluxPipeline:
    def transformer() -> FluxTransformer2DModel:
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed in 2x2 patches by the pipeline
            num_layers=NUM_LAYERS,  # double-stream blocks
            num_single_layers=NUM_LAYERS,
            attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS,
            joint_attention_dim=T5_D_MODEL,
            pooled_projection_dim=CLIP_HIDDEN,
            guidance_embeds=True,  # as FLUX.1-dev: guidance is an input, not CFG
            axes_dims_rope=(8, 12, 12),  # sums to the head dimension, as (16, 56, 56) to 128
        ).eval()

    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's published scheduler settings
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    tokenizer_2 = build_t5_tokenizer()
    return FluxPipeline(
        scheduler=scheduler,
        vae=_seeded(
            name,
            "vae",
            seed,
            lambda: _vae(
                16,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
        ),
        text_encoder=_seeded(name, "text_encoder", seed, lambda: _clip_text_encoder(False)),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=_seeded(name, "text_encoder_2", seed, lambda: _t5_encoder(len(tokenizer_2))),
        tokenizer_2=tokenizer_2,
        transformer=_seeded(name, "transformer", seed, transformer),
    )


def build_tiny_pipeline(name: str, seed: int = 0) -> DiffusionPipeline:
    """A fresh fp32 CPU pipeline for a preset; the same ``(name, seed)`` gives equal weights.

    Shipped (trained) presets are loaded from their folder; ``seed`` does not apply to them.
    """
    _check_preset(name)
    if name in SHIPPED_PRESETS:
        return _from_pretrained(shipped_dir(name), torch.float32)
    if name == "tiny-pixart":
        return _build_pixart(name, seed)
    if name == "tiny-flux":
        return _build_flux(name, seed)
    return _build_sd3(name, seed, sd35=name == "tiny-sd35")


def preset_dir(name: str, cache_dir: str | Path | None = None, *, seed: int = 0) -> Path:
    """``<cache>/<name>-v<PRESET_VERSION>-seed<seed>``.

    The cache is ``cache_dir``, else ``$CATBATCH_CACHE``, else ``~/.cache/catbatch/presets``.
    """
    _check_preset(name)
    if name in SHIPPED_PRESETS:
        return shipped_dir(name)
    root = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(root).expanduser() / f"{name}-v{PRESET_VERSION}-seed{seed}"


def _is_saved(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def ensure_preset_saved(name: str, cache_dir: str | Path | None = None, *, seed: int = 0) -> Path:
    """Build and save a preset once; return its directory.

    The pipeline is written to a temporary sibling directory and renamed into place, so the final
    directory is complete whenever it exists. When two processes race, the loser's rename fails,
    it deletes its copy and uses the winner's.
    """
    if name in SHIPPED_PRESETS:
        return shipped_dir(name)
    path = preset_dir(name, cache_dir, seed=seed)
    if _is_saved(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()  # unlike tempfile.mkdtemp, honours the umask (the cache may be shared)
    try:
        build_tiny_pipeline(name, seed).save_pretrained(tmp)
        try:
            os.rename(tmp, path)
        except OSError as error:
            if not _is_saved(path):
                raise RuntimeError(f"{path} exists but holds no saved pipeline") from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_tiny_pipeline(
    name: str,
    *,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    torch_dtype: torch.dtype = torch.float32,
) -> DiffusionPipeline:
    """Load a preset offline: a shipped one from the package, a random one from the local cache
    (building and saving it first if missing)."""
    return _from_pretrained(ensure_preset_saved(name, cache_dir, seed=seed), torch_dtype)


def _from_pretrained(path: Path, torch_dtype: torch.dtype) -> DiffusionPipeline:
    dtype_key = "dtype" if _DIFFUSERS_VERSION >= Version("0.42") else "torch_dtype"
    kwargs = {dtype_key: torch_dtype}
    return DiffusionPipeline.from_pretrained(path, local_files_only=True, **kwargs)
