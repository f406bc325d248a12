"""Static checks of the deployment files under deploy/.

Each external linter runs on the real file (systemd-analyze, hadolint,
kubernetes-validate, promtool); the cross-file facts they cannot see are
checked here: grace periods above the drain timeout, probes and ports that
match the forwarder config, and dashboards and alerts that only query metrics
the daemon exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from forwarder import config as forwarder_config
from tests.deploy.manifests import (CENTRAL, KUBERNETES, SIDECAR, SIDECAR_CHAINED, container_env, documents, find,
                                    forwarder_container, tier_config, tier_documents, workload)
from tests.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "forwarder.service"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
TIERS, TIER_IDS = [SIDECAR, CENTRAL, SIDECAR_CHAINED], ["sidecar", "central", "sidecar-chained"]
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
SCRAPE = DEPLOY / "prometheus" / "scrape.yml"
DASHBOARD = DEPLOY / "grafana" / "forwarder.json"

TOOL_TIMEOUT = 60  # seconds; every tool here answers in well under one

# Native sidecars (init containers with restartPolicy: Always) are on by
# default from 1.29; validate against that floor and a recent release.
KUBERNETES_VERSIONS = ("1.29", "1.32")

# Every series the daemon exports (histograms as their three series), plus the
# prometheus-client default collectors the dashboard uses and Prometheus' `up`.
FORWARDER_SERIES = frozenset({
    "forwarder_queue_depth", "forwarder_queue_bytes", "forwarder_oldest_event_age_seconds",
    "forwarder_events_received_total", "forwarder_events_rejected_total", "forwarder_events_sent_total",
    "forwarder_events_failed_total", "forwarder_events_dropped_total", "forwarder_batches_sent_total",
    "forwarder_batch_size_events_bucket", "forwarder_batch_size_events_sum", "forwarder_batch_size_events_count",
    "forwarder_throttled_total", "forwarder_retries_total",
    "forwarder_request_duration_seconds_bucket", "forwarder_request_duration_seconds_sum",
    "forwarder_request_duration_seconds_count",
    "forwarder_inflight_requests", "forwarder_send_rate", "forwarder_circuit_open", "forwarder_duplicates_total",
    "forwarder_buffer_corruptions_total", "forwarder_build_info", "forwarder_buffer_write_errors_total",
    "forwarder_outage", "forwarder_outage_seconds_total", "forwarder_outage_probes_total",
    "forwarder_dead_letter_write_errors_total", "forwarder_internal_errors_total",
    "forwarder_project_events_delivered_total", "forwarder_project_events_dead_lettered_total",
    "forwarder_datagrams_received_total", "forwarder_datagram_rejected_total", "forwarder_datagram_paused",
    "forwarder_intake_connections", "forwarder_intake_connection_limit",
    "forwarder_intake_connections_closed_total", "forwarder_intake_auth_refusals_total",
    "forwarder_intake_auth_credentials", "forwarder_intake_auth_reload_errors_total",
    "forwarder_delivery_age_seconds_bucket", "forwarder_delivery_age_seconds_sum",
    "forwarder_delivery_age_seconds_count", "forwarder_delivery_blocked",
})
DEFAULT_COLLECTOR_SERIES = frozenset({
    "process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
    "process_start_time_seconds", "process_open_fds", "process_max_fds",
    "python_info", "python_gc_objects_collected_total", "python_gc_objects_uncollectable_total",
    "python_gc_collections_total",
})
# Series exported only with a listener that has them (the UDP datagram socket).
LISTENER_SERIES = frozenset({"forwarder_datagram_kernel_drops_total"})
KNOWN_SERIES = FORWARDER_SERIES | LISTENER_SERIES | DEFAULT_COLLECTOR_SERIES | {"up"}


def run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)


def default_drain_timeout() -> float:
    return forwarder_config.load(None, environ={}).shutdown.drain_timeout


# --- PromQL -------------------------------------------------------------------

_PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (a tokenizer, not a parser: enough for our queries)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = re.findall(r"(?<![\w$.:])[a-zA-Z_:][\w:]*(?![\w:])(?!\s*\()", text)
    return {n for n in names if n.lower() not in _PROMQL_KEYWORDS}


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (reason) (rate(forwarder_events_rejected_total{job=~"$job"}[$__rate_interval]))',
     {"forwarder_events_rejected_total"}),
    ('histogram_quantile(0.99, sum by (le) (rate(forwarder_request_duration_seconds_bucket[5m])))',
     {"forwarder_request_duration_seconds_bucket"}),
    ('deriv(forwarder_queue_depth[10m]) > 0 and forwarder_queue_depth > 1000', {"forwarder_queue_depth"}),
    ('up{job=~".*forwarder.*"} == 0', {"up"}),
])
def test_promql_metric_names_finds_selected_metrics_only(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_documented_metrics_are_all_exported_by_the_daemon() -> None:
    from forwarder.observability import Metrics

    exported = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"]}
    for family in Metrics().registry.collect():
        for suffix in suffixes.get(family.type, [""]):
            exported.add(family.name + suffix)
    assert FORWARDER_SERIES - exported == set()


# --- systemd ------------------------------------------------------------------

def unit_settings(text: str) -> dict[str, list[str]]:
    """``Section.Key`` to every value assigned to it, in order (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def unit_environment(settings: dict[str, list[str]]) -> dict[str, str]:
    pairs = [p for value in settings.get("Service.Environment", []) for p in value.split()]
    return dict(p.split("=", 1) for p in pairs)


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    systemd_analyze = require_tool("systemd-analyze")
    # verify insists that ExecStart's binary exists: point the copy at the
    # installed entry point (or any executable) and change nothing else.
    executable = Path(sys.executable).parent / "forwarder"
    if not executable.exists():
        executable = Path(sys.executable)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/forwarder", str(executable)))

    result = run([systemd_analyze, "verify", "--man=no", "--recursive-errors=no", str(unit)], cwd=tmp_path)

    # Problems are printed, not always reflected in the exit status; lines about
    # other units (the host's own) are not ours to judge.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
    assert ours == []
    assert result.returncode == 0, result.stdout + result.stderr


def test_systemd_unit_exposure_is_at_most_1_3(tmp_path: Path) -> None:
    """`systemd-analyze security --offline`: today's exposure (1.3, "OK") or better."""
    systemd_analyze = require_tool("systemd-analyze")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/forwarder", sys.executable))
    result = run([systemd_analyze, "security", "--offline=yes", "--threshold=13", str(unit)], cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-500:]
    exposure = re.search(r"Overall exposure level for forwarder.service: (0\.\d|1\.[0-3]) ", result.stdout)
    assert exposure, result.stdout[-300:]


REQUIRED_UNIT_SETTINGS = {
    "Service.Type": "notify",
    "Service.NotifyAccess": "main",
    "Service.KillSignal": "SIGTERM",
    "Service.Restart": "on-failure",
    "Service.DynamicUser": "yes",
    "Service.StateDirectory": "forwarder",
    "Service.ProtectSystem": "strict",
    "Service.ProtectHome": "yes",
    "Service.NoNewPrivileges": "yes",
    "Service.PrivateTmp": "yes",
    "Service.PrivateDevices": "yes",
    "Service.CapabilityBoundingSet": "",
    "Service.RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "Install.WantedBy": "multi-user.target",
}


@pytest.mark.parametrize(("key", "value"), REQUIRED_UNIT_SETTINGS.items())
def test_systemd_unit_sets_lifecycle_and_sandboxing(key: str, value: str) -> None:
    assert unit_settings(UNIT.read_text()).get(key) == [value]


def test_systemd_unit_gives_the_drain_more_time_than_the_stop_timeout() -> None:
    settings = unit_settings(UNIT.read_text())
    assert float(settings["Service.TimeoutStopSec"][0]) > default_drain_timeout()


def test_systemd_unit_runs_the_daemon_and_reloads_with_sighup() -> None:
    settings = unit_settings(UNIT.read_text())
    (exec_start,) = settings["Service.ExecStart"]
    assert exec_start.startswith("/") and exec_start.split()[1:] == ["run", "--config", "/etc/forwarder/forwarder.toml"]
    assert settings["Service.ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    # Some Python builds and C extensions need writable+executable pages.
    assert "Service.MemoryDenyWriteExecute" not in settings


def test_systemd_unit_keeps_buffer_and_dead_letters_in_the_state_directory() -> None:
    settings = unit_settings(UNIT.read_text())
    state = Path("/var/lib") / settings["Service.StateDirectory"][0]
    config = forwarder_config.load(None, environ=unit_environment(settings))
    assert Path(config.buffer.path) == state
    assert Path(config.dead_letter.path).parent == state


# --- container ----------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    out = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (ins, _) in enumerate(instructions) if ins == "FROM"]
    return instructions[starts[-1]:]


def dockerfile_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for ins, args in stage:
        if ins == "ENV":
            env.update(p.split("=", 1) for p in args.split())
    return env


def test_dockerfile_passes_hadolint_without_findings() -> None:
    hadolint = require_tool("hadolint")
    result = run([hadolint, "--no-color", "--format", "json", str(DOCKERFILE)], cwd=ROOT)
    assert json.loads(result.stdout or "[]") == []
    assert result.returncode == 0, result.stderr


def test_dockerfile_builds_in_two_stages_from_a_pinned_slim_python() -> None:
    froms = [args for ins, args in dockerfile_instructions(DOCKERFILE.read_text()) if ins == "FROM"]
    assert len(froms) == 2
    for image in froms:
        assert re.match(r"python:3\.\d+-slim\S*( AS \w+)?$", image), image


def test_dockerfile_runtime_runs_as_numeric_non_root_user() -> None:
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    (user,) = [args for ins, args in stage if ins == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0


def test_dockerfile_runtime_has_healthcheck_stop_signal_and_entrypoint() -> None:
    stage = dict(final_stage(dockerfile_instructions(DOCKERFILE.read_text())))
    check = json.loads(stage["HEALTHCHECK"].split("CMD", 1)[1])
    assert check[:2] == ["forwarder", "healthcheck"] and json.loads(stage["CMD"])[1:] == check[2:4]
    assert stage["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(stage["ENTRYPOINT"]) == ["forwarder"]
    assert json.loads(stage["CMD"]) == ["run", "--config", "/etc/forwarder/forwarder.toml"]
    assert stage["EXPOSE"] == "8080"


def test_dockerfile_copies_only_paths_present_in_the_build_context() -> None:
    for ins, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if ins != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = [a for a in args.split() if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source {source} is missing from the repository root"


def test_dockerfile_default_config_listens_beyond_loopback_and_will_not_run_open() -> None:
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    env = {k: v for k, v in dockerfile_env(stage).items() if k.startswith("FORWARDER_")}
    (copy,) = [args for ins, args in stage if ins == "COPY" and args.endswith("/etc/forwarder/forwarder.toml")]
    with pytest.raises(forwarder_config.ConfigError, match="intake.auth"):
        forwarder_config.load(ROOT / copy.split()[0], environ=env)
    chosen = {**env, "FORWARDER_INTAKE__AUTH": "token", "FORWARDER_INTAKE__TOKEN_FILE": "/run/secrets/tokens"}
    config = forwarder_config.load(ROOT / copy.split()[0], environ=chosen)
    assert config.intake.host == "0.0.0.0"
    (volume,) = [json.loads(args) for ins, args in stage if ins == "VOLUME"]
    assert Path(config.buffer.path).as_posix() in volume
    assert Path(config.dead_letter.path).parent.as_posix() in volume


# --- Kubernetes ---------------------------------------------------------------

def kubernetes_files() -> list[Path]:
    return sorted(KUBERNETES.rglob("*.yaml"))


def quantity_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * units.get(unit, 1)


def test_kubernetes_manifests_pass_kubernetes_validate_strictly() -> None:
    validate = require_tool("kubernetes-validate")
    version_args = [a for v in KUBERNETES_VERSIONS for a in ("--kubernetes-version", v)]
    result = run([validate, "--strict", "--quiet", *version_args, *map(str, kubernetes_files())], cwd=ROOT)
    lines = (result.stdout + result.stderr).splitlines()
    # Only custom resources (no schema shipped for them) may be skipped with a WARN:
    # the Prometheus Operator's, cert-manager's and trust-manager's.
    custom = ("monitoring.coreos.com", "cert-manager.io/v1", "trust.cert-manager.io/v1alpha1")
    problems = [line for line in lines if not (line.startswith("WARN ") and any(api in line for api in custom))]
    assert problems == []
    assert result.returncode == 0


def test_custom_resources_have_api_version_kind_and_metadata() -> None:
    custom = [d for path in kubernetes_files() for d in documents(path) if "monitoring.coreos.com" in d["apiVersion"]]
    assert custom, "expected the PodMonitors"
    for doc in custom:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert doc["kind"] == "PodMonitor"
        assert doc["metadata"]["name"] and doc["spec"]["podMetricsEndpoints"]


@pytest.mark.parametrize("tier", TIERS, ids=TIER_IDS)
def test_podmonitor_selects_the_forwarder_pods_on_a_declared_port(tier: Path) -> None:
    (monitor,) = find(tier_documents(tier), "PodMonitor")
    template = workload(tier)["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "forwarder" in monitor["metadata"]["name"], "ForwarderDown matches job=~'.*forwarder.*'"
    ports = {p["name"] for p in forwarder_container(template["spec"]).get("ports", [])}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"


@pytest.mark.parametrize("tier", TIERS, ids=TIER_IDS)
def test_configmap_config_and_container_env_are_accepted_by_the_daemon(tier: Path, tmp_path: Path) -> None:
    config = tier_config(tier, tmp_path)
    assert config.buffer.type == "disk"


@pytest.mark.parametrize("tier", TIERS, ids=TIER_IDS)
def test_termination_grace_period_exceeds_the_configured_drain_timeout(tier: Path, tmp_path: Path) -> None:
    drain = tier_config(tier, tmp_path).shutdown.drain_timeout
    spec = workload(tier)["spec"]["template"]["spec"]
    pre_stop = forwarder_container(spec).get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_sleep = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
    assert spec["terminationGracePeriodSeconds"] > pre_stop_sleep + drain


@pytest.mark.parametrize("tier", TIERS, ids=TIER_IDS)
def test_forwarder_container_is_bounded_and_locked_down(tier: Path) -> None:
    spec = workload(tier)["spec"]["template"]["spec"]
    container = forwarder_container(spec)
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert spec["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("tier", TIERS, ids=TIER_IDS)
def test_buffer_volume_holds_the_buffer_and_dead_letters(tier: Path, tmp_path: Path) -> None:
    config = tier_config(tier, tmp_path)
    spec = workload(tier)
    container = forwarder_container(spec["spec"]["template"]["spec"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == config.buffer.path)
    assert Path(config.dead_letter.path).parent == Path(mount["mountPath"])
    volumes = {v["name"]: v for v in spec["spec"]["template"]["spec"].get("volumes", [])}
    claims = {c["metadata"]["name"]: c for c in spec["spec"].get("volumeClaimTemplates", [])}
    if mount["name"] in claims:
        size = claims[mount["name"]]["spec"]["resources"]["requests"]["storage"]
    else:
        size = volumes[mount["name"]]["emptyDir"]["sizeLimit"]
    # SQLite pages, indexes and WAL on top of the events' encoded size; the
    # dead-letter file plus its rotations <path>.1 .. <path>.5.
    assert quantity_bytes(size) > 1.5 * config.buffer.max_bytes + 6 * config.dead_letter.max_bytes


@pytest.mark.parametrize("tier", TIERS, ids=TIER_IDS)
def test_scrape_annotations_point_at_the_metrics_port(tier: Path, tmp_path: Path) -> None:
    config = tier_config(tier, tmp_path)
    template = workload(tier)["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    metrics_port = config.metrics.port or config.intake.port
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == metrics_port
    declared = {p["containerPort"] for p in forwarder_container(template["spec"])["ports"]}
    assert metrics_port in declared


def test_sidecar_forwarder_is_a_native_sidecar_on_loopback(tmp_path: Path) -> None:
    spec = workload(SIDECAR)["spec"]["template"]["spec"]
    (sidecar,) = [c for c in spec["initContainers"] if c["name"] == "forwarder"]
    assert sidecar["restartPolicy"] == "Always"
    assert tier_config(SIDECAR, tmp_path).intake.host == "127.0.0.1"
    app_env = {k: v for c in spec["containers"] for k, v in container_env(c).items()}
    assert "http://127.0.0.1:8080" in app_env.values()


def probe_path(probe: dict[str, Any]) -> str:
    """The URL path a probe requests, whether httpGet or an exec that fetches loopback."""
    if "httpGet" in probe:
        return probe["httpGet"]["path"]
    (url,) = re.findall(r"http://127\.0\.0\.1:\d+(/\w+)", " ".join(probe["exec"]["command"]))
    return url


def test_sidecar_probes_liveness_and_startup_on_healthz_without_gating_the_app_on_readyz() -> None:
    sidecar = forwarder_container(workload(SIDECAR)["spec"]["template"]["spec"])
    assert probe_path(sidecar["livenessProbe"]) == "/healthz"
    assert probe_path(sidecar["startupProbe"]) == "/healthz"
    # A sidecar's readiness is the pod's: /readyz failing on every pod during
    # an Evidently outage would empty the app's Service.
    assert "readinessProbe" not in sidecar


def test_central_tier_probes_health_and_readiness_on_the_intake_port() -> None:
    container = forwarder_container(workload(CENTRAL)["spec"]["template"]["spec"])
    assert probe_path(container["livenessProbe"]) == "/healthz"
    assert probe_path(container["startupProbe"]) == "/healthz"
    assert probe_path(container["readinessProbe"]) == "/readyz"


def test_central_tier_listens_beyond_loopback_behind_a_service(tmp_path: Path) -> None:
    assert tier_config(CENTRAL, tmp_path).intake.host == "0.0.0.0"
    template = workload(CENTRAL)["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in forwarder_container(template["spec"])["ports"]}
    services = find(tier_documents(CENTRAL), "Service")
    assert any(s["metadata"]["name"] == "forwarder" for s in services)
    for service in services:
        assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
        assert all(p["targetPort"] in ports for p in service["spec"]["ports"])


def test_central_tier_keeps_a_volume_per_pod_across_restarts(tmp_path: Path) -> None:
    statefulset = workload(CENTRAL)
    assert statefulset["kind"] == "StatefulSet"
    claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
    container = forwarder_container(statefulset["spec"]["template"]["spec"])
    buffer_path = tier_config(CENTRAL, tmp_path).buffer.path
    assert any(m["name"] in claims and m["mountPath"] == buffer_path for m in container["volumeMounts"])
    assert statefulset["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    headless = [s for s in find(tier_documents(CENTRAL), "Service") if s["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in headless] == [statefulset["spec"]["serviceName"]]


def test_central_tier_has_a_disruption_budget() -> None:
    (pdb,) = find(tier_documents(CENTRAL), "PodDisruptionBudget")
    labels = workload(CENTRAL)["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable", 0) >= 1


def test_central_tier_autoscales_on_average_queue_depth_per_pod() -> None:
    (hpa,) = find(tier_documents(CENTRAL), "HorizontalPodAutoscaler")
    target = workload(CENTRAL)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": target["kind"], "name": target["metadata"]["name"]}
    (pods_metric,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods_metric["metric"]["name"] == "forwarder_queue_depth"
    assert pods_metric["target"]["type"] == "AverageValue"
    assert int(pods_metric["target"]["averageValue"]) > 0
    assert hpa["spec"]["minReplicas"] >= 2


def test_prometheus_adapter_rule_exposes_queue_depth_per_pod() -> None:
    (configmap,) = documents(CENTRAL / "prometheus-adapter-rules.yaml")
    rules = yaml.safe_load(configmap["data"]["config.yaml"])["rules"]
    (rule,) = [r for r in rules if r["name"]["as"] == "forwarder_queue_depth"]
    assert promql_metric_names(rule["seriesQuery"]) == {"forwarder_queue_depth"}
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert "<<.Series>>" in rule["metricsQuery"] and "rate(" not in rule["metricsQuery"]


# --- Prometheus ---------------------------------------------------------------

def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_alert_rules_pass_promtool_check() -> None:
    promtool = require_tool("promtool")
    result = run([promtool, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_promtool_unit_tests() -> None:
    promtool = require_tool("promtool")
    result = run([promtool, "test", "rules", str(ALERTS_TEST)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_is_unit_tested_both_firing_and_quiet() -> None:
    cases = [case for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"] for case in test["alert_rule_test"]]
    for rule in alert_rules():
        outcomes = [bool(c.get("exp_alerts")) for c in cases if c["alertname"] == rule["alert"]]
        assert True in outcomes, f"{rule['alert']} never fires in alerts_test.yml"
        assert False in outcomes, f"{rule['alert']} has no case where it stays quiet"


def test_every_alert_has_a_severity_summary_description_and_runbook() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "ForwarderDown", "ForwarderBacklogGrowing", "ForwarderOldEvents", "ForwarderDeadLetters",
        "ForwarderThrottlingSustained", "ForwarderBufferFull", "ForwarderEventsDropped"}
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert {"summary", "description", "runbook"} <= rule["annotations"].keys(), rule["alert"]


def test_alert_rules_query_only_exported_metrics() -> None:
    for rule in alert_rules():
        assert promql_metric_names(rule["expr"]) - KNOWN_SERIES == set(), rule["alert"]


def promtool_has_kubernetes_discovery(promtool: str, tmp_path: Path) -> bool:
    """Debian's promtool is built without Kubernetes service discovery."""
    probe = tmp_path / "probe.yml"
    probe.write_text("scrape_configs:\n  - job_name: k\n    kubernetes_sd_configs:\n      - role: pod\n")
    return run([promtool, "check", "config", str(probe)]).returncode == 0


def test_scrape_config_passes_promtool_check_config(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    config = yaml.safe_load(SCRAPE.read_text())
    if not promtool_has_kubernetes_discovery(promtool, tmp_path):
        # Check everything this promtool understands; the pod job's relabelling
        # is checked structurally by the next test.
        config["scrape_configs"] = [j for j in config["scrape_configs"] if "kubernetes_sd_configs" not in j]
    for rule_file in config["rule_files"]:
        shutil.copy(SCRAPE.parent / rule_file, tmp_path / rule_file)
    checked = tmp_path / SCRAPE.name
    checked.write_text(yaml.safe_dump(config))
    result = run([promtool, "check", "config", str(checked)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout + result.stderr


def test_scrape_config_covers_the_host_and_annotated_forwarder_pods() -> None:
    jobs = {j["job_name"]: j for j in yaml.safe_load(SCRAPE.read_text())["scrape_configs"]}
    assert all("forwarder" in name for name in jobs), "ForwarderDown matches job=~'.*forwarder.*'"
    static = [t for j in jobs.values() for sc in j.get("static_configs", []) for t in sc["targets"]]
    assert "localhost:8080" in static
    (pods,) = [j for j in jobs.values() if j.get("kubernetes_sd_configs")]
    keeps = {tuple(r["source_labels"]): r["regex"] for r in pods["relabel_configs"] if r.get("action") == "keep"}
    assert keeps[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)] == "true"
    address = next(r for r in pods["relabel_configs"] if r.get("target_label") == "__address__")
    assert re.fullmatch(address["regex"], "10.0.0.7:8000;9464")


# --- Grafana ------------------------------------------------------------------

def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def test_dashboard_has_datasource_job_and_instance_variables() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] == "forwarder" and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["type"] == variables["instance"]["type"] == "query"


def test_every_dashboard_panel_has_a_title_and_datasource() -> None:
    panels = [p for p in dashboard_panels(dashboard()["panels"]) if p["type"] != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel["title"], panel["id"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


def test_dashboard_queries_use_only_exported_metrics() -> None:
    board = dashboard()
    exprs = [t["expr"] for p in dashboard_panels(board["panels"]) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            (selector,) = re.fullmatch(r"label_values\((.*),\s*\w+\)", query).groups()  # type: ignore[union-attr]
            exprs.append(selector)
    used = set().union(*map(promql_metric_names, exprs))
    assert used - KNOWN_SERIES == set()
    # The panels the dashboard promises, by the series behind them.
    assert {
        "forwarder_events_received_total", "forwarder_events_sent_total", "forwarder_events_failed_total",
        "forwarder_queue_depth", "forwarder_queue_bytes", "forwarder_oldest_event_age_seconds",
        "forwarder_throttled_total", "forwarder_send_rate", "forwarder_retries_total",
        "forwarder_request_duration_seconds_bucket", "forwarder_batch_size_events_bucket",
        "forwarder_inflight_requests", "forwarder_events_rejected_total", "forwarder_events_dropped_total",
        "forwarder_datagrams_received_total", "forwarder_datagram_rejected_total",
        "forwarder_intake_auth_refusals_total", "forwarder_intake_connections", "forwarder_intake_connection_limit",
        "forwarder_outage", "forwarder_delivery_age_seconds_bucket",
    } <= used


def test_stat_panels_of_labelled_or_state_series_show_0_not_no_data_while_scraped() -> None:
    panels = dashboard_panels(dashboard()["panels"])
    stats = {p["title"]: p["targets"][0]["expr"] for p in panels if p["type"] == "stat"}
    # forwarder_circuit_open has a series per open circuit only: none at all on a healthy forwarder.
    for title in ("Open circuits", "In outage"):
        assert re.search(r"\)\s+or\s+\(0 \* sum\(up\{", stats[title]), stats[title]
