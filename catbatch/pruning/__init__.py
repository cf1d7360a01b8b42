"""CAT pruning (cluster-aware token pruning with caching) for diffusers SD3/SD3.5 and PixArt.

One line, without the rest of catbatch::

    from catbatch.pruning import apply_cat, remove_cat
    apply_cat(pipe, alpha=0.3)        # or apply_cat(pipe, CATConfig(alpha=0.3))
    images = pipe(prompts).images
    remove_cat(pipe)
"""

from .config import STRATEGIES, CATConfig, PruningConfigError
from .counting import count_step_macs, pruned_forward
from .hooks import CATHook, CATState, apply_cat, get_cat_state, remove_cat

__all__ = [
    "STRATEGIES",
    "CATConfig",
    "CATHook",
    "CATState",
    "PruningConfigError",
    "apply_cat",
    "count_step_macs",
    "get_cat_state",
    "pruned_forward",
    "remove_cat",
]
