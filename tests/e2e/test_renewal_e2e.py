"""Renewals without a signal, end to end: certificates, client CA bundles, credentials and token files laid out
as the kubelet mounts a Secret (``name -> ..data/name``) and updated as it does (an atomic swap of ``..data``).
No test sends SIGHUP: the forwarder notices the change on disk within seconds (forwarder/watch.py).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import aiohttp
import pytest

from forwarder.emulator.harness import EmulatorProcess, ForwarderProcess, free_port, wait_for
from tests.certificates import Authority, kubernetes_secret_volume, swap_secret_volume
from tests.e2e.chain import EVENT, REGION, boto, credentials, der, put, served_certificate, wait_delivered

pytestmark = pytest.mark.e2e

NOTICED = 10.0  # seconds a renewal may take to be in use: the poll interval is 1 s
CHECKOUT = "spiffe://cluster.local/ns/shop/sa/checkout"


@pytest.fixture
async def emulator(tmp_path, procs, session) -> EmulatorProcess:
    emu = procs(EmulatorProcess(tmp_path))
    await emu.ready(session)
    return emu


async def start(procs, session, tmp_path: Path, name: str, sections: dict, tls: ssl.SSLContext | None = None,
                env: dict | None = None) -> ForwarderProcess:
    fwd = procs(ForwarderProcess(tmp_path, sections, name=name, tls=tls, env=env))
    await fwd.ready(session)
    return fwd


async def test_a_server_certificate_renewed_on_disk_is_served_to_new_connections_and_a_broken_renewal_keeps_it(
        tmp_path, procs, session):
    ca = Authority(tmp_path)
    first, second = ca.issue("first", client=False), ca.issue("second", client=False)
    volume = tmp_path / "tls"
    files = kubernetes_secret_volume(volume, {"tls.crt": first.cert, "tls.key": first.key})
    fwd = await start(procs, session, tmp_path, "central", {
        "intake": {"tls_cert_file": str(files["tls.crt"]), "tls_key_file": str(files["tls.key"])},
        "evidently": {"endpoint_url": "http://127.0.0.1:9"}}, tls=ssl.create_default_context(cafile=str(ca.cert)))
    assert await asyncio.to_thread(served_certificate, fwd.port) == der(first.cert)

    swap_secret_volume(volume, {"tls.crt": second.cert, "tls.key": second.key})

    async def renewed() -> bool:
        return await asyncio.to_thread(served_certificate, fwd.port) == der(second.cert)
    await wait_for(renewed, NOTICED, "the renewed certificate served to a new connection")

    swap_secret_volume(volume, {"tls.crt": first.cert, "tls.key": second.key})  # a pair that does not match

    async def failed() -> bool:
        return '"reload_failed"' in fwd.logs()
    await wait_for(failed, NOTICED, "the broken renewal logged as reload_failed")
    assert await asyncio.to_thread(served_certificate, fwd.port) == der(second.cert)  # the good pair stays
    assert await fwd.metric(session, "forwarder_intake_connections_closed_total",
                            'reason="tls_handshake_failed"') == 0


async def test_a_client_ca_bundle_renewed_on_disk_admits_the_new_authoritys_certificates(tmp_path, procs, session,
                                                                                        emulator):
    old, new = Authority(tmp_path, "old-ca"), Authority(tmp_path, "new-ca")
    server = old.issue("central", client=False)
    client = new.issue("checkout", san=f"URI:{CHECKOUT}")
    volume = tmp_path / "client-ca"
    files = kubernetes_secret_volume(volume, {"ca.crt": old.cert})
    trust = ssl.create_default_context(cafile=str(old.cert))
    fwd = await start(procs, session, tmp_path, "central", {
        "intake": {"auth": "mtls", "tls_cert_file": str(server.cert), "tls_key_file": str(server.key),
                   "tls_client_ca_file": str(files["ca.crt"])},
        "evidently": {"endpoint_url": emulator.url, "region": REGION}}, tls=trust)
    presenting = ssl.create_default_context(cafile=str(old.cert))  # not the probe's: its connections have none
    presenting.load_cert_chain(str(client.cert), str(client.key))

    async def post() -> int:
        try:
            async with session.post(f"{fwd.url}/events/projects/checkout", json={"events": [{"data": {"i": 1}}]},
                                    ssl=presenting, headers={"Connection": "close"}) as r:
                return r.status
        except aiohttp.ClientError:
            return 0  # the handshake refused the certificate
    assert await post() == 0
    # The trust bundle during a CA rotation: both authorities.
    bundle = tmp_path / "bundle.crt"
    bundle.write_text(old.cert.read_text() + new.cert.read_text())
    swap_secret_volume(volume, {"ca.crt": bundle})

    async def admitted() -> bool:
        return await post() == 200
    await wait_for(admitted, NOTICED, "a certificate of the new CA admitted")


async def test_a_sidecars_client_certificate_renewed_on_disk_is_presented_on_new_connections(
        tmp_path, procs, session, emulator):
    ca = Authority(tmp_path)
    server = ca.issue("central", client=False)
    expired = ca.issue("expired", san=f"URI:{CHECKOUT}", days=-1)
    renewed = ca.issue("renewed", san=f"URI:{CHECKOUT}")
    central = await start(procs, session, tmp_path, "central", {
        "intake": {"port": free_port(), "auth": "mtls", "tls_cert_file": str(server.cert),
                   "tls_key_file": str(server.key), "tls_client_ca_file": str(ca.cert),
                   "tls_allowed_identities": [CHECKOUT]},
        "evidently": {"endpoint_url": emulator.url, "region": REGION}, "buffer": {"type": "disk"},
        "batch": {"flush_interval": 0.1}}, tls=ssl.create_default_context(cafile=str(ca.cert)))
    volume = tmp_path / "client-tls"
    files = kubernetes_secret_volume(volume, {"tls.crt": expired.cert, "tls.key": expired.key})
    sidecar = await start(procs, session, tmp_path, "sidecar", {
        "evidently": {"endpoint_url": central.url, "region": REGION, "sign_requests": False,
                      "client_cert_file": str(files["tls.crt"]), "client_key_file": str(files["tls.key"])},
        "buffer": {"type": "disk"}, "batch": {"flush_interval": 0.1},
        "retry": {"initial_backoff": 0.05, "max_backoff": 0.5}}, env={"AWS_CA_BUNDLE": str(ca.cert)})
    status, body = await sidecar.post(session, "checkout", [{"data": {"i": i}} for i in range(20)])
    assert status == 200, body

    async def refused() -> bool:
        return await central.metric(session, "forwarder_intake_auth_refusals_total", 'reason="bad_certificate"') > 0
    await wait_for(refused, NOTICED, "the central tier refusing the expired certificate")

    swap_secret_volume(volume, {"tls.crt": renewed.cert, "tls.key": renewed.key})
    counts = await wait_delivered(emulator, session, {("checkout", i) for i in range(20)}, timeout=30)
    assert set(counts.values()) == {1}


@pytest.mark.parametrize("scheme", ["token", "sigv4"])
async def test_a_credentials_or_token_file_rotated_on_disk_is_in_force_within_seconds_and_a_broken_one_keeps_it(
        tmp_path, procs, session, emulator, scheme):
    old, new = ("AKIDOLD", "old-secret"), ("AKIDNEW", "new-secret")
    tokens = {"old": "old-token-0123456789abcdef", "new": "new-token-fedcba9876543210"}
    sources = {name: tmp_path / f"{scheme}-{name}" for name in ("old", "new", "broken")}
    if scheme == "token":
        sources["old"].write_text(tokens["old"] + "\n")
        sources["new"].write_text(tokens["new"] + "\n")
        sources["broken"].write_text("# every token removed by mistake\n")
    else:
        sources["old"].write_text(credentials(old))
        sources["new"].write_text(credentials(new))
        sources["broken"].write_text("[p0]\naws_access_key_id = AKIDNEW\n")  # the secret is missing
    volume = tmp_path / "secrets"
    files = kubernetes_secret_volume(volume, {"file": sources["old"]})
    key = "token_file" if scheme == "token" else "credentials_file"
    fwd = await start(procs, session, tmp_path, "central", {
        "intake": {"auth": scheme, key: str(files["file"])},
        "evidently": {"endpoint_url": emulator.url, "region": REGION}})

    async def accepted(which: str) -> bool:
        if scheme == "token":
            async with session.post(f"{fwd.url}/events/projects/shop", data=json.dumps({"events": [EVENT]}),
                                    headers={"Authorization": f"Bearer {tokens[which]}",
                                             "Content-Type": "application/json"}) as r:
                return r.status == 200
        pair = old if which == "old" else new
        try:
            await put(boto(fwd.url, *pair))
        except Exception:  # botocore's ClientError: refused
            return False
        return True

    assert await accepted("old") and not await accepted("new")
    swap_secret_volume(volume, {"file": sources["new"]})

    async def rotated() -> bool:
        return await accepted("new")
    await wait_for(rotated, NOTICED, f"the new {scheme} credential accepted")
    assert not await accepted("old")

    swap_secret_volume(volume, {"file": sources["broken"]})

    async def failed() -> bool:
        return '"reload_failed"' in fwd.logs()
    await wait_for(failed, NOTICED, "the broken file logged as reload_failed")
    assert await accepted("new")  # the set in force stays
