"""The ``catbatch`` command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from catbatch import api
from catbatch.errors import CatbatchError, Stopped

EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _stderr(message: str) -> None:
    click.echo(message, err=True)


@contextmanager
def _exit_codes() -> Iterator[None]:
    """Each :mod:`catbatch.errors` exception ends the command with its exit code: a run's
    summary (shards failed, stopped in the pool) on stdout, else the message on stderr."""
    try:
        yield
    except CatbatchError as e:
        summary = getattr(e, "summary", None)
        if summary is not None:
            for line in summary.lines():
                click.echo(line)
        elif isinstance(e, Stopped):
            _stderr(f"{e}, rerun the same command to go on")
        else:
            _stderr(f"error: {e}")
        sys.exit(e.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="catbatch")
def main() -> None:
    """Generate image datasets with diffusion transformers on Ray, with CAT token pruning.

    A YAML manifest names the model, prompts, seeds, sampling settings, pruning variants and
    the output location. Start with `catbatch validate MANIFEST`, then `catbatch submit
    MANIFEST`. Exit codes: 0 success, 1 some shards failed (status: the run is incomplete;
    regenerate: the image failed), 2 bad input (nothing started), 3 another submission is
    writing the output, 143 stopped by SIGTERM and 130 by SIGINT (at any phase; committed
    shards are kept; rerun the same command to finish).
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
    with _exit_codes():
        p = api.validate(manifest, check_model=not no_model_check, **_output(output))
    m = p.manifest
    resolved = m.model_dump(mode="json")
    resolved["resolved_variants"] = {k: v.model_dump() for k, v in m.resolved_variants().items()}
    click.echo(json.dumps(resolved, indent=2))
    for warning in p.warnings:
        _stderr(f"warning: {warning}")
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
@click.option("--retry-failed", is_flag=True, help="Also make again the images recorded as failed.")
@click.option(
    "--verify",
    is_flag=True,
    help="Check committed shards by sha256 and Parquet footer too (default: existence and size).",
)
@click.option("--num-cpus", type=int, help="CPUs of the private local cluster (default: all).")
@click.option(
    "--gpus-per-actor",
    type=click.FloatRange(0, 8),
    help="GPUs per actor (ray.resources.gpus): 1 pins one GPU each, 0.5 shares one by two.",
)
@click.option("--cpu-only", is_flag=True, help="Run on CPUs even where the cluster has GPUs.")
@click.option(
    "--dtype",
    type=click.Choice(["float16", "bfloat16", "float32"]),
    help="Override model.dtype (part of the run's fingerprint).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def submit(
    manifest: str,
    output: str | None,
    address: str | None,
    actors: int | None,
    overwrite: bool,
    retry_failed: bool,
    verify: bool,
    num_cpus: int | None,
    gpus_per_actor: float | None,
    cpu_only: bool,
    dtype: str | None,
    quiet: bool,
) -> None:
    """Run the job described by MANIFEST and write Parquet shards to its output.

    Prompts are split into fixed shards; each variant of each shard is one task. Ray actors
    (one per GPU, or per CPU slot without GPUs) each load the pipeline once and pull the next
    task when idle. A shard is committed when its `.stats.json` is written; resubmitting the
    same manifest skips committed shards and finishes the rest; prompts appended to the source
    become new shards (a short last shard is completed by an extension piece `-x1`).
    `--retry-failed` replaces the failed rows of committed shards with new images. A committed
    shard whose Parquet file is missing or does not match its stats (size; with `--verify` also
    sha256 and footer) is moved to OUTPUT/damaged/ and made again.

    One submission at a time writes an output: the second exits with code 3 while the first
    holds the output's lease (renewed every 10 s, free 30 s after its driver dies).

    The prompt source is read once into a shard index stored under OUTPUT/index/ (per shard:
    where its records are and a hash of its prompts); a resubmit reuses it while the source is
    unchanged (size, modification time or ETag, hash of sampled blocks; `--verify` reads the
    source again). Actors read their own shards' prompts from the source.

    The output may be a path or a URL: s3://bucket/prefix (pip install catbatch[s3]), or gs://
    and others when their fsspec package is installed. Credentials come from the backend's
    standard chain (for S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, ~/.aws,
    instance roles; AWS_ENDPOINT_URL for other S3 servers) and are never written anywhere.
    Transient storage errors are retried with backoff for CATBATCH_STORAGE_RETRY_S seconds
    (default 300).
    """
    with _exit_codes():
        m = api.load(manifest, **_output(output))
        cluster = cluster_overrides(m, address, actors, gpus_per_actor, cpu_only, dtype)
        if cluster:
            m = api.load(manifest, **_output(output), **cluster)
        summary = api.submit(
            m,
            overwrite=overwrite,
            retry_failed=retry_failed,
            verify=verify,
            num_cpus=num_cpus,
            progress=not quiet,
            messages=_stderr,
        )
    for line in summary.lines():
        click.echo(line)


