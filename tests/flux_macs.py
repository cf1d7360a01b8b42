"""The analytic MACs of one FluxTransformer2DModel step, from its block structure."""

from __future__ import annotations


def analytic_flux_macs(
    cfg: dict, n_img: int, n_txt: int, k: int | None = None, stream: str = "full"
) -> dict[str, int]:
    """MACs of one FLUX step for ONE row (no CFG) computing ``k`` of ``n_img`` image tokens
    (default: all, the unpruned step): ``paper`` (linear layers, the patch embedding included)
    and ``attention`` (QK^T and PV), with ``d`` = heads x head dim.

    Outside the blocks: x_embedder (the patch embedding, ``C_in -> d``, on every image token),
    context_embedder (``T5 width -> d`` per text token), per row the timestep and guidance MLPs
    (``256 -> d -> d`` each) and the pooled-text MLP (``pooled -> d -> d``), norm_out's
    modulation (``d -> 2d``) and proj_out (``d -> p*p*C_out``) on the computed tokens; in the
    full-length stream of a pruned step both once more for all tokens (the scores).

    Double-stream block: AdaLN-Zero modulation of each stream (``d -> 6d``, per row); per
    computed image token and per text token (own weights per stream) q, k, v (3d^2), output
    projection (d^2) and MLP with ratio 4 (8d^2): ``12 d^2``. Single-stream block: modulation
    ``d -> 3d``; per computed image token and text token one q, k, v and MLP input
    (``d -> 3d + 4d``) and one output projection of ``concat(attention, mlp)`` (``5d -> d``):
    ``12 d^2``. Attention in every block: ``k + n_txt`` queries over ``n_img + n_txt`` keys
    (cached image keys included), ``2 (k + n_txt)(n_img + n_txt) d``.
    """
    k = n_img if k is None else k
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    p = cfg.get("patch_size", 1)
    c_in = cfg.get("in_channels", 64)
    c_out = cfg.get("out_channels") or c_in
    double, single = cfg["num_layers"], cfg["num_single_layers"]
    rows, mlp = k + n_txt, 4 * d

    embed = n_img * c_in * d + n_txt * cfg["joint_attention_dim"] * d
    conditioning = 256 * d + d * d  # timestep MLP
    if cfg.get("guidance_embeds"):
        conditioning += 256 * d + d * d  # guidance MLP
    conditioning += cfg["pooled_projection_dim"] * d + d * d  # pooled text MLP
    double_block = 2 * 6 * d * d + rows * (3 * d * d + d * d + 2 * d * mlp)
    single_block = 3 * d * d + rows * (d * (3 * d + mlp) + (d + mlp) * d)
    heads = 2 if stream == "full" and k < n_img else 1  # the scores' final head on all tokens
    out = heads * 2 * d * d + (k + (n_img if heads == 2 else 0)) * d * p * p * c_out
    paper = embed + conditioning + double * double_block + single * single_block + out
    attention = (double + single) * 2 * rows * (n_img + n_txt) * d
    return {"paper": paper, "attention": attention}
