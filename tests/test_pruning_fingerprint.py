"""The run fingerprint and CAT's settings: outputs written before the ``stream`` and
``cuda_graphs`` settings existed still resume (with the K-row stream they were made with); what
changes images changes the fingerprint."""

from __future__ import annotations

import hashlib
import json

import pytest

from catbatch.job.driver import JobError, plan, prepare_output
from catbatch.job.manifest import parse_manifest
from catbatch.job.runrecord import fingerprint, fingerprint_inputs
from catbatch.pruning import CATConfig

# The pruning section as the manifest stored it before issue 13 (CATConfig.to_dict() then):
# the K-row stream was the only stream.
PRE_ISSUE_13_KEYS = (
    "method",
    "alpha",
    "last_full_step",
    "n_clusters",
    "ewma_decay",
    "hot_fraction",
    "strategy",
    "feature_weight",
    "position_weight",
    "graph_pooling",
    "kmeans_iters",
    "seed",
    "attention_block",
)

MANIFEST = """\
name: fp
model: {{id: tiny-sd3, dtype: float32, device: cpu}}
prompts: {{path: p.txt}}
width: 128
height: 128
steps: 10
shard_size: 2
variants: [{{name: cat, pruning: {pruning}}}]
output: {output}
"""


def manifest(tmp_path, pruning: str):
    (tmp_path / "p.txt").write_text("a red fox\na blue boat\n")
    text = MANIFEST.format(pruning=pruning, output=tmp_path / "out")
    return parse_manifest(text, base_dir=str(tmp_path))


def old_run_record(m) -> dict:
    """The run record a catbatch from before issue 13 wrote for ``m`` (K-row stream)."""
    inputs = fingerprint_inputs(m)
    for settings in inputs["variants"].values():
        full = CATConfig.from_dict(settings["pruning"]).to_dict()
        settings["pruning"] = {key: full[key] for key in PRE_ISSUE_13_KEYS}
    blob = json.dumps(inputs, sort_keys=True, default=str)
    fp = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return {"fingerprint": fp, "fingerprint_inputs": inputs, "status": "partial"}


def test_an_output_from_before_the_stream_setting_resumes(tmp_path):
    krow = manifest(tmp_path, "{alpha: 0.3, stream: krow}")
    old = old_run_record(krow)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.json").write_text(json.dumps(old))
    assert fingerprint(krow) == old["fingerprint"]
    prepare_output(plan(krow, check_model=False), overwrite=False)  # no refusal

    # cuda_graphs changes how a run executes, not its images: never in the fingerprint
    graphs = manifest(tmp_path, "{alpha: 0.3, stream: krow, cuda_graphs: off}")
    assert fingerprint(graphs) == old["fingerprint"]
    assert graphs.resolved_variants()["cat"].pruning["cuda_graphs"] == "off"  # but recorded
    prepare_output(plan(graphs, check_model=False), overwrite=False)

    # the full-length stream scores differently, so it has another fingerprint; on an output
    # made before the setting existed (K-row images), the run continues with the K-row stream
    # and says so, with or without `stream` in the manifest: one output never mixes the two
    for section in ("{alpha: 0.3, stream: full}", "{alpha: 0.3}"):
        full = manifest(tmp_path, section)
        assert fingerprint(full) != old["fingerprint"]
        p = plan(full, check_model=False)
        prepare_output(p, overwrite=False)  # no refusal
        assert p.manifest.resolved_variants()["cat"].pruning["stream"] == "krow"
        assert any("stream: krow" in w for w in p.warnings)

    # anything else that differs is still a different run, refused, naming the setting
    other = manifest(tmp_path, "{alpha: 0.5}")
    with pytest.raises(JobError, match=r"variants\.cat\.pruning\.alpha"):
        prepare_output(plan(other, check_model=False), overwrite=False)
    assert other.resolved_variants()["cat"].pruning["stream"] == "full"  # left as it was


def test_a_new_output_runs_the_default_stream(tmp_path):
    m = manifest(tmp_path, "{alpha: 0.3}")
    p = plan(m, check_model=False)
    prepare_output(p, overwrite=False)
    assert p.manifest.resolved_variants()["cat"].pruning["stream"] == CATConfig().stream
    assert not any("stream" in w for w in p.warnings)


def test_default_stream_fingerprint():
    """Which pre-issue-13 outputs a manifest without ``stream`` resumes follows the default:
    the same fingerprint exactly when the default is the K-row stream they were made with."""
    section = CATConfig().to_dict()
    view = CATConfig.fingerprint_dict(section)
    assert "cuda_graphs" not in view
    assert ("stream" in view) == (CATConfig().stream != "krow")
    assert set(CATConfig.fingerprint_dict(CATConfig(stream="krow").to_dict())) == set(
        PRE_ISSUE_13_KEYS
    )
