"""CAT's cache memory in a job (issue 14 item 7): the bytes per pruned variant, computed before
the run from the transformer config, in the run record and each shard's stats; a worker whose
device has less free memory than a variant's caches refuses to start, naming the field and the
number (the free memory is faked)."""

from __future__ import annotations

import json

import pytest
import torch

from catbatch.job import memory as cache_memory
from catbatch.job.driver import plan
from catbatch.job.manifest import load_manifest
from catbatch.job.runrecord import run_record
from catbatch.job.worker import Worker
from catbatch.pruning import CATConfig, cache_bytes

MANIFEST = """\
name: mem
model: {id: tiny-sd3, dtype: float32, device: cpu}
prompts: {path: prompts.txt}
width: 64
height: 96
steps: 3
guidance_scale: 5.0
batch_size: 3
shard_size: 4
metrics: {macs: false, clip: {enabled: false}}
variants:
  - name: full
    pruning: none
  - name: cat
    pruning: {method: cat, alpha: 0.5, stream: krow}
  - name: cat-wide
    width: 128
    pruning: {method: cat, alpha: 0.5}
output: out
"""


@pytest.fixture
def planned(tmp_path, tiny_cache):
    (tmp_path / "prompts.txt").write_text("a red fox\na blue boat\n")
    path = tmp_path / "m.yaml"
    path.write_text(MANIFEST)
    m = load_manifest(path)
    return m, plan(m)


def test_plan_computes_each_pruned_variants_bytes_from_the_config(planned, tiny_cache):
    m, p = planned
    assert set(p.cat_cache) == {"cat", "cat-wide"}
    config = cache_memory.transformer_config(p.model_source)
    for name, width, stream in (("cat", 64, "krow"), ("cat-wide", 128, "full")):
        expected = cache_bytes(
            config,
            batch=3,  # batch_size, two rows per image (CFG at guidance 5)
            height=96,
            width=width,
            dtype=torch.float32,
            config=CATConfig(alpha=0.5, stream=stream),
        )
        assert p.cat_cache[name] == expected.to_dict()
    assert p.cat_cache["cat-wide"]["branches"] > 0 == p.cat_cache["cat"]["branches"]
    record = run_record(m, p.model_source, 2, 1, "running", cat_cache=p.cat_cache)
    assert json.loads(json.dumps(record))["cat_cache_bytes"] == p.cat_cache


def test_worker_refuses_caches_larger_than_the_free_memory(planned, monkeypatch):
    m, p = planned
    need = p.cat_cache["cat-wide"]["total"]
    monkeypatch.setattr(cache_memory, "free_bytes", lambda device: need - 1)
    with pytest.raises(cache_memory.CacheMemoryError) as e:
        Worker(m, p.model_source)
    message = str(e.value)
    assert message.startswith("variants[cat-wide].pruning: CAT's caches need")
    assert f"{need / 1e9:.2f} GB" in message and "batch_size 3 at 128x96" in message
    assert "stream: krow" in message  # the full-length stream's branch caches can go


def test_worker_records_the_bytes_in_each_shards_stats(planned, monkeypatch, tmp_path):
    m, p = planned
    need = p.cat_cache["cat-wide"]["total"]
    monkeypatch.setattr(cache_memory, "free_bytes", lambda device: need)  # fits exactly
    worker = Worker(m, p.model_source)
    assert worker.cat_cache == p.cat_cache
    by_variant = {t.variant: t for t in p.pending}  # before prepare_output: every task
    for variant in ("cat", "full"):
        worker.run_task(by_variant[variant], p.layout)
        stats = p.layout.read_json(p.layout.shard_stats(variant, by_variant[variant].shard.name))
        extra = stats["extra"]
        assert extra.get("cat_cache_bytes") == p.cat_cache.get(variant)


def test_cpu_free_memory_is_the_hosts_available_memory():
    free = cache_memory.free_bytes("cpu")
    assert free is None or 0 < free < 1 << 50
