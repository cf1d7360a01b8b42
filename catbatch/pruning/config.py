"""Configuration of CAT pruning, with the paper's defaults.

The timeline uses the notes' vocabulary (0-based step index ``i``):

* ``i <= last_full_step`` (``s``): full compute;
* ``i == s + 1``: full compute, its output is the reference ``ref``;
* ``i == s + 2``: full compute, clusters are built and the first index set is chosen;
* ``i >= s + 3``: pruned, ``K = int(alpha * n_image_tokens)`` tokens per sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

STRATEGIES = ("cat", "noise", "random", "sequential", "at-edm")
STREAMS = ("full", "krow")
CUDA_GRAPHS = ("auto", "on", "off")

# Settings that change how a run executes, not its images: recorded, never fingerprinted.
EXECUTION_FIELDS = ("cuda_graphs",)
# Settings added after outputs were written, with the value those outputs were made with: a
# fingerprint leaves them out at that value, so such outputs still resume.
LEGACY_VALUES: dict[str, Any] = {"stream": "krow"}


class PruningConfigError(ValueError):
    """A pruning setting is invalid; ``field`` names it, ``value`` holds it."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}: got {value!r}; allowed: {allowed}")


@dataclass(frozen=True)
class CATConfig:
    """Settings of cluster-aware token pruning (defaults: the paper and its reference code).

    Attributes:
        alpha: fraction of image tokens computed at a pruned step, in (0, 1].
        last_full_step: ``s``; steps ``0..s+2`` are computed in full (paper: t0 = 8 with s = 5).
        n_clusters: KMeans clusters, built once per generation at step ``s + 2``.
        ewma_decay: ``a`` in ``f = a * f + 1[computed]``, the staleness frequency.
        hot_fraction: share of ``K`` taken from the top clusters ("hot"); the rest are stale.
        strategy: ``cat`` (default), ``noise``, ``random``, ``sequential`` or ``at-edm``.
        position_weight: weight of the positional encoding in the clustering features; the
            features are ``feature_weight * out + position_weight * pos``.
        feature_weight: weight of the output vector in the clustering features (reference
            code: 0.05, which makes clusters mostly spatial).
        graph_pooling: smooth cluster scores over adjacent clusters at the clustering step.
        kmeans_iters: Lloyd iterations of the on-device KMeans (fixed, no host sync).
        seed: seed of KMeans initialisation and of the ``random`` strategy.
        attention_block: block whose attention map drives ``at-edm`` (-1: the middle block).
        stream: ``full`` (default): every image token stays in the residual stream; tokens
            not computed advance with their cached attention / feed-forward outputs, the final
            norm and projection run for all tokens and the selector scores this raw output
            (the notes' reference design). ``krow``: only the ``K`` computed rows flow
            through the blocks and the selector scores the merged (reused) output, so a token
            keeps the score of the step it was last computed. Both give the same output
            for the same index sets; only the scores (hence the selection) differ.
        cuda_graphs: ``auto`` (capture on a CUDA device below a token count), ``on`` or
            ``off``. Capture the pruned step and the selector step as CUDA graphs; never
            changes the images (not part of a run's fingerprint). The CPU always runs eagerly.
    """

    alpha: float = 0.3
    last_full_step: int = 5
    n_clusters: int = 20
    ewma_decay: float = 0.5
    hot_fraction: float = 0.25
    strategy: str = "cat"
    feature_weight: float = 0.05
    position_weight: float = 1.0
    graph_pooling: bool = True
    kmeans_iters: int = 20
    seed: int = 0
    attention_block: int = -1
    stream: str = "full"
    cuda_graphs: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.cuda_graphs, bool):  # YAML reads a bare on/off as a boolean
            object.__setattr__(self, "cuda_graphs", "on" if self.cuda_graphs else "off")
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`PruningConfigError` naming the first invalid field."""
        checks: list[tuple[str, bool, str]] = [
            ("alpha", _is_number(self.alpha) and 0.0 < self.alpha <= 1.0, "a number in (0, 1]"),
            (
                "last_full_step",
                _is_int(self.last_full_step) and self.last_full_step >= 0,
                "an integer >= 0",
            ),
            ("n_clusters", _is_int(self.n_clusters) and self.n_clusters >= 1, "an integer >= 1"),
            (
                "ewma_decay",
                _is_number(self.ewma_decay) and 0.0 <= self.ewma_decay < 1.0,
                "a number in [0, 1)",
            ),
            (
                "hot_fraction",
                _is_number(self.hot_fraction) and 0.0 <= self.hot_fraction <= 1.0,
                "a number in [0, 1]",
            ),
            ("strategy", self.strategy in STRATEGIES, " | ".join(STRATEGIES)),
            ("feature_weight", _is_number(self.feature_weight), "a number"),
            ("position_weight", _is_number(self.position_weight), "a number"),
            ("graph_pooling", isinstance(self.graph_pooling, bool), "true or false"),
            (
                "kmeans_iters",
                _is_int(self.kmeans_iters) and self.kmeans_iters >= 1,
                "an integer >= 1",
            ),
            ("seed", _is_int(self.seed), "an integer"),
            ("attention_block", _is_int(self.attention_block), "an integer (-1: middle block)"),
            ("stream", self.stream in STREAMS, " | ".join(STREAMS)),
            ("cuda_graphs", self.cuda_graphs in CUDA_GRAPHS, " | ".join(CUDA_GRAPHS)),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise PruningConfigError(name, getattr(self, name), allowed)

    # -- construction from a manifest section ------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CATConfig:
        """Build from a manifest's ``pruning`` mapping; unknown keys are errors."""
        if not isinstance(data, dict):
            raise PruningConfigError("pruning", data, "a mapping of CAT settings, or none")
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k != "method"}
        for key in data:
            if key not in known:
                raise PruningConfigError(key, data[key], "one of " + ", ".join(sorted(known)))
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Every setting, with ``method: cat`` (what a manifest's ``pruning`` section holds)."""
        return {"method": "cat", **asdict(self)}

    @staticmethod
    def fingerprint_dict(section: dict[str, Any]) -> dict[str, Any]:
        """The part of a ``to_dict()`` section that decides the images: without
        :data:`EXECUTION_FIELDS`, and without a :data:`LEGACY_VALUES` field at its legacy value
        (so outputs written before that field existed keep their fingerprint)."""
        return {
            key: value
            for key, value in section.items()
            if key not in EXECUTION_FIELDS
            and not (key in LEGACY_VALUES and value == LEGACY_VALUES[key])
        }

    # -- derived quantities -------------------------------------------------------------------
    @property
    def reference_step(self) -> int:
        return self.last_full_step + 1

    @property
    def cluster_step(self) -> int:
        return self.last_full_step + 2

    @property
    def first_pruned_step(self) -> int:
        return self.last_full_step + 3

    def num_selected(self, n_tokens: int) -> int:
        """``K = int(alpha * n_tokens)``, at least one token."""
        return max(1, min(n_tokens, int(self.alpha * n_tokens)))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_pruning_section(value: Any) -> CATConfig | None:
    """Validate a manifest's ``pruning`` section: ``none``/null/``{method: none}`` -> None,
    otherwise a mapping of :class:`CATConfig` fields (``method: cat`` optional)."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "off")):
        return None
    if value is False:
        return None
    if isinstance(value, CATConfig):
        return value
    if not isinstance(value, dict):
        raise PruningConfigError(
            "method", value, "none, or a mapping such as {method: cat, alpha: 0.3}"
        )
    method = value.get("method", "cat")
    if method in (None, "none", "off"):
        if len(value) > 1:
            raise PruningConfigError("method", method, "no other settings when method is none")
        return None
    if method != "cat":
        raise PruningConfigError("method", method, "cat or none")
    return CATConfig.from_dict(value)
