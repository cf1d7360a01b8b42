"""The Ray Data stage (catbatch.ray_data): ids and prompts from batches, variant choice, the
README example on the session's local Ray cluster, and images equal to `catbatch submit`'s."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from catbatch.cli import main
from catbatch.job.manifest import parse_manifest
from catbatch.job.prompts import PromptSource, read_prompts
from catbatch.job.seeds import image_seed
from catbatch.job.writer import SCHEMA
from catbatch.ray_data import Generate, PromptColumns, actor_options, choose_variant

README = Path(__file__).resolve().parents[1] / "README.md"

PROMPTS = ["a red fox", "a blue boat", "a green tree", "a yellow house", "a black cat"]
PROMPTS += ["a white bird", "a grey wolf", "an orange sun", "a purple flower"]

MANIFEST = """\
name: raydata
model: {id: tiny-sd3, dtype: float32, device: cpu}
prompts: {path: prompts.jsonl, id_column: id}
seed: 7
width: 64
height: 64
steps: 4
guidance_scale: 5.0
images_per_prompt: 2
batch_size: 4
shard_size: 3
variants:
  - name: full
    pruning: none
  - name: cat-0.3
    pruning: {alpha: 0.3, last_full_step: 0, n_clusters: 4}
ray: {address: local, actors: 1, resources: {cpus: 1}}
output: out
"""


def write_inputs(folder: Path, n: int = len(PROMPTS)) -> Path:
    """``prompts.jsonl`` (ids p0.. and prompts) and ``sd3.yaml`` (the manifest) in ``folder``."""
    lines = [json.dumps({"id": f"p{i}", "prompt": p}) for i, p in enumerate(PROMPTS[:n])]
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    path = folder / "sd3.yaml"
    path.write_text(MANIFEST)
    return path


def read_parquet(folder: Path) -> pa.Table:
    files = sorted(folder.glob("*.parquet"))
    assert files, f"no Parquet files in {folder}"
    return pa.concat_tables(pq.read_table(f) for f in files)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png))).astype(int)


# -- prompts and ids from a batch (no model) ----------------------------------------------------


def test_ids_from_source_name_and_row_match_the_prompt_source(tmp_path):
    """Rows 0, 2 and 3 of a JSONL file (row 1 blank): the ids its source gives, and its
    invalid prompt, from the stated source name and each record's row."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a fox"}\n\n{"prompt": " "}\n{"prompt": "a cat"}\n')
    source = read_prompts(PromptSource(path=str(path)))
    batch = {"prompt": np.array(["a fox", " ", "a cat"]), "row": np.array([0, 2, 3])}
    made = PromptColumns(source_name="p.jsonl").prompts(batch)
    assert [p.sample_id for p in made] == [p.sample_id for p in source]
    assert [(p.prompt, p.problem) for p in made] == [(p.prompt, p.problem) for p in source]
    assert made[1].problem == "empty prompt"


