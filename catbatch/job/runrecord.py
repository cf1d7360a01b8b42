"""The run record (``run.json``): what was run, with what, and the fingerprint of its results.

It outlives each submission: every submission appends an entry to ``submissions`` (when, which
host, what it ran, how it ended, its log folder, its own counts), the pipeline description and
log folder of the last submission that ran something are kept, and ``summary`` counts every
committed shard, whichever submission wrote it. Its size does not grow with the prompt count:
per variant it keeps the number of planned pieces and images (``planned``), and it points at the
shard index (``shard_index``, :mod:`catbatch.job.shardindex`) instead of listing the shards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import re
import socket
import sys
import time
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from catbatch.job.layout import OutputLayout
from catbatch.job.manifest import Manifest
from catbatch.job.prompts import source_identity
from catbatch.job.writer import SCHEMA_VERSION
from catbatch.pruning import CATConfig


def fingerprint_inputs(manifest: Manifest, model_source: dict | None = None) -> dict[str, Any]:
    """Everything that changes results: model (and the snapshot it resolved to), dtype, every
    variant's sampling and pruning settings, seed, images per prompt, the prompt source's
    identity (location and reading options, not content: that is each shard's ``content_hash``),
    the shard size and the output format (when not ``parquet``, so runs made before the field
    existed keep their fingerprint). Not batch size, actors, device, offloading or output
    location; of the memory options only those that change images (``drop_t5``,
    ``vae_tiling``), when on; of the pruning settings only those that change images
    (:meth:`CATConfig.fingerprint_dict`)."""
    model = manifest.model.model_dump(exclude={"device", "memory"})
    mem = manifest.model.memory
    model.update({k: True for k in ("drop_t5", "vae_tiling") if getattr(mem, k)})
    fmt = manifest.output_format
    return {
        **({"output_format": fmt} if fmt != "parquet" else {}),
        "model": model,
        "model_snapshot": resolved_snapshot(model_source or {}),
        "variants": {k: _variant(v) for k, v in manifest.resolved_variants().items()},
        "seed": manifest.seed,
        "images_per_prompt": manifest.images_per_prompt,
        "prompts": source_identity(manifest.prompts, manifest.base_dir),
        "shard_size": manifest.shard_size,
    }


def _variant(settings: Any) -> dict[str, Any]:
    """A variant's settings as fingerprinted: ``max_sequence_length`` only when set (as the
    memory options, so runs made before that setting existed keep their fingerprint), pruning
    reduced to what changes images (:meth:`CATConfig.fingerprint_dict`)."""
    values = settings.model_dump()
    if values.get("max_sequence_length") is None:
        values.pop("max_sequence_length", None)
    if values.get("pruning") is not None:
        values["pruning"] = CATConfig.fingerprint_dict(values["pruning"])
    return values


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
    """What the images depend on, from the installed packages: the driver imports neither
    torch nor diffusers for it (that alone took about 800 MB and seconds)."""
    import catbatch

    return {
        "catbatch": catbatch.__version__,
        "python": platform.python_version(),
        "torch": _torch_version("__version__") or _installed("torch"),
        "diffusers": _installed("diffusers"),
        "cuda": _torch_version("cuda"),
    }


def _installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _torch_version(name: str) -> str | None:
    """``torch.version.<name>`` (``__version__``, ``cuda``), read from torch's ``version.py``
    unless torch is imported already."""
    if "torch" in sys.modules:
        return getattr(sys.modules["torch"].version, name, None)
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    try:
        text = (Path(spec.origin).parent / "version.py").read_text()
    except OSError:
        return None
    m = re.search(rf"^{re.escape(name)}\b[^=]*=\s*'([^']*)'", text, re.MULTILINE)
    return m.group(1) if m else None


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def submission_entry(tasks: int, retry_tasks: int, logs: str | None) -> dict[str, Any]:
    """This submission's entry in ``submissions``, as it starts (``status: running``); the
    driver fills in ``finished_at``, ``status``, ``exit_code`` and ``summary`` at the end."""
    import catbatch

    return {
        "started_at": now(),
        "finished_at": None,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "catbatch": catbatch.__version__,
        "tasks": tasks,  # shard pieces to make
        "retry_tasks": retry_tasks,  # committed pieces whose failed images to make again
        "logs": logs,
        "status": "running",
        "exit_code": None,
        "summary": {},
    }


def committed_totals(
    layout: OutputLayout, variants: list[str], received: dict | None = None
) -> dict[str, Any]:
    """Images and shard pieces over every committed piece of ``variants`` (one listing each;
    stats from the commit digest, ``received`` stats as actors wrote them, else their files),
    and the digest brought up to date (:func:`catbatch.job.commits.refresh`)."""
    from catbatch.job.commits import refresh

    totals: dict[str, Any] = {}
    for variant in variants:
        for key, value in refresh(layout, variant, (received or {}).get(variant)).items():
            totals[key] = totals.get(key, 0) + value
    return totals


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
    previous: dict[str, Any] | None = None,
    submission: dict[str, Any] | None = None,
    shard_index: str | None = None,
    cat_cache: dict[str, dict[str, int]] | None = None,
) -> dict[str, Any]:
    """The run record; ``planned`` maps each variant to its number of pieces and images,
    ``shard_index`` is the shard index's file, relative to the output.

    ``previous`` is the record of the same run before this submission: its pipeline and logs
    stay unless this submission has its own, and ``submission`` is appended to its entries.
    ``cat_cache``: each pruned variant's CAT buffer bytes per generation
    (:mod:`catbatch.job.memory`)."""
    previous = previous or {}
    worker_info = worker_info or previous.get("pipeline")
    logs = logs or previous.get("logs")
    submissions = [*previous.get("submissions", []), *([submission] if submission else [])]
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
        "shard_index": shard_index,
        "planned": planned or {},
        "cat_cache_bytes": cat_cache or {},
        **({"logs": logs} if logs else {}),
        "images_per_prompt": manifest.images_per_prompt,
        "status": status,
        "summary": summary or {},
        "submissions": submissions,
        "updated_at": now(),
    }
