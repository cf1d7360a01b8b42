"""CAT combined with what users combine it with (issue 14): CPU offload, shared transformers and
other pipelines, bare loops, skip-layer guidance, LoRA, processor changes, torch.compile.

Every check runs on the tiny presets at alpha = 1 (equal to the unpruned run within 1e-5) and
where it matters at alpha < 1 (deterministic, state kept apart).
"""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload
from accelerate.hooks import AlignDevicesHook, CpuOffload, remove_hook_from_submodules
from diffusers import (
    FluxImg2ImgPipeline,
    FluxPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.models.attention_processor import (
    AttnProcessor2_0,
    SD3IPAdapterJointAttnProcessor2_0,
)
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from catbatch.models.tiny import build_tiny_pipeline, pipeline_call_kwargs
from catbatch.pruning import CATConfig, apply_cat, get_cat_state, remove_cat
from catbatch.pruning.core import CATProcessor
from catbatch.pruning.engine import family_of

STEPS = 10  # steps 0..7 full, 8..9 pruned
PRUNED = STEPS - 8
PROMPTS = ["a red cube on a table", "a dog in the snow"]
TOL = 1e-5
FLUX_CALL = dict(max_sequence_length=32)  # T5 tokens: the default 512 only makes tests slower


def fresh(name: str):
    pipe = build_tiny_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts=PROMPTS, seed=0, **kwargs):
    """Output latents (float32) of one pipeline call."""
    generator = torch.Generator().manual_seed(seed)
    call = dict(num_inference_steps=STEPS, height=128, width=128, output_type="latent")
    call.update(pipeline_call_kwargs(pipe), **kwargs)
    return pipe(list(prompts), generator=generator, **call).images.float()


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture
def counted(monkeypatch):
    """How often accelerate's hooks ran their ``pre_forward`` on each module class."""
    counts: dict[str, int] = {}
    for hook_class in (CpuOffload, AlignDevicesHook):
        original = hook_class.pre_forward

        def pre_forward(self, module, *args, _original=original, **kwargs):
            name = type(module).__name__
            counts[name] = counts.get(name, 0) + 1
            return _original(self, module, *args, **kwargs)

        monkeypatch.setattr(hook_class, "pre_forward", pre_forward)
    return counts


# -- 1. CPU offload, in either order -------------------------------------------------------------


@pytest.mark.parametrize("order", ["offload_first", "cat_first"])
def test_model_cpu_offload_runs_around_the_cat_step(order, counted):
    pipe = fresh("tiny-sd3")
    pipe.enable_model_cpu_offload(device="cpu")
    base = generate(pipe)
    transformer = type(pipe.transformer).__name__
    counted.clear()
    if order == "offload_first":
        state = apply_cat(pipe, alpha=1.0)
    else:
        pipe.remove_all_hooks()
        state = apply_cat(pipe, alpha=1.0)
        pipe.enable_model_cpu_offload(device="cpu")
    out = generate(pipe)
    assert counted.get(transformer) == STEPS  # accelerate's hook ran at every step
    assert state.pruned_steps == PRUNED and max_diff(out, base) <= TOL
    # the pipeline re-installs its offload hooks after every call: CAT stays beneath them
    state = apply_cat(pipe, alpha=0.3)
    first, second = generate(pipe), generate(pipe)
    assert state.generations == 2 and state.pruned_steps == PRUNED
    assert torch.equal(first, second) and max_diff(first, base) > 1e-3
    remove_cat(pipe)
    assert torch.equal(generate(pipe), base) and counted[transformer] == 4 * STEPS


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-pixart", "tiny-flux"])
@pytest.mark.parametrize("order", ["offload_first", "cat_first"])
def test_sequential_cpu_offload_of_the_transformer(name, order, counted):
    """accelerate's ``cpu_offload`` (what ``enable_sequential_cpu_offload`` does per component):
    weights on the meta device between module calls, PixArt's ``scale_shift_table`` too."""
    pipe = fresh(name)
    call = FLUX_CALL if name == "tiny-flux" else {}
    base = generate(pipe, **call)
    if order == "cat_first":
        state = apply_cat(pipe, alpha=1.0)
    cpu_offload(pipe.transformer, execution_device=torch.device("cpu"))
    if order == "offload_first":
        state = apply_cat(pipe, alpha=1.0)
    assert next(pipe.transformer.transformer_blocks[0].parameters()).device.type == "meta"
    counted.clear()
    out = generate(pipe, **call)
    hook = pipe.transformer._hf_hook  # PixArt: two (inputs, and its own parameters)
    per_call = len(getattr(hook, "hooks", [hook]))
    assert counted.get(type(pipe.transformer).__name__) == per_call * STEPS
    assert state.pruned_steps == PRUNED and max_diff(out, base) <= TOL
    apply_cat(pipe, alpha=0.3)
    assert torch.equal(generate(pipe, **call), generate(pipe, **call))
    remove_cat(pipe)
    assert max_diff(generate(pipe, **call), base) <= TOL


