"""Per-image seeds and deterministic sharding."""

from __future__ import annotations

import hashlib

import torch

from catbatch.job.prompts import Prompt
from catbatch.job.seeds import image_generator, image_seed
from catbatch.job.sharding import make_shards, make_tasks


def test_image_seed_is_the_documented_hash():
    digest = hashlib.sha256(b"7\x00abc\x002").digest()
    assert image_seed(7, "abc", 2) == int.from_bytes(digest[:8], "big") & (2**63 - 1)


def test_image_seeds_differ_and_fit_63_bits():
    seeds = {image_seed(0, f"id{i}", j) for i in range(50) for j in range(4)}
    assert len(seeds) == 200
    assert all(0 <= s < 2**63 for s in seeds)
    assert image_seed(1, "id0", 0) != image_seed(0, "id0", 0)


def test_generator_is_reproducible():
    a = torch.randn(4, generator=image_generator(image_seed(0, "x", 0)))
    b = torch.randn(4, generator=image_generator(image_seed(0, "x", 0)))
    c = torch.randn(4, generator=image_generator(image_seed(0, "x", 1)))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _prompts(n: int) -> list[Prompt]:
    return [Prompt(f"s{i}", f"prompt {i}", {}, i) for i in range(n)]


def test_shards_are_fixed_size_and_ordered():
    shards = make_shards(_prompts(10), 4)
    assert [len(s.prompts) for s in shards] == [4, 4, 2]
    assert [p.sample_id for s in shards for p in s.prompts] == [f"s{i}" for i in range(10)]
    assert [s.name for s in shards] == ["shard-00000", "shard-00001", "shard-00002"]


def test_appending_prompts_keeps_full_shards():
    a, b = make_shards(_prompts(8), 4), make_shards(_prompts(11), 4)
    assert [s.content_hash for s in a] == [s.content_hash for s in b[:2]]
    changed = _prompts(8)
    changed[5] = Prompt("s5", "other", {}, 5)
    assert make_shards(changed, 4)[1].content_hash != a[1].content_hash


def test_tasks_cover_every_variant_and_shard_once():
    tasks = make_tasks(["full", "cat"], make_shards(_prompts(5), 2))
    keys = [t.key for t in tasks]
    assert len(keys) == len(set(keys)) == 6
    assert keys[:2] == ["full/shard-00000", "cat/shard-00000"]
