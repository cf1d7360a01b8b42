"""CLIP score: the formula against a direct computation with a tiny random open_clip model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from catbatch.metrics.clipscore import ClipScorer, cached_hub_weights, clip_score, clip_setup

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_clip(folder: Path, name: str = "catbatch-test-clip") -> tuple[str, str]:
    """A tiny open_clip config registered on purpose, with random weights saved to a file."""
    import open_clip

    config = folder / f"{name}.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    weights = folder / f"{name}.pt"
    torch.save(open_clip.create_model(name).state_dict(), weights)
    return str(config), str(weights)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[str, str]:
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def scorer(tiny_clip) -> ClipScorer:
    config, weights = tiny_clip
    setup = clip_setup(config, None, weights)
    assert setup.available and setup.label == "catbatch-test-clip" and setup.weights == weights
    return ClipScorer(setup)


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 48, 40, 3))


def test_score_is_100_times_positive_cosine(scorer):
    import open_clip

    images = random_images(4)
    prompts = ["a red fox", "a blue boat", "a green tree", "a cat on a mat"]
    scores = scorer.score(images, prompts)
    model, _, preprocess = open_clip.create_model_and_transforms(
        "catbatch-test-clip", pretrained=scorer.setup.weights
    )
    model.eval()
    pixels = torch.stack(
        [
            preprocess(Image.fromarray((np.clip(im, 0, 1) * 255).round().astype("uint8")))
            for im in images
        ]
    )
    with torch.no_grad():
        img = model.encode_image(pixels)
        txt = model.encode_text(open_clip.get_tokenizer("catbatch-test-clip")(prompts))
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    expected = [100.0 * max(float((a * b).sum()), 0.0) for a, b in zip(img, txt, strict=True)]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert all(0.0 <= s <= 100.0 for s in scores)
    assert len(set(scores)) > 1  # pairs are scored separately


def test_formula_clamps_negative_cosine():
    img = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    txt = torch.tensor([[-1.0, 0.0], [1.0, 1.0], [0.0, 0.5]])
    assert clip_score(img, txt).tolist() == pytest.approx([0.0, 100 / 2**0.5, 100.0])


def test_text_is_truncated_to_the_context(scorer):
    images = random_images(2, seed=1)
    head = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    a = scorer.score(images, [head + " apples and pears", head + " boats"])
    b = scorer.score(images, [head + " kites", head + " words past the context"])
    assert a == pytest.approx(b, abs=1e-5)  # context 16: the tails are cut off
    short = scorer.score(images, ["one two", "three"])
    assert short != pytest.approx(a, abs=1e-3)


def test_missing_weights_skip_the_score_with_a_note(tmp_path):
    setup = clip_setup("ViT-L-14", "openai", None)
    assert setup.label == "ViT-L-14/openai" and setup.enabled
    if setup.available:  # a machine with the weights in its hub cache
        pytest.skip("ViT-L-14/openai weights are in this machine's hub cache")
    assert not setup.available and setup.weights is None
    assert "nothing is downloaded" in setup.note and "clip_score left empty" in setup.note
    with pytest.raises(ValueError, match="no CLIP weights"):
        ClipScorer(setup)
    gone = clip_setup("ViT-L-14", "openai", str(tmp_path / "nope.pt"))
    assert not gone.available and "not found" in gone.note
    off = clip_setup(enabled=False)
    assert not off.enabled and not off.available and "disabled" in off.note
    bad = clip_setup("no-such-model", "no-such-tag")
    assert not bad.available and "clip_score left empty" in bad.note


def test_weights_found_in_a_hub_cache(tmp_path):
    repo = tmp_path / "models--timm--vit_large_patch14_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert cached_hub_weights("ViT-L-14", "openai", str(tmp_path)) is None
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"x")
    found = cached_hub_weights("ViT-L-14", "openai", str(tmp_path))
    assert found is not None and Path(found).name == "open_clip_pytorch_model.bin"
    (snap / "open_clip_model.safetensors").write_bytes(b"x")
    found = cached_hub_weights("ViT-L-14", "openai", str(tmp_path))
    assert Path(found).name == "open_clip_model.safetensors"
    assert cached_hub_weights("ViT-L-14", None, str(tmp_path)) is None


def test_tensor_path_scores_as_the_pil_path(scorer):
    """The worker's path: 8-bit images as a (B, 3, H, W) tensor, preprocessed as one batch on
    the model's device (antialiased tensor resize and centre crop of a non-square image)."""
    pixels = (random_images(4, seed=1) * 255).round().astype("uint8")
    prompts = ["a red fox", "a blue boat", "a green tree", "a cat on a mat"]
    expected = scorer.score(pixels, prompts)
    got = scorer.score_tensor(torch.from_numpy(pixels).permute(0, 3, 1, 2), prompts)
    assert got == pytest.approx(expected, abs=0.2)  # 0.03 seen; unnormalized: ~10
    assert len(set(got)) == 4 and scorer.score_tensor(torch.zeros(0, 3, 8, 8), []) == []
