#!/usr/bin/env python3
"""Copy a folder of model files (any fsspec URL: s3://bucket/models, a local path) to a local
folder, file by file: only files that are missing there or of another size, each written to a
temporary name and renamed, so a stopped copy resumes and a reader never sees half a file.

    python jobs/sync_models.py s3://my-bucket/models /models

Used by infra/k8s/models-sync.yaml to fill the weights volume. Symlinks in the source (a local
Hugging Face cache) are followed: the copies are plain files, which the hub's offline lookup
reads the same way. Exit 0 when everything is there, 1 when a file could not be copied.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import fsspec


def sync(src: str, dst: Path, say=print) -> tuple[int, int, list[str]]:
    """(copied, already there, failed relative paths) for every file under ``src``."""
    fs, root = fsspec.core.url_to_fs(src)
    root = root.rstrip("/")
    copied = kept = 0
    failed: list[str] = []
    for path, info in sorted(fs.find(root, detail=True).items()):
        rel = path[len(root) :].lstrip("/")
        target = dst / rel
        size = info.get("size")
        if target.is_file() and size is not None and target.stat().st_size == size:
            kept += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        try:
            fs.get_file(path, str(tmp))
            os.replace(tmp, target)
        except OSError as e:
            say(f"{path}: {e}")
            failed.append(rel)
            tmp.unlink(missing_ok=True)
            continue
        copied += 1
        say(f"copied {rel} ({size} bytes)")
    return copied, kept, failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="Source folder: s3://bucket/prefix or a local path.")
    p.add_argument("dst", type=Path, help="Local destination folder.")
    a = p.parse_args(argv)
    copied, kept, failed = sync(a.src, a.dst)
    print(f"{a.src} -> {a.dst}: {copied} copied, {kept} already there, {len(failed)} failed")
    if not copied + kept + len(failed):
        print(f"{a.src}: no files found", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
