"""``forwarder healthcheck``: probes the listener the configuration actually has (TLS, a Unix socket only)."""

from __future__ import annotations

import ssl
import subprocess

import orjson
import pytest

from forwarder.emulator.harness import ForwarderProcess, forwarder_command, free_port, wait_for
from tests.tools import make_ca_and_server_pair

pytestmark = pytest.mark.e2e


def healthcheck(config_path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(forwarder_command("healthcheck", "--config", str(config_path)), capture_output=True,
                          text=True, timeout=30)


async def test_a_tls_intake_is_probed_over_https(tmp_path, procs, session, emulator):
    ca, cert, key = make_ca_and_server_pair(tmp_path)
    daemon = procs(ForwarderProcess(tmp_path, {
        "intake": {"tls_cert_file": str(cert), "tls_key_file": str(key)},
        "evidently": {"endpoint_url": emulator.url}}, tls=ssl.create_default_context(cafile=str(ca))))
    await daemon.ready(session)
    done = healthcheck(daemon.config_path)
    assert done.returncode == 0, done.stderr


async def test_a_unix_socket_only_intake_is_probed_on_its_socket_and_its_started_line_names_no_port(
        tmp_path, procs, session, emulator):
    sock = tmp_path / "intake.sock"
    daemon = procs(ForwarderProcess(tmp_path, {
        "intake": {"port": -1, "unix_socket": str(sock)}, "evidently": {"endpoint_url": emulator.url},
        "metrics": {"port": free_port()}}))

    async def up() -> bool:
        daemon.check_alive()
        return healthcheck(daemon.config_path).returncode == 0
    await wait_for(up, 30, "the Unix-socket intake to answer the healthcheck", interval=0.1)
    started = next(orjson.loads(line) for line in daemon.logs().splitlines() if '"started"' in line)
    assert started["port"] is None and started["unix_socket"] == str(sock)


def test_no_daemon_is_unhealthy_in_one_line(tmp_path):
    config = tmp_path / "forwarder.toml"
    config.write_text(f"[intake]\nport = {free_port()}\n")
    done = healthcheck(config)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("forwarder healthcheck: unhealthy: http://127.0.0.1:")
    assert "Traceback" not in done.stderr
