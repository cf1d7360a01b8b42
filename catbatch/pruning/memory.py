"""The memory CAT keeps per generation, known before a run: its persistent buffers for a
transformer config, batch and resolution, measured by allocating them on the ``meta`` device.

The buffers (:class:`~catbatch.pruning.core.Buffers`) are the per-block image + text key/value
caches, the full-length stream's attention and feed-forward outputs (``stream: full``), the
merged output, the prompt tensors and the index sets; they live as long as CAT is applied and
are reused by every generation of the same shape. Activations of a step, CUDA-graph pools and
the extra buffers of secondary contexts (FLUX's separate CFG calls) or skip-layer guidance
calls are not included.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .config import CATConfig
from .engine import Engine, family_named, family_of


@dataclass(frozen=True)
class CacheBytes:
    """Bytes of CAT's buffers for one shape: ``kv`` (image and text keys and values of every
    attention module), ``branches`` (the full-length stream's attention / feed-forward outputs)
    and ``other`` (merged output, prompt tensors, index sets)."""

    kv: int
    branches: int
    other: int

    @property
    def total(self) -> int:
        return self.kv + self.branches + self.other

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def cache_bytes(
    transformer: torch.nn.Module | Mapping[str, Any],
    *,
    batch: int,
    height: int,
    width: int,
    cfg: bool | None = None,
    dtype: torch.dtype = torch.float16,
    max_sequence_length: int | None = None,
    text_tokens: int | None = None,
    config: CATConfig | None = None,
    vae_scale_factor: int = 8,
) -> CacheBytes:
    """CAT's buffers for ``batch`` images of ``height`` x ``width`` pixels.

    ``transformer``: the model, or its config (a ``transformer/config.json`` mapping with
    ``_class_name``). ``cfg``: two rows per image (default: the family's, False for FLUX.1).
    ``text_tokens``: prompt tokens fed to the transformer; by default what the family's
    diffusers pipeline feeds at ``max_sequence_length`` (SD3: 77 CLIP + 256 T5, PixArt-Sigma:
    300, FLUX.1: 512). ``config``: the CAT
    settings (``stream`` and ``alpha`` matter). No weights and no memory are used.
    """
    config = config or CATConfig()
    if isinstance(transformer, Mapping):
        settings = dict(transformer)
        family = family_named(str(settings.get("_class_name")))
    else:
        settings = dict(transformer.config)
        family = family_of(transformer)
    with torch.device("meta"):
        model = family.model_class.from_config(settings).eval()
    torch.nn.Module.to(model, dtype)  # diffusers' own .to() warns about fp32-kept modules
    if cfg is None:
        cfg = family.cfg
    rows = 2 * batch if cfg else batch
    if text_tokens is None:
        text_tokens = family.text_tokens(model.config, max_sequence_length)
    latent = (height // vae_scale_factor, width // vae_scale_factor)
    with torch.device("meta"):
        inputs = family.example_inputs(model, rows, latent, text_tokens)
    engine = Engine(model, config.stream)
    with torch.no_grad():
        buffers = engine.prepare(model, inputs, batch)
        engine.step(model, inputs, buffers, None, fill=True)
        indices = buffers.index_set(config.num_selected(buffers.key.n_tokens))
        engine.step(model, inputs, buffers, indices)
    kv = sum(_nbytes(c.key) + _nbytes(c.value) for c in buffers.kv.values())
    branches = sum(_nbytes(c.full) for c in buffers.branches.values())
    return CacheBytes(kv, branches, buffers.nbytes() - kv - branches)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
