"""Manifest parsing, validation and its error messages; the CLI's exit code 2 on bad input."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from catbatch.cli import main
from catbatch.job.manifest import ManifestError, load_manifest, parse_manifest

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
name: t
model: {id: tiny-sd3, dtype: float32}
prompts: {path: prompts.txt}
width: 128
height: 128
steps: 4
variants:
  - name: full
    pruning: none
  - name: cat
    pruning: {alpha: 0.3}
  - name: cat-8
    steps: 8
    pruning: {method: cat, alpha: 0.5, strategy: noise}
output: out
"""


def write(tmp_path: Path, text: str, prompts: str | None = "a cat\na dog\n") -> Path:
    if prompts is not None:
        (tmp_path / "prompts.txt").write_text(prompts)
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


def test_good_manifest_resolves_variants(tmp_path):
    m = load_manifest(write(tmp_path, GOOD))
    v = m.resolved_variants()
    assert list(v) == ["full", "cat", "cat-8"]
    assert v["full"].pruning is None
    assert v["cat"].pruning["alpha"] == 0.3 and v["cat"].pruning["method"] == "cat"
    assert v["cat"].steps == 4 and v["cat-8"].steps == 8
    assert v["cat-8"].pruning["strategy"] == "noise"
    assert m.output_url == str(tmp_path / "out")


def test_manifest_without_variants_has_one(tmp_path):
    text = GOOD.split("variants:")[0] + "pruning: {alpha: 0.4}\noutput: out\n"
    v = load_manifest(write(tmp_path, text)).resolved_variants()
    assert list(v) == ["default"] and v["default"].pruning["alpha"] == 0.4


def test_variant_inherits_pruning_unless_set(tmp_path):
    text = GOOD.replace("variants:", "pruning: {alpha: 0.6}\nvariants:\n  - name: inherit")
    v = load_manifest(write(tmp_path, text)).resolved_variants()
    assert v["inherit"].pruning["alpha"] == 0.6
    assert v["full"].pruning is None


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("steps: 4", "steps: 0", ["m.yaml:6:8", "steps", "got 0"]),
        ("steps: 4", "steps: four", ["m.yaml:6:8", "steps", "'four'"]),
        ("width: 128", "width: 130", ["m.yaml:4:8", "width", "multiple of 8"]),
        ("steps: 4", "stepz: 4", ["m.yaml:6:1", "unknown key 'stepz'", "allowed keys:", "steps"]),
        ("{alpha: 0.3}", "{alpha: 1.5}", ["m.yaml:11:22", "variants[1].pruning.alpha", "(0, 1]"]),
        ("{alpha: 0.3}", "{alpha: 0}", ["variants[1].pruning.alpha", "got 0"]),
        ("{alpha: 0.3}", "{alpha: 0.3, bogus: 1}", ["variants[1].pruning.bogus"]),
        ("strategy: noise", "strategy: magic", ["variants[2].pruning.strategy", "cat | noise"]),
        ("dtype: float32", "dtype: float8", ["model.dtype", "float16"]),
        ("  - name: full", "  - name: 'has space'", ["variants[0].name"]),
        ("name: t", "name: t\nseed: -1", ["seed", "got -1"]),
        ("model: {id: tiny-sd3, dtype: float32}\n", "", ["model", "required field is missing"]),
    ],
)
def test_bad_manifest_messages(tmp_path, old, new, expected):
    text = GOOD.replace(old, new)
    assert text != GOOD
    with pytest.raises(ManifestError) as err:
        load_manifest(write(tmp_path, text))
    for part in expected:
        assert part in str(err.value)


def test_bad_yaml_names_line_and_column():
    with pytest.raises(ManifestError, match=r"x.yaml:3:1: invalid YAML"):
        parse_manifest("name: a\nmodel: [\n", source="x.yaml")


def test_yaml_is_loaded_safely():
    with pytest.raises(ManifestError, match="invalid YAML"):
        parse_manifest("name: !!python/object/apply:os.system ['true']\n", source="x.yaml")


