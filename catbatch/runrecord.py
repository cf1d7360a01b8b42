"""The run record (``run.json``): what was run, with what, and the fingerprint of its results."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from typing import Any

from catbatch.manifest import Manifest
from catbatch.prompts import source_identity
from catbatch.writer import SCHEMA_VERSION


def fingerprint_inputs(manifest: Manifest) -> dict[str, Any]:
    """Everything that changes results (not batch size, actors or output location)."""
    return {
        "model": manifest.model.model_dump(exclude={"device"}),
        "variants": {k: v.model_dump() for k, v in manifest.resolved_variants().items()},
        "seed": manifest.seed,
        "images_per_prompt": manifest.images_per_prompt,
        "prompts": source_identity(manifest.prompts, manifest.base_dir),
        "shard_size": manifest.shard_size,
    }


def fingerprint(manifest: Manifest) -> str:
    blob = json.dumps(fingerprint_inputs(manifest), sort_keys=True, default=str)
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
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "name": manifest.name,
        "fingerprint": fingerprint(manifest),
        "fingerprint_inputs": fingerprint_inputs(manifest),
        "manifest": manifest.model_dump(mode="json"),
        "variants": list(manifest.resolved_variants()),
        "model_source": model_source,
        "pipeline": worker_info or {},
        "versions": versions(),
        "prompts": n_prompts,
        "shards": n_shards,
        "status": status,
        "summary": summary or {},
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