# -- 2. a generation per call of whatever pipeline calls the transformer -------------------------


def test_pipelines_sharing_the_transformer_each_start_a_generation():
    pipe = fresh("tiny-sd3")
    other = StableDiffusion3Pipeline(**pipe.components)  # same transformer and scheduler
    other.set_progress_bar_config(disable=True)
    base = generate(other)
    state = apply_cat(pipe, alpha=1.0)
    assert max_diff(generate(other), base) <= TOL and state.pruned_steps == PRUNED

    state = apply_cat(pipe, alpha=0.3)
    own = generate(pipe)
    first, second = generate(other), generate(other)
    assert torch.equal(first, second) and torch.equal(first, own)
    assert state.generations == 3 and state.pruned_steps == PRUNED
    remove_cat(pipe)


def test_img2img_from_components_counts_steps_from_its_first_timestep():
    pipe = fresh("tiny-sd3")
    img2img = StableDiffusion3Img2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(len(PROMPTS), 3, 128, 128, generator=torch.Generator().manual_seed(4))
    call = dict(image=image, strength=0.5, num_inference_steps=20)  # the last 10 steps
    base = generate(img2img, **call)
    state = apply_cat(pipe, alpha=1.0)
    out = generate(img2img, **call)
    assert state.full_steps == 8 and state.pruned_steps == PRUNED
    assert max_diff(out, base) <= TOL
    state = apply_cat(pipe, alpha=0.3)
    assert torch.equal(generate(img2img, **call), generate(img2img, **call))
    assert state.pruned_steps == PRUNED
    remove_cat(pipe)


def test_pixart_pipeline_from_components():
    pipe = fresh("tiny-pixart")
    other = PixArtSigmaPipeline(**pipe.components)
    other.set_progress_bar_config(disable=True)
    base = generate(other)
    state = apply_cat(pipe, alpha=1.0)
    assert max_diff(generate(other), base) <= TOL and state.pruned_steps == PRUNED
    state = apply_cat(pipe, alpha=0.3)
    assert torch.equal(generate(other), generate(pipe))
    # guidance off: the other pipeline's call is conditional rows only, as its own says
    unguided = generate(other, guidance_scale=1.0)
    assert state.cfg is False and state.pruned_steps == PRUNED
    assert torch.equal(unguided, generate(pipe, guidance_scale=1.0))
    remove_cat(pipe)


def bare_inputs(model, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, model.config.in_channels, 16, 16, generator=g)
    text = torch.randn(rows, 9, model.config.joint_attention_dim, generator=g)
    pooled = torch.randn(rows, model.config.pooled_projection_dim, generator=g)
    return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled)


