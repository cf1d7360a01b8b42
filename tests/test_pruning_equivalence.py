"""CAT pruning engine on tiny pipelines: exactness at alpha = 1, state hygiene, removal."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel
from sd3_tiny import SMALL_SD3, tiny_sd3_model

from catbatch.models.tiny import build_tiny_pipeline, pipeline_call_kwargs
from catbatch.pruning import (
    CATConfig,
    PruningConfigError,
    apply_cat,
    get_cat_state,
    remove_cat,
)
from catbatch.pruning.config import STREAMS
from catbatch.pruning.engine import family_of
from catbatch.pruning.selection import make_selector

MODELS = ("tiny-sd3", "tiny-sd35", "tiny-pixart")
PROMPTS = ("a red cube on a table", "a dog in the snow", "a city at night")
STEPS = 10  # last_full_step=5: steps 0..7 full, 8..9 pruned
TOL = 1e-5


@pytest.fixture(scope="module", params=MODELS)
def built_pipe(request):
    pipe = build_tiny_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(built_pipe):
    """The module's pipeline, never patched when a test starts."""
    remove_cat(built_pipe)
    yield built_pipe
    remove_cat(built_pipe)


def generate(pipe, prompts, seed=0, height=128, width=128, **kwargs):
    """Output latents (float32) of one pipeline call."""
    generator = torch.Generator().manual_seed(seed)
    call = dict(num_inference_steps=STEPS, height=height, width=width, output_type="latent")
    call.update(pipeline_call_kwargs(pipe), **kwargs)
    return pipe(list(prompts), generator=generator, **call).images.float()


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("stream", STREAMS)
@pytest.mark.parametrize("batch", [1, 3])
def test_alpha_one_and_forced_all_match_unpruned(pipe, batch, stream):
    prompts = PROMPTS[:batch]
    base = generate(pipe, prompts)

    state = apply_cat(pipe, alpha=1.0, stream=stream)
    out = generate(pipe, prompts)
    assert state.pruned_steps == STEPS - 8 and state.full_steps == 8
    assert max_diff(out, base) <= TOL

    state = apply_cat(pipe, CATConfig(alpha=0.3, stream=stream))
    state.force_indices = "all"
    forced = generate(pipe, prompts)
    assert state.pruned_steps == STEPS - 8
    assert max_diff(forced, base) <= TOL

    state.force_indices = None
    pruned = generate(pipe, prompts)
    assert state.pruned_steps == STEPS - 8
    assert torch.isfinite(pruned).all()
    assert max_diff(pruned, base) > 1e-3
    remove_cat(pipe)


def test_no_state_leaks_between_calls(pipe):
    apply_cat(pipe, alpha=0.3)
    first = generate(pipe, PROMPTS, seed=1)
    again = generate(pipe, PROMPTS, seed=1)
    assert torch.equal(first, again)

    single = generate(pipe, PROMPTS[:1], seed=2)
    generate(pipe, PROMPTS[1:], seed=5)
    assert torch.equal(generate(pipe, PROMPTS[:1], seed=2), single)
    assert get_cat_state(pipe).generations == 5
    remove_cat(pipe)


def test_remove_cat_restores_the_pipeline(pipe):
    base_class = type(pipe)
    transformer = pipe.transformer
    processors = {name: type(p) for name, p in transformer.attn_processors.items()}
    base = generate(pipe, PROMPTS[:2])

    apply_cat(pipe, alpha=0.3)
    assert type(pipe) is base_class  # the hook is on the transformer only
    assert all("CAT" in type(p).__name__ for p in transformer.attn_processors.values())
    generate(pipe, PROMPTS[:2])

    remove_cat(pipe)
    assert type(pipe) is base_class
    assert {name: type(p) for name, p in transformer.attn_processors.items()} == processors
    assert "forward" not in transformer.__dict__
    assert not hasattr(transformer, "_diffusers_hook")
    assert get_cat_state(pipe) is None
    assert torch.equal(generate(pipe, PROMPTS[:2]), base)


