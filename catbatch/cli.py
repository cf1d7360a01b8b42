"""The ``catbatch`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from catbatch.manifest import ManifestError, load_manifest

EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _load(manifest_path: str, overrides: dict[str, Any]):
    try:
        return load_manifest(manifest_path, overrides)
    except ManifestError as e:
        _fail(str(e))


def _plan(m, check_model: bool = True):
    from catbatch.driver import JobError, plan
    from catbatch.models.loader import ModelLoadError
    from catbatch.prompts import PromptSourceError

    try:
        return plan(m, check_model=check_model)
    except (PromptSourceError, ModelLoadError, JobError) as e:
        _fail(str(e))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="catbatch")
def main() -> None:
    """Generate image datasets with diffusion transformers on Ray, with CAT token pruning.

    A YAML manifest names the model, prompts, seeds, sampling settings, pruning variants and
    the output location. Start with `catbatch validate MANIFEST`, then `catbatch submit
    MANIFEST`. Exit codes: 0 success, 1 some shards failed, 2 bad input (nothing started).
    """


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--output", help="Override the manifest's output location (path or URL).")
@click.option("--no-model-check", is_flag=True, help="Skip checking that the model can be found.")
def validate(manifest: str, output: str | None, no_model_check: bool) -> None:
    """Validate MANIFEST and print the resolved config; starts and writes nothing.

    Prints the resolved configuration (every default filled in, one entry per variant) and the
    number of prompts, samples (prompts x images per prompt) and shards.
    """
    m = _load(manifest, {"output": output} if output else {})
    p = _plan(m, check_model=not no_model_check)
    resolved = m.model_dump(mode="json")
    resolved["resolved_variants"] = {k: v.model_dump() for k, v in m.resolved_variants().items()}
    click.echo(json.dumps(resolved, indent=2))
    c = p.counts()
    click.echo(
        f"ok: {c['prompts']} prompts, {c['samples']} samples, {c['shards']} shards, "
        f"{c['variants']} variant(s), {c['images']} images in all"
    )


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--output", help="Override the manifest's output location (path or URL).")
@click.option("--address", help="Ray cluster: 'local' (private cluster), 'auto' or an address.")
@click.option("--actors", type=int, help="Number of actors (default: manifest, 'auto').")
@click.option("--overwrite", is_flag=True, help="Replace an existing output of a different run.")
@click.option("--num-cpus", type=int, help="CPUs of the private local cluster (default: all).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def submit(
    manifest: str,
    output: str | None,
    address: str | None,
    actors: int | None,
    overwrite: bool,
    num_cpus: int | None,
    quiet: bool,
) -> None:
    """Run the job described by MANIFEST and write Parquet shards to its output.

    Prompts are split into fixed shards; each variant of each shard is one task. Ray actors
    (one per GPU, or per CPU slot without GPUs) each load the pipeline once and pull the next
    task when idle. A shard is committed when its `.stats.json` is written; resubmitting the
    same manifest skips committed shards and finishes the rest.
    """
    from catbatch.driver import JobError, prepare_output
    from catbatch.driver import submit as run

    overrides: dict[str, Any] = {}
    if output:
        overrides["output"] = output
    m = _load(manifest, overrides)
    if address or actors:
        ray_spec = m.ray.model_dump()
        ray_spec.update({k: v for k, v in {"address": address, "actors": actors}.items() if v})
        m = _load(manifest, {**overrides, "ray": ray_spec})
    p = _plan(m)
    try:
        prepare_output(p, overwrite)
    except (JobError, OSError) as e:
        _fail(str(e))
    c = p.counts()
    click.echo(
        f"{m.name}: {c['prompts']} prompts x {m.images_per_prompt} image(s) x {c['variants']} "
        f"variant(s) in {c['shards']} shards; {c['pending_tasks']} of {c['tasks']} tasks to run",
        err=True,
    )
    try:
        summary = run(p, progress=not quiet, num_cpus=num_cpus)
    except JobError as e:
        _fail(str(e), code=1)
    for line in summary.lines():
        click.echo(line)
    if summary.failed_tasks:
        sys.exit(1)


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--sample-id", required=True, help="The sample id (see the `sample_id` column).")
@click.option("--image-index", default=0, show_default=True, help="Which image of the sample.")
@click.option("--variant", help="Variant name (default: the first).")
@click.option(
    "-o",
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the PNG.",
)
def regenerate(
    manifest: str, sample_id: str, image_index: int, variant: str | None, out: str
) -> None:
    """Regenerate one image by id, alone (batch size 1, in this process), as a PNG.

    The image's seed depends only on the manifest seed, the sample id and the image index,
    so the result matches the row in the dataset (up to float summation order when the
    dataset was made at a larger batch size).
    """
    from catbatch.sharding import Shard, Task
    from catbatch.worker import Worker

    m = _load(manifest, {"batch_size": 1})
    p = _plan(m)
    matches = [pr for pr in p.prompts if pr.sample_id == sample_id]
    if not matches:
        _fail(f"sample id {sample_id!r} is not in the prompt source of {manifest}")
    variants = m.resolved_variants()
    name = variant or next(iter(variants))
    if name not in variants:
        _fail(f"variant {name!r} is not in {manifest}; variants: {', '.join(variants)}")
    if not 0 <= image_index < m.images_per_prompt:
        _fail(f"--image-index must be in [0, {m.images_per_prompt})")
    worker = Worker(m, p.model_source)
    item = [it for it in worker.items(matches) if it.image_index == image_index]
    rows = worker.generate_rows(item, Task(name, Shard(0, tuple(matches))), variants[name], "regen")
    if rows[0].png is None:
        _fail(f"generation failed: {rows[0].error}", code=1)
    Path(out).write_bytes(rows[0].png)
    click.echo(f"wrote {out} (sample {sample_id}, image {image_index}, seed {rows[0].seed})")


if __name__ == "__main__":
    main()
