"""cluster.yaml and the KubeRay manifests, validated offline with Ray's own validators."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

REPO = Path(__file__).resolve().parents[1]


def _cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_cluster()))
    validate_config(prepared)  # raises on a schema error
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    gpu = {name: t["node_config"]["InstanceType"] for name, t in types.items() if name != "head"}
    assert gpu["gpu_a10g"].startswith("g5.") and gpu["gpu_a100"].startswith("p4d.")
    for name in gpu:
        assert types[name]["min_workers"] == 0 < types[name]["max_workers"]


def test_cluster_yaml_rejects_a_typo_like_rays_validator_does():
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = _cluster()
    bad["available_node_types"]["gpu_a10g"]["max_worker"] = 4  # typo for max_workers
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(bad))


def test_cluster_installs_the_pinned_project_and_opens_no_extra_ports():
    cfg = _cluster()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    setup = cfg["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==" in c)
    project_at = next(i for i, c in enumerate(setup) if "llava-platform" in c)
    assert torch_at < project_at and f"@v{version}" in setup[project_at]
    assert "IpPermissions" not in str(cfg["provider"].get("security_group", {}))
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "mlflow/start.sh" in head
    assert all("MLFLOW_TRACKING_URI" in " ".join(cfg[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    assert (REPO / "infra" / "mlflow" / "start.sh").exists() and (REPO / "infra" / "docker" / "Dockerfile").exists()


def _manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((REPO / "infra" / "kuberay").glob("*.yaml"))}


def test_kuberay_manifests_parse_and_pin_the_ray_version():
    docs = _manifests()
    assert {d["kind"] for d in docs.values()} == {"RayCluster", "RayJob", "RayService"}
    for name, d in docs.items():
        assert d["apiVersion"] == "ray.io/v1", name
        spec = d["spec"].get("rayClusterSpec") or d["spec"].get("rayClusterConfig") or d["spec"]
        assert spec["rayVersion"] == "2.60.0", name
        images = {c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
                  for c in g["template"]["spec"]["containers"]}
        assert images == {"llava-platform:0.1.0"}, name
    job = docs["rayjob-finetune.yaml"]["spec"]
    assert job["entrypoint"].startswith("python jobs/finetune.py --config jobs/configs/")
    assert (REPO / job["entrypoint"].split("--config ")[1]).exists()


def test_rayservice_embeds_the_cluster_serve_config_and_it_validates():
    embedded = yaml.safe_load(_manifests()["rayservice.yaml"]["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    shipped = yaml.safe_load((REPO / "serve_apps" / "serve_config_cluster.yaml").read_text())
    assert embedded["applications"] == shipped["applications"]


def test_the_api_key_reaches_every_node_from_a_secret_never_from_the_repository():
    """The Gateway (API and chat page) reads LLAVA_API_KEY; on a cluster it comes from a file the
    user keeps out of git (rsynced with infra/), on Kubernetes from an optional Secret."""
    cfg = _cluster()
    mounted = {v.removeprefix("./"): k for k, v in cfg["file_mounts"].items()}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cfg[key] if "ray start" in c)
        assert f"export LLAVA_API_KEY=$(cat {mounted['infra']}/secrets/api_key 2>/dev/null)" in start, key
        assert start.index("LLAVA_API_KEY") < start.index("ray start"), key
    assert "infra/secrets/" in (REPO / ".gitignore").read_text().split()
    spec = _manifests()["rayservice.yaml"]["spec"]["rayClusterConfig"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        env = {e["name"]: e for c in group["template"]["spec"]["containers"] for e in c.get("env", [])}
        assert env["LLAVA_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "llava-api-key", "key": "api-key",
                                                                     "optional": True}
    assert "api_key" not in str(yaml.safe_load((REPO / "serve_apps" / "serve_config_cluster.yaml").read_text()))
