"""Every runtime dependency in pyproject.toml is used: imported by the package, or named below
with what needs it. (scikit-learn, used only to check the engine's KMeans, is a test extra.)"""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]

IMPORT_NAMES = {"pyyaml": "yaml", "open-clip-torch": "open_clip", "pillow": "PIL"}
# needed at run time without an import of their own
INDIRECT = {"accelerate": "diffusers' model.memory.cpu_offload"}


def test_every_runtime_dependency_is_imported():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    source = "\n".join(p.read_text() for p in (ROOT / "catbatch").rglob("*.py"))
    unused = []
    for spec in project["dependencies"]:
        name = Requirement(spec).name.lower().replace("_", "-")
        if name in INDIRECT:
            continue
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        if not re.search(rf"^\s*(import|from) {re.escape(module)}\b", source, re.M):
            unused.append(name)
    assert unused == [], f"declared but never imported by catbatch: {unused}"
