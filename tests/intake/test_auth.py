"""intake.auth in-process: the files, the token check, the answers, the configuration rules."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import boto3
import orjson
import botocore.config
import botocore.exceptions
import pytest
import structlog
from prometheus_client import CollectorRegistry

from forwarder.intake import auth as auth_mod
from forwarder.app import Forwarder, StartupError
from forwarder.intake.auth import CredentialsError, TokenAuthenticator, load_credentials, load_tokens
from forwarder.config import ConfigError, IntakeConfig, from_dict
from forwarder.observability import Observer
from tests import support

TOKEN_A = "a" * 20 + "-token-one"
TOKEN_B = "b" * 20 + "-token-two"
REGION = "eu-west-1"


def write(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def credentials_text(*pairs: tuple[str, str]) -> str:
    return "".join(f"[p{i}]\naws_access_key_id = {k}\naws_secret_access_key = {s}\n\n" for i, (k, s) in enumerate(pairs))


def refusals(obs: Observer, reason: str) -> float:
    return obs.metrics.registry.get_sample_value("forwarder_intake_auth_refusals_total", {"reason": reason}) or 0.0


# --- files --------------------------------------------------------------------

def test_every_profile_of_a_shared_credentials_file_is_an_accepted_key_pair(tmp_path: Path) -> None:
    path = write(tmp_path / "credentials",
                 "[default]\naws_access_key_id = AKID1\naws_secret_access_key = s1\n"
                 "# the next key, for rotation\n[next]\naws_access_key_id=AKID2\naws_secret_access_key=s2/+x\n"
                 "aws_session_token = ignored\n")
    assert load_credentials(path) == {"AKID1": "s1", "AKID2": "s2/+x"}


@pytest.mark.parametrize("text, words", [
    ("", "has no profile"),
    ("[a]\naws_access_key_id = K\n", "profile [a] needs both"),
    ("aws_access_key_id = K\n", "is not an AWS shared-credentials file"),
    ("[a]\naws_access_key_id = K\naws_secret_access_key = 1\n[b]\naws_access_key_id = K\n"
     "aws_secret_access_key = 2\n", "appears twice"),
])
def test_an_unusable_credentials_file_is_refused_with_the_key_named(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(CredentialsError) as err:
        load_credentials(write(tmp_path / "credentials", text))
    assert words in str(err.value) and str(err.value).startswith("intake.credentials_file ")


def test_a_missing_credentials_file_is_refused_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="cannot be read: No such file"):
        load_credentials(str(tmp_path / "nope"))


def test_a_token_file_takes_one_token_per_line_ignoring_comments_and_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens", f"# rotated in on Monday\n{TOKEN_A}\n\n   {TOKEN_B}  \n")
    assert len(load_tokens(path)) == 2


@pytest.mark.parametrize("text, words", [
    ("# only a comment\n\n", "has no token"),
    ("short\n", "line 1: a token must be at least 16"),
    (f"{TOKEN_A}\nhas a space in it here\n", "line 2"),
])
def test_an_unusable_token_file_is_refused_without_echoing_the_token(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(CredentialsError) as err:
        load_tokens(write(tmp_path / "tokens", text))
    assert words in str(err.value) and "has a space" not in str(err.value) and "short" not in str(err.value)


def test_a_credentials_file_others_can_read_is_warned_about(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(TOKEN_A + "\n")
    path.chmod(0o644)
    with structlog.testing.capture_logs() as logs:
        TokenAuthenticator(str(path), support.observer())
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["credentials_readable_by_others"]


# --- token comparison and reload ----------------------------------------------

def test_a_token_is_compared_against_every_configured_token_whichever_matches(tmp_path: Path, monkeypatch) -> None:
    tokens = [f"{c * 20}-token" for c in "abcdef"]
    check = TokenAuthenticator(write(tmp_path / "tokens", "\n".join(tokens)), support.observer())
    calls = []
    compare = auth_mod.hmac.compare_digest
    monkeypatch.setattr(auth_mod.hmac, "compare_digest", lambda a, b: calls.append(len(a)) or compare(a, b))
    for token, expected in [(tokens[0], True), (tokens[-1], True), ("z" * 26, False), ("x", False)]:
        calls.clear()
        assert check.matches(token) is expected
        assert calls == [32] * len(tokens)  # every token, and digests of one length: no length shows either


@pytest.mark.parametrize("header, status", [
    (f"Bearer {TOKEN_A}", None),  # the form every client sends: checked whole
    (f"bearer   {TOKEN_A} ", None),  # any other spelling goes through the parser
    (f"Bearer {TOKEN_A}x", 403),
    (f"Bearer {TOKEN_A[:-1]}", 403),
    ("Basic dXNlcjpwYXNz", 401),
    (None, 401),
])
def test_the_authorization_header_is_checked_against_every_token_in_either_form(tmp_path: Path, monkeypatch,
                                                                                  header, status) -> None:
    from aiohttp.test_utils import make_mocked_request

    check = TokenAuthenticator(write(tmp_path / "tokens", f"{TOKEN_B}\n{TOKEN_A}\n"), support.observer())
    calls = []
    compare = auth_mod.hmac.compare_digest
    monkeypatch.setattr(auth_mod.hmac, "compare_digest", lambda a, b: calls.append(len(a)) or compare(a, b))
    request = make_mocked_request("POST", "/events", headers={} if header is None else {"Authorization": header})
    answer = check(request, b"")
    assert (answer and answer.status) == status
    if header is not None:  # the whole header is compared with every token's, in constant time, before parsing
        assert calls[:2] == [32, 32]


async def test_a_reload_that_cannot_read_its_file_keeps_the_previous_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    obs = support.observer()
    check = TokenAuthenticator(write(path, TOKEN_A + "\n"), obs)
    path.write_text("# emptied by mistake\n")
    with structlog.testing.capture_logs() as logs:
        await check.reconfigure(IntakeConfig())
    assert check.matches(TOKEN_A)
    assert [e["event"] for e in logs] == ["reload_failed"] and "has no token" in logs[0]["error"]
    assert obs.metrics.registry.get_sample_value("forwarder_intake_auth_reload_errors_total") == 1
    path.write_text(TOKEN_B + "\n")
    await check.reconfigure(IntakeConfig())
    assert check.matches(TOKEN_B) and not check.matches(TOKEN_A)
    assert obs.metrics.registry.get_sample_value("forwarder_intake_auth_credentials") == 1


# --- configuration ------------------------------------------------------------

@pytest.mark.parametrize("intake, words", [
    ({"auth": "basic"}, "intake.auth must be one of 'none', 'sigv4', 'token', 'mtls', got 'basic'"),
    ({"auth": "mtls"}, "intake.auth = 'mtls' needs the TLS listener: set intake.tls_cert_file"),
    ({"auth": "mtls", "tls_cert_file": "c", "tls_key_file": "k"},
     "intake.tls_client_ca_file must be set when intake.auth is 'mtls'"),
    ({"auth": "token", "token_file": "t", "tls_client_ca_file": "ca"},
     "intake.tls_client_ca_file applies only with intake.auth = 'mtls'"),
    ({"tls_allowed_identities": ["spiffe://td/ns/a/sa/b"]},
     "intake.tls_allowed_identities applies only with intake.auth = 'mtls'"),
    ({"auth": "mtls", "tls_cert_file": "c", "tls_key_file": "k", "tls_client_ca_file": "ca",
      "tls_allowed_identities": ["spiffe://*/sa/b"]}, "with at most a trailing *"),
    ({"auth": "mtls", "tls_cert_file": "c", "tls_key_file": "k", "tls_client_ca_file": "ca",
      "tls_allowed_identities": "spiffe://td/ns/a/sa/b"}, "intake.tls_allowed_identities must be a list of strings"),
    ({"auth": "sigv4"}, "intake.credentials_file must be set when intake.auth is 'sigv4'"),
    ({"auth": "token"}, "intake.token_file must be set when intake.auth is 'token'"),
    ({"host": "0.0.0.0"}, "intake.host = '0.0.0.0' is not a loopback address and intake.auth is 'none'"),
    ({"host": "::"}, "intake.allow_unauthenticated = true"),
    ({"host": "forwarder.internal"}, "is not a loopback address"),
    ({"allow_unauthenticated": "yes"}, "intake.allow_unauthenticated must be true or false, got 'yes'"),
])
def test_auth_settings_are_validated_with_the_key_named(intake: dict, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"intake": intake})
    assert words in str(err.value)


@pytest.mark.parametrize("intake", [
    {"host": "127.0.0.1"}, {"host": "127.0.0.2"}, {"host": "::1"}, {"host": "localhost"},
    {"host": "0.0.0.0", "allow_unauthenticated": True},
    {"host": "0.0.0.0", "auth": "token", "token_file": "/run/secrets/tokens"},
    {"host": "0.0.0.0", "auth": "sigv4", "credentials_file": "/run/secrets/credentials"},
    {"host": "0.0.0.0", "auth": "mtls", "tls_cert_file": "c", "tls_key_file": "k", "tls_client_ca_file": "ca"},
])
def test_open_intake_is_allowed_on_loopback_or_when_asked_for_explicitly(intake: dict) -> None:
    assert from_dict({"intake": intake}).intake.host == intake["host"]


def test_allowed_identities_are_read_from_the_environment_as_a_comma_separated_list() -> None:
    config = from_dict({"intake": {"auth": "mtls", "tls_cert_file": "c", "tls_key_file": "k", "tls_client_ca_file": "a"}},
                       {"FORWARDER_INTAKE__TLS_ALLOWED_IDENTITIES": "spiffe://td/ns/a/*, checkout.shop.svc"})
    assert config.intake.tls_allowed_identities == ("spiffe://td/ns/a/*", "checkout.shop.svc")


# --- mutual TLS: identities of a verified client certificate ------------------

PEERCERT = {"subject": ((("organizationName", "shop"),), (("commonName", "checkout-cn"),)),
            "subjectAltName": (("DNS", "checkout.shop.svc"), ("URI", "spiffe://td/ns/shop/sa/checkout"),
                               ("IP Address", "10.0.0.7"))}


def test_a_certificates_identities_are_its_san_uris_then_dns_names_then_subject_cn() -> None:
    assert auth_mod.certificate_identities(PEERCERT) == (
        "spiffe://td/ns/shop/sa/checkout", "checkout.shop.svc", "checkout-cn")
    assert auth_mod.certificate_identities(None) == () and auth_mod.certificate_identities({}) == ()


@pytest.mark.parametrize("allowed, admitted", [
    ((), True),  # any certificate the CAs signed
    (("spiffe://td/ns/shop/sa/checkout",), True),
    (("checkout.shop.svc",), True),
    (("checkout-cn",), True),
    (("spiffe://td/ns/shop/*",), True),
    (("spiffe://td/ns/shop/sa/check",), False),  # exact unless it ends in *
    (("spiffe://td/ns/other/*", "search.shop.svc"), False),
    (("10.0.0.7",), False),  # IP SANs are not identities
])
def test_a_client_identity_is_admitted_when_listed_exactly_or_by_a_trailing_star(allowed, admitted) -> None:
    assert auth_mod.identity_allowed(auth_mod.certificate_identities(PEERCERT), allowed) is admitted


def test_a_connection_without_a_certificate_is_never_admitted() -> None:
    assert auth_mod.identity_allowed((), ()) is False


def test_allow_unauthenticated_is_read_from_the_environment_as_a_boolean() -> None:
    config = from_dict({"intake": {"host": "0.0.0.0"}}, {"FORWARDER_INTAKE__ALLOW_UNAUTHENTICATED": "true"})
    assert config.intake.allow_unauthenticated is True


def test_a_forwarder_with_an_unreadable_credentials_file_does_not_start(tmp_path: Path) -> None:
    config = from_dict({"intake": {"auth": "sigv4", "credentials_file": str(tmp_path / "missing")}})
    with pytest.raises(StartupError, match="intake.credentials_file .*missing cannot be read"):
        Forwarder(config, credentials=("k", "s"), registry=CollectorRegistry(), process_metrics=False)


# --- the intake's answers, in-process -----------------------------------------

@pytest.fixture
async def sigv4_forwarder(tmp_path, emulator):
    creds = write(tmp_path / "credentials", credentials_text(("AKIDAPP", "app-secret")))
    config = from_dict({
        "intake": {"port": 0, "auth": "sigv4", "credentials_file": creds},
        "evidently": {"endpoint_url": emulator.url, "region": REGION},
        "batch": {"flush_interval": 0.05},
        "dead_letter": {"path": str(tmp_path / "dl.ndjson")},
    }, {})
    fwd = Forwarder(config, credentials=("k", "s"), registry=CollectorRegistry(), process_metrics=False)
    await fwd.start()
    fwd.url = f"http://127.0.0.1:{fwd.intake.port}"
    yield fwd
    await fwd.shutdown()


def boto(url: str, key: str, secret: str) -> object:
    return boto3.client("evidently", region_name=REGION, endpoint_url=url, aws_access_key_id=key,
                        aws_secret_access_key=secret,
                        config=botocore.config.Config(inject_host_prefix=False, retries={"total_max_attempts": 1}))


EVENT = {"data": json.dumps({"k": 1}), "timestamp": 1_790_000_000, "type": "aws.evidently.custom"}


async def test_a_refused_signature_is_an_aws_style_403_and_nothing_is_buffered(sigv4_forwarder) -> None:
    fwd = sigv4_forwarder
    client = boto(fwd.url, "AKIDAPP", "wrong-secret")
    with pytest.raises(botocore.exceptions.ClientError) as err:
        await asyncio.to_thread(client.put_project_events, project="shop", events=[EVENT])
    meta = err.value.response["ResponseMetadata"]
    assert meta["HTTPStatusCode"] == 403
    assert err.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert meta["HTTPHeaders"]["x-amzn-requestid"]
    assert "signature we calculated does not match" in err.value.response["Error"]["Message"]
    assert fwd.buffer.depth == 0
    assert fwd.metrics.events_received.value == 0
    assert refusals(fwd.observer, "bad_signature") == 1


async def test_a_correctly_signed_request_is_accepted_and_delivered(sigv4_forwarder, emulator) -> None:
    client = boto(sigv4_forwarder.url, "AKIDAPP", "app-secret")
    answer = await asyncio.to_thread(client.put_project_events, project="shop", events=[EVENT])
    assert answer["failedEventCount"] == 0
    assert sigv4_forwarder.metrics.events_received.value == 1


async def test_health_readiness_and_metrics_need_no_credentials(sigv4_forwarder, session) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        async with session.get(sigv4_forwarder.url + path) as r:
            assert r.status == 200, path


async def test_a_missing_signature_gets_missing_authentication_token(sigv4_forwarder, session) -> None:
    async with session.post(sigv4_forwarder.url + "/events/projects/shop", json={"events": [EVENT]}) as r:
        assert r.status == 403
        assert r.headers["x-amzn-ErrorType"] == "MissingAuthenticationTokenException"
        assert "Missing Authentication Token" in (await r.json())["message"]
    assert sigv4_forwarder.buffer.depth == 0


# --- one Authorization header ---------------------------------------------------

@pytest.mark.parametrize("first, second", [
    (f"Bearer {TOKEN_A}", "Bearer wrong-token-wrong-token"),
    ("Bearer wrong-token-wrong-token", f"Bearer {TOKEN_A}"),
    (f"Bearer {TOKEN_A}", f"Bearer {TOKEN_A}"),
])
def test_two_authorization_headers_are_refused_even_when_one_is_a_valid_token(tmp_path: Path, first: str,
                                                                               second: str) -> None:
    from aiohttp.test_utils import make_mocked_request

    obs = support.observer()
    check = TokenAuthenticator(write(tmp_path / "tokens", f"{TOKEN_A}\n"), obs)
    assert check(make_mocked_request("POST", "/events", headers=[("Authorization", f"Bearer {TOKEN_A}")]), b"") is None
    answer = check(make_mocked_request("POST", "/events", headers=[("Authorization", first),
                                                                   ("Authorization", second)]), b"")
    assert answer is not None and answer.status == 400
    assert answer.headers["x-amzn-ErrorType"] == "BadRequestException"
    assert "more than one Authorization header" in json.loads(answer.body)["message"]
    assert refusals(obs, "duplicate_header") == 1


@pytest.mark.parametrize("valid_first", [True, False])
def test_two_authorization_headers_are_refused_even_when_one_is_a_valid_signature(tmp_path: Path,
                                                                                   valid_first: bool) -> None:
    from aiohttp.test_utils import make_mocked_request

    from forwarder.intake.auth import SigV4Authenticator

    obs = support.observer()
    check = SigV4Authenticator(write(tmp_path / "credentials", credentials_text(("AKIDAPP", "app-secret"))),
                               REGION, obs)
    body = orjson.dumps({"events": [EVENT]})
    target, headers = support.sign("http://localhost/events/projects/shop", body, "AKIDAPP", "app-secret", REGION)
    assert check(make_mocked_request("POST", target, headers=headers), body) is None  # alone, it verifies
    forged = headers["Authorization"].replace("AKIDAPP", "AKIDOTHER")
    pairs = [(k, v) for k, v in headers.items() if k.lower() != "authorization"]
    both = [("Authorization", headers["Authorization"]), ("Authorization", forged)]
    answer = check(make_mocked_request("POST", target, headers=pairs + (both if valid_first else both[::-1])), body)
    assert answer is not None and answer.status == 403
    assert answer.headers["x-amzn-ErrorType"] == "IncompleteSignatureException"
    assert "more than one Authorization header" in json.loads(answer.body)["message"]
    assert refusals(obs, "duplicate_header") == 1


class _Protocol:
    peer = None


class _Transport:
    def __init__(self, peercert: dict) -> None:
        self._peercert = peercert

    def get_extra_info(self, name: str) -> dict | None:
        return self._peercert if name == "peercert" else None


class _Request:
    def __init__(self, peercert: dict) -> None:
        self.protocol, self.transport, self.remote = _Protocol(), _Transport(peercert), "10.0.0.7"


async def test_a_reloaded_identity_list_applies_to_new_connections_and_not_to_open_ones() -> None:
    obs = support.observer()
    check = auth_mod.MtlsAuthenticator(("spiffe://td/ns/shop/sa/checkout",), obs)
    open_connection = _Request(PEERCERT)
    assert check(open_connection, b"") is None
    await check.reconfigure(from_dict({"intake": {"auth": "mtls", "tls_cert_file": "c", "tls_key_file": "k",
                                                  "tls_client_ca_file": "a",
                                                  "tls_allowed_identities": ["spiffe://td/ns/shop/sa/search"]}}).intake)
    assert check(open_connection, b"") is None  # its verdict was taken at its first request
    refused = check(_Request(PEERCERT), b"")
    assert refused is not None and refused.status == 403
    assert refusals(obs, "identity_not_allowed") == 1
