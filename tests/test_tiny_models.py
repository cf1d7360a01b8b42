"""Tiny offline presets: tokenizers, determinism, disk cache, image generation."""

from __future__ import annotations

import socket

import numpy as np
import open_clip
import pytest
import sentencepiece as spm
import torch

from catbatch.models import tiny
from catbatch.models.tiny import (
    PRESET_VERSION,
    PRESETS,
    build_tiny_pipeline,
    ensure_preset_saved,
    is_preset,
    load_tiny_pipeline,
    pipeline_call_kwargs,
    preset_dir,
)
from catbatch.models.tokenizers import (
    T5_SPIECE_PATH,
    build_clip_tokenizer,
    build_t5_tokenizer,
    train_t5_spiece,
)

SENTENCES = [
    "a photo of a cat",
    "A Teddy-bear's picnic, 3 balloons!! at 12:30 on the moon.",
    "  lots   of\tspace and UPPER case words  ",
    "an oil painting of a robot reading the newspaper; photorealistic, 4k",
]


def _state(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for key, value in module.state_dict().items()
    }


def _assert_same_weights(a, b) -> None:
    state_a, state_b = _state(a), _state(b)
    assert state_a.keys() == state_b.keys()
    for key, value in state_a.items():
        assert torch.equal(value, state_b[key]), key


def _generate(pipe, height=64, width=64, steps=2, output_type="np"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt=["a red cube", "a blue sphere"],
        negative_prompt=["", "blurry"],
        num_inference_steps=steps,
        guidance_scale=7.0,
        height=height,
        width=width,
        generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)],
        output_type=output_type,
        **pipeline_call_kwargs(pipe),
    ).images


@pytest.fixture(scope="module")
def built() -> dict:
    return {name: build_tiny_pipeline(name) for name in PRESETS}


# --- tokenizers ---------------------------------------------------------------------------------


def test_clip_tokenizer_matches_open_clip():
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    long_prompt = " ".join(["a very long prompt about cats"] * 30)
    reference = open_clip.tokenize(SENTENCES + [long_prompt]).tolist()
    ours = tokenizer(SENTENCES + [long_prompt], truncation=True, max_length=77).input_ids
    for mine, ref in zip(ours, reference, strict=True):
        assert mine == ref[: ref.index(49407) + 1]
    assert len(ours[-1]) == 77 and ours[-1][-1] == 49407
    padded = tokenizer(SENTENCES[0], padding="max_length").input_ids
    assert len(padded) == 77


def test_t5_tokenizer_round_trips_and_matches_sentencepiece():
    tokenizer = build_t5_tokenizer()
    processor = spm.SentencePieceProcessor(model_file=str(T5_SPIECE_PATH))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.bos_token_id is None and len(tokenizer) == processor.get_piece_size()
    for text in SENTENCES:
        ids = tokenizer(text).input_ids
        assert ids == processor.encode(text) + [1]
        assert 2 not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(text.split())
    padded = tokenizer(SENTENCES[0], padding="max_length", max_length=32).input_ids
    assert len(padded) == 32 and padded[-1] == 0


def test_shipped_spiece_model_is_reproducible(tmp_path):
    rebuilt = train_t5_spiece(tmp_path / "spiece.model")
    pieces = [
        [(p.id_to_piece(i), p.get_score(i)) for i in range(p.get_piece_size())]
        for p in (spm.SentencePieceProcessor(model_file=str(f)) for f in (rebuilt, T5_SPIECE_PATH))
    ]
    assert pieces[0] == pieces[1]


# --- presets ------------------------------------------------------------------------------------


def test_preset_names_and_dirs(tmp_path, monkeypatch):
    assert PRESETS == ("tiny-sd3", "tiny-sd35", "tiny-pixart", "tiny-flux")
    assert all(is_preset(name) for name in PRESETS) and not is_preset("sd3-medium")
    expected = tmp_path / f"tiny-sd3-v{PRESET_VERSION}-seed3"
    assert preset_dir("tiny-sd3", tmp_path, seed=3) == expected
    monkeypatch.setenv("CATBATCH_CACHE", str(tmp_path / "env"))
    assert preset_dir("tiny-pixart").parent == tmp_path / "env"
    monkeypatch.delenv("CATBATCH_CACHE", raising=False)
    assert preset_dir("tiny-pixart").parent.name == "presets"
    with pytest.raises(ValueError, match="unknown preset"):
        build_tiny_pipeline("tiny-hidream")


