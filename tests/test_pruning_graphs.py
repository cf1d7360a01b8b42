"""CUDA-graph capture of CAT steps: the data flow on the CPU (emulated graphs: static inputs in,
recorded step re-run, output copied out), real capture on a CUDA device (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from sd3_tiny import SMALL_SD3, tiny_sd3_model

from catbatch.models.tiny import build_tiny_pipeline, pipeline_call_kwargs
from catbatch.pruning import CATConfig, apply_cat, remove_cat
from catbatch.pruning.config import STREAMS
from catbatch.pruning.graphs import AUTO_MAX_TOKENS, StepGraphs, wants_graphs

STEPS = 10  # steps 0..7 full, 8..9 pruned
TOL = 1e-5
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def generate(pipe, prompts, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    call = dict(num_inference_steps=STEPS, height=128, width=128, output_type="latent")
    call.update(pipeline_call_kwargs(pipe), **kwargs)
    return pipe(list(prompts), generator=generator, **call).images.float()


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-pixart", "tiny-flux"])
def pipe(request):
    pipe = build_tiny_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    remove_cat(pipe)


@pytest.mark.parametrize("stream", STREAMS)
def test_emulated_graphs_replay_what_eager_computes(pipe, stream):
    """Generation 1 warms up and captures (full step, pruned + selector step); generation 2,
    other prompts and seed, only replays: the same latents as eager CAT."""
    config = CATConfig(alpha=0.3, stream=stream, cuda_graphs="off")
    apply_cat(pipe, config)
    eager = generate(pipe, ["a dog in the snow", "a city at night"], seed=3)

    state = apply_cat(pipe, config)
    graphs = state.engine.graphs = StepGraphs(torch.device("cpu"), emulate=True)
    first = generate(pipe, ["a red cube", "a blue ball"], seed=1)
    assert graphs.captures == 2 and graphs.error is None
    replays = graphs.replays
    second = generate(pipe, ["a dog in the snow", "a city at night"], seed=3)
    assert graphs.captures == 2 and graphs.replays == replays + STEPS
    assert (second - eager).abs().max().item() <= TOL
    assert (first - second).abs().max().item() > 1e-3
    remove_cat(pipe)


def test_emulated_graphs_at_alpha_one_match_unpruned(pipe):
    base = generate(pipe, ["a red cube", "a blue ball"])
    state = apply_cat(pipe, alpha=1.0)
    state.engine.graphs = StepGraphs(torch.device("cpu"), emulate=True)
    generate(pipe, ["a dog"])  # warm-up and capture (batch 1)
    out = generate(pipe, ["a red cube", "a blue ball"])  # batch 2: captured again, replayed
    assert state.engine.graphs.captures == 4
    assert (out - base).abs().max().item() <= TOL
    remove_cat(pipe)


def test_a_failed_capture_falls_back_to_eager_with_a_warning(monkeypatch):
    model = tiny_sd3_model(SMALL_SD3)
    config = CATConfig(alpha=0.5, last_full_step=0)

    def run(graphs: bool) -> list[torch.Tensor]:
        state = apply_cat(model, config, cfg=True)
        if graphs:
            state.engine.graphs = StepGraphs(torch.device("cpu"), emulate=True)
        torch.manual_seed(0)
        x, text, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.randn(2, 16)
        outs = [
            model(x, text, pooled, torch.full((2,), t), return_dict=False)[0]
            for t in (9, 8, 7, 6, 5)
        ]
        remove_cat(model)
        return outs, state

    eager, _ = run(False)

    def broken(self, fn, inputs, names):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StepGraphs, "_capture", broken)
    with pytest.warns(RuntimeWarning, match="running eagerly"):
        outs, state = run(True)
    assert "not permitted" in state.engine.graphs.error
    for a, b in zip(outs, eager, strict=True):
        assert torch.equal(a, b)


def test_auto_captures_small_steps_on_cuda_only():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert not wants_graphs("on", cpu, 10) and not wants_graphs("auto", cpu, 10)
    assert wants_graphs("auto", gpu, AUTO_MAX_TOKENS) and not wants_graphs(
        "auto", gpu, AUTO_MAX_TOKENS + 1
    )
    assert wants_graphs("on", gpu, 10 * AUTO_MAX_TOKENS) and not wants_graphs("off", gpu, 10)
    assert CATConfig(cuda_graphs=False).cuda_graphs == "off"  # YAML's bare off
    with pytest.warns(UserWarning, match="needs a CUDA device"):
        model = tiny_sd3_model(SMALL_SD3)
        apply_cat(model, CATConfig(alpha=0.5, cuda_graphs="on"), cfg=False)
        model(torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16), torch.randn(1, 16), torch.ones(1))
    remove_cat(model)


@cuda
@pytest.mark.parametrize("stream", STREAMS)
@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_captured_steps_equal_eager_on_cuda(model, stream):
    pipe = build_tiny_pipeline(model).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cube", "a blue ball"]
    apply_cat(pipe, CATConfig(alpha=0.3, stream=stream, cuda_graphs="off"))
    eager = generate(pipe, prompts)
    state = apply_cat(pipe, CATConfig(alpha=0.3, stream=stream, cuda_graphs="on"))
    generate(pipe, prompts)
    captured = generate(pipe, prompts)
    assert state.engine.graphs is not None and state.engine.graphs.error is None
    assert state.engine.graphs.captures == 2
    assert (captured - eager).abs().max().item() <= TOL
    remove_cat(pipe)
    base = generate(pipe, prompts)
    state = apply_cat(pipe, CATConfig(alpha=1.0, stream=stream, cuda_graphs="on"))
    generate(pipe, prompts)
    assert (generate(pipe, prompts) - base).abs().max().item() <= TOL
    remove_cat(pipe)
