"""CAT's cache memory in a job: each pruned variant's buffer bytes per generation, computed
before the run from the transformer's config (no weights), and the check that they fit the
device.

The figure (:func:`catbatch.pruning.cache_bytes`) is for ``batch_size`` images at the variant's
size and text length, in the model's dtype, with two rows per image where the family uses CFG
and ``guidance_scale > 1``. It goes into the run record (``cat_cache_bytes``) and each shard's
stats (``extra.cat_cache_bytes``). A worker refuses to start when a variant's buffers exceed the
memory its device has free once the model is loaded: CUDA's free memory, or on a CPU device the
host's available memory (``MemAvailable``; not checked where the system does not report it).
Activations and the model itself are not part of the figure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from catbatch.job.manifest import Manifest
from catbatch.models.families import Family, source_folder

GB = 1e9


class CacheMemoryError(RuntimeError):
    """A variant's CAT buffers do not fit the device; the message is meant for the user."""


def transformer_config(source: dict[str, Any]) -> dict[str, Any] | None:
    """The ``transformer/config.json`` of a model source (``describe_source``); None when the
    pipeline has none or it cannot be read."""
    folder = source_folder(source)
    if folder is None:
        return None
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def loaded_transformer_config(pipe: Any) -> dict[str, Any] | None:
    """The config of a loaded pipeline's transformer (with ``_class_name``), or None."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return None
    return {**transformer.config, "_class_name": type(transformer).__name__}


def cat_cache_bytes(
    manifest: Manifest, config: Mapping[str, Any] | None, family: Family | None
) -> dict[str, dict[str, int]]:
    """``{variant: {"kv", "branches", "other", "total"}}`` for every variant with pruning;
    empty when the transformer config or family is unknown or not prunable."""
    if config is None or family is None or not family.pruning:
        return {}
    import torch

    from catbatch.pruning import CATConfig, cache_bytes

    dtype = getattr(torch, manifest.model.dtype)
    out = {}
    for name, s in manifest.resolved_variants().items():
        if s.pruning is None:
            continue
        size = cache_bytes(
            config,
            batch=manifest.batch_size,
            height=s.height,
            width=s.width,
            cfg=family.cfg and s.guidance_scale > 1,
            dtype=dtype,
            max_sequence_length=s.max_sequence_length,
            config=CATConfig.from_dict(s.pruning),
        )
        out[name] = size.to_dict()
    return out


def free_bytes(device: str) -> int | None:
    """Memory ``device`` has free now: CUDA's free memory, the host's ``MemAvailable`` for the
    CPU; None when unknown."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(
    manifest: Manifest, caches: dict[str, dict[str, int]], free: int | None, device: str
) -> None:
    """Raise :class:`CacheMemoryError` naming the variant, its fields and the numbers when a
    variant's CAT buffers exceed ``free`` bytes (None: not checked)."""
    if free is None:
        return
    settings = manifest.resolved_variants()
    for name, size in caches.items():
        if size["total"] <= free:
            continue
        s = settings[name]
        where = "pruning" if name == "default" else f"variants[{name}].pruning"
        stream = s.pruning.get("stream", "full")
        hint = "" if stream == "krow" else f", or `{where}.stream: krow` (no branch caches)"
        raise CacheMemoryError(
            f"{where}: CAT's caches need {size['total'] / GB:.2f} GB per generation "
            f"(K/V {size['kv'] / GB:.2f} GB, branches {size['branches'] / GB:.2f} GB) for "
            f"batch_size {manifest.batch_size} at {s.width}x{s.height} in "
            f"{manifest.model.dtype}, but {device} has {free / GB:.2f} GB free after loading "
            f"the model; lower `batch_size` or `width` / `height`{hint}"
        )
