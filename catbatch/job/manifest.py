"""The job manifest: YAML loaded safely and validated into a typed config before anything runs.

Every error becomes one :class:`ManifestError` that names the file, the line and column of the
offending value (when the YAML has one), the field path, the bad value and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from catbatch.errors import ManifestError, Problem
from catbatch.job.prompts import PromptSource
from catbatch.pruning import PruningConfigError, parse_pruning_section

DTYPES = ("float32", "float16", "bfloat16")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemorySpec(_Strict):
    """Memory savers passed to the diffusers pipeline (all off by default).

    ``vae_tiling``/``vae_slicing`` decode large images / batches in pieces; ``cpu_offload``
    keeps weights in CPU memory and moves each model (``model``) or each layer
    (``sequential``, slowest, least memory) to the GPU when used; ``drop_t5`` loads SD3 / SD3.5
    without its T5 text encoder (about 9 GB less in fp16; prompts are encoded by the CLIPs only).
    """

    vae_tiling: bool = False
    vae_slicing: bool = False
    cpu_offload: Literal["none", "model", "sequential"] = "none"
    drop_t5: bool = False


class ModelSpec(_Strict):
    """Which pipeline to load: a built-in preset, a local directory or a hub id."""

    id: str = Field(min_length=1, description="preset name (tiny-sd3, ...), local dir or hub id")
    revision: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    memory: MemorySpec = MemorySpec()


class Resources(_Strict):
    """Ray resources per actor. ``gpus`` may be fractional (0.5: two actors share a GPU) and
    is used only where the cluster has GPUs; 0 runs CPU-only actors."""

    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(1.0, ge=0, le=8)


class RaySpec(_Strict):
    """Where the actors run and how many there are.

    ``address``: ``local`` starts a private cluster on this machine (the default), ``auto``
    joins the cluster this process runs in (a Ray Job, a head node, ``RAY_ADDRESS``), anything
    else is a cluster address (``ray://head:10001`` or ``head:6379``). ``actors: auto`` is one
    per GPU (``gpus`` each) on a cluster with GPUs, else one per ``cpus`` CPUs.
    """

    address: str = Field("local", min_length=1)
    actors: int | Literal["auto"] = "auto"
    resources: Resources = Resources()
    object_store_mb: int = Field(256, ge=64)
    # fault handling: tries per shard, seconds one batch may take, SIGTERM grace period
    max_attempts: int = Field(3, ge=1, le=100)
    batch_timeout_s: float | None = Field(3600.0, gt=0)
    stop_grace_s: float = Field(20.0, ge=0)

    @field_validator("actors")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be 'auto' or an integer >= 1")
        return v


class ClipSpec(_Strict):
    """CLIP score: open_clip model (name or config ``.json``), tag and local weights."""

    model: str = Field("ViT-L-14", min_length=1)
    pretrained: str | None = "openai"
    weights: str | None = None  # local open_clip weights; else the user's hub cache
    enabled: bool = True


class MetricsSpec(_Strict):
    """Per-sample metrics: CLIP score, price per GPU-hour (one number or by device name), MACs,
    and prompt adherence by a checker of a known caption domain (off by default)."""

    clip: ClipSpec = ClipSpec()
    price_per_gpu_hour: float | dict[str, float] | None = None
    macs: bool = True
    adherence: Literal["shapes"] | None = None  # catbatch.metrics.adherence

    @field_validator("price_per_gpu_hour", mode="before")
    @classmethod
    def _price(cls, v: Any) -> Any:
        prices = v.values() if isinstance(v, dict) else [] if v is None else [v]
        for p in prices:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < float("inf"):
                raise ValueError(
                    "must be a price >= 0, or a mapping of device name (or 'default') to price"
                )
        return v


def _multiple_of_8(v: int) -> int:
    if v % 8:
        raise ValueError("must be a multiple of 8")
    return v


def _pruning(v: Any) -> dict[str, Any] | None:
    try:
        cfg = parse_pruning_section(v)
    except PruningConfigError as e:
        raise PydanticCustomError(
            "pruning",
            "got {value}; allowed: {allowed}",
            {"field": e.field, "value": repr(e.value), "allowed": e.allowed},
        ) from e
    return None if cfg is None else cfg.to_dict()


Size = Annotated[int, Field(ge=16, le=8192), AfterValidator(_multiple_of_8)]
Steps = Annotated[int, Field(ge=1, le=1000)]
TextTokens = Annotated[int, Field(ge=1, le=512)]  # T5 tokens; diffusers' SD3 and FLUX limit
Guidance = Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)]
Pruning = Annotated[Any, BeforeValidator(_pruning)]


class Sampling(_Strict):
    """Generation settings; each may be overridden per variant. ``pruning`` is the engine's."""

    width: Size = 1024
    height: Size = 1024
    steps: Steps = 28
    guidance_scale: Guidance = 7.0
    negative_prompt: str = ""
    # T5 tokens of the prompt; None: the pipeline's default (SD3 256, PixArt-Sigma 300, FLUX 512)
    max_sequence_length: TextTokens | None = None
    pruning: Pruning = None


class Variant(_Strict):
    """A named override of the sampling settings, run over the same prompts and seeds."""

    name: str
    width: Size | None = None
    height: Size | None = None
    steps: Steps | None = None
    guidance_scale: Guidance | None = None
    negative_prompt: str | None = None
    max_sequence_length: TextTokens | None = None
    pruning: Pruning = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("must be 1-64 characters of letters, digits, '.', '_' or '-'")
        return v


class Manifest(Sampling):
    """A validated job manifest: the sampling defaults plus everything else."""

    name: str
    model: ModelSpec
    prompts: PromptSource
    output: str = Field(min_length=1)
    # shard files: Parquet, or WebDataset tars (catbatch.job.writer.ShardFormat)
    output_format: Literal["parquet", "webdataset"] = "parquet"
    seed: int = Field(0, ge=0, lt=2**63)
    images_per_prompt: int = Field(1, ge=1, le=64)
    batch_size: int = Field(1, ge=1, le=256)
    shard_size: int = Field(64, ge=1, le=100_000)
    variants: list[Variant] = Field(default_factory=list)
    ray: RaySpec = RaySpec()
    metrics: MetricsSpec = MetricsSpec()
    # filled in by load_manifest: where the manifest lives, to resolve relative paths
    base_dir: str = Field("", exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("must be 1-64 characters of letters, digits, '.', '_' or '-'")
        return v

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, variants: list[Variant]) -> list[Variant]:
        first: dict[str, int] = {}
        for index, v in enumerate(variants):
            if v.name in first:
                raise PydanticCustomError(
                    "duplicate_variant",
                    "'{name}' is already the name of variants[{first}]; variant names must be "
                    "unique",
                    {"index": index, "name": v.name, "first": first[v.name]},
                )
            first[v.name] = index
        return variants

    def resolved_variants(self) -> dict[str, Sampling]:
        """Each variant's full sampling settings (the manifest's own when none are listed)."""
        base = {name: getattr(self, name) for name in Sampling.model_fields}
        if not self.variants:
            return {"default": Sampling.model_construct(**base)}
        out = {}
        for v in self.variants:
            over = {k: getattr(v, k) for k in v.model_fields_set if k != "name"}
            out[v.name] = Sampling.model_construct(**{**base, **over})
        return out

    def resolve_path(self, path: str) -> str:
        """A local path relative to the manifest's folder; URLs pass through."""
        if "://" in path or Path(path).is_absolute():
            return path
        return str(Path(self.base_dir or ".") / path)

    @property
    def output_url(self) -> str:
        return self.resolve_path(self.output)


# ------------------------------------------------------------------------------------------
# Loading with positions
# ------------------------------------------------------------------------------------------


def load_manifest(path: str | Path, overrides: dict[str, Any] | None = None) -> Manifest:
    """Read, parse and validate a manifest file; raise :class:`ManifestError` on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest file not found") from None
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read manifest: {e.strerror}") from None
    # absolute: Ray actors of a cluster started elsewhere have another working directory
    base_dir = str(path.parent.absolute())
    return parse_manifest(text, source=str(path), base_dir=base_dir, overrides=overrides)


def parse_manifest(
    text: str,
    source: str = "<manifest>",
    base_dir: str = ".",
    overrides: dict[str, Any] | None = None,
) -> Manifest:
    """Parse YAML text (safe loader) and validate it into a :class:`Manifest`."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ManifestError(f"{source}{where}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: the manifest must be a YAML mapping of fields")
    return manifest_from_dict(data, source, base_dir, overrides, _positions(node))


def manifest_from_dict(
    data: dict[str, Any],
    source: str = "<dict>",
    base_dir: str = ".",
    overrides: dict[str, Any] | None = None,
    positions: dict[tuple, tuple[int, int]] | None = None,
) -> Manifest:
    """Validate a manifest given as a dict (the parsed YAML); ``base_dir`` is where relative
    paths are resolved from, ``positions`` the field paths' lines in ``source`` if any."""
    data = {**data, **(overrides or {}), "base_dir": base_dir}
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise ManifestError(_problems(e, source, positions or {})) from None


def _positions(node: yaml.Node | None, path: tuple = ()) -> dict[tuple, tuple[int, int]]:
    """Map each field path to the 1-based (line, column) of its value (keys for mappings)."""
    out: dict[tuple, tuple[int, int]] = {}
    if node is None:
        return out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            sub = (*path, k.value)
            out[sub] = (v.start_mark.line + 1, v.start_mark.column + 1)
            out[(*sub, "__key__")] = (k.start_mark.line + 1, k.start_mark.column + 1)
            out.update(_positions(v, sub))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[(*path, i)] = (v.start_mark.line + 1, v.start_mark.column + 1)
            out.update(_positions(v, (*path, i)))
    return out


def _problems(err: ValidationError, source: str, positions: dict) -> list[Problem]:
    out = []
    for e in err.errors(include_url=False):
        loc = tuple(x for x in e["loc"] if not str(x).startswith("function-"))
        loc = tuple(x for x in loc if x not in ("int", "literal['auto']", "dict[str,any]", "none"))
        if e["type"] == "pruning" and e["ctx"]["field"] != "pruning":
            loc = (*loc, e["ctx"]["field"])
        if e["type"] == "duplicate_variant":
            loc = (*loc, e["ctx"]["index"], "name")
        field = _dotted(loc) or "(manifest)"
        pos = _nearest_position(loc, positions, key=e["type"] == "extra_forbidden")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            msg = f"unknown key {loc[-1]!r}" + (f"; allowed keys: {allowed}" if allowed else "")
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] in ("pruning", "duplicate_variant"):
            msg = e["msg"]
        else:
            value = e.get("input")
            text = str(e["msg"]).removeprefix("Value error, ")
            msg = f"got {_short(value)}; {text}"
        line, column = pos or (None, None)
        out.append(Problem(source, line, column, field, msg))
    return list(dict.fromkeys(out))


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _nearest_position(loc: tuple, positions: dict, key: bool) -> tuple[int, int] | None:
    if key and (*loc, "__key__") in positions:
        return positions[(*loc, "__key__")]
    for n in range(len(loc), 0, -1):
        if loc[:n] in positions:
            return positions[loc[:n]]
    return None


def _allowed_keys(loc: tuple) -> str:
    model: Any = Manifest
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        model = _model_in(field.annotation)
    fields = getattr(model, "model_fields", None)
    if not fields:
        return ""
    return ", ".join(k for k, f in fields.items() if not f.exclude)


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