def test_preset_architectures(built):
    for name in ("tiny-sd3", "tiny-sd35"):
        pipe = built[name]
        assert type(pipe).__name__ == "StableDiffusion3Pipeline"
        assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 16
        assert pipe.text_encoder_3 is not None and pipe.tokenizer.model_max_length == 77
        blocks = pipe.transformer.transformer_blocks
        assert len(blocks) >= 2 and blocks[0].attn.heads >= 2
        assert [b.context_pre_only for b in blocks] == [False] * (len(blocks) - 1) + [True]
        assert pipe.transformer.config.pos_embed_max_size * 2 * 8 >= 512
        dual = [b.use_dual_attention for b in blocks]
        if name == "tiny-sd35":
            assert pipe.transformer.config.qk_norm == "rms_norm" and dual[0] and not dual[-1]
        else:
            assert pipe.transformer.config.qk_norm is None and not any(dual)
    pixart = built["tiny-pixart"]
    assert type(pixart).__name__ == "PixArtSigmaPipeline"
    config = pixart.transformer.config
    assert (config.out_channels, config.norm_type, config.use_additional_conditions) == (
        8,
        "ada_norm_single",
        False,
    )
    assert config.num_layers >= 2 and config.num_attention_heads >= 2
    assert pixart.vae_scale_factor == 8 and pixart.vae.config.latent_channels == 4
    assert type(pixart.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipeline_call_kwargs(pixart) == {"use_resolution_binning": False, "clean_caption": False}
    assert pipeline_call_kwargs(built["tiny-sd3"]) == {}


def test_flux_preset_architecture(built):
    pipe = built["tiny-flux"]
    assert type(pipe).__name__ == "FluxPipeline"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"  # pooled output, no projection
    assert type(pipe.text_encoder_2).__name__ == "T5EncoderModel"
    assert pipe.tokenizer.model_max_length == 77 and len(pipe.tokenizer_2) == 4000
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 16
    config = pipe.transformer.config
    assert config.in_channels == 4 * 16 and config.patch_size == 1 and config.guidance_embeds
    assert len(pipe.transformer.transformer_blocks) >= 2
    assert len(pipe.transformer.single_transformer_blocks) >= 2
    assert sum(config.axes_dims_rope) == config.attention_head_dim
    assert config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.use_dynamic_shifting  # FLUX.1-dev's resolution-dependent shift
    assert pipeline_call_kwargs(pipe) == {}


def test_flux_guidance_is_an_input_not_cfg(built):
    """FLUX.1-dev-style guidance: one transformer row per image, the scale changes the image."""
    pipe = built["tiny-flux"]
    rows = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]),
        with_kwargs=True,
    )
    try:
        images = {
            g: pipe(
                prompt=["a red cube", "a blue sphere"],
                num_inference_steps=2,
                guidance_scale=g,
                height=64,
                width=96,
                generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                output_type="np",
            ).images
            for g in (1.0, 3.5)
        }
    finally:
        hook.remove()
    assert rows == [2] * 4  # batch 2, 2 steps, 2 calls: never doubled for guidance
    assert images[1.0].shape == (2, 64, 96, 3)
    assert not np.array_equal(images[1.0], images[3.5])


@pytest.mark.parametrize("name", PRESETS)
def test_build_is_deterministic(name, built):
    global_state = torch.random.get_rng_state()
    again = build_tiny_pipeline(name)
    assert torch.equal(torch.random.get_rng_state(), global_state)  # caller's RNG untouched
    _assert_same_weights(built[name], again)
    other = _state(build_tiny_pipeline(name, seed=1))
    assert not torch.equal(other["transformer.proj_out.weight"], again.transformer.proj_out.weight)


@pytest.mark.parametrize("name", PRESETS)
def test_cache_reloads_offline_with_same_weights_and_outputs(name, built, tmp_path, monkeypatch):
    path = ensure_preset_saved(name, tmp_path)
    assert path == preset_dir(name, tmp_path) and (path / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary dirs left

    def no_network(*args, **kwargs):
        raise AssertionError("network access while loading a cached preset")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(tiny, "build_tiny_pipeline", no_network)  # must not rebuild
    loaded = load_tiny_pipeline(name, cache_dir=tmp_path)
    assert type(loaded) is type(built[name])
    _assert_same_weights(built[name], loaded)
    assert np.array_equal(_generate(built[name]), _generate(loaded))


def test_load_honours_torch_dtype(tmp_path):
    pipe = load_tiny_pipeline("tiny-pixart", cache_dir=tmp_path, torch_dtype=torch.bfloat16)
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == torch.bfloat16


def test_concurrent_save_loser_uses_winner(tmp_path, monkeypatch):
    real_build = tiny.build_tiny_pipeline

    def build_while_another_process_wins(name, seed=0):
        monkeypatch.setattr(tiny, "build_tiny_pipeline", real_build)
        winner = ensure_preset_saved(name, tmp_path, seed=seed)  # finishes first
        (winner / "winner").touch()
        return real_build(name, seed)

    monkeypatch.setattr(tiny, "build_tiny_pipeline", build_while_another_process_wins)
    path = ensure_preset_saved("tiny-pixart", tmp_path)
    assert (path / "winner").exists()  # the loser's rename failed and it kept the winner's dir
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("size", [(256, 256), (128, 192)])
def test_generates_requested_size(name, size, built):
    height, width = size
    images = _generate(built[name], height=height, width=width, steps=3, output_type="pil")
    assert [image.size for image in images] == [(width, height)] * 2
    pixels = np.stack([np.asarray(image) for image in images]).astype(float)
    assert pixels.std() > 0 and not np.array_equal(pixels[0], pixels[1])


def test_session_cache_fixture_reuses_presets(tiny_cache):
    first = ensure_preset_saved("tiny-sd3", tiny_cache)
    assert ensure_preset_saved("tiny-sd3", tiny_cache) == first and first.parent == tiny_cache
