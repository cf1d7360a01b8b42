"""Per-image seeds and deterministic sharding."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from catbatch.job.driver import all_tasks
from catbatch.job.manifest import parse_manifest
from catbatch.job.prompts import PromptSource
from catbatch.job.seeds import image_generator, image_seed
from catbatch.job.shardindex import build_index
from catbatch.job.sharding import content_hash


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


def _index(tmp_path: Path, prompts: list[str], shard_size: int, name: str = "p.txt"):
    path = tmp_path / name
    path.write_text("".join(f"{p}\n" for p in prompts))
    return build_index(PromptSource(path=str(path)), None, shard_size)


def test_shards_are_fixed_size_and_ordered(tmp_path):
    prompts = [f"prompt {i}" for i in range(10)]
    index = _index(tmp_path, prompts, 4)
    shards = [index.read(i) for i in range(index.n_shards)]
    assert [len(s) for s in shards] == [index.size(i) for i in range(3)] == [4, 4, 2]
    assert [p.prompt for s in shards for p in s] == prompts
    assert [index.ref(i).name for i in range(3)] == ["shard-00000", "shard-00001", "shard-00002"]


def test_appending_prompts_keeps_full_shards(tmp_path):
    prompts = [f"prompt {i}" for i in range(11)]
    a, b = _index(tmp_path, prompts[:8], 4, "a.txt"), _index(tmp_path, prompts, 4, "b.txt")
    assert a.n_shards == 2 and b.n_shards == 3
    same_name = _index(tmp_path, prompts[:8], 4, "b.txt")  # ids come from the name and row
    assert [same_name.content_hash(i) for i in range(2)] == [b.content_hash(i) for i in range(2)]
    changed = _index(tmp_path, [*prompts[:5], "other", *prompts[6:8]], 4, "b.txt")
    assert changed.content_hash(0) == same_name.content_hash(0)
    assert changed.content_hash(1) != same_name.content_hash(1)
    assert changed.content_hash(1) == content_hash(changed.read(1))


def test_tasks_cover_every_variant_and_shard_once(tmp_path):
    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(5)))
    m = parse_manifest(MANIFEST, base_dir=str(tmp_path))
    tasks = all_tasks(m, build_index(m.prompts, m.base_dir, m.shard_size))
    keys = [t.key for t in tasks]
    assert len(keys) == len(set(keys)) == 6
    assert keys[:2] == ["full/shard-00000", "cat/shard-00000"]
    assert tasks[0].shard == tasks[1].shard and tasks.prompts() == 2 * 5


def test_the_pools_queue_puts_back_first_and_retries_last_taking_the_list_lazily():
    """Tasks put back go first (in order), then the rest of the list, then retries; the list is
    read one task at a time (a compact list is never copied whole)."""
    from catbatch.job.distributor import _Queue

    class Listed(list):
        read: list[int] = []

        def __getitem__(self, i):
            self.read.append(i)
            return super().__getitem__(i)

    queue = _Queue(Listed("abcde"))
    assert (queue.popleft(), queue.popleft(), len(queue)) == ("a", "b", 3)
    assert Listed.read == [0, 1]
    queue.append("b")  # b failed: retried after the rest
    queue.extendleft(["x", "y"])  # put back unstarted
    assert list(queue) == ["x", "y", "c", "d", "e", "b"] and len(queue) == 6
    assert [queue.popleft() for _ in range(6)] == ["x", "y", "c", "d", "e", "b"] and not queue


MANIFEST = """\
name: t
model: {id: tiny-sd3}
prompts: {path: p.txt}
shard_size: 2
variants: [{name: full, pruning: none}, {name: cat, pruning: {alpha: 0.5}}]
output: out
"""
