"""Launch-count benchmark: how many aten ops a step dispatches (a proxy for kernel launches).

Counting rule: every call that reaches ``__torch_dispatch__`` of a ``TorchDispatchMode`` is one
op, whatever it is: views (``view``, ``transpose``, ``t``, ``expand``, ``slice``...), in-place
ops, copies, factory calls (``empty``, ``arange``) and compute kernels alike. Composite ops are
counted as what they decompose into (``linear`` -> ``t`` + ``addmm``), which is what runs.
Python-only work (hooks, argument binding) is not counted. Eager, fp32, CPU, no_grad; the op
count of a step does not depend on the token count, the width or the device.

Configuration (issue 13): an SD3 transformer with 24 blocks at a tiny width (2 heads x 16),
16x16 latent (64 image tokens), 16 text tokens, one prompt with CFG (2 rows). Counted:

* ``full (diffusers)``: the unpatched ``SD3Transformer2DModel.forward``;
* ``CAT full``: a full step of an applied CAT (step 1: no selector work);
* ``CAT pruned``: a pruned step of an applied CAT, selector step included;
* ``selector``: the ``cat`` selector's ``step()`` alone.

    python -m bench.launch_count [--stream full krow] [--strategy cat] [--layers 24]

Targets: CAT pruned <= the unpatched full step's count before issue 13 (2,982), CAT full not
above it, selector <= 40.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from torch.utils._python_dispatch import TorchDispatchMode

from catbatch.pruning import CATConfig, apply_cat, remove_cat

TARGETS = {"pruned": 2982, "full": 2982, "selector": 40}


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count(fn: Callable[[], Any]) -> OpCounter:
    with torch.no_grad(), OpCounter() as counter:
        fn()
    return counter


def build(layers: int, fused: bool = False) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
    ).eval()
    if fused:
        model.fuse_qkv_projections()
    return model


@torch.no_grad()
def step_counts(
    layers: int = 24, stream: str | None = None, strategy: str = "cat", fused: bool = False
) -> dict[str, Any]:
    """Op counts of one full diffusers step, a CAT full step, a CAT pruned step and the
    selector step (see the module docstring)."""
    model = build(layers, fused)
    rows = 2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 16, 16, 16, generator=g)
    text = torch.randn(rows, 16, 32, generator=g)
    pooled = torch.randn(rows, 32, generator=g)

    def call(t: float) -> None:
        model(x, text, pooled, torch.full((rows,), t), return_dict=False)

    full = count(lambda: call(900.0))
    extra = {} if stream is None else {"stream": stream}
    config = CATConfig(alpha=0.3, strategy=strategy, cuda_graphs="off", **extra)
    state = apply_cat(model, config, cfg=True)
    try:
        call(900.0)
        cat_full = count(lambda: call(899.0))  # a plain full step (step 1)
        for i in range(2, config.first_pruned_step + 1):
            call(900.0 - i)  # ... the reference and clustering steps, the first pruned step
        selector_counts: list[OpCounter] = []
        selector = state.selector
        inner = selector.step

        def counted_step(*args: Any, **kwargs: Any) -> Any:
            counter = OpCounter()
            with counter:
                result = inner(*args, **kwargs)
            selector_counts.append(counter)
            return result

        selector.step = counted_step
        pruned = count(lambda: call(780.0))
        selector.step = inner
        if state.pruned_steps != 2:
            raise RuntimeError(f"expected 2 pruned steps, got {state.pruned_steps}")
    finally:
        remove_cat(model)
    return {
        "full": full,
        "cat_full": cat_full,
        "pruned": pruned,
        "selector": selector_counts[-1] if selector_counts else OpCounter(),
        "stream": state.config.stream if hasattr(state.config, "stream") else "krow",
    }


def format_counts(results: dict[str, Any], top: int = 0) -> str:
    lines = [
        f"stream {results['stream']}: full (diffusers) {results['full'].total}, CAT full "
        f"{results['cat_full'].total}, CAT pruned (selector included) "
        f"{results['pruned'].total}, selector {results['selector'].total}",
        f"  targets: pruned <= {TARGETS['pruned']}: "
        f"{_verdict(results['pruned'].total <= TARGETS['pruned'])}; CAT full <= "
        f"{TARGETS['full']}: {_verdict(results['cat_full'].total <= TARGETS['full'])}; "
        f"selector <= {TARGETS['selector']}: "
        f"{_verdict(results['selector'].total <= TARGETS['selector'])}",
    ]
    if top:
        for name in ("pruned", "selector"):
            common = ", ".join(f"{op} {n}" for op, n in results[name].ops.most_common(top))
            lines.append(f"  most frequent in {name}: {common}")
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--stream", nargs="+", default=[None], help="full and/or krow")
    parser.add_argument("--strategy", default="cat")
    parser.add_argument("--fused", action="store_true", help="fuse_qkv_projections() first")
    parser.add_argument("--top", type=int, default=12, help="most frequent ops to list")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"SD3, {args.layers} blocks of 2 heads x 16, 64 image + 16 text tokens, CFG rows 2, "
        f"strategy {args.strategy}{', fused projections' if args.fused else ''}; eager CPU"
    )
    for stream in args.stream:
        print(format_counts(step_counts(args.layers, stream, args.strategy, args.fused), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
