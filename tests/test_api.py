"""The Python API (catbatch.submit / validate / status / open_output): the same images, errors
and status as the CLI; typed errors with field, file and line; a worker thread and an existing
Ray connection; only committed, intact shards in open_output, images read when asked; the
README's "Python API" example and jobs/submit_python.py run as written (tiny-sd3, 64 px)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

import catbatch
from catbatch.cli import main

ROOT = Path(__file__).resolve().parents[1]

MANIFEST = """\
name: api
model: {id: tiny-sd3, dtype: float32, device: cpu}
prompts: {path: prompts.txt}
seed: 5
width: 64
height: 64
steps: 2
batch_size: 2
shard_size: 2
variants:
  - name: full
    pruning: none
ray: {actors: 1, resources: {cpus: 1}}
output: out
"""


def write_job(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.txt").write_text("a red fox\na blue boat\na green tree\n")
    path = folder / "m.yaml"
    path.write_text(MANIFEST)
    return path


def images(out: Path) -> dict[tuple[str, int], bytes]:
    rows = [
        r
        for f in sorted((out / "variants" / "full").glob("*.parquet"))
        for r in pq.read_table(f, columns=["sample_id", "image_index", "image"]).to_pylist()
    ]
    return {(r["sample_id"], r["image_index"]): r["image"]["bytes"] for r in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_cluster):
    """The same manifest run by the CLI, by submit(path) and by submit(dict) from a thread."""
    tmp = tmp_path_factory.mktemp("api")
    path = write_job(tmp)
    res = CliRunner().invoke(main, ["submit", str(path), "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    from_path = catbatch.submit(path, output="out-path")

    address = ray_cluster.get_runtime_context().gcs_address
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    found: dict = {}

    def in_thread() -> None:
        try:
            found["summary"] = catbatch.submit(
                yaml.safe_load(MANIFEST), base_dir=tmp, output=str(tmp / "out-dict")
            )
        except BaseException as e:  # reported by the test
            found["error"] = e

    t = threading.Thread(target=in_thread)
    t.start()
    t.join(600)
    assert "error" not in found, repr(found.get("error"))
    assert ray_cluster.is_initialized()
    assert ray_cluster.get_runtime_context().gcs_address == address
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    return tmp, from_path, found["summary"]


def test_submit_from_path_and_dict_make_the_cli_images(runs):
    tmp, from_path, from_dict = runs
    cli = images(tmp / "out")
    assert len(cli) == 3
    assert images(tmp / "out-path") == cli
    assert images(tmp / "out-dict") == cli
    for summary in (from_path, from_dict):
        assert isinstance(summary, catbatch.RunSummary)
        assert (summary.images, summary.failed_images, summary.exit_code) == (3, 0, 0)
    assert from_dict.output == str(tmp / "out-dict")


def test_resubmit_skips_committed_shards(runs):
    tmp, _, _ = runs
    summary = catbatch.submit(tmp / "m.yaml", output="out-path")
    assert (summary.images, summary.skipped_tasks) == (0, 2)


def test_status_is_what_the_cli_prints(runs):
    tmp, _, _ = runs
    res = CliRunner().invoke(main, ["status", str(tmp / "out"), "--json"])
    assert res.exit_code == 0, res.output
    st = catbatch.status(tmp / "out")
    assert st.to_json() == json.loads(res.output) and st.complete


def test_open_output_reads_committed_intact_shards_and_images_when_asked(runs, tmp_path):
    src, _, _ = runs
    out = tmp_path / "out"
    shutil.copytree(src / "out", out)
    folder = out / "variants" / "full"
    ds = catbatch.open_output(out)
    assert ds.count_rows() == 3 and ds.schema.metadata[b"catbatch.schema_version"] == b"1"

    # shard-00001 damaged (size differs from its stats), a Parquet file without its commit
    damaged = folder / "shard-00001.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    shutil.copy(folder / "shard-00000.parquet", folder / "shard-00009.parquet")
    ds = catbatch.open_output(out, variant="full")
    assert [Path(f).name for f in ds.files] == ["shard-00000.parquet"]
    ids = ds.to_table(columns=["sample_id"]).column("sample_id").to_pylist()
    assert sorted(ids) == sorted(k[0] for k in images(src / "out") if k[0] in ids)
    assert len(ids) == 2

    # the image column's bytes garbled in place (same size): the other columns read as before,
    # so reading them never touched the images
    meta = pq.ParquetFile(folder / "shard-00000.parquet").metadata.row_group(0)
    names = [meta.column(i).path_in_schema for i in range(meta.num_columns)]
    col = meta.column(names.index("image.bytes"))
    start = col.dictionary_page_offset or col.data_page_offset
    data = bytearray((folder / "shard-00000.parquet").read_bytes())
    data[start : start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    (folder / "shard-00000.parquet").write_bytes(bytes(data))
    ds = catbatch.open_output(out)
    assert sorted(ds.to_table(columns=["sample_id"]).column("sample_id").to_pylist()) == sorted(ids)
    try:
        garbled = ds.to_table(columns=["image"]).column("image").to_pylist()
    except Exception:  # noqa: BLE001 - unreadable pages: the image bytes were read
        garbled = None
    assert garbled != [images(src / "out")[(i, 0)] for i in ids]
    with pytest.raises(catbatch.InputError, match="variant 'cat' is not in"):
        catbatch.open_output(out, variant="cat")


def test_bad_manifest_raises_with_field_file_and_line(tmp_path):
    path = write_job(tmp_path)
    path.write_text(MANIFEST.replace("steps: 2", "steps: 0"))
    with pytest.raises(catbatch.ManifestError) as err:
        catbatch.validate(path, check_model=False)
    e = err.value
    assert (e.field, e.file, e.line, e.exit_code) == ("steps", str(path), 7, 2)
    assert isinstance(e, catbatch.InputError) and isinstance(e, catbatch.CatbatchError)
    res = CliRunner().invoke(main, ["validate", str(path), "--no-model-check"])
    assert res.exit_code == 2 and f"error: {e}\n" in res.output, res.output

    with pytest.raises(catbatch.ManifestError) as err:
        catbatch.submit({**yaml.safe_load(MANIFEST), "steps": 0, "batch_size": "x"})
    assert [(p.file, p.line, p.field) for p in err.value.problems] == [
        ("<dict>", None, "steps"),
        ("<dict>", None, "batch_size"),
    ]
    assert str(err.value).startswith("<dict>: steps: got 0; ")


def test_other_bad_input_is_an_input_error(tmp_path):
    path = write_job(tmp_path)
    (tmp_path / "prompts.txt").unlink()
    with pytest.raises(catbatch.InputError, match="prompts.txt") as err:
        catbatch.validate(path, check_model=False)
    assert err.value.exit_code == 2
    with pytest.raises(catbatch.InputError, match="holds no catbatch run"):
        catbatch.status(tmp_path)
    with pytest.raises(catbatch.InputError, match="holds no catbatch run"):
        catbatch.open_output(tmp_path)


def test_busy_output_is_output_busy(tmp_path):
    from catbatch.job.layout import OutputLayout
    from catbatch.job.lease import Lease

    path = write_job(tmp_path)
    holder = Lease(OutputLayout(str(tmp_path / "out")))
    holder.acquire()
    try:
        with pytest.raises(catbatch.OutputBusy) as err:
            catbatch.submit(path)
    finally:
        holder.release()
    assert err.value.exit_code == 3


def test_import_loads_no_torch_ray_or_pyarrow():
    code = (
        "import sys, catbatch\n"
        "catbatch.submit, catbatch.ManifestError\n"
        "print(sorted(m for m in ('torch', 'ray', 'pyarrow', 'diffusers') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)[0]


def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys, ray_cluster):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "2 images in" in out and "complete: True" in out
    assert "steps <dict> None" in out
    assert pq.read_table(next((tmp_path / "out").rglob("*.parquet"))).num_rows == 2


def test_jobs_example_prints_the_report_path(runs, capsys):
    tmp, _, _ = runs
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import submit_python
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    code = submit_python.main([str(tmp / "m.yaml"), "--output", str(tmp / "out-jobs")])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert out[-1] == str(tmp / "out-jobs" / "report")
    assert (Path(out[-1]) / "report.json").is_file()
    assert images(tmp / "out-jobs") == images(tmp / "out")


def test_jobs_example_runs_the_coco_manifest_by_default():
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import submit_python
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    assert submit_python.COCO == ROOT / "manifests" / "coco.yaml"
    m = catbatch.load(submit_python.COCO)  # the fields only: its prompts live on the cluster
    assert m.prompts.format == "coco" and m.model.id.endswith("stable-diffusion-3-medium-diffusers")


def test_relative_paths_resolve_from_the_callers_directory(tmp_path, monkeypatch):
    """Actors of a Ray cluster started elsewhere run in another directory: the manifest's
    folder (or a dict's base_dir) is made absolute."""
    write_job(tmp_path)
    monkeypatch.chdir(tmp_path)
    from_file = catbatch.load("m.yaml")
    from_dict = catbatch.load(yaml.safe_load(MANIFEST))
    for m in (from_file, from_dict):
        assert m.output_url == str(tmp_path / "out")


def test_open_output_of_a_run_without_commits_is_empty(tmp_path):
    record = {"name": "api", "variants": ["full"], "prompts": 2, "images_per_prompt": 1}
    (tmp_path / "run.json").write_text(json.dumps(record))
    ds = catbatch.open_output(tmp_path)
    assert ds.count_rows() == 0 and "image" in ds.schema.names
