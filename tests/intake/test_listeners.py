"""The Unix socket and TLS listeners (issue 14), with real ``forwarder run`` processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import stat
import subprocess
from pathlib import Path

import aiohttp
import pytest

from forwarder.config import ConfigError, IntakeConfig, from_dict
from forwarder.intake.listeners import ListenerError, TlsCertificates
from forwarder.emulator.harness import ForwarderProcess, wait_for
from tests.tools import require_tool

pytestmark = pytest.mark.e2e

EVENTS = {"events": [{"data": {"n": 1}}, {"data": {"n": 2}}]}
NOWHERE = "http://127.0.0.1:9"  # no network beyond loopback: nothing is delivered in these tests


def sections(**intake) -> dict:
    return {"intake": intake, "evidently": {"endpoint_url": NOWHERE}, "shutdown": {"drain_timeout": 0.5}}


# --- helpers -----------------------------------------------------------------------------------------

def make_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with the openssl CLI."""
    openssl = require_tool("openssl")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key


def install(source: Path, target: Path) -> None:
    """Replace ``target`` atomically, as cert-manager or a deploy script would."""
    temporary = target.with_suffix(".new")
    temporary.write_bytes(source.read_bytes())
    os.replace(temporary, target)


def served_certificate(port: int, **context_options) -> bytes:
    """DER of the certificate a new TLS connection to ``port`` is given."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    for name, value in context_options.items():
        setattr(context, name, value)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def unix_session(path: Path) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)),
                                 timeout=aiohttp.ClientTimeout(total=10))


async def unix_ready(fwd: ForwarderProcess, path: Path) -> None:
    async def up() -> bool:
        assert fwd.popen is not None
        if fwd.popen.poll() is not None:
            raise AssertionError(f"forwarder exited with {fwd.popen.returncode}:\n{fwd.logs()}")
        try:
            async with unix_session(path) as s, s.get("http://localhost/readyz") as r:
                return r.status == 200
        except (aiohttp.ClientError, OSError):
            return False
    await wait_for(up, 20, f"the forwarder on {path}")


async def logged(fwd: ForwarderProcess, text: str, count: int = 1) -> None:
    async def seen() -> bool:
        return fwd.logs().count(text) >= count
    await wait_for(seen, 10, f"{text} in the log")


async def start_error(fwd: ForwarderProcess) -> str:
    """The one-line error a forwarder that cannot start leaves (it must exit 2)."""
    assert await fwd.wait(30) == 2, fwd.logs()
    lines = [line for line in fwd.logs().splitlines() if line.startswith("forwarder: cannot start:")]
    assert len(lines) == 1 and "Traceback" not in fwd.logs(), fwd.logs()
    return lines[0]


def short_dir(tmp_path: Path) -> Path:
    """A directory for a Unix socket: pytest's tmp_path can exceed the 108-byte socket path limit."""
    directory = Path("/tmp") / f"fwd-{os.getpid()}-{abs(hash(tmp_path)) % 10**8}"
    directory.mkdir(exist_ok=True)
    return directory


@pytest.fixture
def sockdir(tmp_path):
    directory = short_dir(tmp_path)
    yield directory
    for item in directory.iterdir():
        item.unlink()
    directory.rmdir()


# --- Unix socket ---------------------------------------------------------------------------------

async def test_the_intake_serves_events_health_and_metrics_over_a_unix_socket(tmp_path, sockdir, procs,
                                                                                emulator_process, session):
    path = sockdir / "intake.sock"
    fwd = procs(ForwarderProcess(tmp_path, {"evidently": {"endpoint_url": emulator_process.url},
                                            "batch": {"flush_interval": 0.05},
                                            "intake": {"unix_socket": str(path), "unix_socket_mode": "0660"}}))
    await unix_ready(fwd, path)
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    async with unix_session(path) as s:
        async with s.post("http://localhost/events/projects/p", json=EVENTS) as r:
            assert r.status == 200 and r.headers["x-amzn-RequestId"]
        for route in ("/healthz", "/readyz", "/metrics"):
            async with s.get("http://localhost" + route) as r:
                assert r.status == 200, route

    async def delivered() -> bool:
        return len(await emulator_process.events(session)) == 2
    await wait_for(delivered, 10, "2 events at the emulator")
    await fwd.ready(session)  # TCP still served beside the socket
    fwd.terminate()
    assert await fwd.wait(15) == 0
    assert not path.exists()  # removed on a clean exit


async def test_a_daemon_with_only_a_unix_socket_serves_there(tmp_path, sockdir, procs):
    path = sockdir / "only.sock"
    fwd = procs(ForwarderProcess(tmp_path, sections(port=-1, unix_socket=str(path))))
    await unix_ready(fwd, path)
    assert '"port": null' in next(line for line in fwd.logs().splitlines() if "intake_listening" in line)


async def test_a_stale_socket_file_from_a_crashed_run_is_replaced(tmp_path, sockdir, procs):
    path = sockdir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as crashed:
        crashed.bind(str(path))  # closed without unlinking: what a kill -9 leaves
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    fwd = procs(ForwarderProcess(tmp_path, sections(unix_socket=str(path))))
    await unix_ready(fwd, path)


