"""Fidelity of generated images and latents against a reference (e.g. the unpruned run).

Images may be PIL images, numpy arrays (``HW``, ``HWC`` or ``BHWC``; uint8 in ``[0, 255]`` or
float in ``[0, 1]``), torch tensors (``HW``, ``CHW`` or ``BCHW``; uint8 or float in ``[0, 1]``,
the layout of diffusers' ``output_type="pt"``), or lists of any of these. Internally every
image becomes float64 ``[0, 1]`` channel-last; an alpha channel is dropped.

* PSNR: ``10 log10(1 / MSE)`` over all pixels and channels, data range 1 (the same number as
  ``255`` on uint8 values). Identical images give ``inf`` (no cap).
* SSIM: Wang et al. (2004) with an 11x11 Gaussian window, sigma 1.5, ``K1 = 0.01``,
  ``K2 = 0.03``, data range 1, population (not sample) covariances, averaged over the valid
  window positions (no padding). This equals scikit-image's
  ``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1)``. ``mode="luminance"`` (default) scores the BT.601 luma
  ``Y = 0.299 R + 0.587 G + 0.114 B`` (unrounded floats); ``mode="channels"`` averages the
  per-channel SSIMs (scikit-image's ``channel_axis=-1``). Images need at least 11x11 pixels.
* Latent PSNR: data range = peak-to-peak (max - min) of the reference; identical -> ``inf``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

WINDOW_SIZE = 11
WINDOW_SIGMA = 1.5
K1, K2 = 0.01, 0.03
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
_RANGE_TOLERANCE = 1e-3


# -- conversion ---------------------------------------------------------------------------------


def as_images(images: Any) -> Tensor:
    """Images as a float64 tensor ``(B, H, W, C)`` in ``[0, 1]``, ``C`` in ``{1, 3}``."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images")
        return torch.cat([as_images(image) for image in images])
    if hasattr(images, "convert") and hasattr(images, "mode"):  # PIL.Image
        rgb_or_gray = images if images.mode in ("L", "RGB") else images.convert("RGB")
        return as_images(np.asarray(rgb_or_gray))
    if isinstance(images, np.ndarray):
        array = images
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim == 3:
            array = array[None]
        if not array.flags.writeable:  # e.g. np.asarray(PIL image)
            array = array.copy()
        tensor = torch.from_numpy(np.ascontiguousarray(array))  # BHWC
    elif isinstance(images, Tensor):
        tensor = images.detach().cpu()
        if tensor.dim() == 2:
            tensor = tensor[None]
        if tensor.dim() == 3:
            tensor = tensor[None]
        tensor = tensor.permute(0, 2, 3, 1)  # BCHW -> BHWC
    else:
        raise TypeError(f"unsupported image type {type(images).__name__}")
    if tensor.dim() != 4:
        raise ValueError(f"expected 2 to 4 image dims, got shape {tuple(tensor.shape)}")
    return _normalise(tensor)


def _normalise(tensor: Tensor) -> Tensor:
    channels = tensor.shape[-1]
    if channels == 4:
        tensor = tensor[..., :3]
    elif channels not in (1, 3):
        raise ValueError(f"images need 1, 3 or 4 channels, got {channels}")
    if tensor.dtype == torch.uint8:
        return tensor.double() / 255.0
    if not tensor.is_floating_point():
        raise TypeError(f"images must be uint8 or float, got {tensor.dtype}")
    tensor = tensor.double()
    lo, hi = float(tensor.min()), float(tensor.max())
    if lo < -_RANGE_TOLERANCE or hi > 1.0 + _RANGE_TOLERANCE:
        raise ValueError(f"float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return tensor


def _pair(images: Any, references: Any) -> tuple[Tensor, Tensor]:
    x, y = as_images(images), as_images(references)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(y.shape)} (BHWC)")
    return x, y


def _single(x: Tensor, name: str) -> None:
    if x.shape[0] != 1:
        raise ValueError(f"{name}() takes one image, got {x.shape[0]}; use {name}_batch()")


# -- PSNR ----------------------------------------------------------------------------------------


def _psnr_from_mse(mse: float, data_range: float) -> float:
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _psnr_values(x: Tensor, y: Tensor) -> list[float]:
    mse = (x - y).square().flatten(1).mean(1)
    return [_psnr_from_mse(float(m), 1.0) for m in mse]


