"""CAT pruning of FLUX.1 (tiny-flux and a tiny FluxTransformer2DModel): exactness at alpha = 1,
pruned steps against full steps, one index set per image, state hygiene, removal, MACs."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from flux_macs import analytic_flux_macs
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from catbatch.models.tiny import build_tiny_pipeline
from catbatch.pruning import (
    CATConfig,
    apply_cat,
    count_step_macs,
    get_cat_state,
    pruned_forward,
    remove_cat,
)
from catbatch.pruning.config import STREAMS
from catbatch.pruning.selection import make_selector

PROMPTS = ("a red cube on a table", "a dog in the snow", "a city at night")
STEPS = 10  # last_full_step=5: steps 0..7 full, 8..9 pruned
TOL = 1e-5
TEXT = 32  # T5 tokens (the pipeline's default 512 only makes the tests slower)


@pytest.fixture(scope="module")
def built_pipe():
    pipe = build_tiny_pipeline("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(built_pipe):
    """The module's pipeline, never patched when a test starts."""
    remove_cat(built_pipe)
    yield built_pipe
    remove_cat(built_pipe)


def generate(pipe, prompts, seed=0, height=128, width=192, images=2, **kwargs):
    """Packed output latents (float32) of one call: 8 x 12 tokens at 128 x 192."""
    call = dict(
        num_inference_steps=STEPS,
        height=height,
        width=width,
        num_images_per_prompt=images,
        guidance_scale=3.5,
        max_sequence_length=TEXT,
        output_type="latent",
    )
    call.update(kwargs)
    generator = torch.Generator().manual_seed(seed)
    return pipe(list(prompts), generator=generator, **call).images.float()


def max_diff(a, b):
    return (a - b).abs().max().item()


# -- the pipeline ----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", STREAMS)
def test_alpha_one_and_forced_all_match_unpruned(pipe, stream):
    """Batch 3, two images per prompt (6 rows, 6 index sets), 128 x 192 (non-square)."""
    base = generate(pipe, PROMPTS)
    assert base.shape == (6, 8 * 12, 64)

    state = apply_cat(pipe, alpha=1.0, stream=stream)
    out = generate(pipe, PROMPTS)
    assert state.cfg is False  # guidance 3.5 is FLUX's embedded guidance, not CFG
    assert (state.full_steps, state.pruned_steps) == (8, STEPS - 8)
    assert state.selector.grid == (8, 12) and state.selector.batch == 6
    assert max_diff(out, base) <= TOL

    state = apply_cat(pipe, CATConfig(alpha=0.3, stream=stream))
    state.force_indices = "all"
    assert max_diff(generate(pipe, PROMPTS), base) <= TOL

    state.force_indices = None
    pruned = generate(pipe, PROMPTS)
    assert state.pruned_steps == STEPS - 8 and torch.isfinite(pruned).all()
    assert max_diff(pruned, base) > 1e-3


def test_no_state_leaks_between_calls(pipe):
    apply_cat(pipe, alpha=0.3)
    first = generate(pipe, PROMPTS[:2], seed=1, images=1)
    assert torch.equal(generate(pipe, PROMPTS[:2], seed=1, images=1), first)
    single = generate(pipe, PROMPTS[:1], seed=2, images=1, height=192, width=128)
    generate(pipe, PROMPTS[1:], seed=5, images=1)
    again = generate(pipe, PROMPTS[:1], seed=2, images=1, height=192, width=128)
    assert torch.equal(again, single)
    state = get_cat_state(pipe)
    assert state.generations == 5 and state.selector.grid == (12, 8)


def test_remove_cat_restores_the_pipeline(pipe):
    base_class = type(pipe)
    transformer = pipe.transformer
    processors = {name: type(p) for name, p in transformer.attn_processors.items()}
    base = generate(pipe, PROMPTS[:2], images=1)

    apply_cat(pipe, alpha=0.3)
    assert type(pipe) is base_class  # the hook is on the transformer; the pipeline is as it was
    assert all("CAT" in type(p).__name__ for p in transformer.attn_processors.values())
    assert max_diff(generate(pipe, PROMPTS[:2], images=1), base) > 1e-3

    remove_cat(pipe)
    assert type(pipe) is base_class and get_cat_state(pipe) is None
    assert {name: type(p) for name, p in transformer.attn_processors.items()} == processors
    assert "forward" not in transformer.__dict__
    assert torch.equal(generate(pipe, PROMPTS[:2], images=1), base)


