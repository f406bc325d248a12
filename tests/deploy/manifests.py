"""Reading the Kubernetes manifests under deploy/kubernetes/: documents, the forwarder's container, its config.

Shared by the deploy tests (tests/deploy/test_deploy.py, test_deploy_auth.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from forwarder import config as forwarder_config

KUBERNETES = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
SIDECAR = KUBERNETES / "sidecar"
CENTRAL = KUBERNETES / "central"
SIDECAR_CHAINED = KUBERNETES / "sidecar-chained"  # a sidecar sending to the central tier


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def tier_documents(tier: Path) -> list[dict[str, Any]]:
    return [d for path in sorted(tier.glob("*.yaml")) for d in documents(path)]


def find(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def workload(tier: Path) -> dict[str, Any]:
    (doc,) = [d for d in tier_documents(tier) if d["kind"] in ("Deployment", "StatefulSet")]
    return doc


def forwarder_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod_spec.get("initContainers", []) + pod_spec["containers"]
                    if c["name"] == "forwarder"]
    return container


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def mounted_config(tier: Path) -> tuple[Path, dict[str, str]]:
    """The TOML text of the ConfigMap the forwarder mounts, and the mount path of its file."""
    spec = workload(tier)["spec"]["template"]["spec"]
    container = forwarder_container(spec)
    config_arg = container["args"][container["args"].index("--config") + 1]
    mount = next(m for m in container["volumeMounts"] if config_arg.startswith(m["mountPath"] + "/"))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    configmap = next(d for d in find(tier_documents(tier), "ConfigMap")
                     if d["metadata"]["name"] == volume["configMap"]["name"])
    return Path(config_arg), configmap["data"]


def tier_config(tier: Path, tmp_path: Path) -> forwarder_config.Config:
    config_path, data = mounted_config(tier)
    path = tmp_path / config_path.name
    path.write_text(data[config_path.name])
    env = {k: v for k, v in container_env(forwarder_container(workload(tier)["spec"]["template"]["spec"])).items()
           if k.startswith("FORWARDER_")}
    return forwarder_config.load(path, environ=env)