def _output(output: str | None) -> dict[str, str]:
    """The ``--output`` override, if given."""
    return {"output": output} if output else {}


def cluster_overrides(
    m: Any,
    address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    cpu_only: bool = False,
    dtype: str | None = None,
) -> dict[str, Any]:
    """The ``ray`` and ``model`` sections of manifest ``m`` with submit's flags applied (empty
    when no flag is given); passed back through validation like the manifest's own values."""
    ray_over = {"address": address, "actors": actors}
    res_over = {"gpus": 0.0 if cpu_only else gpus_per_actor}
    model_over = {"dtype": dtype, "device": "cpu" if cpu_only else None}
    if all(v is None for d in (ray_over, res_over, model_over) for v in d.values()):
        return {}

    def merged(base: dict, over: dict) -> dict:
        return {**base, **{k: v for k, v in over.items() if v is not None}}

    ray_spec = merged(m.ray.model_dump(exclude_unset=True), ray_over)
    ray_spec["resources"] = merged(m.ray.resources.model_dump(), res_over)
    return {"ray": ray_spec, "model": merged(m.model.model_dump(exclude_unset=True), model_over)}


@main.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--verify", is_flag=True, help="Also check each committed file's sha256 and Parquet footer."
)
def status(output: str, as_json: bool, verify: bool) -> None:
    """Show committed, pending and failed shards and images of the run at OUTPUT (a path or URL).

    A committed shard whose Parquet file is missing or differs in size from its stats (with
    --verify: in sha256 or footer) is reported as damaged. Exit code 0 when every planned shard
    is committed and intact, 1 when some are pending or damaged, 2 when OUTPUT holds no run.
    """
    with _exit_codes():
        st = api.status(output, verify)
    if as_json:
        click.echo(json.dumps(st.to_json(), indent=2))
    else:
        for line in st.lines():
            click.echo(line)
    sys.exit(0 if st.complete else 1)


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
    from catbatch.job.driver import JobError, check
    from catbatch.job.prompts import PromptSourceError, SourceScan
    from catbatch.job.sharding import ShardRef, Task
    from catbatch.job.worker import Worker
    from catbatch.models.loader import ModelLoadError

    with _exit_codes():
        m = api.load(manifest, batch_size=1)
    try:
        model_source = check(m)
        found = next(
            (
                (n, located[0])
                for n, located in enumerate(SourceScan(m.prompts, m.base_dir))
                if located[0].sample_id == sample_id
            ),
            None,
        )
    except (PromptSourceError, ModelLoadError, JobError) as e:
        _fail(str(e))
    if found is None:
        _fail(f"sample id {sample_id!r} is not in the prompt source of {manifest}")
    position, prompt = found
    variants = m.resolved_variants()
    name = variant or next(iter(variants))
    if name not in variants:
        _fail(f"variant {name!r} is not in {manifest}; variants: {', '.join(variants)}")
    if not 0 <= image_index < m.images_per_prompt:
        _fail(f"--image-index must be in [0, {m.images_per_prompt})")
    worker = Worker(m, model_source)
    item = [it for it in worker.items([prompt]) if it.image_index == image_index]
    task = Task(name, ShardRef(position // m.shard_size, count=1))
    rows = worker.generate_rows(item, task, variants[name], "regen")
    if rows[0].png is None:
        _fail(f"generation failed: {rows[0].error}", code=1)
    Path(out).write_bytes(rows[0].png)
    click.echo(f"wrote {out} (sample {sample_id}, image {image_index}, seed {rows[0].seed})")


@main.command()
@click.argument("output")
@click.option("--out", help="Where to write the report (default: OUTPUT/report).")
@click.option("--baseline", help="Variant to compare against (default: the one without pruning).")
@click.option("--bootstrap", default=1000, show_default=True, help="CLIP bootstrap resamples.")
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap.")
@click.option("--pairs", default=8, show_default=True, help="Samples in the HTML image grid.")
def report(
    output: str, out: str | None, baseline: str | None, bootstrap: int, seed: int, pairs: int
) -> None:
    """Compare the variants of the run at OUTPUT (a path or URL), like the paper's tables.

    Writes report.json, report.md (a Table 2-shaped comparison), card.md (a dataset card) and
    report.html (one self-contained page with plots and paired images). Works on a run that
    is still partial and says so.
    """
    from catbatch.job.layout import OutputLayout
    from catbatch.job.writer import shard_format
    from catbatch.report import ReportError, ReportOptions, make_report

    options = ReportOptions(baseline=baseline, bootstrap=bootstrap, seed=seed, pairs=pairs)
    try:
        result, files = make_report(output, out, options)
    except (ReportError, OSError) as e:
        _fail(str(e))
    data = result.data
    layout = OutputLayout(output)
    fmt = shard_format(data.get("output_format"))
    for name in data["variants_order"]:
        for shard, why in data["variants"][name]["unreadable_shards"].items():
            path = layout.display(fmt.path(layout, name, shard))
            click.echo(f"warning: skipped unreadable shard {path}: {why}", err=True)
    if data["partial"]:
        click.echo("partial run: " + "; ".join(data["notes"]), err=True)
    for name in data["variants_order"]:
        v = data["variants"][name]
        speedup = (v.get("vs_baseline") or {}).get("speedup")
        click.echo(
            f"{name}: {v['images']} images, {v['failures']} failed"
            + (f", {v['invalid']} invalid" if v.get("invalid") else "")
            + (f", speed-up {speedup:.2f}x" if speedup else "")
        )
    for path in files.values():
        click.echo(f"wrote {path}")


@main.command()
@click.option(
    "--model",
    "models",
    multiple=True,
    type=click.Choice(["sd3-medium", "pixart-sigma", "flux1-dev"]),
    help="Which model (repeatable; default: all three).",
)
@click.option("--steps", multiple=True, type=int, help="Step counts (repeatable; default 28, 50).")
@click.option("--alpha", default=0.3, show_default=True, help="CAT: fraction of tokens computed.")
@click.option("--resolution", default=1024, show_default=True, help="Image side in pixels.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def macs(
    models: tuple[str, ...], steps: tuple[int, ...], alpha: float, resolution: int, as_json: bool
) -> None:
    """Full and CAT-pruned MACs per image of SD3-medium and PixArt-Sigma, as in the paper, and
    of FLUX.1-dev.

    The real transformer configs (written out in catbatch.metrics.paper_configs, no hub access) are
    built on the meta device, without weights, and one step of each kind is counted with torch's
    FLOP counter through the pruning engine's counting path; CFG doubles the rows. Two figures
    in T (1e12) MACs: "paper" counts the transformer's linear layers and the patch-embedding
    convolution, as the CAT paper does; "total" adds the attention products. SD3 gets 333 text
    tokens (77 CLIP + 256 T5), which reproduces the paper's full-model figures; PixArt-Sigma
    300 T5 tokens; FLUX.1-dev one row (guidance-distilled, no CFG) of 4096 image and 512 T5
    tokens. For PixArt with CAT the printed figure counts what the engine runs (text
    keys/values computed once per generation); "as paper" recomputes them at every full step,
    which is how the paper's CAT figures appear to be counted. "ceiling" is the counted
    speed-up of the timeline, full / CAT MACs (paper count / total). Takes about a minute on a
    CPU.
    """
    from dataclasses import asdict

    from catbatch.metrics.paper_configs import NOTES, format_table, paper_macs_table

    if not 0 < alpha <= 1 or resolution % 16:
        _fail("--alpha must be in (0, 1] and --resolution a multiple of 16")
    rows = paper_macs_table(
        models or ("sd3-medium", "pixart-sigma", "flux1-dev"), steps or (28, 50), alpha, resolution
    )
    if as_json:
        payload = [{**asdict(r), "diff_pct": r.diff_pct} for r in rows]
        click.echo(json.dumps({"rows": payload, "notes": list(NOTES)}, indent=2))
    else:
        click.echo(format_table(rows, alpha))


if __name__ == "__main__":
    main()
