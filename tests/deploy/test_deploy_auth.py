"""The central tier's authentication, NetworkPolicy and the chaining sidecar: cross-file facts of deploy/kubernetes/.

kubernetes-validate (tests/deploy/test_deploy.py) checks each document's schema;
these check that the documents agree with each other and with the daemon.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from forwarder.intake.auth import load_credentials
from tests.deploy.manifests import (CENTRAL, SIDECAR_CHAINED, container_env, find, forwarder_container, tier_config,
                                    tier_documents, workload)


def central_secret_credentials(tmp_path: Path) -> dict[str, str]:
    """The key pairs of the Secret the central tier mounts as intake.credentials_file, parsed by the daemon."""
    config = tier_config(CENTRAL, tmp_path)
    spec = workload(CENTRAL)["spec"]["template"]["spec"]
    path = Path(config.intake.credentials_file)
    mount = next(m for m in forwarder_container(spec)["volumeMounts"] if m["mountPath"] == str(path.parent))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    secret = next(d for d in find(tier_documents(CENTRAL), "Secret")
                  if d["metadata"]["name"] == volume["secret"]["secretName"])
    copy = tmp_path / "credentials"
    copy.write_text(secret["stringData"][path.name])
    return load_credentials(str(copy))


def test_central_tier_requires_sigv4_against_its_mounted_secret(tmp_path: Path) -> None:
    assert tier_config(CENTRAL, tmp_path).intake.auth == "sigv4"
    assert len(central_secret_credentials(tmp_path)) >= 2  # one pair per client team, for revocation


def test_central_secret_is_mounted_as_a_directory_so_rotation_reaches_the_pod() -> None:
    container = forwarder_container(workload(CENTRAL)["spec"]["template"]["spec"])
    volumes = {v["name"]: v for v in workload(CENTRAL)["spec"]["template"]["spec"]["volumes"]}
    secret_mounts = [m for m in container["volumeMounts"] if "secret" in volumes.get(m["name"], {})]
    assert secret_mounts and all("subPath" not in m for m in secret_mounts)  # subPath mounts never update
    assert all(volumes[m["name"]]["secret"]["defaultMode"] & 0o007 == 0 for m in secret_mounts)


def test_network_policy_admits_labelled_clients_to_the_intake_and_prometheus_to_metrics(tmp_path: Path) -> None:
    (policy,) = find(tier_documents(CENTRAL), "NetworkPolicy")
    template = workload(CENTRAL)["spec"]["template"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["name"]: p["containerPort"] for p in forwarder_container(template["spec"])["ports"]}
    config = tier_config(CENTRAL, tmp_path)
    rules = {rule["ports"][0]["port"]: rule for rule in policy["spec"]["ingress"]}
    assert set(rules) == {"http", "metrics"} and ports["http"] == config.intake.port
    assert ports["metrics"] == config.metrics.port
    for rule in rules.values():
        assert rule["from"] and all(peer.get("podSelector", {}).get("matchLabels") for peer in rule["from"])
    (client,) = rules["http"]["from"]
    assert client["podSelector"]["matchLabels"] == {"forwarder-client": "true"}


def test_chained_sidecar_sends_to_the_central_service_in_its_region(tmp_path: Path) -> None:
    config = tier_config(SIDECAR_CHAINED, tmp_path)
    url = urlsplit(config.evidently.endpoint_url)
    services = {s["metadata"]["name"]: s for s in find(tier_documents(CENTRAL), "Service")}
    assert url.hostname.split(".")[0] in services  # type: ignore[union-attr]
    assert url.port in {p["port"] for p in services[url.hostname.split(".")[0]]["spec"]["ports"]}  # type: ignore[union-attr]
    central_env = container_env(forwarder_container(workload(CENTRAL)["spec"]["template"]["spec"]))
    assert config.evidently.region == central_env["FORWARDER_EVIDENTLY__REGION"]  # the SigV4 scope it checks


def test_chained_sidecar_signs_with_a_key_pair_the_central_tier_accepts(tmp_path: Path) -> None:
    spec = workload(SIDECAR_CHAINED)["spec"]["template"]
    assert spec["metadata"]["labels"]["forwarder-client"] == "true"  # what the NetworkPolicy admits
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in forwarder_container(spec["spec"])["env"]
           if "valueFrom" in e}
    secrets = {s["metadata"]["name"]: s["stringData"] for s in find(tier_documents(SIDECAR_CHAINED), "Secret")}
    key = secrets[env["AWS_ACCESS_KEY_ID"]["name"]][env["AWS_ACCESS_KEY_ID"]["key"]]
    secret = secrets[env["AWS_SECRET_ACCESS_KEY"]["name"]][env["AWS_SECRET_ACCESS_KEY"]["key"]]
    assert central_secret_credentials(tmp_path)[key] == secret


def test_central_tier_serves_tls_from_a_mounted_tls_secret_and_probes_over_https(tmp_path: Path) -> None:
    config = tier_config(CENTRAL, tmp_path)
    spec = workload(CENTRAL)["spec"]["template"]["spec"]
    container = forwarder_container(spec)
    cert, key = Path(config.intake.tls_cert_file), Path(config.intake.tls_key_file)
    assert cert.parent == key.parent
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(cert.parent))
    assert "subPath" not in mount  # renewals reach the pod; SIGHUP loads them
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    secret = next(d for d in find(tier_documents(CENTRAL), "Secret")
                  if d["metadata"]["name"] == volume["secret"]["secretName"])
    assert secret["type"] == "kubernetes.io/tls" and {cert.name, key.name} == set(secret["stringData"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"


def test_chained_sidecar_reaches_the_central_tier_over_https_trusting_its_ca(tmp_path: Path) -> None:
    assert urlsplit(tier_config(SIDECAR_CHAINED, tmp_path).evidently.endpoint_url).scheme == "https"
    spec = workload(SIDECAR_CHAINED)["spec"]["template"]["spec"]
    container = forwarder_container(spec)
    bundle = Path(container_env(container)["AWS_CA_BUNDLE"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(bundle.parent))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    ca = next(d for d in find(tier_documents(SIDECAR_CHAINED), "ConfigMap")
              if d["metadata"]["name"] == volume["configMap"]["name"])
    assert "BEGIN CERTIFICATE" in ca["data"][bundle.name]
