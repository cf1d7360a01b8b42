"""infra/ and the cluster docs against the package: image, pins, GPU resources, entrypoints,
schedule. Parsing only: no Docker, no Kubernetes, no Ray cluster."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
README = ROOT / "README.md"


def cluster_section() -> str:
    """The README's "Running on your cluster" section, up to the next section."""
    text = README.read_text()
    start = text.index("## Running on your cluster")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


FROM_RE = re.compile(r"^FROM\s+rayproject/ray:(?P<ray>[\w.]+)-py(?P<py>\d+)-gpu\s*$", re.M)


def _yaml(rel: str) -> dict:
    return yaml.safe_load((INFRA / rel).read_text())


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (INFRA / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not name==version"
            assert canonicalize_name(name) not in pins, f"{name} pinned twice"
            pins[canonicalize_name(name)] = version
    return pins


def _dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text()


def _base() -> re.Match:
    m = FROM_RE.search(_dockerfile())
    assert m, "infra/Dockerfile must start FROM rayproject/ray:<ray>-py<python>-gpu"
    return m


def _workdir() -> str:
    return re.findall(r"^WORKDIR\s+(\S+)", _dockerfile(), re.M)[-1]


def _image() -> str:
    version = _pyproject()["project"]["version"]
    base = _base()
    return f"registry.example.com/catbatch:{version}-ray{base['ray']}-py{base['py']}-gpu"


def _pods(doc: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of a RayCluster spec: the head, then each worker group."""
    pods = [("head", doc["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in doc["workerGroupSpecs"]]
    return pods


def _cluster_specs() -> list[tuple[str, dict]]:
    return [
        ("kuberay/raycluster.yaml", _yaml("kuberay/raycluster.yaml")["spec"]),
        ("kuberay/rayjob.yaml", _yaml("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]),
    ]


def _manifest_in_image(path: str) -> Path:
    """The repository file that an absolute path inside the image was copied from."""
    prefix = _workdir().rstrip("/") + "/"
    assert path.startswith(prefix), f"{path} is not under the image's WORKDIR {prefix}"
    local = ROOT / path.removeprefix(prefix)
    assert local.is_file(), f"{path}: no {local.relative_to(ROOT)} in the repository"
    return local


def _check_submit_args(args: list[str]) -> dict:
    """Parse `catbatch submit` arguments with the real CLI (nothing runs); return its params."""
    from catbatch.cli import submit

    return submit.make_context("submit", list(args)).params


# ------------------------------------------------------------------------------------------
# Dockerfile and pins
# ------------------------------------------------------------------------------------------


def test_ray_pin_matches_installed_ray_and_base_image():
    installed = importlib.metadata.version("ray")
    assert _pins()["ray"] == installed
    assert _base()["ray"] == installed
    assert f"ray.__version__ == '{installed}'" in _dockerfile()  # the build checks it too


def test_pins_cover_the_package_requirements_and_satisfy_them():
    project = _pyproject()["project"]
    pins = _pins()
    reqs = [
        Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["s3"]
    ]
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in infra/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]}: {req}"
    torch_pair = re.search(r"^TORCH_PAIR \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
    for pair in torch_pair.group(1).split():
        name, version = pair.split("==")
        assert pins[name] == version, f"{name}: Makefile {version}, constraints {pins[name]}"


def test_dockerfile_installs_catbatch_with_s3_under_the_pins():
    text = _dockerfile()
    assert _base()["py"] == "311"
    runs = " ".join(re.findall(r"^RUN\s+(.+?)(?<!\\)$", text.replace("\\\n", " "), re.M))
    assert 'pip install -c infra/constraints.txt ".[s3]"' in runs
    assert "catbatch --version" in runs
    for path in ("pyproject.toml", "catbatch", "manifests", "jobs", "infra/constraints.txt"):
        assert re.search(rf"^COPY\s.*\b{re.escape(path)}\s", text, re.M), f"COPY {path}"
        assert (ROOT / path).exists()
    assert "ENV HF_HUB_OFFLINE=1" in text
    assert f"-t {_image()} ." in text  # the build command in its header uses the tag convention


# ------------------------------------------------------------------------------------------
# KubeRay and the CronJob
# ------------------------------------------------------------------------------------------


def test_every_kubernetes_image_is_the_dockerfile_image():
    images = []
    for _, spec in _cluster_specs():
        images += [c["image"] for _, pod in _pods(spec) for c in pod["containers"]]
    cron = _yaml("k8s/cronjob.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    images += [c["image"] for c in cron["containers"]]
    assert len(images) >= 5 and set(images) == {_image()}


@pytest.mark.parametrize("rel", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_gpu_worker_groups_fit_the_coco_manifest(rel):
    from catbatch.job.manifest import load_manifest

    m = load_manifest(ROOT / "manifests/coco.yaml")
    assert _yaml(rel)["apiVersion"] == "ray.io/v1"
    spec = dict(_cluster_specs())[rel]
    assert spec["rayVersion"] == _pins()["ray"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # actors never land on the head
    assert all(
        "nvidia.com/gpu" not in c["resources"]["limits"] for c in _pods(spec)[0][1]["containers"]
    )
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        (c,) = g["template"]["spec"]["containers"]
        res = c["resources"]
        gpus = int(res["limits"]["nvidia.com/gpu"])
        assert gpus >= 1 and res["requests"]["nvidia.com/gpu"] == gpus
        actors = gpus / m.ray.resources.gpus
        assert float(res["limits"]["cpu"]) >= actors * m.ray.resources.cpus, "too few CPUs"
        if m.ray.actors == "auto":  # counted when the job starts: the group must not scale
            assert g["replicas"] == g["minReplicas"] == g["maxReplicas"]
    (head_container,) = _pods(spec)[0][1]["containers"]
    env = {e["name"]: e["value"] for e in head_container.get("env", [])}
    assert float(env["RAY_JOB_STOP_WAIT_TIME_S"]) > m.ray.stop_grace_s  # SIGTERM before SIGKILL
    for name, pod in _pods(spec):  # the same model folder on the driver and every actor
        mounts = {v["mountPath"]: v["name"] for c in pod["containers"] for v in c["volumeMounts"]}
        assert mounts.get("/models") == "models", name
        claim = {v["name"]: v for v in pod["volumes"]}["models"]["persistentVolumeClaim"]
        assert claim["claimName"] == "catbatch-models"


def test_rayjob_entrypoint_submits_a_repository_manifest_into_the_cluster():
    spec = _yaml("kuberay/rayjob.yaml")["spec"]
    args = shlex.split(spec["entrypoint"])
    assert args[:2] == ["catbatch", "submit"]
    _manifest_in_image(args[2])
    assert _check_submit_args(args[2:])["address"] == "auto"
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert spec["shutdownAfterJobFinishes"] is True


_CRON_FIELDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def _cron_field_ok(field: str, lo: int, hi: int) -> bool:
    for part in field.split(","):
        base, _, step = part.partition("/")
        if step and not (step.isdigit() and int(step) > 0):
            return False
        if base == "*":
            continue
        ends = base.split("-")
        if len(ends) > 2 or not all(e.isdigit() and lo <= int(e) <= hi for e in ends):
            return False
    return True


@pytest.mark.parametrize(
    ("expr", "ok"),
    [("0 1 * * *", True), ("*/15 0-6 1,15 * 1-5", True), ("0 24 * * *", False), ("0 1 * *", False)],
)
def test_cron_checker(expr, ok):
    fields = expr.split()
    valid = len(fields) == 5 and all(
        _cron_field_ok(f, lo, hi) for f, (lo, hi) in zip(fields, _CRON_FIELDS, strict=False)
    )
    assert valid == ok


def test_cronjob_submits_the_nightly_entrypoint_to_the_raycluster():
    cron = _yaml("k8s/cronjob.yaml")
    assert cron["apiVersion"] == "batch/v1" and cron["kind"] == "CronJob"
    spec = cron["spec"]
    fields = spec["schedule"].split()
    assert len(fields) == 5
    assert all(_cron_field_ok(f, lo, hi) for f, (lo, hi) in zip(fields, _CRON_FIELDS, strict=True))
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    cmd = c["command"] + c.get("args", [])
    assert cmd[:3] == ["ray", "job", "submit"]
    head = _yaml("kuberay/raycluster.yaml")["metadata"]["name"] + "-head-svc"
    assert cmd[cmd.index("--address") + 1] == f"http://{head}:8265"
    env = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    entry = cmd[cmd.index("--") + 1 :]
    assert entry[0] == "python" and _manifest_in_image(entry[1]).name == "run_manifest.py"
    _manifest_in_image(entry[2])
    job = _load_run_manifest().parse_args(entry[2:])
    assert _check_submit_args([str(job.manifest), *job.submit_args])["address"] == "auto"


def _load_run_manifest():
    spec = importlib.util.spec_from_file_location("run_manifest", ROOT / "jobs/run_manifest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------
# Cluster launcher
# ------------------------------------------------------------------------------------------


def test_launcher_config_is_valid_and_installs_the_pinned_package():
    import jsonschema

    cfg = _yaml("launcher/aws.yaml")
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)

    from catbatch.job.manifest import load_manifest

    grace = load_manifest(ROOT / "manifests/coco.yaml").ray.stop_grace_s
    opts = " ".join(cfg["docker"]["run_options"])
    assert float(re.search(r"RAY_JOB_STOP_WAIT_TIME_S=(\d+)", opts).group(1)) > grace
    assert "-e HF_HUB_OFFLINE=1" in opts
    assert cfg["docker"]["image"] == f"rayproject/ray:{_base()['ray']}-py{_base()['py']}-gpu"
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if re.match(r"(g\d|p\d)", t["node_config"]["InstanceType"])]
    assert gpu, "no GPU node type (g*/p* instance)"
    for t in gpu:
        assert t["min_workers"] == t["max_workers"] >= 1  # actors: auto counts GPUs at start
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]

    src = _workdir()
    assert cfg["file_mounts"] == {src: "."}
    setup = " ".join(cfg["setup_commands"])
    assert f'pip install -q -c {src}/infra/constraints.txt "{src}[s3]"' in setup
    assert f"ray.__version__ == '{_pins()['ray']}'" in setup
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("--metrics-export-port=") == 2


# ------------------------------------------------------------------------------------------
# The "Running on your cluster" guide
# ------------------------------------------------------------------------------------------


def _doc_commands() -> list[list[str]]:
    """Every catbatch command line in the guide's shell blocks (also after `ray job submit --`)."""
    blocks = re.findall(r"```(?:bash|sh|console)\n(.*?)```", cluster_section(), re.S)
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            args = shlex.split(line)
            if "--" in args and args[:3] == ["ray", "job", "submit"]:
                args = args[args.index("--") + 1 :]
            if args and args[0] == "catbatch":
                out.append(args)
    return out


def test_guide_commands_parse_with_the_real_cli():
    from catbatch.cli import main

    cmds = _doc_commands()
    used = {c[1] for c in cmds}
    assert {"validate", "submit", "status", "report"} <= used
    for args in cmds:
        command = main.commands[args[1]]
        command.make_context(args[1], args[2:])  # raises on an unknown option or missing argument
    for args in cmds:
        for arg in args[2:]:
            if arg.startswith("manifests/"):
                assert (ROOT / arg).is_file(), arg


def test_guide_documents_the_ray_job_runtime_env():
    text = cluster_section()
    m = re.search(r"--runtime-env-json\s+'([^']+)'", text)
    assert m, "no `ray job submit --runtime-env-json '...'` in the guide"
    env = json.loads(m.group(1))
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert "## Running on your cluster" in text


def test_guide_names_the_exported_metrics_and_log_folder():
    observe = pytest.importorskip("catbatch.job.observe")
    text = cluster_section()
    named = set(re.findall(r"`ray_(catbatch_\w+)`", text))
    # Prometheus names: Ray adds the ray_ prefix, and _total to counters (Ray >= 2.10)
    kinds = {f"catbatch_{name}": kind for name, kind, _ in observe._METRICS}
    assert set(kinds) == set(observe.METRIC_NAMES)
    assert named == {n + ("_total" if k == "counter" else "") for n, k in kinds.items()}
    assert f"OUTPUT/{observe.LOG_DIR}/<run id>/driver.jsonl" in text
