"""FLUX.1 in the job system: validation, call arguments and per-sample metrics, unpruned and
CAT-pruned."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from flux_macs import analytic_flux_macs

from catbatch.cli import main
from catbatch.job import driver
from catbatch.job.driver import plan
from catbatch.job.manifest import ManifestError, load_manifest, parse_manifest
from catbatch.job.runrecord import fingerprint, fingerprint_inputs
from catbatch.job.worker import Worker
from catbatch.models.families import FLUX, SD3, Family, family_of, source_family
from catbatch.pruning import CATConfig

MANIFEST = """\
name: flux
model: {{id: {model}, dtype: float32, device: cpu}}
prompts: {{path: prompts.txt}}
width: 64
height: 96
steps: 2
batch_size: 2
shard_size: 3
metrics: {{clip: {{enabled: false}}}}
output: out
{extra}"""
# 27 T5 tokens of the tiny preset's tokenizer (eos included), 18 CLIP tokens: cut only by a
# short T5 limit
MEDIUM = "a red fox jumping over a lazy brown dog near the old stone bridge at sunset"


def write(tmp_path: Path, extra: str = "guidance_scale: 3.5\n", model: str = "tiny-flux") -> Path:
    (tmp_path / "prompts.txt").write_text(f"a red fox\n{MEDIUM}\na blue boat\n")
    path = tmp_path / "m.yaml"
    path.write_text(MANIFEST.format(model=model, extra=extra))
    return path


def validate(path: Path) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["validate", str(path)])
    return res.exit_code, res.output


# -- families --------------------------------------------------------------------------------


def test_family_is_read_from_the_pipeline_index(tmp_path, tiny_cache):
    assert source_family({"kind": "preset", "path": "tiny-flux"}) is FLUX
    assert source_family({"kind": "preset", "path": "tiny-sd3"}) is SD3
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert source_family({"kind": "local", "path": str(folder)}) is FLUX
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    assert source_family({"kind": "local", "path": str(folder)}) is None  # not checked
    (folder / "model_index.json").write_text("{not json")
    assert source_family({"kind": "local", "path": str(folder)}) is None
    assert family_of("FluxPipeline") is FLUX and FLUX.pruning and not FLUX.cfg


# -- validation ------------------------------------------------------------------------------


def test_valid_flux_manifest_validates(tmp_path, tiny_cache):
    code, out = validate(write(tmp_path))
    assert code == 0, out
    assert '"max_sequence_length": null' in out and "ok: 3 prompts" in out


@pytest.mark.parametrize(
    ("extra", "messages"),
    [
        (
            "guidance_scale: 3.5\nnegative_prompt: blurry\n",
            ["negative_prompt: FLUX is guidance-distilled and takes no negative prompt"],
        ),
        (
            "variants:\n  - name: a\n    guidance_scale: 3.5\n  - name: b\n"
            "    negative_prompt: blurry\n",
            [
                "variants[1].negative_prompt: FLUX is guidance-distilled",
                "guidance_scale: not set; FLUX takes it as an embedded guidance strength",
            ],
        ),
    ],
)
def test_settings_flux_cannot_honour_fail_at_validation(tmp_path, tiny_cache, extra, messages):
    code, out = validate(write(tmp_path, extra))
    assert code == 2, out
    for message in messages:
        assert f"error: {message}" in out or f"\n{message}" in out, out


def test_flux_takes_a_pruning_section(tmp_path, tiny_cache):
    extra = (
        "guidance_scale: 3.5\nvariants:\n  - name: full\n    pruning: none\n"
        "  - name: cat\n    pruning: {alpha: 0.3}\n"
    )
    code, out = validate(write(tmp_path, extra))
    assert code == 0, out
    m = load_manifest(write(tmp_path, extra))
    unpruned = Family("unpruned", pruning=False, cfg=False)  # a family the engine cannot prune
    with pytest.raises(driver.JobError, match=r"variants\[1\]\.pruning: CAT pruning is not"):
        driver._check_family(m, unpruned)


def test_guidance_set_in_every_variant_is_enough(tmp_path, tiny_cache):
    extra = "variants:\n  - name: a\n    guidance_scale: 3.5\n  - name: b\n    guidance_scale: 1\n"
    assert plan(load_manifest(write(tmp_path, extra))).counts()["variants"] == 2


def test_sd3_keeps_cfg_settings(tmp_path, tiny_cache):
    extra = "negative_prompt: blurry\npruning: {alpha: 0.3}\n"  # default guidance, CFG model
    assert validate(write(tmp_path, extra, model="tiny-sd3"))[0] == 0


def test_max_sequence_length_field(tmp_path):
    path = write(tmp_path, "guidance_scale: 3.5\nmax_sequence_length: 512\n")
    assert load_manifest(path).max_sequence_length == 512
    for bad in ("max_sequence_length: 513", "max_sequence_length: 0"):
        with pytest.raises(ManifestError, match=r"m.yaml:\d+:\d+: max_sequence_length: got"):
            load_manifest(write(tmp_path, f"guidance_scale: 3.5\n{bad}\n"))
    variant = "variants:\n  - name: short\n    max_sequence_length: 64\n  - name: long\n"
    m = load_manifest(write(tmp_path, f"guidance_scale: 3.5\n{variant}"))
    lengths = {k: v.max_sequence_length for k, v in m.resolved_variants().items()}
    assert lengths == {"short": 64, "long": None}


def test_max_sequence_length_counts_in_the_fingerprint_only_when_set(tmp_path):
    base = MANIFEST.format(model="tiny-flux", extra="guidance_scale: 3.5\n")
    m = parse_manifest(base, base_dir=str(tmp_path))
    assert "max_sequence_length" not in fingerprint_inputs(m)["variants"]["default"]
    longer = parse_manifest(base + "max_sequence_length: 256\n", base_dir=str(tmp_path))
    assert fingerprint_inputs(longer)["variants"]["default"]["max_sequence_length"] == 256
    assert fingerprint(longer) != fingerprint(m)


REPO = Path(__file__).resolve().parents[1]


def test_cluster_manifest_is_a_valid_flux_run(tmp_path):
    m = load_manifest(REPO / "manifests" / "flux.yaml")
    assert (m.model.id, m.model.dtype) == ("/models/FLUX.1-dev", "bfloat16")
    assert (m.width, m.height, m.guidance_scale, m.max_sequence_length) == (1024, 1024, 3.5, 512)
    assert m.model.memory.vae_slicing and m.negative_prompt == ""
    pruning = {k: v.pruning for k, v in m.resolved_variants().items()}
    assert pruning == {"full": None, "cat-0.3": CATConfig(alpha=0.3).to_dict()}
    driver._check_family(m, FLUX)  # what validation checks once the folder is there: passes
    res = CliRunner().invoke(main, ["validate", str(REPO / "manifests" / "flux.yaml")])
    assert res.exit_code == 2 and "/models/FLUX.1-dev" in res.output  # no weights here


# -- one worker, no Ray ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_worker(tmp_path_factory, tiny_cache):
    """A tiny-flux worker that ran three variants: T5 at the pipeline's 512 and at 16 tokens,
    and CAT (alpha 0.5, steps 0..2 full, step 3 pruned) at 16 tokens."""
    tmp = tmp_path_factory.mktemp("flux")
    extra = "guidance_scale: 3.5\nvariants:\n  - name: full\n  - name: short\n"
    extra += "    max_sequence_length: 16\n  - name: cat\n    max_sequence_length: 16\n"
    extra += "    steps: 4\n    pruning: {alpha: 0.5, last_full_step: 0}\n"
    path = write(tmp, extra)
    m = load_manifest(path)
    p = plan(m)
    worker = Worker(m, p.model_source)
    calls: list[dict] = []
    base = type(worker.pipe)

    class Recording(base):  # same class name: records the worker's call arguments
        def __call__(self, *args, **kwargs):
            calls.append(kwargs)
            return base.__call__(self, *args, **kwargs)

    worker.pipe.__class__ = Recording
    texts = {}
    for task in p.tasks:
        worker.run_task(task, p.layout)
        texts[task.variant] = worker.macs_counter.first_inputs["encoder_hidden_states"].shape[1]
    worker.pipe.__class__ = base
    rows = {
        v: [r for f in sorted((tmp / "out" / "variants" / v).glob("*.parquet")) for r in _read(f)]
        for v in ("full", "short", "cat")
    }
    return worker, rows, calls, texts


def _read(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_flux_rows_have_one_row_macs_and_latency(flux_worker):
    worker, rows, calls, texts = flux_worker
    assert texts == {"full": 512, "short": 16, "cat": 16}  # T5 tokens the transformer was fed
    config = dict(worker.pipe.transformer.config)
    n_img = (64 // 16) * (96 // 16)  # 8x VAE, 2x2 packing: a 4 x 6 token grid
    for variant in ("full", "short"):
        n_txt = texts[variant]
        step = analytic_flux_macs(config, n_img, n_txt)
        for r in rows[variant]:
            assert r["status"] == "ok" and (r["width"], r["height"]) == (64, 96)
            assert r["macs_paper"] == 2 * step["paper"]  # 2 steps, one row per image
            assert r["macs_total"] == 2 * (step["paper"] + step["attention"])
            assert r["t_text_s"] > 0 and r["t_denoise_s"] > 0 and r["t_vae_s"] > 0
            assert json.loads(r["settings"])["guidance_scale"] == 3.5
    truncated = {v: [r["prompt_truncated"] for r in rs] for v, rs in rows.items()}
    assert truncated == {
        "full": [False, False, False],
        "short": [False, True, False],
        "cat": [False, True, False],
    }
    assert worker.metrics_info()["notes"] == []  # MACs counted, nothing failed


def test_pruned_flux_rows_count_the_pruned_step(flux_worker):
    """Per-sample MACs of a CAT variant: 3 full steps and 1 step at K = 12 of 24 tokens (the
    full-length stream's final head also on all tokens), one row per image."""
    worker, rows, _, _ = flux_worker
    config = dict(worker.pipe.transformer.config)
    full = analytic_flux_macs(config, 24, 16)
    pruned = analytic_flux_macs(config, 24, 16, k=12)
    assert len(rows["cat"]) == 3
    for r in rows["cat"]:
        assert r["status"] == "ok" and json.loads(r["settings"])["pruning"]["alpha"] == 0.5
        assert r["macs_paper"] == 3 * full["paper"] + pruned["paper"]
        assert r["macs_total"] == 3 * sum(full.values()) + sum(pruned.values())
        assert r["macs_paper"] < 4 * full["paper"]


def test_flux_call_has_no_negative_prompt(flux_worker):
    _, _, calls, _ = flux_worker
    assert calls and all("negative_prompt" not in c for c in calls)
    assert [c.get("max_sequence_length") for c in calls] == [None, None, 16, 16, 16, 16]
    assert all(c["guidance_scale"] == 3.5 for c in calls)
