"""The pipeline families catbatch knows, and what each one takes.

A family is found from the diffusers pipeline class (``_class_name`` in a pipeline folder's
``model_index.json``) without loading weights, so a manifest can be checked against it before
anything runs. Pipelines of other classes still load and run; nothing is checked for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Family:
    """What catbatch does with one family of pipelines.

    ``pruning``: the CAT engine (:mod:`catbatch.pruning`) supports its transformer.
    ``cfg``: ``guidance_scale`` is classifier-free guidance over a negative prompt (two rows per
    image when above 1). False for guidance-distilled models (FLUX.1), whose transformer takes
    the guidance strength as an input embedding: one row per image and no negative prompt.
    """

    name: str
    pruning: bool
    cfg: bool


SD3 = Family("sd3", pruning=True, cfg=True)
PIXART = Family("pixart", pruning=True, cfg=True)
FLUX = Family("flux", pruning=True, cfg=False)

PIPELINES: dict[str, Family] = {
    "StableDiffusion3Pipeline": SD3,
    "PixArtSigmaPipeline": PIXART,
    "FluxPipeline": FLUX,
}


def family_of(pipeline: Any) -> Family | None:
    """The family of a pipeline object or class name; None for classes catbatch does not know.

    A pipeline with CAT applied keeps its class name, so it maps to the same family.
    """
    name = pipeline if isinstance(pipeline, str) else type(pipeline).__name__
    return PIPELINES.get(name)


def source_folder(source: dict[str, Any]) -> Path | None:
    """The local folder of a model source from :func:`catbatch.models.loader.describe_source`
    (a built-in preset is saved first); None for a source without one."""
    path = source.get("path")
    if not path:
        return None
    if source.get("kind") == "preset":
        from catbatch.models import tiny

        return Path(tiny.ensure_preset_saved(path))
    return Path(path)


def source_family(source: dict[str, Any]) -> Family | None:
    """The family of a model source from :func:`catbatch.models.loader.describe_source`, read
    from its ``model_index.json`` (no weights loaded); None when unknown or unreadable."""
    folder = source_folder(source)
    if folder is None:
        return None
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return family_of(str(index.get("_class_name", "")))
