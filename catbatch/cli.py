"""The ``catbatch`` command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from catbatch.job.manifest import ManifestError, load_manifest

EXIT_BAD_INPUT = 2
EXIT_BUSY = 3  # another submission holds the output's lease


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _load(manifest_path: str, overrides: dict[str, Any]):
    try:
        return load_manifest(manifest_path, overrides)
    except ManifestError as e:
        _fail(str(e))


def _plan(m, check_model: bool = True):
    from catbatch.job.driver import JobError, plan
    from catbatch.job.prompts import PromptSourceError
    from catbatch.models.loader import ModelLoadError

    try:
        return plan(m, check_model=check_model)
    except (PromptSourceError, ModelLoadError, JobError) as e:
        _fail(str(e))


def _warn(p) -> None:
    """The plan's warnings on stderr, once the command goes ahead."""
    for warning in p.warnings:
        click.echo(f"warning: {warning}", err=True)


def _refuse_if_busy(url: str) -> None:
    """Exit 3 at once, before reading prompts or loading anything, when another submission
    holds the output's lease (storage errors are left to the checks that follow)."""
    from catbatch.job.layout import OutputLayout
    from catbatch.job.lease import LeaseHeld, ensure_free

    try:
        ensure_free(OutputLayout(url))
    except LeaseHeld as e:
        _fail(str(e), code=EXIT_BUSY)
    except (OSError, ValueError, ImportError):
        pass


@contextmanager
def _output_lease(layout) -> Iterator[Any]:
    """Hold the output's lease (exit 3 if another submission holds it); released on exit."""
    from catbatch.job.lease import Lease, LeaseHeld

    try:
        layout.check_writable()
    except OSError as e:
        _fail(str(e))
    lease = Lease(layout)
    try:
        lease.acquire()
    except LeaseHeld as e:
        _fail(str(e), code=EXIT_BUSY)
    except OSError as e:
        _fail(f"cannot take the lease on {layout.display()}: {e}")
    try:
        yield lease
    finally:
        lease.release()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="catbatch")
def main() -> None:
    """Generate image datasets with diffusion transformers on Ray, with CAT token pruning.

    A YAML manifest names the model, prompts, seeds, sampling settings, pruning variants and
    the output location. Start with `catbatch validate MANIFEST`, then `catbatch submit
    MANIFEST`. Exit codes: 0 success, 1 some shards failed (status: the run is incomplete;
    regenerate: the image failed), 2 bad input (nothing started), 3 another submission is
    writing the output, 143 stopped by SIGTERM (committed shards are kept; rerun the same
    command to finish).
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
    _warn(p)
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

    The output may be a path or a URL: s3://bucket/prefix (pip install catbatch[s3]), or gs://
    and others when their fsspec package is installed. Credentials come from the backend's
    standard chain (for S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, ~/.aws,
    instance roles; AWS_ENDPOINT_URL for other S3 servers) and are never written anywhere.
    Transient storage errors are retried with backoff for CATBATCH_STORAGE_RETRY_S seconds
    (default 300).
    """
    from catbatch.job.driver import JobError, prepare_output
    from catbatch.job.driver import submit as run

    overrides: dict[str, Any] = {}
    if output:
        overrides["output"] = output
    m = _load(manifest, overrides)
    cluster = cluster_overrides(m, address, actors, gpus_per_actor, cpu_only, dtype)
    if cluster:
        m = _load(manifest, {**overrides, **cluster})
    _refuse_if_busy(m.output_url)
    p = _plan(m)
    with _output_lease(p.layout) as lease:
        try:
            prepare_output(p, overwrite, retry_failed, verify)
        except (JobError, OSError) as e:
            _fail(str(e))
        for line in p.damaged:
            click.echo(f"damaged shard {line}", err=True)
        _warn(p)
        c = p.counts()
        retry = f"; {len(p.retry)} shard(s) with failed images to retry" if p.retry else ""
        click.echo(
            f"{m.name}: {c['prompts']} prompts x {m.images_per_prompt} image(s) x "
            f"{c['variants']} variant(s) in {c['shards']} shards; {c['pending_tasks']} of "
            f"{c['tasks']} tasks to run{retry}",
            err=True,
        )
        try:
            summary = run(p, progress=not quiet, num_cpus=num_cpus, lease=lease)
        except JobError as e:
            _fail(str(e), code=1)
    for line in summary.lines():
        click.echo(line)
    sys.exit(summary.exit_code)


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
    from catbatch.job.status import StatusError, output_status

    try:
        st = output_status(output, verify)
    except (StatusError, OSError) as e:
        _fail(str(e))
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
    from catbatch.job.sharding import Shard, Task
    from catbatch.job.worker import Worker

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
    _warn(p)
    worker = Worker(m, p.model_source)
    item = [it for it in worker.items(matches) if it.image_index == image_index]
    rows = worker.generate_rows(item, Task(name, Shard(0, tuple(matches))), variants[name], "regen")
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
    from catbatch.report import ReportError, ReportOptions, make_report

    options = ReportOptions(baseline=baseline, bootstrap=bootstrap, seed=seed, pairs=pairs)
    try:
        result, files = make_report(output, out, options)
    except (ReportError, OSError) as e:
        _fail(str(e))
    data = result.data
    layout = OutputLayout(output)
    for name in data["variants_order"]:
        for shard, why in data["variants"][name]["unreadable_shards"].items():
            path = layout.display(layout.shard_parquet(name, shard))
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
