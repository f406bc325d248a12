"""The SigV4 verifier on an injected clock: requests signed by botocore's own signer, and AWS's test vectors."""

from __future__ import annotations

import datetime

import pytest
from multidict import CIMultiDict

from forwarder.evidently import sigv4
from tests import support
from forwarder.evidently.sigv4 import (INCOMPLETE, INVALID, MISSING, UNRECOGNIZED, Denial, Verifier, canonical_query,
                             canonical_uri, parse_amz_date, remove_dot_segments)

KEY, SECRET = "AKIDCLIENT", "client-secret/with+chars"
REGION = "eu-west-1"
SIGNED_AT = datetime.datetime(2026, 3, 1, 12, 0, 0)
NOW = SIGNED_AT.replace(tzinfo=datetime.timezone.utc).timestamp()
ARN = "arn:aws:evidently:eu-west-1:123456789012:project/shop.checkout"
BODY = b'{"events":[{"data":"{\\"a\\":1}","timestamp":1772366400,"type":"aws.evidently.custom"}]}'


class Signed:
    """A request as botocore's SigV4Auth signs it, and as the intake would receive it."""

    def __init__(self, target: str, headers: CIMultiDict[str], body: bytes, method: str = "POST") -> None:
        self.target, self.headers, self.body, self.method = target, headers, body, method


def sign(path: str = "/events/projects/shop", body: bytes = BODY, key: str = KEY, secret: str = SECRET,
         region: str = REGION, service: str = "evidently", at: datetime.datetime = SIGNED_AT,
         headers: dict[str, str] | None = None, query: str = "") -> Signed:
    url = "http://127.0.0.1:8080" + path + (f"?{query}" if query else "")
    target, received = support.sign(url, body, key, secret, region, service, at, headers)
    return Signed(target, received, body)


def verifier(clock_offset: float = 0.0, secrets: dict[str, str] | None = None) -> Verifier:
    return Verifier(secrets or {KEY: SECRET}, REGION, clock=lambda: NOW + clock_offset)


def verify(v: Verifier, r: Signed) -> str | Denial:
    return v.verify(r.method, r.target, r.headers, r.body)


def denial(result: str | Denial) -> tuple[str, str]:
    assert isinstance(result, Denial), result
    return result.error_type, result.reason


# --- accepted -----------------------------------------------------------------

def test_a_request_signed_by_botocore_verifies_as_its_access_key() -> None:
    assert verify(verifier(), sign()) == KEY


def test_an_arn_project_verifies_with_its_colon_and_slash_percent_encoded_as_sdks_send_them() -> None:
    signed = sign("/events/projects/" + ARN.replace(":", "%3A").replace("/", "%2F"))
    assert "%2F" in signed.target and "%3A" in signed.target
    assert verify(verifier(), signed) == KEY


