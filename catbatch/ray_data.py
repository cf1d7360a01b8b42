"""A Ray Data stage: ``ds.map_batches(Generate, ...)`` makes a manifest's images from a
dataset's prompts and returns the rows of catbatch's Parquet output.

.. code-block:: python

    manifest = load_manifest("sd3.yaml")
    ds = ds.map_batches(
        Generate,
        fn_constructor_kwargs={"manifest": manifest, "variant": "cat-0.3", "id_column": "id"},
        batch_size=64,
        **actor_options(manifest),  # or concurrency=N, num_gpus=1
    )

Each actor holds one pipeline (a :class:`catbatch.job.worker.Worker`, as ``catbatch submit``'s
actors do) and uses the manifest's model, the chosen variant's settings (size, steps, guidance,
negative prompt, pruning), its ``seed``, ``images_per_prompt``, ``batch_size`` and ``metrics``;
its ``prompts``, ``output`` and ``shard_size`` are not used (the dataset replaces them). A batch
of prompts is made as a shard of the same prompts would be: ``images_per_prompt`` images each,
in pipeline calls of ``batch_size`` images; the result is a ``pyarrow.Table`` with the Parquet
writer's columns (:data:`catbatch.job.writer.SCHEMA`), one row per image, in batch order.

Sample ids come from ``id_column`` (values as strings, stripped; unique within a batch), or, as
a manifest's prompt source without an id column makes them, from ``source_name`` and the
0-based record index in ``row_column``: ``sample_id_for(source_name, row)``. Each image's seed
depends only on the manifest's seed, the sample id and the image index, so for the same
(sample id, image index) and the same batch composition (a batch holding the prompts of one of
submit's shards, in its order) the PNG bytes equal ``catbatch submit``'s; in other batches the
pixels may differ by float summation order (at most 1 grey level in the tests).

A prompt that cannot be made (empty, a NUL byte, not a string) gives ``invalid`` rows, a failed
generation ``failed`` rows, as in submit's output. Ray is imported only by
:func:`actor_options`; the pipeline (torch, diffusers) loads in each actor.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import pyarrow as pa

from catbatch.job import manifest as manifests
from catbatch.job.manifest import Manifest
from catbatch.job.prompts import Prompt, make_prompt, sample_id_for


def load_manifest(
    manifest: str | os.PathLike[str] | Mapping[str, Any],
    base_dir: str | os.PathLike[str] | None = None,
) -> Manifest:
    """Read and check a manifest (a YAML file's path or a dict of the same fields) in the
    driver, for :class:`Generate`: errors show before any actor starts, and the actors need no
    copy of the file (its folder, or a dict's ``base_dir``, default the current directory, is
    made absolute, so relative paths in it resolve on any node that shares them)."""
    if isinstance(manifest, Mapping):
        from catbatch.api import load

        return load(manifest, base_dir)
    return manifests.load_manifest(Path(manifest).resolve())


def actor_options(
    manifest: Manifest, resources: dict[str, float] | None = None
) -> dict[str, float | int]:
    """``concurrency``, ``num_cpus`` and ``num_gpus`` for ``map_batches``, placed as ``catbatch
    submit`` places its actors: ``ray.resources`` per actor, GPUs where the cluster has them
    (always with ``model.device: cuda``), ``ray.actors`` actors (``auto``: one per GPU, else one
    per ``cpus`` CPUs with one CPU left for Ray Data's own tasks: reading, ``map``, writing).

    ``resources``: the cluster's (``ray.cluster_resources()``); by default the cluster Ray is
    connected to, connecting first (``ray.init()``) when it is not."""
    from catbatch.job.distributor import plan_actors

    if resources is None:
        import ray

        if not ray.is_initialized():
            ray.init()
        resources = ray.cluster_resources()
    actors, cpus, gpus = plan_actors(manifest, sys.maxsize, resources)
    if manifest.ray.actors == "auto" and not gpus:
        actors = max(1, min(actors, int((resources.get("CPU", 1) - 1) / cpus + 1e-6)))
    return {"concurrency": actors, "num_cpus": cpus, "num_gpus": gpus}


def choose_variant(manifest: Manifest, variant: str | None) -> str:
    """``variant``, checked; may be left out when the manifest has one (or none: ``default``)."""
    names = list(manifest.resolved_variants())
    if variant is None:
        if len(names) > 1:
            raise ValueError(
                f"manifest {manifest.name!r} has {len(names)} variants ({', '.join(names)}); "
                "pass variant= to choose one"
            )
        return names[0]
    if variant not in names:
        raise ValueError(
            f"variant {variant!r} is not in manifest {manifest.name!r}; variants: "
            f"{', '.join(names)}"
        )
    return variant


@dataclass(frozen=True)
class PromptColumns:
    """Which columns of a batch hold the prompt, the sample id (or the source row) and the
    metadata kept in ``prompt_metadata``."""

    prompt_column: str = "prompt"
    id_column: str | None = None
    source_name: str | None = None
    row_column: str = "row"
    metadata_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.id_column is None) == (self.source_name is None):
            raise ValueError(
                "give the sample ids one way: id_column='<column>' (its values are the ids), "
                "or source_name='<name>' with row_column (the ids a prompt source of that name "
                "without an id column gives, from each record's 0-based row)"
            )

    def prompts(self, batch: Any) -> list[Prompt]:
        """The batch's prompts (a dict of columns, a ``pyarrow.Table`` or a pandas DataFrame)."""
        columns = _columns(batch)
        key = self.id_column or self.row_column
        for name in (self.prompt_column, key, *self.metadata_columns):
            if name not in columns:
                raise ValueError(f"no column {name!r} in the batch; columns: {sorted(columns)}")
        seen: dict[str, int] = {}
        out = []
        for n, value in enumerate(columns[self.prompt_column]):
            where = f"batch row {n}"
            row, sample_id = self._sample_id(columns[key][n], where)
            if sample_id in seen:
                raise ValueError(
                    f"duplicate sample id {sample_id!r} in one batch (batch rows {seen[sample_id]}"
                    f" and {n}); ids must be unique"
                )
            seen[sample_id] = n
            kept = {c: columns[c][n] for c in self.metadata_columns}
            metadata = {c: "" if v is None else str(v) for c, v in kept.items()}
            out.append(make_prompt(sample_id, value, metadata, row, where))
        return out

    def _sample_id(self, value: Any, where: str) -> tuple[int, str]:
        """``(row, sample id)`` of one record (row -1 when ids come from ``id_column``)."""
        if self.source_name is None:
            sample_id = "" if value is None else str(value).strip()
            if not sample_id:
                raise ValueError(f"{where}: empty sample id in column {self.id_column!r}")
            return -1, sample_id
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise ValueError(
                f"{where}: column {self.row_column!r} holds {value!r}; the 0-based row of the "
                "record in its source (an integer >= 0) is needed"
            )
        return int(value), sample_id_for(self.source_name, int(value))


def _columns(batch: Any) -> dict[str, list[Any]]:
    """A batch as lists of Python values per column."""
    if isinstance(batch, pa.Table):
        return batch.to_pydict()
    if not isinstance(batch, Mapping):  # pandas
        return batch.to_dict("list")
    return {k: v.tolist() if hasattr(v, "tolist") else list(v) for k, v in batch.items()}


class Generate:
    """Callable class for ``ds.map_batches``: a batch of prompts in, its images' rows out.

    Args:
        manifest: a :class:`Manifest` (:func:`load_manifest` reads one in the driver), the
            path of a manifest file or a dict of its fields (as ``catbatch.submit`` takes),
            read in each actor.
        base_dir: where the relative paths of a dict manifest resolve (default: the actor's
            working directory; :func:`load_manifest` in the driver resolves them there).
        variant: which variant's settings to use; required when the manifest has several.
        prompt_column: the column of prompts.
        id_column: the column of sample ids; or
        source_name, row_column: derive the ids as a prompt source named ``source_name``
            without an id column does, from each record's 0-based row in ``row_column``.
        metadata_columns: columns kept as strings in ``prompt_metadata``.

    The actor's torch threads are set to ``ray.resources.cpus``, as submit's actors set theirs,
    so that the same batches run as they do there.
    """

    def __init__(
        self,
        manifest: Manifest | str | os.PathLike[str] | Mapping[str, Any],
        variant: str | None = None,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        prompt_column: str = "prompt",
        id_column: str | None = None,
        source_name: str | None = None,
        row_column: str = "row",
        metadata_columns: Sequence[str] = (),
    ):
        m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest, base_dir)
        self.variant = choose_variant(m, variant)
        self.columns = PromptColumns(
            prompt_column, id_column, source_name, row_column, tuple(metadata_columns)
        )
        import torch

        from catbatch.job.driver import check_model_settings
        from catbatch.job.worker import Worker
        from catbatch.models.loader import describe_source

        source = describe_source(m.model.id, m.model.revision, m.base_dir)
        check_model_settings(m, source)
        torch.set_num_threads(max(1, int(m.ray.resources.cpus)))  # as submit's actors
        self.worker = Worker(m, source)
        self.name = f"ray-{uuid.uuid4().hex[:8]}"  # this actor, in batch ids
        self.calls = 0

    def __call__(self, batch: Any) -> pa.Table:
        from catbatch.job.sharding import ShardRef, Task
        from catbatch.job.writer import rows_to_table

        prompts = self.columns.prompts(batch)
        task = Task(self.variant, ShardRef(self.calls, count=len(prompts)))
        rows = self.worker.task_rows(task, prompts, f"{self.name}-{self.calls:05d}")
        self.calls += 1
        self.worker.take_events()  # the job system's log; the rows say what happened
        return rows_to_table(rows)
