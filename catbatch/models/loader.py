"""Load any diffusers text-to-image pipeline: a built-in tiny preset, a local directory or a hub id.

Failures become :class:`ModelLoadError` with one readable message that names the model and says
how to point the manifest at a local copy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DTYPES = ("float32", "float16", "bfloat16")  # torch dtype names (torch is imported on use)


class ModelLoadError(RuntimeError):
    """The model cannot be found or loaded; the message is meant for the user."""


def describe_source(model_id: str, revision: str | None = None, base_dir: str = ".") -> dict:
    """Where the model comes from, checked without loading weights (fails fast, offline).

    Returns ``{"kind": "preset"|"local"|"hub", "path": ..., "revision": ...}``.
    """
    from catbatch.models import tiny

    if tiny.is_preset(model_id):
        quiet_libraries()  # building prints progress bars into the command's output otherwise
        tiny.ensure_preset_saved(model_id)  # build once here, not racing in every actor
        return {"kind": "preset", "path": model_id, "revision": f"v{tiny.PRESET_VERSION}"}
    local = Path(model_id) if Path(model_id).is_absolute() else Path(base_dir) / model_id
    if local.is_dir():
        if not (local / "model_index.json").exists():
            raise ModelLoadError(
                f"model {model_id!r}: {local} is a folder but not a diffusers pipeline "
                "(no model_index.json); point model.id at the folder made by save_pretrained"
            )
        return {"kind": "local", "path": str(local.resolve()), "revision": None}
    if model_id.startswith((".", "/", "~")) or os.sep in model_id.strip("/").replace("/", "", 1):
        raise ModelLoadError(f"model {model_id!r}: no such local folder ({local})")
    return {"kind": "hub", "path": _hub_snapshot(model_id, revision), "revision": revision}


def _hub_snapshot(model_id: str, revision: str | None) -> str:
    """The local snapshot of a hub model, downloading only when the hub is reachable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(model_id, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    hint = (
        f"model {model_id!r}{f' (revision {revision})' if revision else ''} is not in the local "
        "Hugging Face cache"
    )
    how = (
        "Download it where the hub is reachable (for example `hf download "
        f"{model_id} --local-dir /models/{model_id.split('/')[-1]}`) and set model.id in the "
        "manifest to that folder, or set HF_HOME to a cache that holds it."
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelLoadError(f"{hint} and HF_HUB_OFFLINE is set. {how}")
    try:
        return snapshot_download(model_id, revision=revision, etag_timeout=10)
    except HfHubHTTPError as e:
        raise ModelLoadError(
            f"{hint} and the hub refused it ({e.__class__.__name__}). {how}"
        ) from None
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise ModelLoadError(
            f"{hint} and the hub is unreachable ({type(e).__name__}). {how}"
        ) from None


def load_pipeline(
    source: dict, dtype: str = "float32", device: str = "cpu", memory: dict | None = None
) -> Any:
    """Load the pipeline that :func:`describe_source` found onto ``device``, with the manifest's
    memory options (``model.memory``: vae_tiling, vae_slicing, cpu_offload, drop_t5)."""
    import torch
    from diffusers import DiffusionPipeline

    from catbatch.models import tiny

    quiet_libraries()  # one worker per GPU: keep their logs readable
    memory = memory or {}
    if dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype: got {dtype!r}; allowed: {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, dtype)
    skip = _dropped_components(source, memory)
    try:
        if source["kind"] == "preset":
            pipe = tiny.load_tiny_pipeline(source["path"], torch_dtype=torch_dtype)
        else:
            pipe = DiffusionPipeline.from_pretrained(
                source["path"], torch_dtype=torch_dtype, local_files_only=True, **skip
            )
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(
            f"model {source['path']!r} failed to load: {type(e).__name__}: {e}"
        ) from e
    pipe.set_progress_bar_config(disable=True)
    if skip:
        if "text_encoder_3" not in pipe.config:
            raise ModelLoadError(_NO_T5.format(source.get("path")))
        pipe.register_modules(**skip)  # a preset loads everything: drop it here
    return apply_memory_options(pipe, memory, device)


def quiet_libraries() -> None:
    """Turn off diffusers' and transformers' progress bars and warnings in this process."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def _dropped_components(source: dict, memory: dict) -> dict[str, None]:
    """``{"text_encoder_3": None, "tokenizer_3": None}`` when ``drop_t5`` asks for it."""
    if not memory.get("drop_t5"):
        return {}
    index = Path(source.get("path", "")) / "model_index.json"
    if source["kind"] != "preset" and index.is_file():
        if "text_encoder_3" not in json.loads(index.read_text()):
            raise ModelLoadError(_NO_T5.format(source.get("path")))
    return {"text_encoder_3": None, "tokenizer_3": None}


_NO_T5 = (
    "model {!r}: model.memory.drop_t5 applies to SD3 / SD3.5 pipelines (a third, T5 text "
    "encoder); this pipeline has none to drop"
)


def apply_memory_options(pipe: Any, memory: dict, device: str) -> Any:
    """VAE tiling/slicing, then CPU offload (GPU only) or a plain move to ``device``."""
    vae = getattr(pipe, "vae", None)
    if memory.get("vae_tiling") and vae is not None:
        vae.enable_tiling()
    if memory.get("vae_slicing") and vae is not None:
        vae.enable_slicing()
    offload = memory.get("cpu_offload", "none")
    if offload != "none" and device.startswith("cuda"):
        if offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_sequential_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device is 'cuda' but no CUDA device is visible to this worker")
    return device


SD3_T5_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length


def pipeline_call_kwargs(pipe: Any) -> dict[str, Any]:
    """Extra call kwargs a caller must pass for this pipeline (usually none for SD3).

    PixArt: resolution binning would snap the requested size to the aspect-ratio table of the
    real model, and caption cleaning needs bs4/ftfy; both are turned off so the image has the
    size asked for and prompts go to the tokenizer as given.
    SD3 / SD3.5: a T5 tokenizer whose ``model_max_length`` is below the pipeline's default
    T5 length (256) sets ``max_sequence_length`` to it (``catbatch-shapes``: 1, one zero token);
    real models' T5 tokenizers declare 512 and keep the default.
    """
    name = type(pipe).__name__
    if name.startswith("PixArt"):
        return {"use_resolution_binning": False, "clean_caption": False}
    t5 = getattr(pipe, "tokenizer_3", None)
    limit = getattr(t5, "model_max_length", None)
    if name.startswith("StableDiffusion3") and isinstance(limit, int) and limit < SD3_T5_LENGTH:
        return {"max_sequence_length": limit}
    return {}