@pytest.mark.parametrize("vector, method, signature", [
    ("get-vanilla", "GET", "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
    ("post-vanilla", "POST", "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
])
def test_the_aws_signature_v4_test_suite_vectors_verify(vector: str, method: str, signature: str) -> None:
    v = Verifier({"AKIDEXAMPLE": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"}, "us-east-1", service="service",
                 clock=lambda: parse_amz_date("20150830T123600Z"))  # type: ignore[arg-type,return-value]
    headers = CIMultiDict({
        "Host": "example.amazonaws.com", "X-Amz-Date": "20150830T123600Z",
        "Authorization": "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
                         f"SignedHeaders=host;x-amz-date, Signature={signature}"})
    assert v.verify(method, "/", headers, b"") == "AKIDEXAMPLE"


def test_a_query_string_is_signed_decoded_reencoded_and_sorted() -> None:
    assert verify(verifier(), sign(query="b=2&a=x%20y&a=w")) == KEY


def test_header_values_with_runs_of_spaces_verify_as_sdks_trim_them() -> None:
    assert verify(verifier(), sign(headers={"X-Amz-Meta": "  two   spaces  here "})) == KEY


def test_an_x_amz_content_sha256_matching_the_body_verifies() -> None:
    import hashlib
    assert verify(verifier(), sign(headers={"X-Amz-Content-SHA256": hashlib.sha256(BODY).hexdigest()})) == KEY


@pytest.mark.parametrize("offset", [-299.0, 299.0])
def test_a_request_within_five_minutes_of_the_clock_verifies(offset: float) -> None:
    assert verify(verifier(clock_offset=offset), sign()) == KEY


def test_a_replayed_request_verifies_again_within_the_window() -> None:
    v, signed = verifier(), sign()
    assert [verify(v, signed), verify(v, signed)] == [KEY, KEY]


# --- refused ------------------------------------------------------------------

def test_a_wrong_secret_is_an_invalid_signature() -> None:
    assert denial(verify(verifier(), sign(secret="not-the-secret"))) == (INVALID, "bad_signature")


def test_an_unknown_access_key_is_an_unrecognized_client() -> None:
    result = verify(verifier(), sign(key="AKIDSTRANGER"))
    assert denial(result) == (UNRECOGNIZED, "unknown_key")
    assert "AKIDSTRANGER" in result.message  # type: ignore[union-attr]


def test_no_authorization_header_is_a_missing_authentication_token() -> None:
    assert denial(verifier().verify("POST", "/events/projects/shop", CIMultiDict(Host="h"), BODY)) == \
        (MISSING, "missing")


def test_a_presigned_url_is_refused_because_it_does_not_sign_the_body() -> None:
    target = "/events/projects/shop?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=" + "0" * 64
    result = verifier().verify("POST", target, CIMultiDict(Host="h"), BODY)
    assert denial(result) == (INCOMPLETE, "presigned")


def test_a_body_altered_after_signing_is_an_invalid_signature() -> None:
    signed = sign()
    signed.body = signed.body.replace(b'\\"a\\":1', b'\\"a\\":2')
    assert denial(verify(verifier(), signed)) == (INVALID, "bad_signature")


def test_an_x_amz_content_sha256_that_does_not_match_the_body_received_is_refused() -> None:
    import hashlib
    signed = sign(headers={"X-Amz-Content-SHA256": hashlib.sha256(BODY).hexdigest()})
    signed.body = BODY + b" "
    assert denial(verify(verifier(), signed)) == (INVALID, "body_mismatch")


def test_an_unsigned_payload_is_refused() -> None:
    signed = sign(headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    result = verify(verifier(), signed)
    assert denial(result) == (INVALID, "body_mismatch") and "unsigned" in result.message  # type: ignore[union-attr]


@pytest.mark.parametrize("offset, text", [(301.0, "Signature expired"), (-301.0, "Signature not yet current")])
def test_a_request_more_than_five_minutes_off_the_clock_is_expired(offset: float, text: str) -> None:
    result = verify(verifier(clock_offset=offset), sign())
    assert denial(result) == (INVALID, "expired")
    assert result.message.startswith(text)  # type: ignore[union-attr]


def test_a_request_signed_ten_minutes_ago_is_expired() -> None:
    old = sign(at=SIGNED_AT - datetime.timedelta(minutes=10))
    assert denial(verify(verifier(), old)) == (INVALID, "expired")


@pytest.mark.parametrize("override, words", [
    ({"service": "s3"}, "service"),
    ({"region": "us-east-1"}, "evidently.region"),
])
def test_a_credential_scoped_to_another_service_or_region_is_refused(override: dict, words: str) -> None:
    result = verify(verifier(), sign(**override))
    assert denial(result) == (INVALID, "wrong_scope") and words in result.message  # type: ignore[union-attr]


def test_a_credential_date_that_is_not_the_request_date_is_refused() -> None:
    signed = sign()
    signed.headers["Authorization"] = signed.headers["Authorization"].replace("/20260301/", "/20260228/")
    assert denial(verify(verifier(), signed)) == (INVALID, "wrong_scope")


@pytest.mark.parametrize("mangle, words", [
    (lambda a: a.replace("AWS4-HMAC-SHA256", "AWS4-ECDSA-P256-SHA256"), "AWS4-HMAC-SHA256"),
    (lambda a: "Bearer abcdefabcdefabcdef", "Bearer"),
    (lambda a: a.replace("Credential=", "Cred="), "'Credential'"),
    (lambda a: a.split(", Signature=")[0], "'Signature'"),
    (lambda a: a[:-1] + "Z", "hexadecimal"),
    (lambda a: a.replace("SignedHeaders=content-type;host;x-amz-date", "SignedHeaders=content-type;x-amz-date"),
     "'Host'"),
    (lambda a: a.replace("/aws4_request", "/aws5_request"), "aws4_request"),
])
def test_a_malformed_authorization_header_is_an_incomplete_signature(mangle, words: str) -> None:
    signed = sign()
    signed.headers["Authorization"] = mangle(signed.headers["Authorization"])
    result = verify(verifier(), signed)
    assert denial(result) == (INCOMPLETE, "malformed")
    assert words in result.message  # type: ignore[union-attr]


def test_a_non_ascii_signature_from_a_known_client_is_malformed_not_a_crash() -> None:
    v, signed = verifier(), sign()
    assert verify(v, signed) == KEY  # the client's header is now cached
    signed.headers["Authorization"] = signed.headers["Authorization"][:-64] + "é" * 64
    assert denial(verify(v, signed)) == (INCOMPLETE, "malformed")


@pytest.mark.parametrize("date", [None, "2026-03-01T12:00:00Z", "20261301T120000Z"])
def test_a_missing_or_malformed_x_amz_date_is_an_incomplete_signature(date: str | None) -> None:
    signed = sign()
    del signed.headers["X-Amz-Date"]
    if date is not None:
        signed.headers["X-Amz-Date"] = date
    assert denial(verify(verifier(), signed)) == (INCOMPLETE, "malformed")


def test_a_signed_header_missing_from_the_request_is_an_invalid_signature() -> None:
    signed = sign()
    del signed.headers["Content-Type"]
    assert denial(verify(verifier(), signed)) == (INVALID, "bad_signature")


# --- rotation and caching -----------------------------------------------------

def test_replacing_the_secrets_stops_the_old_key_and_admits_the_new() -> None:
    v = verifier()
    v.replace_secrets({"AKIDNEW": "new-secret"})
    assert denial(verify(v, sign())) == (UNRECOGNIZED, "unknown_key")
    assert verify(v, sign(key="AKIDNEW", secret="new-secret")) == "AKIDNEW"


def test_a_rotated_secret_for_the_same_key_id_is_not_served_from_the_key_cache() -> None:
    v = verifier()
    assert verify(v, sign()) == KEY
    v.replace_secrets({KEY: "rotated-secret"})
    assert denial(verify(v, sign())) == (INVALID, "bad_signature")
    assert verify(v, sign(secret="rotated-secret")) == KEY


def test_the_signing_key_is_derived_once_per_secret_day_and_scope(monkeypatch) -> None:
    derived = []
    original = sigv4.signing_key
    monkeypatch.setattr(sigv4, "signing_key", lambda *a: derived.append(a) or original(*a))
    now = [NOW]
    v = Verifier({KEY: SECRET}, REGION, clock=lambda: now[0])
    for _ in range(3):
        assert verify(v, sign()) == KEY
    now[0] += 86400
    assert verify(v, sign(at=SIGNED_AT + datetime.timedelta(days=1))) == KEY
    assert [a[1] for a in derived] == ["20260301", "20260302"]


# --- the pure pieces ----------------------------------------------------------

@pytest.mark.parametrize("path, normalised", [
    ("", "/"), ("/", "/"), ("/a/./b/../c", "/a/c"), ("//a//b/", "/a/b/"), ("/a/..", "/"),
    ("/events/projects/arn%3Aaws%2Fx", "/events/projects/arn%3Aaws%2Fx"),
])
def test_dot_segments_and_empty_segments_are_removed_as_sdks_do(path: str, normalised: str) -> None:
    assert remove_dot_segments(path) == normalised


def test_the_canonical_uri_encodes_the_sent_path_a_second_time() -> None:
    assert canonical_uri("/events/projects/arn%3Aaws%2Fp") == "/events/projects/arn%253Aaws%252Fp"
    assert canonical_uri("/events/projects/a~b_c.d-e") == "/events/projects/a~b_c.d-e"


def test_the_canonical_query_sorts_by_name_then_value_and_encodes_per_sigv4() -> None:
    assert canonical_query("b=2&a=x%20y&a=w&c") == "a=w&a=x%20y&b=2&c="
    assert canonical_query("k=a+b&k2=%7e") == "k=a%2Bb&k2=~"


@pytest.mark.parametrize("text, epoch", [
    ("20150830T123600Z", 1440938160.0), ("20150830T123600", None), ("2015083OT123600Z", None),
    ("20151330T123600Z", None), ("20150830T250000Z", None),
])
def test_x_amz_date_parses_only_iso_8601_basic_utc(text: str, epoch: float | None) -> None:
    assert parse_amz_date(text) == epoch
