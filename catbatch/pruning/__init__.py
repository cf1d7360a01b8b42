"""CAT pruning (cluster-aware token pruning with caching) for diffusers SD3/SD3.5, PixArt-Sigma
and FLUX.1.

One line, without the rest of catbatch::

    from catbatch.pruning import apply_cat, remove_cat
    apply_cat(pipe, alpha=0.3)        # or apply_cat(pipe, CATConfig(alpha=0.3))
    images = pipe(prompts).images
    remove_cat(pipe)

Names are imported on first use (PEP 562), so the configuration (``CATConfig``,
``parse_pruning_section``) is available without importing torch or diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it
_EXPORTS = {
    "STRATEGIES": "config",
    "CacheBytes": "memory",
    "cache_bytes": "memory",
    "CATConfig": "config",
    "PruningConfigError": "config",
    "parse_pruning_section": "config",
    "count_step_macs": "counting",
    "pruned_forward": "counting",
    "CATHook": "hooks",
    "CATState": "hooks",
    "apply_cat": "hooks",
    "get_cat_state": "hooks",
    "remove_cat": "hooks",
}

__all__ = [
    "STRATEGIES",
    "CacheBytes",
    "CATConfig",
    "CATHook",
    "CATState",
    "PruningConfigError",
    "apply_cat",
    "cache_bytes",
    "count_step_macs",
    "get_cat_state",
    "parse_pruning_section",
    "pruned_forward",
    "remove_cat",
]

if TYPE_CHECKING:
    from .config import STRATEGIES, CATConfig, PruningConfigError, parse_pruning_section
    from .counting import count_step_macs, pruned_forward
    from .hooks import CATHook, CATState, apply_cat, get_cat_state, remove_cat
    from .memory import CacheBytes, cache_bytes


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