def test_true_cfg_calls_share_the_step_and_guidance_is_not_cfg(pipe):
    """True CFG (``true_cfg_scale > 1`` with a negative prompt): FluxPipeline calls the
    transformer under ``cache_context("cond")`` then ``("uncond")`` at every step; the uncond
    call is a secondary call (own caches, the cond call's index set)."""
    true_cfg = dict(true_cfg_scale=4.0, negative_prompt="blurry")
    base = generate(pipe, PROMPTS[:2], images=1, **true_cfg)
    state = apply_cat(pipe, alpha=1.0)
    out = generate(pipe, PROMPTS[:2], images=1, **true_cfg)
    assert state.cfg is False and state.pruned_steps == STEPS - 8
    assert state.secondary_calls == STEPS and state.extra_calls == 0
    assert max_diff(out, base) <= TOL

    state = apply_cat(pipe, alpha=0.3)
    pruned = generate(pipe, PROMPTS[:2], images=1, **true_cfg)
    assert torch.equal(generate(pipe, PROMPTS[:2], images=1, **true_cfg), pruned)
    assert max_diff(pruned, base) > 1e-3
    # true_cfg_scale without a negative prompt is a no-op in diffusers: one call per step
    generate(pipe, PROMPTS[:1], images=1, true_cfg_scale=4.0)
    assert state.secondary_calls == 0 and state.pruned_steps == STEPS - 8


def test_step_counters_survive_the_end_of_the_call(pipe):
    """diffusers resets FLUX's stateful hooks after every call (CacheMixin): the counters of
    the call that ran (what the worker's MACs read) are still there."""
    state = apply_cat(pipe, alpha=0.3)
    generate(pipe, PROMPTS[:1], images=1)
    assert (state.full_steps, state.pruned_steps, state.step) == (8, STEPS - 8, STEPS - 1)
    generate(pipe, PROMPTS[:1], images=1, num_inference_steps=4)
    assert (state.full_steps, state.pruned_steps) == (4, 0)


def test_fused_projections_are_used(pipe):
    """diffusers' fuse_qkv_projections() (to_qkv, to_added_qkv): alpha = 1 matches the fused
    unpruned pipeline and the fused projections are the ones called."""
    transformer = pipe.transformer
    originals = dict(transformer.attn_processors)
    transformer.fuse_qkv_projections()
    try:
        fused = generate(pipe, PROMPTS[:2], images=1)
        single = transformer.single_transformer_blocks[0].attn
        calls = []
        handle = single.to_qkv.register_forward_hook(lambda *a: calls.append(1))
        state = apply_cat(pipe, alpha=1.0)
        out = generate(pipe, PROMPTS[:2], images=1)
        handle.remove()
        assert state.pruned_steps == STEPS - 8 and len(calls) == 2 * STEPS  # image, text
        assert max_diff(out, fused) <= TOL
        remove_cat(pipe)
    finally:
        transformer.set_attn_processor(originals)
        for module in transformer.modules():  # unfuse: back to to_q/to_k/to_v
            if getattr(module, "fused_projections", False):
                module.fused_projections = False
                for name in ("to_qkv", "to_added_qkv"):
                    if hasattr(module, name):
                        delattr(module, name)


def test_prompt_work_runs_once_per_generation(pipe):
    """Context embedding, pooled-text and guidance embeddings and the rotary tables: once per
    generation, not once per step."""
    transformer = pipe.transformer
    calls = {"context": 0, "rope": 0, "guidance": 0}
    modules = {
        "context": transformer.context_embedder,
        "rope": transformer.pos_embed,
        "guidance": transformer.time_text_embed.guidance_embedder,
    }
    handles = [
        module.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, module in modules.items()
    ]
    try:
        state = apply_cat(pipe, alpha=0.3)
        generate(pipe, PROMPTS[:2], images=1)
        generate(pipe, PROMPTS[1:], images=1)
        assert state.full_steps + state.pruned_steps == STEPS
        assert calls == {"context": 2, "rope": 2, "guidance": 2}
    finally:
        for handle in handles:
            handle.remove()