async def test_a_socket_another_process_listens_on_stops_start_up_naming_the_key(tmp_path, sockdir, procs):
    path = sockdir / "busy.sock"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        other.listen(1)
        fwd = procs(ForwarderProcess(tmp_path, sections(unix_socket=str(path))))
        line = await start_error(fwd)
    assert "intake.unix_socket" in line and "in use by another process" in line


async def test_a_path_that_is_not_a_socket_is_left_alone_and_named(tmp_path, sockdir, procs):
    path = sockdir / "notes.txt"
    path.write_text("keep me")
    fwd = procs(ForwarderProcess(tmp_path, sections(unix_socket=str(path))))
    line = await start_error(fwd)
    assert "intake.unix_socket" in line and "not a socket" in line and path.read_text() == "keep me"


@pytest.mark.parametrize(("intake", "message"), [
    ({"unix_socket_mode": "999"}, "intake.unix_socket_mode must be octal permission bits"),
    ({"unix_socket_mode": "rw-rw----"}, "intake.unix_socket_mode must be octal permission bits"),
    ({"unix_socket": "/run/" + "x" * 120}, "intake.unix_socket must be at most 107 bytes long"),
    ({"port": -1}, "intake.port = -1 (no TCP listener) needs intake.unix_socket"),
    ({"port": -2}, "intake.port must be between -1 and 65535"),
    ({"tls_cert_file": "/etc/c.pem"}, "intake.tls_cert_file and intake.tls_key_file must be set together"),
    ({"port": -1, "unix_socket": "/run/f.sock", "tls_cert_file": "c", "tls_key_file": "k"},
     "intake.tls_cert_file applies to the TCP listener"),
    ({"max_connections": 0}, "intake.max_connections must be between 1 and 1048576"),
    ({"header_timeout": 0}, "intake.header_timeout must be between 0 (exclusive) and 3600"),
    ({"max_header_bytes": 100}, "intake.max_header_bytes must be between 4096"),
])
def test_listener_settings_are_validated_naming_the_key(intake, message):
    with pytest.raises(ConfigError) as err:
        from_dict({"intake": intake}, {})
    assert str(err.value).startswith(message)


# --- TLS ---------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")  # TLS 1.1 is what is refused
async def test_tls_intake_serves_tls_1_2_and_later_and_rotates_its_certificate_on_sighup(tmp_path, procs):
    first_cert, first_key = make_pair(tmp_path, "first")
    second_cert, second_key = make_pair(tmp_path, "second")
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    install(first_cert, cert)
    install(first_key, key)
    fwd = procs(ForwarderProcess(tmp_path, sections(tls_cert_file=str(cert), tls_key_file=str(key))))
    url = f"https://127.0.0.1:{fwd.port}"
    trust = ssl.create_default_context(cafile=str(first_cert))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as s:
        async def up() -> bool:
            try:
                async with s.get(url + "/readyz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False
        await wait_for(up, 20, "the TLS intake")
        async with s.post(url + "/events/projects/p", json=EVENTS) as r:
            assert r.status == 200
        for route in ("/healthz", "/metrics"):
            async with s.get(url + route) as r:
                assert r.status == 200
        assert await asyncio.to_thread(served_certificate, fwd.port) == der(first_cert)
        with pytest.raises(ssl.SSLError):
            await asyncio.to_thread(served_certificate, fwd.port, maximum_version=ssl.TLSVersion.TLSv1_1,
                                    minimum_version=ssl.TLSVersion.TLSv1)

        install(second_cert, cert)
        install(second_key, key)
        fwd.signal(signal.SIGHUP)
        await logged(fwd, '"tls_reloaded"')
        assert await asyncio.to_thread(served_certificate, fwd.port) == der(second_cert)
        async with s.get(url + "/healthz") as r:  # a connection opened before the reload keeps its session
            assert r.status == 200

        key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
        fwd.signal(signal.SIGHUP)
        await logged(fwd, '"reload_failed"')
        assert "intake.tls" in next(line for line in fwd.logs().splitlines() if "reload_failed" in line)
        assert await asyncio.to_thread(served_certificate, fwd.port) == der(second_cert)  # the old pair stays
    fwd.terminate()
    assert await fwd.wait(15) == 0


@pytest.mark.parametrize(("problem", "key"), [
    ("missing key", "intake.tls_key_file"),
    ("mismatched key", "intake.tls_key_file"),
    ("not a certificate", "intake.tls_cert_file"),
])
async def test_a_bad_certificate_pair_stops_start_up_with_one_line_naming_the_key(tmp_path, procs, problem, key):
    cert, own_key = make_pair(tmp_path, "a")
    _, other_key = make_pair(tmp_path, "b")
    key_file = {"missing key": tmp_path / "absent.key", "mismatched key": other_key}.get(problem, own_key)
    if problem == "not a certificate":
        cert.write_text("hello")
    fwd = procs(ForwarderProcess(tmp_path, sections(tls_cert_file=str(cert), tls_key_file=str(key_file))))
    assert key in await start_error(fwd)


async def test_a_reload_with_a_bad_pair_keeps_the_pair_in_use(tmp_path):
    cert, key = make_pair(tmp_path, "a")
    certificates = TlsCertificates(str(cert), str(key))
    before = certificates._current
    cert.write_text("garbage")
    with pytest.raises(ListenerError, match="intake.tls_cert_file"):
        await certificates.reconfigure(IntakeConfig())
    assert certificates._current is before
