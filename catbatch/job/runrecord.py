"""The run record (``run.json``): what was run, with what, and the fingerprint of its results."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import PurePosixPath
from typing import Any

from catbatch.job.manifest import Manifest
from catbatch.job.prompts import source_identity
from catbatch.job.writer import SCHEMA_VERSION
from catbatch.pruning.config import CATConfig


def fingerprint_inputs(manifest: Manifest, model_source: dict | None = None) -> dict[str, Any]:
    """Everything that changes results: model (and the snapshot it resolved to), dtype, every
    variant's sampling and pruning settings, seed, images per prompt, the prompt source's
    identity (location and reading options, not content: that is each shard's ``content_hash``)
    and the shard size. Not batch size, actors, device, offloading or output location; of the
    memory options only those that change images (``drop_t5``, ``vae_tiling``), when on; of the
    pruning settings only those that change images (:meth:`CATConfig.fingerprint_dict`)."""
    model = manifest.model.model_dump(exclude={"device", "memory"})
    mem = manifest.model.memory
    model.update({k: True for k in ("drop_t5", "vae_tiling") if getattr(mem, k)})
    return {
        "model": model,
        "model_snapshot": resolved_snapshot(model_source or {}),
        "variants": {k: _variant(v.model_dump()) for k, v in manifest.resolved_variants().items()},
        "seed": manifest.seed,
        "images_per_prompt": manifest.images_per_prompt,
        "prompts": source_identity(manifest.prompts, manifest.base_dir),
        "shard_size": manifest.shard_size,
    }


def _variant(settings: dict[str, Any]) -> dict[str, Any]:
    if settings.get("pruning") is not None:
        settings["pruning"] = CATConfig.fingerprint_dict(settings["pruning"])
    return settings


def resolved_snapshot(model_source: dict) -> str | None:
    """What a model id resolved to: a preset's version or a hub snapshot's commit."""
    if model_source.get("kind") == "preset":
        return model_source.get("revision")
    if model_source.get("kind") == "hub":
        return PurePosixPath(str(model_source.get("path", ""))).name or None
    return None


def fingerprint(manifest: Manifest, model_source: dict | None = None) -> str:
    blob = json.dumps(fingerprint_inputs(manifest, model_source), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def versions() -> dict[str, str | None]:
    import diffusers
    import torch

    import catbatch

    return {
        "catbatch": catbatch.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda,
    }


def run_record(
    manifest: Manifest,
    model_source: dict,
    n_prompts: int,
    n_shards: int,
    status: str,
    worker_info: dict | None = None,
    summary: dict | None = None,
    planned: dict[str, dict[str, int]] | None = None,
    logs: str | None = None,
) -> dict[str, Any]:
    """The run record; ``planned`` maps each variant to its pieces and their image counts."""
    return {
        "schema_version": SCHEMA_VERSION,
        "name": manifest.name,
        "fingerprint": fingerprint(manifest, model_source),
        "fingerprint_inputs": fingerprint_inputs(manifest, model_source),
        "manifest": manifest.model_dump(mode="json"),
        "variants": list(manifest.resolved_variants()),
        "model_source": model_source,
        "pipeline": worker_info or {},
        "versions": versions(),
        "prompts": n_prompts,
        "shards": n_shards,
        "planned_shards": planned or {},
        **({"logs": logs} if logs else {}),
        "images_per_prompt": manifest.images_per_prompt,
        "status": status,
        "summary": summary or {},
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