def psnr_batch(images: Any, references: Any) -> list[float]:
    """PSNR in dB of each image against its reference (data range 1, ``inf`` if identical)."""
    return _psnr_values(*_pair(images, references))


def psnr(image: Any, reference: Any) -> float:
    """PSNR in dB of one image against its reference."""
    x, y = _pair(image, reference)
    _single(x, "psnr")
    return _psnr_values(x, y)[0]


# -- SSIM ----------------------------------------------------------------------------------------


def gaussian_window(size: int = WINDOW_SIZE, sigma: float = WINDOW_SIGMA) -> Tensor:
    """Normalised 1-D Gaussian taps (float64)."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    return taps / taps.sum()


def _luminance(x: Tensor) -> Tensor:
    if x.shape[-1] == 1:
        return x
    weights = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype)
    return (x * weights).sum(-1, keepdim=True)


def _ssim_planes(x: Tensor, y: Tensor) -> Tensor:
    """Mean SSIM of each plane: ``x, y (P, H, W)`` in ``[0, 1]`` -> ``(P,)``."""
    taps = gaussian_window()
    vertical, horizontal = taps.view(1, 1, -1, 1), taps.view(1, 1, 1, -1)

    def blur(t: Tensor) -> Tensor:  # valid separable Gaussian filter
        return torch.nn.functional.conv2d(
            torch.nn.functional.conv2d(t[:, None], vertical), horizontal
        )[:, 0]

    c1, c2 = K1**2, K2**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(1)


def _ssim_values(x: Tensor, y: Tensor, mode: str) -> list[float]:
    if min(x.shape[1], x.shape[2]) < WINDOW_SIZE:
        raise ValueError(f"SSIM needs images of at least {WINDOW_SIZE}x{WINDOW_SIZE} pixels")
    if mode == "luminance":
        x, y = _luminance(x), _luminance(y)
    elif mode != "channels":
        raise ValueError(f"mode must be 'luminance' or 'channels', got {mode!r}")
    b, h, w, c = x.shape
    planes = _ssim_planes(
        x.permute(0, 3, 1, 2).reshape(b * c, h, w), y.permute(0, 3, 1, 2).reshape(b * c, h, w)
    )
    return [float(v) for v in planes.view(b, c).mean(1)]


def ssim_batch(
    images: Any, references: Any, mode: Literal["luminance", "channels"] = "luminance"
) -> list[float]:
    """SSIM of each image against its reference (see the module docstring for the definition)."""
    return _ssim_values(*_pair(images, references), mode)


def ssim(image: Any, reference: Any, mode: Literal["luminance", "channels"] = "luminance") -> float:
    """SSIM of one image against its reference."""
    x, y = _pair(image, reference)
    _single(x, "ssim")
    return _ssim_values(x, y, mode)[0]


def compare_images(images: Any, references: Any) -> dict[str, list[float]]:
    """Per-image ``psnr`` and luminance ``ssim`` lists."""
    return {"psnr": psnr_batch(images, references), "ssim": ssim_batch(images, references)}


# -- latents -------------------------------------------------------------------------------------


def _as_float64(t: Tensor | np.ndarray) -> Tensor:
    if isinstance(t, np.ndarray):
        return torch.from_numpy(np.asarray(t, dtype=np.float64))
    return t.detach().cpu().double()


def latent_psnr(latent: Tensor | np.ndarray, reference: Tensor | np.ndarray) -> float:
    """PSNR over the whole tensor; data range = reference max - min (1 if that is 0)."""
    x, y = _as_float64(latent), _as_float64(reference)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(y.shape)}")
    data_range = float(y.max() - y.min()) or 1.0
    return _psnr_from_mse(float((x - y).square().mean()), data_range)


def latent_psnr_batch(
    latents: Tensor | np.ndarray | Sequence[Tensor], references: Tensor | np.ndarray | Sequence
) -> list[float]:
    """:func:`latent_psnr` of each sample along dim 0, each with its own data range."""
    return [latent_psnr(x, y) for x, y in zip(latents, references, strict=True)]


def relative_error(latent: Tensor | np.ndarray, reference: Tensor | np.ndarray) -> float:
    """``||latent - reference|| / ||reference||`` (L2 over the whole tensor; 0 if identical)."""
    x, y = _as_float64(latent), _as_float64(reference)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(y.shape)}")
    diff = float(torch.linalg.vector_norm(x - y))
    return 0.0 if diff == 0.0 else diff / max(float(torch.linalg.vector_norm(y)), 1e-300)
