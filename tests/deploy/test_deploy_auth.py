"""The central tier's mutual TLS, NetworkPolicy and the chaining sidecar: cross-file facts of deploy/kubernetes/.

kubernetes-validate (tests/deploy/test_deploy.py) checks each document's schema;
these check that the documents agree with each other and with the daemon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from forwarder.intake.auth import certificate_identities, identity_allowed
from tests.deploy.manifests import (CENTRAL, SIDECAR_CHAINED, container_env, find, forwarder_container, tier_config,
                                    tier_documents, workload)


def mounted_volume(spec: dict[str, Any], path: Path) -> dict[str, Any]:
    """The volume the forwarder container mounts at ``path``'s directory (a directory mount: renewals reach it)."""
    mount = next(m for m in forwarder_container(spec)["volumeMounts"] if m["mountPath"] == str(path.parent))
    assert "subPath" not in mount  # a subPath mount is never updated by the kubelet
    return next(v for v in spec["volumes"] if v["name"] == mount["name"])


def certificate_for_secret(tier: Path, secret_name: str) -> dict[str, Any]:
    """The cert-manager Certificate that writes the Secret ``secret_name``."""
    (certificate,) = [c for c in find(tier_documents(tier), "Certificate") if c["spec"]["secretName"] == secret_name]
    return certificate


def trust_bundle() -> dict[str, Any]:
    (bundle,) = find(tier_documents(CENTRAL), "Bundle")
    return bundle


def test_central_tier_requires_client_certificates_from_the_trust_bundle(tmp_path: Path) -> None:
    config = tier_config(CENTRAL, tmp_path)
    assert config.intake.auth == "mtls" and config.intake.tls_allowed_identities
    volume = mounted_volume(workload(CENTRAL)["spec"]["template"]["spec"], Path(config.intake.tls_client_ca_file))
    bundle = trust_bundle()
    # trust-manager names the ConfigMap it writes after the Bundle.
    assert volume["configMap"]["name"] == bundle["metadata"]["name"]
    assert Path(config.intake.tls_client_ca_file).name == bundle["spec"]["target"]["configMap"]["key"]


def test_every_certificate_comes_from_the_ca_whose_certificate_is_the_trust_bundle() -> None:
    issuers = {i["metadata"]["name"]: i for i in find(tier_documents(CENTRAL), "ClusterIssuer")}
    ca_secret = issuers["forwarder-ca"]["spec"]["ca"]["secretName"]
    assert trust_bundle()["spec"]["sources"] == [{"secret": {"name": ca_secret, "key": "ca.crt"}}]
    for tier in (CENTRAL, SIDECAR_CHAINED):
        for certificate in find(tier_documents(tier), "Certificate"):
            if certificate["spec"].get("isCA"):
                continue
            assert certificate["spec"]["issuerRef"]["name"] == "forwarder-ca"
            assert certificate["spec"]["privateKey"]["rotationPolicy"] == "Always"


def test_central_secret_mounts_are_directories_readable_by_the_forwarders_group_only() -> None:
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
    assert config.evidently.region == central_env["FORWARDER_EVIDENTLY__REGION"]  # else refused per event


def test_chained_sidecar_presents_a_certificate_whose_identity_the_central_tier_admits(tmp_path: Path) -> None:
    template = workload(SIDECAR_CHAINED)["spec"]["template"]
    assert template["metadata"]["labels"]["forwarder-client"] == "true"  # what the NetworkPolicy admits
    config = tier_config(SIDECAR_CHAINED, tmp_path)
    assert config.evidently.sign_requests is False  # the certificate is the credential
    assert "AWS_ACCESS_KEY_ID" not in {e["name"] for e in forwarder_container(template["spec"]).get("env", [])}
    cert, key = Path(config.evidently.client_cert_file), Path(config.evidently.client_key_file)
    assert cert.parent == key.parent
    volume = mounted_volume(template["spec"], cert)
    certificate = certificate_for_secret(SIDECAR_CHAINED, volume["secret"]["secretName"])
    assert {cert.name, key.name} == {"tls.crt", "tls.key"}  # what cert-manager writes
    assert certificate["spec"]["usages"] == ["client auth"]
    identities = certificate_identities({"subjectAltName": [("URI", u) for u in certificate["spec"]["uris"]]})
    assert identity_allowed(identities, tier_config(CENTRAL, tmp_path).intake.tls_allowed_identities)


def test_central_tier_serves_tls_from_a_certificate_of_its_service_name_and_probes_over_https(tmp_path: Path) -> None:
    config = tier_config(CENTRAL, tmp_path)
    spec = workload(CENTRAL)["spec"]["template"]["spec"]
    cert, key = Path(config.intake.tls_cert_file), Path(config.intake.tls_key_file)
    assert cert.parent == key.parent and {cert.name, key.name} == {"tls.crt", "tls.key"}
    certificate = certificate_for_secret(CENTRAL, mounted_volume(spec, cert)["secret"]["secretName"])
    assert certificate["spec"]["usages"] == ["server auth"]
    endpoint = urlsplit(tier_config(SIDECAR_CHAINED, tmp_path).evidently.endpoint_url).hostname
    assert endpoint in certificate["spec"]["dnsNames"]  # the name the sidecars check
    container = forwarder_container(spec)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"  # no client certificate needed for probes


def test_chained_sidecar_reaches_the_central_tier_over_https_trusting_the_bundle(tmp_path: Path) -> None:
    assert urlsplit(tier_config(SIDECAR_CHAINED, tmp_path).evidently.endpoint_url).scheme == "https"
    spec = workload(SIDECAR_CHAINED)["spec"]["template"]["spec"]
    bundle = Path(container_env(forwarder_container(spec))["AWS_CA_BUNDLE"])
    volume = mounted_volume(spec, bundle)
    assert volume["configMap"]["name"] == trust_bundle()["metadata"]["name"]
    assert bundle.name == trust_bundle()["spec"]["target"]["configMap"]["key"]
