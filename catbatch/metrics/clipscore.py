"""CLIP score with open_clip: ``100 * max(cos(image, text), 0)``, text truncated to the context.

Weights come from a local file (the manifest's ``metrics.clip.weights``) or, failing that, from
the Hugging Face hub cache already on the machine (the open_clip tag's ``hf_hub`` entry). Nothing
is ever downloaded: without weights the score is skipped and :func:`clip_setup` says why; a
random-weight model is never used to fill the column. ``model`` is an open_clip model name or
the path of an open_clip model config (``.json``), registered with ``open_clip.add_model_config``,
or a CLIP that ships with catbatch (:data:`SHIPPED`, e.g. ``catbatch-shapes-clip``, trained on the
``catbatch-shapes`` domain): its config and weights come from the package, and the tag is ignored.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

FORMULA = (
    "100 * max(cosine(image_embedding, text_embedding), 0) with open_clip; the prompt is "
    "truncated to the text model's context length (77 tokens for CLIP models)"
)
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "models" / "data"
SHIPPED = ("catbatch-shapes-clip",)  # in SHIPPED_DIR/<name>/: <name>.json and the weights


def shipped_files(model: str) -> tuple[str, str] | None:
    """``(config, weights)`` of a CLIP shipped with catbatch, or None for any other name."""
    if model not in SHIPPED:
        return None
    folder = SHIPPED_DIR / model
    return str(folder / f"{model}.json"), str(folder / HF_WEIGHT_FILES[0])


@dataclass(frozen=True)
class ClipSetup:
    """What CLIP scoring will use, or why it is skipped (kept in the run record)."""

    enabled: bool
    model: str  # open_clip model name
    pretrained: str | None
    label: str  # the ``clip_model`` column, e.g. "ViT-L-14/openai"
    weights: str | None  # the local file that will be loaded
    available: bool
    note: str
    formula: str = FORMULA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def register_config(model: str) -> str:
    """The open_clip model name of ``model``; a ``.json`` config path is registered first."""
    if model.endswith(".json"):
        import open_clip

        open_clip.add_model_config(model)
        return Path(model).stem
    return model


def cached_hub_weights(
    model: str, pretrained: str | None, cache_dir: str | None = None
) -> str | None:
    """The tag's weights in the local Hugging Face hub cache, without any network access."""
    if not pretrained:
        return None
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import get_pretrained_cfg

    hub = get_pretrained_cfg(model, pretrained).get("hf_hub", "")
    if not hub:
        return None
    repo_id, filename = os.path.split(hub)  # "org/name/" means the default file names
    for name in (filename,) if filename else HF_WEIGHT_FILES:
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def clip_setup(
    model: str = "ViT-L-14",
    pretrained: str | None = "openai",
    weights: str | None = None,
    enabled: bool = True,
) -> ClipSetup:
    """Resolve the model name and its local weights; never downloads, never loads the model."""
    shipped = shipped_files(model)
    if shipped is not None:
        model, pretrained, weights = shipped[0], None, weights or shipped[1]
    name = Path(model).stem if model.endswith(".json") else model
    label = f"{name}/{pretrained}" if pretrained else name
    if not enabled:
        return ClipSetup(False, name, pretrained, label, None, False, "CLIP score disabled")
    try:
        register_config(model)
    except Exception as e:  # noqa: BLE001 - a bad config path: say so in the record
        return ClipSetup(True, name, pretrained, label, None, False, f"{e}{skip(False)}")
    if weights:
        ok = os.path.isfile(weights)
        note = "weights from a local file" if ok else f"weights file not found: {weights}"
        if shipped is not None:
            note = f"shipped with catbatch ({weights})" if ok else note
        return ClipSetup(
            True, name, pretrained, label, weights if ok else None, ok, note + skip(ok)
        )
    try:
        found = cached_hub_weights(name, pretrained)
    except Exception as e:  # noqa: BLE001 - unknown model/tag: say so in the record
        return ClipSetup(True, name, pretrained, label, None, False, f"{e}{skip(False)}")
    note = (
        f"weights from the hub cache: {found}"
        if found
        else f"no local weights for open_clip {label} (metrics.clip.weights is not set and the "
        "Hugging Face hub cache has none; nothing is downloaded)"
    )
    return ClipSetup(True, name, pretrained, label, found, found is not None, note + skip(found))


def skip(ok: Any) -> str:
    return "" if ok else "; clip_score left empty"


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """``100 * max(cos, 0)`` of paired rows of image and text embeddings."""
    cos = torch.nn.functional.cosine_similarity(image_features.float(), text_features.float(), -1)
    return 100.0 * cos.clamp(min=0.0)


class ClipScorer:
    """An open_clip model with its preprocessing and tokenizer, scoring (image, prompt) pairs."""

    def __init__(self, setup: ClipSetup, device: str = "cpu"):
        if not setup.available or setup.weights is None:
            raise ValueError(f"no CLIP weights: {setup.note}")
        import open_clip
        from open_clip.pretrained import get_pretrained_cfg

        if setup.model in SHIPPED:  # registered by clip_setup, maybe in another process
            register_config(shipped_files(setup.model)[0])
        cfg = get_pretrained_cfg(setup.model, setup.pretrained) if setup.pretrained else {}
        self.setup = setup
        self.device = device
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            setup.model,
            pretrained=setup.weights,
            device=device,
            force_quick_gelu=bool(cfg.get("quick_gelu", False)),
            image_mean=cfg.get("mean"),
            image_std=cfg.get("std"),
            image_interpolation=cfg.get("interpolation"),
            image_resize_mode=cfg.get("resize_mode"),
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(setup.model)

    @torch.no_grad()
    def embed(self, images: list[Image.Image], prompts: list[str]) -> tuple[torch.Tensor, ...]:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        tokens = self.tokenizer(prompts).to(self.device)  # truncated to the context length
        return self.model.encode_image(pixels), self.model.encode_text(tokens)

    @torch.no_grad()
    def score_tensor(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        """Scores of paired 8-bit images ``(B, 3, H, W)`` (uint8, on any device), preprocessed
        on the model's device as one batch: open_clip's transform applied to the tensor (its
        resize is torchvision's antialiased one, close to the PIL path of :meth:`score`)."""
        if not len(images):
            return []
        pixels = self.preprocess(images.to(self.device).float() / 255)
        tokens = self.tokenizer(list(prompts)).to(self.device)
        features = self.model.encode_image(pixels), self.model.encode_text(tokens)
        return [float(s) for s in clip_score(*features).cpu()]

    def score(self, images: list[Image.Image] | np.ndarray, prompts: list[str]) -> list[float]:
        """Scores of paired images (PIL, or uint8 / [0, 1] float arrays ``(B, H, W, 3)``)."""
        if isinstance(images, np.ndarray):
            images = [Image.fromarray(to_uint8(im)) for im in images]
        if not images:
            return []
        image_features, text_features = self.embed(list(images), list(prompts))
        return [float(s) for s in clip_score(image_features, text_features).cpu()]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """As the stored PNG: ``round(clip(x, 0, 1) * 255)`` for floats; uint8 passes through."""
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255).round().astype("uint8")