def bare_loop(model, inputs, contexts=(None,), state=None):
    """A denoising loop over the transformer alone: per step one call per context (a
    ``(rows,)`` timestep, latents moved by the outputs); returns every call's output."""
    outputs = []
    x = inputs["hidden_states"]
    for i in range(STEPS):
        timestep = torch.full((x.shape[0],), 1000.0 - 90 * i)
        step_out = []
        for name in contexts:
            view = dict(inputs, hidden_states=x, timestep=timestep, return_dict=False)
            if state is None or name is None:
                step_out.append(model(**view)[0])
            else:
                with state.context(name):
                    step_out.append(model(**view)[0])
        outputs += step_out
        x = x - 0.05 * step_out[0]
    return outputs


@torch.no_grad()
def test_bare_transformer_generations_without_reading_the_timestep(monkeypatch):
    pipe = fresh("tiny-sd3")
    model = pipe.transformer
    inputs = bare_inputs(model, 4)
    base = bare_loop(model, inputs)
    state = apply_cat(model, alpha=1.0, cfg=True)

    def no_host_read(*args, **kwargs):
        raise AssertionError("the timestep was read on the host")

    for name in ("item", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, no_host_read)
    with state.generation():
        out = bare_loop(model, inputs)
    monkeypatch.undo()
    assert state.pruned_steps == PRUNED
    assert max(max_diff(a, b) for a, b in zip(out, base, strict=True)) <= TOL

    state = apply_cat(model, alpha=0.3, cfg=True)
    first = bare_loop(model, inputs)
    state.reset()
    second = bare_loop(model, inputs)
    assert state.generations == 2 and all(map(torch.equal, first, second))
    remove_cat(model)


# -- 3. several calls at one step ----------------------------------------------------------------


@torch.no_grad()
def test_separate_cond_and_uncond_calls_share_the_step_and_its_index_set():
    pipe = fresh("tiny-sd3")
    model = pipe.transformer
    inputs = bare_inputs(model, 2)
    base = bare_loop(model, inputs, ("cond", "uncond"))
    state = apply_cat(model, alpha=1.0, cfg=False)
    out = bare_loop(model, inputs, ("cond", "uncond"), state)
    assert state.pruned_steps == PRUNED and state.secondary_calls == STEPS
    assert max(max_diff(a, b) for a, b in zip(out, base, strict=True)) <= TOL

    # alpha < 1: the same inputs under two contexts compute the same tokens, each over its
    # own caches, so both outputs stay equal at pruned steps
    state = apply_cat(model, alpha=0.3, cfg=False)
    out = bare_loop(model, inputs, ("cond", "uncond"), state)
    assert state.pruned_steps == PRUNED and state.extra_calls == 0
    for cond, uncond in zip(out[::2], out[1::2], strict=True):
        assert torch.equal(cond, uncond)
    assert max_diff(out[-2], base[-2]) > 1e-4
    remove_cat(model)


def test_skip_layer_guidance_calls_read_the_caches_and_change_nothing():
    pipe = fresh("tiny-sd35")
    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.0)
    slg.update(skip_layer_guidance_stop=1.0)  # SLG calls at pruned steps too
    base = generate(pipe, **slg)
    state = apply_cat(pipe, alpha=1.0)
    out = generate(pipe, **slg)
    assert state.pruned_steps == PRUNED and state.extra_calls == STEPS - 1
    assert max_diff(out, base) <= TOL

    state = apply_cat(pipe, alpha=0.3)
    plain = generate(pipe)
    unscaled = generate(pipe, skip_layer_guidance_scale=0.0, **slg)  # calls SLG, adds 0
    assert state.extra_calls == STEPS - 1 and state.pruned_steps == PRUNED
    assert torch.equal(unscaled, plain)  # the extra calls wrote no state
    assert max_diff(generate(pipe, **slg), plain) > 1e-4
    remove_cat(pipe)


# -- 4. LoRA through joint_attention_kwargs; IP-Adapter named ------------------------------------


