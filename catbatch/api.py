"""catbatch's Python API: what the ``catbatch`` command does, as functions that return values
and raise :mod:`catbatch.errors` exceptions (each with the command's ``exit_code``).

Safe to call from a worker thread (Airflow, Prefect): signal handlers (the clean stop on
SIGTERM / SIGINT) are installed only when called from the main thread, and only while the call
runs; nothing calls ``sys.exit``. A Ray connection that exists (``ray.init()`` done by the
caller) is used as it is and never shut down; else ``ray.address`` of the manifest says which
cluster to start or join (``local``: a private one that ends with this process).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeAlias

from catbatch.errors import InputError, OutputBusy, RunFailed, Stopped

if TYPE_CHECKING:
    import pyarrow.dataset

    from catbatch.job.driver import Plan, RunSummary, StopSignals
    from catbatch.job.layout import OutputLayout
    from catbatch.job.lease import Lease
    from catbatch.job.manifest import Manifest
    from catbatch.job.status import OutputStatus

log = logging.getLogger("catbatch")

ManifestLike: TypeAlias = "str | os.PathLike[str] | Mapping[str, Any] | Manifest"


def load(
    manifest: ManifestLike, base_dir: str | os.PathLike[str] | None = None, **overrides: Any
) -> Manifest:
    """The validated manifest, from a YAML file's path or a dict of the same fields (a
    :class:`~catbatch.job.manifest.Manifest` passes as it is). ``overrides`` replace top-level
    fields (``output="..."``, ``ray={...}``). Relative paths in a dict resolve against
    ``base_dir`` (default: the current directory), in a file against its folder. Raises
    :class:`~catbatch.errors.ManifestError` naming each bad field (with its file, line and
    column; ``"<dict>"`` and no line for a dict)."""
    from catbatch.job.manifest import Manifest, load_manifest, manifest_from_dict

    if isinstance(manifest, Manifest):
        if overrides or base_dir is not None:
            raise TypeError("a Manifest takes no overrides or base_dir: pass its path or dict")
        return manifest
    if isinstance(manifest, Mapping):
        folder = os.path.abspath(base_dir or ".")  # actors may run in another directory
        return manifest_from_dict(dict(manifest), "<dict>", folder, overrides)
    return load_manifest(manifest, overrides)


def validate(
    manifest: ManifestLike,
    *,
    check_model: bool = True,
    base_dir: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> Plan:
    """Check ``manifest`` (path or dict) as ``catbatch validate`` does, starting and writing
    nothing: the fields, the prompt source (read once into the shard index) and, with
    ``check_model``, that the model can be found and suits the settings. Returns the plan:
    ``.manifest`` (resolved), ``.counts()`` (prompts, samples, shards, images), ``.warnings``.
    Raises :class:`~catbatch.errors.InputError` (a :class:`~catbatch.errors.ManifestError` for
    the manifest's own fields)."""
    m = load(manifest, base_dir, **overrides)
    with _stop_signals():
        return _plan(m, check_model=check_model)


def submit(
    manifest: ManifestLike,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    verify: bool = False,
    num_cpus: int | None = None,
    progress: bool = False,
    messages: Callable[[str], None] | None = None,
    **overrides: Any,
) -> RunSummary:
    """Run ``manifest`` (path or dict) as ``catbatch submit`` does and return what it did.

    Resumes: committed shards are skipped. ``overrides`` replace top-level manifest fields
    (``output=...``); ``overwrite``, ``retry_failed``, ``verify`` and ``num_cpus`` are the
    command's options; ``progress`` shows a progress bar. What the command prints before the run
    (the plan's counts, warnings, damaged shards moved aside) goes to ``messages`` (default: the
    ``catbatch`` logger, at INFO; warnings at WARNING).

    Raises :class:`~catbatch.errors.InputError` (nothing started), :class:`~catbatch.errors.
    OutputBusy` (another submission writes the output), :class:`~catbatch.errors.RunFailed`
    (shards failed after retries: its ``summary``; or the workers could not start) and
    :class:`~catbatch.errors.Stopped` (SIGTERM / SIGINT, main thread only).
    """
    from catbatch.job.driver import JobError, prepare_output
    from catbatch.job.driver import submit as run

    say = messages or log.info
    warn = messages or log.warning
    m = load(manifest, base_dir, **overrides)
    refuse_if_busy(m.output_url)
    with _stop_signals() as stop:
        p = _plan(m, rescan=verify)
        with output_lease(p.layout) as lease:
            try:
                prepare_output(p, overwrite, retry_failed, verify)
            except (JobError, OSError) as e:
                raise InputError(str(e)) from e
            for line in p.damaged:
                warn(f"damaged shard {line}")
            for warning in p.warnings:
                warn(f"warning: {warning}")
            c = p.counts()
            retry = f"; {len(p.retry)} shard(s) with failed images to retry" if p.retry else ""
            say(
                f"{m.name}: {c['prompts']} prompts x {m.images_per_prompt} image(s) x "
                f"{c['variants']} variant(s) in {c['shards']} shards; {c['pending_tasks']} of "
                f"{c['tasks']} tasks to run{retry}"
            )
            try:
                summary = run(p, progress=progress, num_cpus=num_cpus, lease=lease, stop=stop)
            except JobError as e:
                raise RunFailed(str(e)) from e
    if summary.stopped:
        pending = f"{summary.unfinished_tasks} shard task(s) not committed stay pending"
        raise Stopped(
            f"stopped by {signal.Signals(summary.stop_signal).name}: {pending}",
            summary.stop_signal,
            summary,
        )
    if summary.failed_tasks:
        raise RunFailed(f"{len(summary.failed_tasks)} shard task(s) failed after retries", summary)
    return summary


def status(output: str | os.PathLike[str], verify: bool = False) -> OutputStatus:
    """What ``catbatch status OUTPUT`` shows, as a value: per variant the committed, pending,
    failed and damaged shards and the images (``.complete``, ``.to_json()``, ``.lines()``).
    ``verify`` also checks each committed file's sha256 and footer. Raises
    :class:`~catbatch.errors.InputError` when ``output`` holds no run or cannot be read."""
    from catbatch.job.status import StatusError, output_status

    try:
        return output_status(os.fspath(output), verify)
    except (StatusError, OSError) as e:
        raise InputError(str(e)) from e


def open_output(
    output: str | os.PathLike[str], variant: str | None = None, verify: bool = False
) -> pyarrow.dataset.Dataset:
    """The committed, intact shards of ``variant`` (default: the run's only one) of the run at
    ``output`` (a path or fsspec URL) as a :class:`pyarrow.dataset.Dataset`.

    A shard is in it when its ``.stats.json`` commit marker exists and its file matches it
    (size; with ``verify`` also sha256 and row count, which reads every file); damaged or
    uncommitted files are left out. Parquet output: nothing but the footers is read until
    asked, and only the columns asked for: ``ds.to_table(columns=["sample_id", "prompt"])``
    reads no image bytes. WebDataset output (``output_format: webdataset``): the tars are read
    now, into an in-memory dataset of the same columns. The ``image`` column is ``{bytes: PNG,
    path}``. Raises :class:`~catbatch.errors.InputError` when ``output`` holds no run, or
    ``variant`` is not one of its variants."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    from catbatch.job.layout import OutputLayout
    from catbatch.job.verify import check_pieces
    from catbatch.job.writer import PARQUET, SCHEMA, record_format

    layout = OutputLayout(os.fspath(output))
    try:
        record = layout.read_json(layout.run_record)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {layout.display(layout.run_record)}: {e}") from e
    if record is None:
        raise InputError(f"{layout.display()} holds no catbatch run (no run.json)")
    variants = list(record.get("variants") or [])
    if variant is None:
        if len(variants) != 1:
            raise InputError(
                f"{layout.display()} holds {len(variants)} variants ({', '.join(variants)}): "
                "name one with variant="
            )
        variant = variants[0]
    if variant not in variants:
        raise InputError(
            f"variant {variant!r} is not in {layout.display()}; variants: {', '.join(variants)}"
        )
    try:
        fmt = record_format(record)
    except ValueError as e:
        raise InputError(f"{layout.display(layout.run_record)}: {e}") from e
    pieces = check_pieces(layout, variant, deep=verify, fmt=fmt)
    files = [fmt.path(layout, variant, name) for name in sorted(pieces.stats)]
    if fmt is not PARQUET:
        tables = []
        for path in files:
            try:
                tables.append(fmt.read_table(layout, path))
            except ValueError as e:  # same size as committed, other bytes: verify=True skips it
                raise InputError(f"{layout.display(path)}: {e} (pass verify=True)") from e
        return ds.dataset(pa.concat_tables(tables) if tables else SCHEMA.empty_table())
    schema = None if files else SCHEMA  # the files' own (with their metadata) when there are any
    return ds.dataset(files, schema=schema, format="parquet", filesystem=layout.fs)


def refuse_if_busy(url: str) -> None:
    """Raise :class:`~catbatch.errors.OutputBusy` at once, before reading prompts or loading
    anything, when another submission holds the output's lease (storage errors are left to the
    checks that follow)."""
    from catbatch.job.layout import OutputLayout
    from catbatch.job.lease import LeaseHeld, ensure_free

    try:
        ensure_free(OutputLayout(url))
    except LeaseHeld as e:
        raise OutputBusy(str(e)) from e
    except (OSError, ValueError, ImportError):
        pass


@contextmanager
def output_lease(layout: OutputLayout) -> Iterator[Lease]:
    """Hold the output's lease (:class:`~catbatch.errors.OutputBusy` if another submission
    holds it); released on exit."""
    from catbatch.job.lease import Lease, LeaseHeld

    try:
        layout.check_writable()
    except OSError as e:
        raise InputError(str(e)) from e
    lease = Lease(layout)
    try:
        lease.acquire()
    except LeaseHeld as e:
        raise OutputBusy(str(e)) from e
    except OSError as e:
        raise InputError(f"cannot take the lease on {layout.display()}: {e}") from e
    try:
        yield lease
    finally:
        lease.release()


def _plan(m: Manifest, check_model: bool = True, rescan: bool = False) -> Plan:
    from catbatch.job.driver import JobError, plan
    from catbatch.job.prompts import PromptSourceError
    from catbatch.models.loader import ModelLoadError

    try:
        return plan(m, check_model=check_model, rescan=rescan)
    except (PromptSourceError, ModelLoadError, JobError) as e:
        raise InputError(str(e)) from e


@contextmanager
def _stop_signals() -> Iterator[StopSignals]:
    """SIGTERM / SIGINT handled for the call (main thread only; see
    :func:`catbatch.job.driver.stop_signals`): outside the actor pool one stops the call at once
    with :class:`~catbatch.errors.Stopped` (every file written is complete)."""
    from catbatch.job.driver import Interrupted, stop_signals

    try:
        with stop_signals() as stop:
            yield stop
    except Interrupted as e:
        message = f"{e} (outside the actor pool: at once); committed shards are kept"
        raise Stopped(message, e.signum) from None


__all__ = ["load", "open_output", "status", "submit", "validate"]
