"""Bad input through the CLI: a clear error and exit code 2 before anything starts, with nothing
written; or, for a single bad prompt, a failed row with the reason. Values from the data never
build paths. (More cases live in test_manifest.py and test_prompts.py; these add the rest.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from catbatch.cli import main
from catbatch.job.layout import OutputLayout

GOOD = """\
name: bad
model: {id: tiny-sd3, dtype: float32, device: cpu}
prompts: {path: prompts.txt}
width: 128
height: 128
steps: 2
batch_size: 2
shard_size: 4
variants:
  - name: full
    pruning: none
  - name: cat
    pruning: {alpha: 0.5}
ray: {address: local, actors: 1, resources: {cpus: 1}}
output: out
"""


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def submit_fails(tmp_path: Path, manifest: str, prompts: bytes = b"a cat\na dog\n") -> str:
    """Submit; assert exit 2, no traceback, nothing written. Returns the output."""
    (tmp_path / "prompts.txt").write_bytes(prompts)
    path = tmp_path / "m.yaml"
    path.write_text(manifest)
    before = files_under(tmp_path)
    res = CliRunner().invoke(main, ["submit", str(path), "--quiet"])
    assert res.exit_code == 2, res.output + repr(res.exception)
    assert res.output.startswith("error: ") and "Traceback" not in res.output
    assert files_under(tmp_path) == before
    return res.output


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # malformed YAML and unknown keys (nested; top level is in test_manifest.py)
        ("steps: 2", "steps: {", ["m.yaml:8:11", "invalid YAML"]),
        ("actors: 1", "actorz: 1", ["ray.actorz", "unknown key 'actorz'", "batch_timeout_s"]),
        ("pruning: none", "pruning: none\n    sharpness: 3", ["variants[0].sharpness"]),
        # wrong types
        ("steps: 2", "steps: two", ["m.yaml:6:8", "steps", "'two'"]),
        ("width: 128", "width: [128]", ["width", "[128]"]),
        ("model: {id: tiny-sd3, dtype: float32, device: cpu}", "model: tiny-sd3", ["model"]),
        ("actors: 1", "actors: many", ["ray.actors", "'many'"]),
        ("shard_size: 4", "shard_size: 2.5", ["shard_size", "2.5"]),
        # out of range
        ("steps: 2", "steps: -3", ["steps", "got -3"]),
        ("{alpha: 0.5}", "{alpha: 1.01}", ["variants[1].pruning.alpha", "(0, 1]"]),
        ("{alpha: 0.5}", "{alpha: -0.2}", ["variants[1].pruning.alpha", "(0, 1]"]),
        ("{alpha: 0.5}", "{alpha: .nan}", ["variants[1].pruning.alpha"]),
        ("actors: 1", "actors: 1, batch_timeout_s: 0", ["ray.batch_timeout_s", "got 0"]),
        ("actors: 1", "actors: 1, max_attempts: 0", ["ray.max_attempts", "got 0"]),
        # a resolution the model cannot take (8 px VAE x 2 px patches)
        ("width: 128", "width: 136", ["width 136 is not a multiple of 16"]),
        ("    pruning: none", "    pruning: none\n    height: 200", ["variant full: height 200"]),
        # names that could become paths
        ("name: full", "name: ../../x", ["variants[0].name", "'../../x'"]),
        ("name: bad", "name: ../bad", ["name", "'../bad'"]),
    ],
)
def test_bad_manifest_values(tmp_path, old, new, expected):
    text = GOOD.replace(old, new)
    assert text != GOOD
    output = submit_fails(tmp_path, text)
    for fragment in expected:
        assert fragment in output


@pytest.mark.parametrize(
    ("name", "content", "source", "expected"),
    [
        ("empty.txt", b"", "", ["no prompts"]),
        ("blank.txt", b"  \n\t\n", "", ["no prompts"]),
        ("utf8.txt", b"a cat\na dog\na \xc3\x28 bird\n", "", ["line 3", "invalid UTF-8"]),
        (
            "dup.csv",
            b"id,prompt\nx1,a cat\nx2,a dog\nx1,a bird\n",
            ", id_column: id",
            ["duplicate", "'x1'", "line 2", "line 4"],
        ),
        ("missing.txt", None, "", ["missing.txt", "not found"]),
    ],
)
def test_bad_prompt_files(tmp_path, name, content, source, expected):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    text = GOOD.replace("{path: prompts.txt}", f"{{path: {name}{source}}}")
    output = submit_fails(tmp_path, text)
    assert name in output
    for fragment in expected:
        assert fragment in output


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    """A folder nobody may write below (root ignores permission bits: /sys is read-only)."""
    if os.geteuid() == 0:
        yield Path("/sys")
        return
    path = tmp_path / "ro"
    path.mkdir()
    path.chmod(0o555)
    yield path
    path.chmod(0o755)


@pytest.mark.parametrize("where", ["file", "below-file", "read-only"])
def test_output_that_is_not_writable(tmp_path, read_only_dir, where):
    (tmp_path / "taken").write_text("a file, not a folder")
    output = {
        "file": str(tmp_path / "taken"),
        "below-file": str(tmp_path / "taken" / "out"),
        "read-only": str(read_only_dir / "catbatch-out"),
    }[where]
    message = submit_fails(tmp_path, GOOD.replace("output: out", f"output: {output}"))
    assert f"output location {output} is not writable" in message
    assert (tmp_path / "taken").read_text() == "a file, not a folder"
    assert not Path(output).is_dir()


def test_unknown_model_offline_at_submit(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "hf").mkdir()
    text = GOOD.replace("id: tiny-sd3", "id: nobody/no-such-model")
    message = submit_fails(tmp_path, text)
    assert "nobody/no-such-model" in message


def test_layout_refuses_path_components_from_data(tmp_path):
    layout = OutputLayout(str(tmp_path / "out"))
    for bad in ("..", "../x", "a/b", "", ".", "a\\b"):
        with pytest.raises(ValueError, match="unsafe path component"):
            layout.shard_parquet(bad, "shard-00000")
    assert layout.shard_parquet("full", "shard-00000").startswith(str(tmp_path / "out"))


@pytest.mark.slow
def test_bad_single_prompts_and_hostile_ids_become_rows(tmp_path, ray_cluster):
    """Empty, whitespace-only and NUL prompts are named by validate (file and line) and recorded
    as `invalid` rows with the reason, which --retry-failed leaves alone and status counts
    apart; ids like '../../x' stay data: every file written is inside the output location."""
    records = [
        {"id": "../../x", "prompt": "a red fox"},
        {"id": "/tmp/evil", "prompt": "   \t "},
        {"id": "nul", "prompt": "a blue\x00boat"},
        {"id": "..", "prompt": ""},
        {"id": "ok", "prompt": "a green tree"},
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    text = GOOD.replace("{path: prompts.txt}", "{path: p.jsonl, id_column: id}")
    text = text.replace("shard_size: 4", "shard_size: 8")
    path = tmp_path / "m.yaml"
    path.write_text(text)
    res = CliRunner().invoke(main, ["validate", str(path), "--no-model-check"])
    assert res.exit_code == 0, res.output
    source = tmp_path / "p.jsonl"
    for line, why in ((2, "empty prompt"), (3, "prompt contains a NUL byte"), (4, "empty prompt")):
        assert f"warning: {source} line {line}: {why}" in res.stderr, res.stderr
    assert "3 prompt(s) cannot be generated" in res.stderr
    outside = tmp_path.parent / "x"
    before = files_under(tmp_path)
    res = CliRunner().invoke(main, ["submit", str(path), "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "images: 4 generated, 0 failed, 6 invalid" in res.stdout
    new = files_under(tmp_path) - before
    assert new and all(name == "out" or name.startswith("out/") for name in new)
    assert not outside.exists() and not Path("/tmp/evil").exists()
    for variant in ("full", "cat"):
        files = sorted((tmp_path / "out" / "variants" / variant).glob("*.parquet"))
        rows = {r["sample_id"]: r for f in files for r in pq.read_table(f).to_pylist()}
        assert set(rows) == {r["id"] for r in records}
        assert rows["../../x"]["status"] == "ok" and rows["ok"]["status"] == "ok"
        assert rows["/tmp/evil"]["status"] == "invalid"
        assert rows["/tmp/evil"]["error"] == "empty prompt"
        assert rows[".."]["error"] == "empty prompt" and rows[".."]["status"] == "invalid"
        assert rows["nul"]["error"] == "prompt contains a NUL byte"
        assert rows["nul"]["image"] is None and rows["../../x"]["image"]["bytes"]
        stats = json.loads(
            (tmp_path / "out/variants" / variant / "shard-00000.stats.json").read_text()
        )
        assert (stats["images_ok"], stats["images_failed"], stats["images_invalid"]) == (2, 0, 3)
    res = CliRunner().invoke(main, ["status", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    full = json.loads(res.output)["variants"]["full"]
    assert (full["images_ok"], full["images_failed"], full["images_invalid"]) == (2, 0, 3)
    res = CliRunner().invoke(main, ["status", str(tmp_path / "out")])
    assert "--retry-failed" not in res.output and "invalid" in res.output
    assert "full: 3 image(s) of prompts that cannot be generated, in shard-00000" in res.output
    res = CliRunner().invoke(main, ["submit", str(path), "--quiet", "--retry-failed"])
    assert res.exit_code == 0 and "0 of 2 tasks to run\n" in res.output, res.output


def test_printed_output_paths_are_normalised(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"name": "n", "variants": []}))
    winding = str(tmp_path / "a" / "b" / ".." / ".." / "out")
    assert OutputLayout(winding).display() == str(out)
    res = CliRunner().invoke(main, ["status", winding])
    assert f"output: {out}\n" in res.output and ".." not in res.output
    res = CliRunner().invoke(main, ["status", str(tmp_path / "a" / ".." / "none")])
    assert res.exit_code == 2 and f"{tmp_path / 'none'} holds no catbatch run" in res.output