def test_at_edm_records_the_joint_attention_of_a_double_block(pipe):
    seen = []

    def factory(config, grid, batch, device):
        selector = make_selector(config, grid, batch, device)
        start, step = selector.start, selector.step

        def recording_start(out, attn=None):
            seen.append(("start", tuple(out.shape), tuple(attn.shape)))
            return start(out, attn)

        def recording_step(out, computed, attn=None):
            seen.append(("step", tuple(out.shape), tuple(attn.shape)))
            return step(out, computed, attn)

        selector.start, selector.step = recording_start, recording_step
        return selector

    base = generate(pipe, PROMPTS[:2], images=1)
    apply_cat(pipe, alpha=1.0, strategy="at-edm", selector_factory=factory)
    assert max_diff(generate(pipe, PROMPTS[:2], images=1), base) <= TOL  # explicit softmax
    apply_cat(pipe, alpha=0.5, strategy="at-edm", selector_factory=factory)
    seen.clear()
    assert torch.isfinite(generate(pipe, PROMPTS[:2], images=1)).all()
    n = 96
    assert seen == [("start", (2, n, 64), (2, n, n)), *[("step", (2, n, 64), (2, n // 2, n))] * 2]


# -- a bare transformer ------------------------------------------------------------------------

SMALL_FLUX = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=20,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
GRID, N_TEXT = (4, 6), 7


def tiny_flux_model(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**SMALL_FLUX).eval()


def image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.view(h * w, 3)


def flux_inputs(rows: int, seed: int = 0, grid=GRID) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    return dict(
        hidden_states=torch.randn(rows, n, 16, generator=g),
        encoder_hidden_states=torch.randn(rows, N_TEXT, 24, generator=g),
        pooled_projections=torch.randn(rows, 20, generator=g),
        guidance=torch.full((rows,), 3.5),
        img_ids=image_ids(*grid),
        txt_ids=torch.randn(N_TEXT, 3, generator=g),  # non-zero: text rotations matter
    )


@torch.no_grad()
@pytest.mark.parametrize("stream", STREAMS)
@pytest.mark.parametrize("forced", ["permutation", "cached"])
def test_pruned_step_with_caches_reproduces_the_full_step(forced, stream):
    """Same input twice: a pruned step (K rows, gathered rotations, cached K/V) gives the full
    step's output. ``permutation``: every token, in a random order per row; ``cached``: 40% of
    the tokens, the others' keys/values from the caches."""
    model = tiny_flux_model()
    rows, n = 3, GRID[0] * GRID[1]
    config = CATConfig(alpha=0.4, last_full_step=0, stream=stream)
    state = apply_cat(model, config)
    assert state.cfg is False  # a bare FLUX transformer: one index set per row by default
    g = torch.Generator().manual_seed(3)
    k = n if forced == "permutation" else config.num_selected(n)
    state.force_indices = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(rows)])
    inputs = flux_inputs(rows)
    outputs = [
        model(**inputs, timestep=torch.full((rows,), t), return_dict=False)[0]
        for t in (0.9, 0.8, 0.7, 0.7)
    ]
    assert (state.full_steps, state.pruned_steps) == (3, 1)
    assert max_diff(outputs[3], outputs[2]) <= TOL
    remove_cat(model)
    unpatched = model(**inputs, timestep=torch.full((rows,), 0.7), return_dict=False)[0]
    assert max_diff(outputs[2], unpatched) <= TOL


@torch.no_grad()
def test_unselected_tokens_reuse_the_previous_output_per_row():
    model = tiny_flux_model()
    state = apply_cat(model, CATConfig(alpha=0.25, last_full_step=0))
    state.force_indices = torch.tensor([[0, 1, 2, 3, 4, 5], [18, 19, 20, 21, 22, 23]])
    inputs = flux_inputs(2)
    hidden = inputs.pop("hidden_states")
    outputs = [
        model(hidden * (1 - i / 10), **inputs, timestep=torch.full((2,), t), return_dict=False)[0]
        for i, t in enumerate((0.9, 0.8, 0.7, 0.6))
    ]
    assert (state.full_steps, state.pruned_steps) == (3, 1)
    prev, last = outputs[2], outputs[3]
    for row in range(2):
        chosen = set(state.force_indices[row].tolist())
        for token in range(24):
            same = torch.equal(last[row, token], prev[row, token])
            assert same == (token not in chosen), (row, token)
    remove_cat(model)


def test_grid_comes_from_img_ids_and_must_be_one_raster():
    model = tiny_flux_model()
    apply_cat(model, CATConfig(alpha=0.5, last_full_step=0))
    inputs = flux_inputs(2, grid=(6, 4))
    for t in (0.9, 0.8, 0.7, 0.6):
        model(**inputs, timestep=torch.full((2,), t))
    assert get_cat_state(model).selector.grid == (6, 4)

    shuffled = flux_inputs(2, grid=(6, 4))
    shuffled["img_ids"] = shuffled["img_ids"].flip(0)
    with pytest.raises(ValueError, match="img_ids: CAT pruning needs one row-major token grid"):
        for t in (0.9, 0.8, 0.7):
            model(**shuffled, timestep=torch.full((2,), t))
    no_guidance = {**flux_inputs(2), "guidance": None}
    with pytest.raises(ValueError, match="guidance: this FLUX transformer embeds guidance"):
        model(**no_guidance, timestep=torch.full((2,), 0.5))
    remove_cat(model)


# -- MACs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", STREAMS)
@pytest.mark.parametrize("k", [24, 9, 3])
def test_counter_matches_analytic_count(k, stream):
    model = tiny_flux_model()
    inputs = flux_inputs(2)
    n = GRID[0] * GRID[1]
    idx = None if k == n else torch.stack([torch.randperm(n)[:k] for _ in range(2)])
    macs = count_step_macs(model, timestep=torch.full((2,), 0.5), idx=idx, **inputs, stream=stream)
    expected = analytic_flux_macs(SMALL_FLUX, n, N_TEXT, k, stream)
    assert macs["paper"] == 2 * expected["paper"] and macs["conv"] == 0
    assert macs["attention"] == 2 * expected["attention"]
    assert macs["total"] == macs["paper"] + macs["attention"]


@torch.no_grad()
def test_full_step_costs_and_computes_what_diffusers_does():
    model = tiny_flux_model()
    inputs = {**flux_inputs(2), "timestep": torch.full((2,), 0.5)}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        expected = model(**inputs, return_dict=False)[0]
    assert count_step_macs(model, **inputs)["total"] * 2 == counter.get_total_flops()
    assert max_diff(pruned_forward(model, **inputs), expected) <= 1e-6