LORA_PIPELINES = {"tiny-sd3": StableDiffusion3Pipeline, "tiny-flux": FluxPipeline}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """``lora_dir(name)``: a LoRA for the preset's transformer made offline with peft, saved as
    diffusers saves one."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    made = {}

    def make(name):
        if name not in made:
            pipe = fresh(name)
            torch.manual_seed(0)
            config = LoraConfig(
                r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"]
            )
            pipe.transformer.add_adapter(config)
            path = tmp_path_factory.mktemp("lora")
            layers = get_peft_model_state_dict(pipe.transformer)
            LORA_PIPELINES[name].save_lora_weights(path, transformer_lora_layers=layers)
            made[name] = path
        return made[name]

    return make


@pytest.mark.parametrize("name", list(LORA_PIPELINES))
@pytest.mark.parametrize("order", ["lora_first", "cat_first"])
def test_lora_scale_is_honoured(lora_dir, order, name):
    pipe = fresh(name)
    call = FLUX_CALL if name == "tiny-flux" else {}
    plain = generate(pipe, **call)
    if order == "cat_first":
        state = apply_cat(pipe, alpha=1.0)
        pipe.load_lora_weights(lora_dir(name))
    else:
        pipe.load_lora_weights(lora_dir(name))
        state = apply_cat(pipe, alpha=1.0)
    scaled = {s: dict(joint_attention_kwargs={"scale": s}, **call) for s in (1.0, 0.5)}
    cat = {s: generate(pipe, **kwargs) for s, kwargs in scaled.items()}
    assert state.pruned_steps == PRUNED
    remove_cat(pipe)
    for scale, out in cat.items():
        assert max_diff(out, generate(pipe, **scaled[scale])) <= TOL
    assert max_diff(cat[1.0], cat[0.5]) > 1e-3 and max_diff(cat[1.0], plain) > 1e-3


def test_ip_adapter_is_refused_by_name():
    pipe = fresh("tiny-sd3")
    apply_cat(pipe, alpha=0.3)
    embeds = {"ip_adapter_image_embeds": torch.zeros(2, 1, 8)}
    with pytest.raises(NotImplementedError, match="IP-Adapter"):
        generate(pipe, joint_attention_kwargs=embeds)
    with pytest.raises(NotImplementedError, match="scale"):  # any other key is named
        generate(pipe, joint_attention_kwargs={"temperature": 2.0})
    model = pipe.transformer
    processor = SD3IPAdapterJointAttnProcessor2_0(64, 8, 32, timesteps_emb_dim=64)
    model.transformer_blocks[0].attn.set_processor(processor)
    with pytest.raises(NotImplementedError, match="IP-Adapter"):
        generate(pipe)
    remove_cat(pipe)  # the IP-Adapter processor stays: the one set last
    assert model.transformer_blocks[0].attn.processor is processor
    with pytest.raises(NotImplementedError, match="IP-Adapter"):  # loaded before apply_cat
        apply_cat(pipe, alpha=0.3)


# -- 5. processor changes after apply_cat --------------------------------------------------------


def test_fused_projections_after_apply_cat_are_taken_up():
    pipe = fresh("tiny-sd3")
    model = pipe.transformer
    attn = model.transformer_blocks[0].attn
    apply_cat(pipe, alpha=1.0)
    model.fuse_qkv_projections()  # sets diffusers' fused processors on every attention
    calls = []
    attn.to_qkv.register_forward_hook(lambda *a: calls.append(1))
    state = get_cat_state(pipe)
    out = generate(pipe)
    assert isinstance(attn.processor, CATProcessor) and len(calls) == STEPS
    assert state.pruned_steps == PRUNED
    remove_cat(pipe)
    assert type(attn.processor).__name__ == "FusedJointAttnProcessor2_0"  # the one set last
    assert max_diff(out, generate(pipe)) <= TOL


def test_other_processors_after_apply_cat_are_an_error():
    class Custom(AttnProcessor2_0):  # a user's processor: CAT cannot run its code
        pass

    pipe = fresh("tiny-pixart")
    apply_cat(pipe, alpha=0.3)
    pipe.transformer.set_attn_processor(Custom())
    with pytest.raises(NotImplementedError, match="Custom"):
        generate(pipe)
    pipe.transformer.set_attn_processor(AttnProcessor2_0())  # diffusers' default: taken up
    generate(pipe)
    modules = family_of(pipe.transformer).attention_modules(pipe.transformer)
    assert all(isinstance(a.processor, CATProcessor) for a in modules.values())
    remove_cat(pipe)


# -- 6. torch.compile before or after apply_cat --------------------------------------------------


@pytest.mark.parametrize("order", ["compile_first", "cat_first"])
def test_torch_compile_in_either_order(order):
    torch._dynamo.reset()
    pipe = fresh("tiny-sd3")
    base = generate(pipe)
    model = pipe.transformer
    with pytest.warns(UserWarning, match="torch.compile does not compile the CAT step"):
        if order == "compile_first":
            pipe.transformer = torch.compile(model, backend="eager")
            state = apply_cat(pipe, CATConfig(alpha=1.0))
        else:
            state = apply_cat(pipe, CATConfig(alpha=1.0))
            pipe.transformer = torch.compile(model, backend="eager")
        out = generate(pipe)
    assert get_cat_state(pipe) is state and state.pruned_steps == PRUNED
    assert max_diff(out, base) <= TOL
    remove_cat(pipe)
    assert max_diff(generate(pipe), base) <= TOL
    torch._dynamo.reset()


# -- FLUX.1 (tiny-flux): the same combinations --------------------------------------------------


@pytest.mark.parametrize("order", ["offload_first", "cat_first"])
def test_flux_model_cpu_offload_and_img2img_from_components(order, counted):
    pipe = fresh("tiny-flux")
    pipe.enable_model_cpu_offload(device="cpu")
    base = generate(pipe, **FLUX_CALL)
    img2img = FluxImg2ImgPipeline(**pipe.components)  # shares the transformer and scheduler
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(len(PROMPTS), 3, 128, 128, generator=torch.Generator().manual_seed(4))
    call = dict(image=image, strength=0.5, num_inference_steps=20, **FLUX_CALL)  # last 10
    img2img_base = generate(img2img, **call)
    if order == "offload_first":
        state = apply_cat(pipe, alpha=1.0)
    else:
        remove_hook_from_submodules(pipe.transformer)
        state = apply_cat(pipe, alpha=1.0)
        pipe.enable_model_cpu_offload(device="cpu")
    counted.clear()
    out = generate(pipe, **FLUX_CALL)
    assert counted.get("FluxTransformer2DModel") == STEPS  # accelerate's hook ran each call
    assert state.cfg is False and state.pruned_steps == PRUNED
    assert max_diff(out, base) <= TOL
    out = generate(img2img, **call)
    assert (state.full_steps, state.pruned_steps) == (8, PRUNED)
    assert max_diff(out, img2img_base) <= TOL
    state = apply_cat(pipe, alpha=0.3)
    assert torch.equal(generate(img2img, **call), generate(img2img, **call))
    remove_cat(pipe)


def test_flux_processor_changes_and_ip_adapter():
    class Custom(FluxAttnProcessor):  # a user's processor: CAT cannot run its code
        pass

    pipe = fresh("tiny-flux")
    apply_cat(pipe, alpha=0.3)
    with pytest.raises(NotImplementedError, match="IP-Adapter"):
        embeds = {"ip_adapter_image_embeds": [torch.zeros(2, 1, 8)]}
        generate(pipe, joint_attention_kwargs=embeds, **FLUX_CALL)
    pipe.transformer.set_attn_processor(Custom())
    with pytest.raises(NotImplementedError, match="Custom"):
        generate(pipe, **FLUX_CALL)
    pipe.transformer.set_attn_processor(FluxAttnProcessor())  # diffusers' default: taken up
    state = get_cat_state(pipe)
    generate(pipe, **FLUX_CALL)
    assert state.pruned_steps == PRUNED
    modules = family_of(pipe.transformer).attention_modules(pipe.transformer)
    assert all(isinstance(a.processor, CATProcessor) for a in modules.values())
    remove_cat(pipe)