def test_duplicate_variant_names(tmp_path):
    """The error points at the repeated name (file, line, column) and shows no manifest dump."""
    text = GOOD.replace("name: cat-8", "name: cat")
    with pytest.raises(ManifestError) as err:
        load_manifest(write(tmp_path, text))
    message = str(err.value)
    assert message == (
        f"{tmp_path / 'm.yaml'}:12:11: variants[2].name: 'cat' is already the name of "
        "variants[1]; variant names must be unique"
    )


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "old,new,needle",
    [
        ("steps: 4", "steps: 0", "steps"),
        ("name: t", "name: t\nfoo: 1", "unknown key 'foo'"),
        ("steps: 4", "steps: [", "invalid YAML"),
        ("{path: prompts.txt}", "{path: missing.txt}", "missing.txt"),
    ],
)
def test_cli_bad_manifest_exit_2_and_writes_nothing(tmp_path, old, new, needle):
    path = write(tmp_path, GOOD.replace(old, new))
    before = sorted(os.listdir(tmp_path))
    for cmd in (["validate", str(path)], ["submit", str(path), "--quiet"]):
        res = CliRunner().invoke(main, cmd)
        assert res.exit_code == 2, res.output
        assert needle in res.output
        assert "Traceback" not in res.output
    assert sorted(os.listdir(tmp_path)) == before


def test_cli_validate_prints_counts(tmp_path):
    text = GOOD.replace("output: out", "output: out\nimages_per_prompt: 3\nshard_size: 1")
    res = CliRunner().invoke(main, ["validate", str(write(tmp_path, text))])
    assert res.exit_code == 0, res.output
    assert "ok: 2 prompts, 6 samples, 2 shards, 3 variant(s), 18 images in all" in res.output
    assert not (tmp_path / "out").exists()


def test_unknown_model_offline_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    text = GOOD.replace("id: tiny-sd3", "id: someorg/not-a-real-model")
    res = CliRunner().invoke(main, ["validate", str(write(tmp_path, text))])
    assert res.exit_code == 2
    assert "someorg/not-a-real-model" in res.output and "model.id" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("name", ["coco.yaml", "parti.yaml"])
def test_paper_manifests_fail_fast_offline(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    m = load_manifest(REPO / "manifests" / name)
    assert (m.width, m.height, m.steps, m.guidance_scale) == (1024, 1024, 28, 7.0)
    assert m.model.id == "stabilityai/stable-diffusion-3-medium-diffusers"
    res = CliRunner().invoke(main, ["submit", str(REPO / "manifests" / name), "--quiet"])
    assert res.exit_code == 2
    assert "stable-diffusion-3-medium" in res.output and "Traceback" not in res.output


def test_help_texts():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0 and "manifest" in top.output.lower()
    for cmd in ("submit", "validate", "regenerate"):
        res = runner.invoke(main, [cmd, "--help"])
        assert res.exit_code == 0 and "MANIFEST" in res.output


def test_manifest_round_trips_for_actors(tmp_path):
    """Actors rebuild the manifest from a dump: variants must resolve identically."""
    from catbatch.job.manifest import Manifest

    text = GOOD.replace("variants:", "pruning: {alpha: 0.6}\nvariants:\n  - name: inherit")
    m = load_manifest(write(tmp_path, text))
    again = Manifest.model_validate(
        {**m.model_dump(mode="json", exclude_unset=True), "base_dir": m.base_dir}
    )
    assert again.resolved_variants() == m.resolved_variants()


@pytest.mark.parametrize(("steps", "warned"), [(8, True), (9, False)])
def test_cat_that_would_prune_nothing_is_warned_about(tmp_path, steps, warned):
    """Steps 0..7 always run in full (last_full_step 5, reference, clustering): CAT at 8 steps
    would make the unpruned images; validate and submit say so instead of going ahead silently."""
    text = GOOD.replace("steps: 8", f"steps: {steps}")
    res = CliRunner().invoke(main, ["validate", str(write(tmp_path, text)), "--no-model-check"])
    assert res.exit_code == 0, res.output
    warning = (
        f"warning: variant cat-8: CAT prunes nothing in {steps} steps: steps 0..7 run in full "
        "(pruning.last_full_step 5, then the reference and clustering steps); use steps >= 9 "
        "or a lower pruning.last_full_step"
    )
    assert (warning in res.stderr) is warned, res.stderr
    # the 4-step variant 'cat' is below the threshold as well
    assert ("warning: variant cat: CAT prunes nothing in 4 steps" in res.stderr) is True
    assert "warning: variant full" not in res.stderr


def test_readme_states_every_commands_exit_codes():
    """The README's exit-code table has a row for every command; status exits 1 when incomplete."""
    text = (REPO / "README.md").read_text()
    rows = {
        m.group(1): [c.strip() for c in m.group(2).split("|")]
        for m in re.finditer(r"^\| `(\w+)` \|(.*)\|$", text, re.M)
    }
    assert set(rows) == set(main.commands), sorted(rows)
    assert all(len(cells) == 5 and cells[0] for cells in rows.values())  # codes 0 1 2 3 143
    assert rows["status"][1].startswith("incomplete")
    assert rows["submit"][3].startswith("another submission holds the output's lease")
