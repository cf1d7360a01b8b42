"""PSNR / SSIM of images and latents (catbatch.metrics.fidelity)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from catbatch.metrics import fidelity


def _image(seed: int = 0, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """Smooth uint8 RGB image (gradients plus a little texture)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (h + w)], -1) * 200 + 20
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _noisy(image: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def test_psnr_identical_is_inf():
    image = _image()
    assert fidelity.psnr(image, image.copy()) == math.inf
    assert fidelity.latent_psnr(torch.ones(2, 3), torch.ones(2, 3)) == math.inf


def test_psnr_constant_offset_known_value():
    a = np.full((16, 16, 3), 100, np.uint8)
    b = np.full((16, 16, 3), 110, np.uint8)
    assert fidelity.psnr(a, b) == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)
    # Offset on one channel only: MSE is a third.
    c = a.copy()
    c[..., 1] = 130
    assert fidelity.psnr(c, a) == pytest.approx(10 * math.log10(255**2 / (30**2 / 3)), abs=1e-9)


def test_input_types_agree():
    a, b = _image(0), _noisy(_image(0), 10)
    expected = fidelity.psnr(a, b)
    as_chw = torch.from_numpy(b).permute(2, 0, 1)
    assert fidelity.psnr(Image.fromarray(a), Image.fromarray(b)) == pytest.approx(expected)
    assert fidelity.psnr(a, as_chw.float() / 255) == pytest.approx(expected)
    assert fidelity.psnr(a.astype(np.float32) / 255, as_chw) == pytest.approx(expected)
    assert fidelity.ssim(a, b) == pytest.approx(fidelity.ssim(Image.fromarray(a), as_chw))
    rgba = np.concatenate([b, np.full(b.shape[:2] + (1,), 7, np.uint8)], -1)
    assert fidelity.psnr(a, rgba) == pytest.approx(expected)  # alpha dropped


def test_batches_are_per_image():
    a = [_image(0), _image(1)]
    b = [_noisy(a[0], 5), _noisy(a[1], 20)]
    values = fidelity.psnr_batch(a, b)
    assert values == pytest.approx([fidelity.psnr(a[0], b[0]), fidelity.psnr(a[1], b[1])])
    assert values[0] > values[1]
    stacked = torch.stack([torch.from_numpy(x).permute(2, 0, 1) for x in b])  # BCHW uint8
    assert fidelity.ssim_batch(a, stacked) == pytest.approx(fidelity.ssim_batch(a, b))
    report = fidelity.compare_images(a, b)
    assert set(report) == {"psnr", "ssim"} and len(report["ssim"]) == 2
    with pytest.raises(ValueError, match="one image"):
        fidelity.psnr(np.stack(a), np.stack(b))


@pytest.mark.parametrize("mode", ["luminance", "channels"])
def test_ssim_identical_is_one_and_decreases_with_noise(mode):
    image = _image()
    assert fidelity.ssim(image, image.copy(), mode) == pytest.approx(1.0, abs=1e-12)
    weak = fidelity.ssim(_noisy(image, 5), image, mode)
    strong = fidelity.ssim(_noisy(image, 40), image, mode)
    assert 0.0 < strong < weak < 1.0


def test_ssim_is_insensitive_to_a_small_constant_offset_compared_to_noise():
    image = _image()
    shifted = np.clip(image.astype(int) + 3, 0, 255).astype(np.uint8)
    assert fidelity.ssim(shifted, image) > fidelity.ssim(_noisy(image, 3), image)


@pytest.mark.parametrize("mode", ["luminance", "channels"])
def test_ssim_matches_scikit_image(mode):
    metrics = pytest.importorskip("skimage.metrics")
    a, b = _image(3, (64, 50)), _noisy(_image(3, (64, 50)), 25)
    x, y = a / 255.0, b / 255.0
    kwargs = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    if mode == "luminance":
        weights = np.array(fidelity.LUMA_WEIGHTS)
        expected = metrics.structural_similarity(x @ weights, y @ weights, **kwargs)
    else:
        expected = metrics.structural_similarity(x, y, channel_axis=-1, **kwargs)
    assert fidelity.ssim(a, b, mode) == pytest.approx(expected, abs=1e-9)


def test_invalid_inputs():
    image = _image()
    with pytest.raises(ValueError, match="shape mismatch"):
        fidelity.psnr(image, image[:-1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fidelity.psnr(torch.full((3, 8, 8), 2.0), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="at least 11x11"):
        fidelity.ssim(image[:8, :8], image[:8, :8])
    with pytest.raises(ValueError, match="mode"):
        fidelity.ssim(image, image, "hsv")


def test_latent_psnr_and_relative_error():
    ref = torch.linspace(-1, 1, 64).view(4, 16)  # data range 2
    assert fidelity.latent_psnr(ref + 0.1, ref) == pytest.approx(10 * math.log10(4 / 0.01))
    assert fidelity.latent_psnr(ref.numpy() + 0.1, ref.numpy()) == pytest.approx(
        fidelity.latent_psnr(ref + 0.1, ref)
    )
    per_sample = fidelity.latent_psnr_batch(torch.stack([ref + 0.1, ref]), torch.stack([ref, ref]))
    assert per_sample[0] == pytest.approx(10 * math.log10(4 / 0.01)) and per_sample[1] == math.inf
    assert fidelity.relative_error(ref, ref) == 0.0
    assert fidelity.relative_error(2 * ref, ref) == pytest.approx(1.0)
