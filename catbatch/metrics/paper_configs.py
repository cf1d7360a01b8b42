"""The paper's transformers (SD3-medium, PixArt-Sigma) and FLUX.1-dev as configs in code, built
without weights.

The values are the published ``transformer/config.json`` of ``stabilityai/stable-diffusion-3-medium
-diffusers``, ``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS`` and ``black-forest-labs/FLUX.1-dev``,
copied here so that nothing touches a model hub. Every other argument keeps diffusers' default,
which matches those files. Built on the ``meta`` device they cost no memory and serve only to
count MACs at real sizes.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field, replace
from typing import Any

import torch

SD3_MEDIUM: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
}

# ``stabilityai/stable-diffusion-3.5-large``: 38 blocks of width 2432, QK RMSNorm, no MMDiT-X
# second attention (not in the paper; for CAT's cache sizes).
SD35_LARGE: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}

PIXART_SIGMA: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 8,  # learned sigma: 4 noise + 4 variance channels
    "num_layers": 28,
    "attention_head_dim": 72,
    "num_attention_heads": 16,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,
    "norm_type": "ada_norm_single",
    "use_additional_conditions": False,
    "interpolation_scale": 2,
}

FLUX_1_DEV: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels, packed 2x2 by the pipeline
    "num_layers": 19,  # double-stream blocks
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}


@dataclass(frozen=True)
class PaperModel:
    """A transformer of the paper and the text tokens its pipeline feeds it.

    ``text_tokens``: SD3's pipeline concatenates the CLIP embeddings (77 tokens) with the T5
    embeddings (``max_sequence_length`` 256), 333 tokens; PixArt-Sigma's pipeline pads T5 to 300;
    FLUX's pipeline feeds T5 only (512 tokens; CLIP gives the pooled embedding).
    """

    name: str
    family: str  # "sd3", "pixart" or "flux"
    config: dict[str, Any]
    text_tokens: int
    text_dim: int
    pooled_dim: int | None = None
    paper_macs: dict[tuple[str, int], float] = field(default_factory=dict)

    def build(self, device: str | torch.device = "meta") -> torch.nn.Module:
        """The transformer with this config (random or no weights; ``meta`` by default)."""
        from diffusers import (
            FluxTransformer2DModel,
            PixArtTransformer2DModel,
            SD3Transformer2DModel,
        )

        classes = {
            "sd3": SD3Transformer2DModel,
            "pixart": PixArtTransformer2DModel,
            "flux": FluxTransformer2DModel,
        }
        cls = classes[self.family]
        with torch.device(device):
            return cls(**self.config).eval()


# Paper, Table 2 (1024x1024, CFG): MACs in T per image, keyed by (variant, steps).
PAPER_MODELS: dict[str, PaperModel] = {
    "sd3-medium": PaperModel(
        name="SD3-medium",
        family="sd3",
        config=SD3_MEDIUM,
        text_tokens=77 + 256,
        text_dim=4096,
        pooled_dim=2048,
        paper_macs={
            ("full", 28): 168.28,
            ("full", 50): 300.50,
            ("cat", 28): 90.28,
            ("cat", 50): 136.70,
        },
    ),
    "pixart-sigma": PaperModel(
        name="PixArt-Sigma",
        family="pixart",
        config=PIXART_SIGMA,
        text_tokens=300,
        text_dim=4096,
        paper_macs={
            ("full", 28): 120.68,
            ("full", 50): 215.40,
            ("cat", 28): 60.08,
            ("cat", 50): 88.24,
        },
    ),
    "flux1-dev": PaperModel(  # not in the paper: no reference figures
        name="FLUX.1-dev",
        family="flux",
        config=FLUX_1_DEV,
        text_tokens=512,
        text_dim=4096,
        pooled_dim=768,
    ),
}


# -- the paper's MACs table, counted on the meta device -------------------------------------------

NOTES = (
    "paper = transformer linear layers + patch-embedding convolution (the CAT paper's count); "
    "total = paper + attention products (QK^T, PV). Per image with CFG (2 rows per "
    "step; FLUX.1-dev 1 row), counted with torch's FLOP counter on the meta device "
    "(FLOPs / 2), no weights.",
    "SD3-medium: 333 text tokens (77 CLIP + 256 T5, what the pipeline feeds the transformer) "
    "reproduce the paper's full-model figures to within 0.05%.",
    "CAT: steps 0..7 full, the rest at K = int(alpha * N) of N image tokens (1228 of 4096 at "
    "1024px); image Q/K/V, attention output and feed-forward on K rows, SD3's and FLUX's text "
    "streams in full. 'ceiling' = full / CAT MACs of the timeline (paper count / total): the "
    "speed-up the counted work allows.",
    "PixArt-Sigma CAT: the engine computes the cross-attention text keys/values once per "
    "generation and reuses them at every later step; 'as the paper' recomputes them at the 8 "
    "full steps and reuses them only at pruned steps, which matches the paper's 60.08T / "
    "88.24T to within 0.1%: the gap is 7 later full steps x 28 blocks x 2 rows x (K and V: "
    "2 x 300 x 1152^2 MACs) = 0.31T. Both are within 1% of the paper.",
    "The remaining gaps (SD3 +0.03% full, +0.10% to +0.13% CAT) are smaller than one layer type "
    "(e.g. all AdaLN modulation layers: about 0.04T at 28 steps); their source is not "
    "identified (the paper does not publish its counting script).",
    "FLUX.1-dev (not in the paper): guidance-distilled, so one row per image (guidance is an "
    "input embedding, not CFG); 4096 image tokens (128x128 latent packed in 2x2 patches) + 512 "
    "T5 tokens; its patch embedding is the linear x_embedder. CAT: double-stream blocks as "
    "SD3's, single-stream blocks with the 512 text rows in full and K image rows.",
)


@dataclass(frozen=True)
class MacsRow:
    """One line of ``catbatch macs``: MACs per image in T (1e12)."""

    model: str
    steps: int
    variant: str  # "full" or "cat"
    paper_t: float
    total_t: float
    reference_t: float | None  # the paper's figure
    as_paper_t: float | None = None  # PixArt CAT counted as the paper appears to count
    ceiling_paper: float | None = None  # CAT rows: full / CAT MACs, paper count
    ceiling_total: float | None = None  # CAT rows: full / CAT MACs, with attention

    @property
    def diff_pct(self) -> float | None:
        if self.reference_t is None:
            return None
        return 100.0 * (self.paper_t - self.reference_t) / self.reference_t


def meta_inputs(model: PaperModel, resolution: int = 1024, rows: int = 2) -> dict[str, Any]:
    """Transformer inputs of one CFG image (``rows`` = 2; FLUX: always 1) on the meta device."""
    latent = resolution // 8
    channels = model.config["in_channels"]
    if model.family == "flux":
        return _flux_meta_inputs(model, latent // 2)
    with torch.device("meta"):
        inputs: dict[str, Any] = {
            "hidden_states": torch.zeros(rows, channels, latent, latent),
            "timestep": torch.full((rows,), 500.0),
            "encoder_hidden_states": torch.zeros(rows, model.text_tokens, model.text_dim),
        }
        if model.pooled_dim:
            inputs["pooled_projections"] = torch.zeros(rows, model.pooled_dim)
        if model.family == "pixart":
            inputs["encoder_attention_mask"] = torch.ones(rows, model.text_tokens)
            inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return inputs


def _flux_meta_inputs(model: PaperModel, side: int) -> dict[str, Any]:
    """One FLUX image: ``side x side`` packed latent tokens, ``model.text_tokens`` T5 tokens."""
    n = side * side
    with torch.device("meta"):
        return {
            "hidden_states": torch.zeros(1, n, model.config["in_channels"]),
            "encoder_hidden_states": torch.zeros(1, model.text_tokens, model.text_dim),
            "pooled_projections": torch.zeros(1, model.pooled_dim),
            "timestep": torch.full((1,), 0.5),
            "guidance": torch.full((1,), 3.5),
            "img_ids": torch.zeros(n, 3),
            "txt_ids": torch.zeros(model.text_tokens, 3),
        }


def paper_macs_table(
    names: tuple[str, ...] = ("sd3-medium", "pixart-sigma", "flux1-dev"),
    steps: tuple[int, ...] = (28, 50),
    alpha: float = 0.3,
    resolution: int = 1024,
) -> list[MacsRow]:
    """Full and CAT MACs per image of the paper's models and FLUX.1-dev, counted on the meta
    device."""
    from catbatch.metrics.rows import schedule, step_costs, step_macs
    from catbatch.pruning import CATConfig

    config = CATConfig(alpha=alpha)
    rows: list[MacsRow] = []
    for name in names:
        spec = PAPER_MODELS[name]
        model = spec.build("meta")
        inputs = meta_inputs(spec, resolution)
        full = step_macs(model, inputs)
        cat = step_costs(model, inputs, config)
        for n in steps:
            rows.append(_row(spec, n, "full", full * n, resolution, alpha))
            full_steps, pruned_steps = schedule(n, config)
            macs = cat.generation(full_steps, pruned_steps)
            as_paper = None
            if spec.family == "pixart":
                as_paper = (full * full_steps + cat.pruned * pruned_steps).paper / 1e12
            row = _row(spec, n, "cat", macs, resolution, alpha, as_paper)
            ceiling = {
                "ceiling_paper": full.paper * n / macs.paper,
                "ceiling_total": full.total * n / macs.total,
            }
            rows.append(replace(row, **ceiling))
    return rows


def _row(
    spec: PaperModel,
    steps: int,
    variant: str,
    macs: Any,
    resolution: int,
    alpha: float,
    as_paper: float | None = None,
) -> MacsRow:
    at_paper_setting = resolution == 1024 and (variant == "full" or alpha == 0.3)
    reference = spec.paper_macs.get((variant, steps)) if at_paper_setting else None
    return MacsRow(
        spec.name, steps, variant, macs.paper / 1e12, macs.total / 1e12, reference, as_paper
    )


def format_table(rows: list[MacsRow], alpha: float) -> str:
    """The table ``catbatch macs`` prints, with how each figure is counted."""
    head = (
        f"{'model':<13} {'steps':>5} {'variant':<10} {'paper T':>9} {'total T':>9} "
        f"{'paper says':>10} {'diff':>7}  {'as paper':>8}  {'ceiling':>13}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        variant = "full" if r.variant == "full" else f"cat a={alpha:g}"
        ref = "" if r.reference_t is None else f"{r.reference_t:.2f}"
        diff = "" if r.diff_pct is None else f"{r.diff_pct:+.2f}%"
        as_paper = "" if r.as_paper_t is None else f"{r.as_paper_t:.2f}"
        ceiling = ""
        if r.ceiling_paper is not None and r.ceiling_total is not None:
            ceiling = f"{r.ceiling_paper:.2f}x / {r.ceiling_total:.2f}x"
        lines.append(
            f"{r.model:<13} {r.steps:>5} {variant:<10} {r.paper_t:>9.2f} {r.total_t:>9.2f} "
            f"{ref:>10} {diff:>7}  {as_paper:>8}  {ceiling:>13}"
        )
    lines = [line.rstrip() for line in lines]
    lines.append("")
    lines.extend(
        textwrap.fill(note, 100, initial_indent="* ", subsequent_indent="  ") for note in NOTES
    )
    return "\n".join(lines)