def test_ids_from_a_column_in_every_batch_format(tmp_path):
    """Integer ids become strings as a source's id column does; dict of numpy arrays, Arrow
    table and pandas frame give the same prompts; metadata columns are kept as strings."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 7, "prompt": "a fox", "k": 1}\n{"id": 9, "prompt": "a cat", "k": 2}\n')
    source = read_prompts(PromptSource(path=str(path), id_column="id"))
    table = pa.table({"id": [7, 9], "prompt": ["a fox", "a cat"], "k": [1, 2]})
    columns = PromptColumns(id_column="id", metadata_columns=("k",))
    numpy = {name: table[name].to_numpy() for name in table.column_names}
    batches = [table, table.to_pandas(), numpy]
    for batch in batches:
        made = columns.prompts(batch)
        assert [p.sample_id for p in made] == [p.sample_id for p in source] == ["7", "9"]
        assert [p.prompt for p in made] == ["a fox", "a cat"]
        assert [p.metadata for p in made] == [{"k": "1"}, {"k": "2"}]


@pytest.mark.parametrize(
    ("columns", "batch", "message"),
    [
        ({}, {"prompt": ["a"]}, "give the sample ids one way"),
        ({"id_column": "id", "source_name": "x"}, {"prompt": ["a"]}, "give the sample ids"),
        ({"id_column": "id"}, {"prompt": ["a"]}, "no column 'id' in the batch"),
        ({"id_column": "id"}, {"prompt": ["a", "b"], "id": [1, "1"]}, "duplicate sample id '1'"),
        ({"id_column": "id"}, {"prompt": ["a"], "id": [" "]}, "batch row 0: empty sample id"),
        ({"source_name": "x"}, {"prompt": ["a"], "row": [-1]}, "column 'row' holds -1"),
        ({"source_name": "x"}, {"prompt": ["a"], "row": ["3"]}, "column 'row' holds '3'"),
    ],
)
def test_bad_columns_are_named(columns, batch, message):
    with pytest.raises(ValueError, match=message):
        PromptColumns(**columns).prompts(batch)


def test_variant_required_when_the_manifest_has_several(tmp_path):
    manifest = parse_manifest(MANIFEST, base_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"2 variants \(full, cat-0.3\); pass variant="):
        Generate(manifest, id_column="id")  # refused before the pipeline loads
    with pytest.raises(ValueError, match=r"variant 'cat' is not in .*variants: full, cat-0.3"):
        Generate(manifest, "cat", id_column="id")
    assert choose_variant(manifest, "cat-0.3") == "cat-0.3"
    single = parse_manifest(MANIFEST.split("variants:")[0] + "output: out\n")
    assert choose_variant(single, None) == "default"


def test_manifest_may_be_a_dict(tmp_path):
    """As ``catbatch.submit``: a dict of the manifest's fields, checked with "<dict>" named;
    relative paths resolve against ``base_dir``."""
    from catbatch.errors import ManifestError
    from catbatch.ray_data import load_manifest

    fields = yaml.safe_load(MANIFEST)
    with pytest.raises(ValueError, match=r"2 variants \(full, cat-0.3\); pass variant="):
        Generate(fields, id_column="id")  # read and refused before the pipeline loads
    with pytest.raises(ManifestError, match="<dict>: steps: got 0"):
        Generate({**fields, "steps": 0}, "full", id_column="id")
    m = load_manifest(fields, base_dir=tmp_path)
    assert m == parse_manifest(MANIFEST, base_dir=str(tmp_path))
    assert m.resolve_path("prompts.jsonl") == str(tmp_path / "prompts.jsonl")


@pytest.mark.parametrize(
    ("device", "actors", "resources", "expected"),
    [
        ("cpu", "auto", {"CPU": 4.0}, (3, 0)),  # a CPU left for reading and writing
        ("cpu", "auto", {"CPU": 1.0}, (1, 0)),
        ("auto", "auto", {"CPU": 16.0, "GPU": 4.0}, (4, 1)),  # one per GPU
        ("auto", 2, {"CPU": 16.0, "GPU": 4.0}, (2, 1)),
        ("cuda", 2, {"CPU": 16.0}, (2, 1)),  # GPU nodes may come up later
    ],
)
def test_actor_options_place_actors_as_submit(device, actors, resources, expected):
    text = MANIFEST.replace("device: cpu", f"device: {device}")
    text = text.replace(
        "actors: 1, resources: {cpus: 1}", f"actors: {actors}, resources: {{cpus: 1}}"
    )
    options = actor_options(parse_manifest(text), resources)
    assert options == {"concurrency": expected[0], "num_cpus": 1.0, "num_gpus": expected[1]}


# -- on the session's local Ray cluster ----------------------------------------------------------


def readme_example() -> str:
    """The first Python block of the README's "In your pipeline" / "Ray Data" section."""
    text = README.read_text()
    section = text[text.index("## In your pipeline") :]
    section = section[section.index("### Ray Data") :]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path):
    """As a user runs it: a fresh Python in the folder of its files, Ray started by the
    example (the session's cluster runs in another folder; Ray Data reads relative paths in
    its workers)."""
    write_inputs(tmp_path, n=4)
    (tmp_path / "example.py").write_text(readme_example())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(README.parent), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, timeout=600
    )
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    table = read_parquet(tmp_path / "images")
    assert table.column_names == SCHEMA.names
    rows = sorted(table.to_pylist(), key=lambda r: (r["sample_id"], r["image_index"]))
    assert [(r["sample_id"], r["image_index"]) for r in rows] == [
        (f"p{i}", k) for i in range(4) for k in range(2)
    ]
    for r in rows:
        assert r["status"] == "ok" and r["variant"] == "cat-0.3" and r["error"] is None
        assert r["prompt"] == f"{PROMPTS[int(r['sample_id'][1:])]}, watercolor"
        assert r["seed"] == image_seed(7, r["sample_id"], r["image_index"])
        assert json.loads(r["settings"])["pruning"]["alpha"] == 0.3
        assert pixels(r["image"]["bytes"]).shape == (64, 64, 3)
        assert r["macs_paper"] > 0 and r["batch_size"] in (4, 2)


