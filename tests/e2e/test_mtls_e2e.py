"""Mutual TLS into the central tier, end to end: app -> sidecar (client certificate) -> central (intake.auth =
"mtls") -> emulator, every one a real process on 127.0.0.1.

The central tier trusts one CA for client certificates and admits listed
identities (a SPIFFE ID, as cert-manager's CSI driver or SPIRE would issue);
the sidecar presents its pair (evidently.client_cert_file / client_key_file)
and sends its calls unsigned (evidently.sign_requests = false): it holds no
shared secret at all.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from forwarder.emulator.harness import EmulatorProcess, ForwarderProcess, free_port, wait_for
from tests.certificates import Authority, Pair
from tests.e2e.chain import REGION, delivered_ids, wait_delivered

pytestmark = pytest.mark.e2e

CHECKOUT = "spiffe://cluster.local/ns/shop/sa/checkout"


class Pki:
    """The cluster's CA (server and client certificates) and a CA the central tier does not trust."""

    def __init__(self, directory: Path) -> None:
        self.ca = Authority(directory, "ca")
        self.other = Authority(directory, "other-ca")
        self.server = self.ca.issue("central", client=False)
        self.checkout = self.ca.issue("checkout", san=f"URI:{CHECKOUT}")

    def trust(self, client: Pair | None = None) -> ssl.SSLContext:
        """A client context trusting the central tier's certificate, presenting ``client``'s pair if given."""
        context = ssl.create_default_context(cafile=str(self.ca.cert))
        if client is not None:
            context.load_cert_chain(str(client.cert), str(client.key))
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
async def emulator(tmp_path, procs, session) -> EmulatorProcess:
    emu = procs(EmulatorProcess(tmp_path))
    await emu.ready(session)
    return emu


def central_sections(pki: Pki, emulator: EmulatorProcess, **intake: Any) -> dict[str, dict[str, Any]]:
    return {
        "intake": {"port": free_port(), "auth": "mtls", "tls_cert_file": str(pki.server.cert),
                   "tls_key_file": str(pki.server.key), "tls_client_ca_file": str(pki.ca.cert),
                   "tls_allowed_identities": [CHECKOUT], **intake},
        "evidently": {"endpoint_url": emulator.url, "region": REGION},
        "buffer": {"type": "disk"},
        "batch": {"flush_interval": 0.1},
    }


async def start_central(procs, session, tmp_path: Path, pki: Pki, sections: dict) -> ForwarderProcess:
    # The readiness probe presents no certificate, as the kubelet's does not.
    central = procs(ForwarderProcess(tmp_path, sections, name="central", tls=pki.trust()))
    await central.ready(session)
    return central


async def start_sidecar(procs, session, tmp_path: Path, pki: Pki, central: ForwarderProcess,
                        pair: Pair | None) -> ForwarderProcess:
    evidently: dict[str, Any] = {"endpoint_url": central.url, "region": REGION, "sign_requests": False}
    if pair is not None:
        evidently.update(client_cert_file=str(pair.cert), client_key_file=str(pair.key))
    sidecar = procs(ForwarderProcess(tmp_path, {
        "evidently": evidently, "buffer": {"type": "disk"}, "batch": {"flush_interval": 0.1},
        "retry": {"initial_backoff": 0.05, "max_backoff": 0.5},
    }, env={"AWS_CA_BUNDLE": str(pki.ca.cert)}, name="sidecar"))
    await sidecar.ready(session)
    return sidecar


async def post(sidecar: ForwarderProcess, session, first: int, count: int) -> set[tuple[str, int]]:
    status, body = await sidecar.post(session, "checkout", [{"data": {"i": i}} for i in range(first, first + count)])
    assert status == 200, body
    return {("checkout", i) for i in range(first, first + count)}


async def test_a_sidecar_with_a_listed_client_certificate_delivers_through_an_mtls_central_tier(
        tmp_path, procs, session, emulator, pki):
    central = await start_central(procs, session, tmp_path, pki, central_sections(pki, emulator))
    sidecar = await start_sidecar(procs, session, tmp_path, pki, central, pki.checkout)
    acked = set()
    for first in range(0, 500, 50):
        acked |= await post(sidecar, session, first, 50)

    counts = await wait_delivered(emulator, session, acked)
    assert set(counts) == acked and set(counts.values()) == {1}
    assert await central.metric(session, "forwarder_intake_auth_refusals_total", 'reason="no_certificate"') == 0
    assert sidecar.dead_letters() == [] and central.dead_letters() == []


@pytest.mark.parametrize("presented, reason", [
    ("other_ca", "bad_certificate"),
    ("expired", "bad_certificate"),
    ("unlisted", "identity_not_allowed"),
    ("none", "no_certificate"),
])
async def test_a_sidecar_whose_certificate_is_refused_gets_nothing_delivered(
        tmp_path, procs, session, emulator, pki, presented, reason):
    pair = {
        "other_ca": lambda: pki.other.issue("stranger", san=f"URI:{CHECKOUT}"),  # the right name, the wrong CA
        "expired": lambda: pki.ca.issue("expired", san=f"URI:{CHECKOUT}", days=-1),
        "unlisted": lambda: pki.ca.issue("search", san="URI:spiffe://cluster.local/ns/shop/sa/search"),
        "none": lambda: None,
    }[presented]()
    central = await start_central(procs, session, tmp_path, pki, central_sections(pki, emulator))
    sidecar = await start_sidecar(procs, session, tmp_path, pki, central, pair)
    await post(sidecar, session, 0, 50)  # the sidecar accepts them: its own intake knows nothing of the central tier

    async def refused() -> bool:
        return await central.metric(session, "forwarder_intake_auth_refusals_total", f'reason="{reason}"') >= 2
    await wait_for(refused, 20.0, f"the central tier refusing the sidecar's calls ({reason}) more than once")
    assert await central.metric(session, "forwarder_events_received_total") == 0
    assert await delivered_ids(emulator, session) == {}
    assert "auth_refused" in central.logs()


async def test_a_post_from_an_identity_not_listed_gets_an_aws_style_403_naming_it_while_probes_stay_open(
        tmp_path, procs, session, emulator, pki):
    unlisted = pki.ca.issue("search", san="URI:spiffe://cluster.local/ns/shop/sa/search")
    central = await start_central(procs, session, tmp_path, pki, central_sections(pki, emulator))
    answers = {}
    for name, pair in (("listed", pki.checkout), ("unlisted", unlisted), ("none", None)):
        async with session.post(f"{central.url}/events/projects/checkout", json={"events": [{"data": {"i": 1}}]},
                                ssl=pki.trust(pair)) as r:
            answers[name] = (r.status, r.headers.get("x-amzn-ErrorType"), await r.json(content_type=None))
        async with session.get(f"{central.url}/healthz", ssl=pki.trust(pair)) as r:
            assert r.status == 200
    assert answers["listed"][0] == 200
    status, error_type, body = answers["unlisted"]
    assert (status, error_type) == (403, "AccessDeniedException")
    assert "spiffe://cluster.local/ns/shop/sa/search" in body["message"]
    assert answers["none"][:2] == (403, "AccessDeniedException")
    assert "requires a client certificate" in answers["none"][2]["message"]
    assert "spiffe://cluster.local/ns/shop/sa/search" in central.logs()  # auth_refused names who was refused