def test_without_guidance_the_batch_is_conditional_only(pipe):
    base = generate(pipe, PROMPTS[:1], guidance_scale=1.0)
    state = apply_cat(pipe, alpha=1.0)
    out = generate(pipe, PROMPTS[:1], guidance_scale=1.0)
    assert state.cfg is False and state.pruned_steps == STEPS - 8
    assert max_diff(out, base) <= TOL
    remove_cat(pipe)


@pytest.mark.parametrize("stream", STREAMS)
def test_non_square_resolution(pipe, stream):
    base = generate(pipe, PROMPTS[:2], height=128, width=192)
    state = apply_cat(pipe, alpha=1.0, stream=stream)
    out = generate(pipe, PROMPTS[:2], height=128, width=192)
    assert state.pruned_steps == STEPS - 8
    assert max_diff(out, base) <= TOL
    assert state.selector.grid == (8, 12)
    remove_cat(pipe)


def test_selector_sees_conditional_noise_and_attention(pipe):
    """Shapes handed to the selector: conditional half, noise channels, at-edm attention maps."""
    calls = []

    class Recording:
        def __init__(self, inner):
            self.inner, self.k, self.needs_attention = inner, inner.k, inner.needs_attention

        def reset(self):
            self.inner.reset()

        def set_reference(self, out):
            calls.append(("reference", tuple(out.shape), None))
            self.inner.set_reference(out)

        def start(self, out, attn=None):
            calls.append(("start", tuple(out.shape), tuple(attn.shape)))
            return self.inner.start(out, attn)

        def step(self, out, computed, attn=None):
            calls.append(("step", tuple(out.shape), tuple(attn.shape)))
            return self.inner.step(out, computed, attn)

    def factory(config, grid, batch, device):
        return Recording(make_selector(config, grid, batch, device))

    base = generate(pipe, PROMPTS[:2])
    apply_cat(pipe, alpha=1.0, strategy="at-edm", selector_factory=factory)
    out = generate(pipe, PROMPTS[:2])
    assert max_diff(out, base) <= TOL  # explicit softmax in the recorded block
    apply_cat(pipe, alpha=0.5, strategy="at-edm", selector_factory=factory)
    calls.clear()
    assert torch.isfinite(generate(pipe, PROMPTS[:2])).all()

    n, channels = 64, 2 * 2 * pipe.transformer.config.in_channels  # 8x8 tokens, patch 2
    assert calls == [
        ("reference", (2, n, channels), None),
        ("start", (2, n, channels), (2, n, n)),
        ("step", (2, n, channels), (2, n // 2, n)),
        ("step", (2, n, channels), (2, n // 2, n)),
    ]
    remove_cat(pipe)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-pixart"])
def test_bare_transformer_matches_pipeline_mode(model):
    pipe = build_tiny_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    apply_cat(pipe, alpha=0.3)
    via_pipeline = generate(pipe, PROMPTS[:2])
    remove_cat(pipe)

    state = apply_cat(pipe.transformer, alpha=0.3)  # the pipeline calling it is found
    first = generate(pipe, PROMPTS[:2])
    second = generate(pipe, PROMPTS[:2])
    assert state.generations == 2 and state.pruned_steps == STEPS - 8
    assert torch.equal(first, via_pipeline) and torch.equal(second, via_pipeline)
    remove_cat(pipe.transformer)


@torch.no_grad()
def test_unselected_tokens_reuse_the_previous_output_per_sample():
    model = tiny_sd3_model(SMALL_SD3)
    state = apply_cat(model, CATConfig(alpha=0.25, last_full_step=0), cfg=True)
    batch, n_tokens = 2, 16  # 8x8 latent, patch 2
    state.force_indices = torch.tensor([[0, 1, 2, 3], [12, 13, 14, 15]])
    x = torch.randn(2 * batch, 4, 8, 8)
    text, pooled = torch.randn(2 * batch, 5, 16), torch.randn(2 * batch, 16)
    outputs = []
    for i, t in enumerate([900.0, 800.0, 700.0, 600.0]):
        step_input = x * (1 - i / 10)
        timestep = torch.full((2 * batch,), t)
        out = model(step_input, text, pooled, timestep, return_dict=False)[0]
        outputs.append(out.unflatten(2, (4, 2)).unflatten(4, (4, 2)))  # (R, C, h, p, w, q)
    assert state.full_steps == 3 and state.pruned_steps == 1

    def token_values(out, row, token):
        return out[row, :, token // 4, :, token % 4, :]

    prev, last = outputs[2], outputs[3]
    for sample in range(batch):
        chosen = set(state.force_indices[sample].tolist())
        for row in (sample, batch + sample):  # both CFG halves share the sample's index set
            for token in range(n_tokens):
                same = torch.equal(token_values(last, row, token), token_values(prev, row, token))
                assert same == (token not in chosen), (sample, row, token)
    remove_cat(model)


def test_invalid_settings_are_rejected():
    with pytest.raises(PruningConfigError):
        apply_cat(tiny_sd3_model(SMALL_SD3), alpha=1.5)
    with pytest.raises(TypeError):
        apply_cat(torch.nn.Linear(2, 2))
    model = tiny_sd3_model(SMALL_SD3)
    with pytest.raises(ValueError, match="attention_block"):
        apply_cat(model, alpha=0.5, attention_block=2)  # 2 blocks
    assert not hasattr(model, "_diffusers_hook")
    apply_cat(model, alpha=0.5, cfg=True)
    with pytest.raises(ValueError, match="even"):
        model(torch.randn(3, 4, 8, 8), torch.randn(3, 5, 16), torch.randn(3, 16), torch.ones(3))
    remove_cat(model)


def transformer_inputs(model, rows, seed=0):
    """Random inputs for one transformer call of the tiny SD3 or PixArt model (16x16 latent)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(rows, cfg.in_channels, 16, 16, generator=g)
    if isinstance(model, SD3Transformer2DModel):
        text = torch.randn(rows, 9, cfg.joint_attention_dim, generator=g)
        pooled = torch.randn(rows, cfg.pooled_projection_dim, generator=g)
        return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled)
    text = torch.randn(rows, 9, cfg.caption_channels, generator=g)
    mask = torch.ones(rows, 9)
    mask[:, 6:] = 0
    return dict(hidden_states=x, encoder_hidden_states=text, encoder_attention_mask=mask)


@torch.no_grad()
@pytest.mark.parametrize("stream", STREAMS)
@pytest.mark.parametrize("forced", ["permutation", "cached"])
def test_pruned_step_with_caches_reproduces_the_full_step(pipe, forced, stream):
    """Same input twice: a pruned step (K rows + cached K/V) gives the full step's output.

    ``permutation``: every token, in a different random order per sample (gather/scatter).
    ``cached``: 40% of the tokens, the others' keys/values come from the caches.
    """
    model, batch = pipe.transformer, 2
    config = CATConfig(alpha=0.4, last_full_step=0, stream=stream)
    state = apply_cat(model, config, cfg=True)  # bare: one generation, a step per call
    n = 64
    g = torch.Generator().manual_seed(3)
    orders = [torch.randperm(n, generator=g) for _ in range(batch)]
    k = n if forced == "permutation" else config.num_selected(n)
    state.force_indices = torch.stack([order[:k] for order in orders])
    inputs = transformer_inputs(model, 2 * batch)
    outputs = []
    for t in [900.0, 800.0, 700.0, 700.0]:
        timestep = torch.full((2 * batch,), t)
        outputs.append(model(**inputs, timestep=timestep, return_dict=False)[0])
    assert state.full_steps == 3 and state.pruned_steps == 1
    assert max_diff(outputs[3], outputs[2]) <= TOL


def test_streams_compute_the_same_rows_and_score_the_raw_output(pipe):
    """Same index sets: both streams give the same images. The selector sees, at a pruned step,
    new raw outputs for the tokens not computed (full-length) or their reused ones (K-row)."""
    seen = {}

    def factory(stream):
        def make(config, grid, batch, device):
            inner = make_selector(config, grid, batch, device)
            step = inner.step

            def recording(out, computed, attn=None):
                seen.setdefault(stream, []).append((out.clone(), computed.clone()))
                return step(out, computed, attn)

            inner.step = recording
            return inner

        return make

    outputs = {}
    for stream in STREAMS:
        state = apply_cat(pipe, alpha=0.5, stream=stream, selector_factory=factory(stream))
        outputs[stream] = generate(pipe, PROMPTS[:2])
        assert state.pruned_steps == STEPS - 8
        state.force_indices = seen[stream][0][1]  # the first pruned step's index set
        outputs[stream, "forced"] = generate(pipe, PROMPTS[:2])
    assert max_diff(outputs["full", "forced"], outputs["krow", "forced"]) <= TOL

    for stream in STREAMS:  # scores at the second pruned step vs the first
        (first, _), (second, computed) = seen[stream][:2]
        skipped = torch.ones(first.shape[:2], dtype=torch.bool)
        skipped.scatter_(1, computed, False)
        changed = (second != first).any(-1)
        if stream == "full":  # every token has a fresh raw output
            assert changed[skipped].all()
        else:  # tokens not computed keep the output (and score) of their last computation
            assert not changed[skipped].any()
    remove_cat(pipe)


def test_fused_projections_are_used(pipe):
    """diffusers' fuse_qkv_projections() (to_qkv / to_added_qkv / to_kv): alpha = 1 matches the
    fused unpruned pipeline, and pruning gives what it gives without fusion."""
    unfused = generate(pipe, PROMPTS[:2])
    apply_cat(pipe, alpha=0.3)
    pruned_unfused = generate(pipe, PROMPTS[:2])
    remove_cat(pipe)
    transformer = pipe.transformer
    originals = dict(transformer.attn_processors)
    # diffusers' fused joint processor cannot run SD3.5's image-only attn2 unpruned (it
    # expects text); CAT runs it, so there the unfused unpruned run is the reference.
    dual = any(
        getattr(block, "attn2", None) is not None and hasattr(block, "norm1_context")
        for block in transformer.transformer_blocks
    )
    transformer.fuse_qkv_projections()
    try:
        fused = unfused if dual else generate(pipe, PROMPTS[:2])
        scale = unfused.abs().max().item()
        assert (fused - unfused).abs().max().item() < 1e-3 * scale
        attn = next(iter(family_of(transformer).attention_modules(transformer).values()))
        calls = []
        handle = attn.to_qkv.register_forward_hook(lambda *a: calls.append(1))
        state = apply_cat(pipe, alpha=1.0)
        out = generate(pipe, PROMPTS[:2])
        if dual:
            assert (out - fused).abs().max().item() < 1e-3 * scale
        else:
            assert max_diff(out, fused) <= TOL
        assert state.pruned_steps == STEPS - 8 and len(calls) == STEPS
        handle.remove()
        apply_cat(pipe, alpha=0.3)
        pruned_fused = generate(pipe, PROMPTS[:2])
        scale = pruned_unfused.abs().max().item()
        assert (pruned_fused - pruned_unfused).abs().max().item() < 1e-3 * scale
        remove_cat(pipe)
    finally:
        transformer.set_attn_processor(originals)
        for module in transformer.modules():  # unfuse: back to to_q/to_k/to_v
            if getattr(module, "fused_projections", False):
                module.fused_projections = False
                for name in ("to_qkv", "to_kv", "to_added_qkv"):
                    if hasattr(module, name):
                        delattr(module, name)


@torch.no_grad()
def test_prompt_work_runs_once_per_generation(pipe):
    """Context embedding / caption projection (and PixArt's cross-attention text K/V) run once
    per generation, not once per step."""
    transformer = pipe.transformer
    module = (
        transformer.context_embedder
        if isinstance(transformer, SD3Transformer2DModel)
        else transformer.caption_projection
    )
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    try:
        state = apply_cat(pipe, alpha=0.3)
        generate(pipe, PROMPTS[:2])
        generate(pipe, PROMPTS[1:])
        assert state.full_steps + state.pruned_steps == STEPS and len(calls) == 2
    finally:
        handle.remove()
        remove_cat(pipe)