@pytest.fixture(scope="module")
def submitted(tmp_path_factory, ray_cluster) -> tuple[Path, dict]:
    """`catbatch submit` of the test manifest (3 shards of 3 prompts, 2 images each, batches
    of 4 images): each variant's rows by (sample id, image index)."""
    tmp = tmp_path_factory.mktemp("raydata")
    path = write_inputs(tmp)
    res = CliRunner().invoke(main, ["submit", str(path), "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = {}
    for variant in ("full", "cat-0.3"):
        table = read_parquet(tmp / "out" / "variants" / variant)
        rows[variant] = {(r["sample_id"], r["image_index"]): r for r in table.to_pylist()}
    return path, rows


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "cat-0.3"])
def test_images_equal_submit_for_the_same_batches(submitted, variant):
    """Ray Data batches of 3 prompts: the first as submit's first shard (byte-equal images),
    the others mixed across its shards (at most 1 grey level apart)."""
    import ray

    path, by_submit = submitted
    order = [0, 1, 2, 3, 6, 7, 4, 5, 8]
    records = [{"id": f"p{i}", "prompt": PROMPTS[i], "extra": i} for i in order]
    # the manifest's path, or (cat-0.3) a dict of its fields
    manifest = str(path) if variant == "full" else yaml.safe_load(path.read_text())
    ds = ray.data.from_items(records, override_num_blocks=1).map_batches(
        Generate,
        fn_constructor_kwargs={
            "manifest": manifest,
            "variant": variant,
            "id_column": "id",
            "base_dir": str(path.parent),
        },
        batch_size=3,
        concurrency=1,
        num_cpus=1,
    )
    rows = ds.take_all()
    assert len(rows) == 18 and set(rows[0]) == set(SCHEMA.names)
    calls: dict[str, set[str]] = {}
    for r in rows:
        calls.setdefault(r["batch_id"].rsplit("-b", 1)[0], set()).add(r["sample_id"])
    assert sorted(map(sorted, calls.values())) == [
        ["p0", "p1", "p2"],
        ["p3", "p6", "p7"],
        ["p4", "p5", "p8"],
    ]
    for r in rows:
        ref = by_submit[variant][(r["sample_id"], r["image_index"])]
        assert r["status"] == ref["status"] == "ok" and r["seed"] == ref["seed"]
        assert r["settings"] == ref["settings"] and r["variant"] == variant
        if r["sample_id"] in ("p0", "p1", "p2"):
            assert r["batch_size"] == ref["batch_size"]
            assert r["image"]["bytes"] == ref["image"]["bytes"], r["sample_id"]
        else:
            diff = np.abs(pixels(r["image"]["bytes"]) - pixels(ref["image"]["bytes"]))
            assert diff.max() <= 1, (r["sample_id"], r["image_index"], diff.max())
