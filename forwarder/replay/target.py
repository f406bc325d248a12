"""Where replay sends, and as whom: the intake's address, TLS trust and credentials.

The intake is ``http://host:port``, ``https://host:port`` (verified against
``--ca-bundle``, else ``AWS_CA_BUNDLE``, else the system's trust store, as the
AWS SDKs do) or ``unix:///path/to/intake.sock``. Credentials are whatever the
intake's ``intake.auth`` accepts: nothing, a bearer token (``--token-file``, or
``FORWARDER_TOKEN``), or SigV4 signed with the standard AWS credential chain
(environment, shared profile, instance role) by botocore's own signer.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Callable, Mapping
from urllib.parse import quote, urlsplit

import aiohttp
from yarl import URL

TOKEN_ENV = "FORWARDER_TOKEN"
AUTH_CHOICES = ("none", "token", "sigv4")


class TargetError(Exception):
    """The intake address, its TLS trust or the credentials are unusable; the message says what to fix."""


Signer = Callable[[str, bytes, dict[str, str]], dict[str, str]]


@dataclass(frozen=True)
class Target:
    """An intake to post to: ``base`` URL (``http://localhost`` for a Unix socket) and how to connect."""

    base: str
    unix_socket: str | None
    tls: ssl.SSLContext | None
    sign: Signer

    def url(self, project: str) -> str:
        return f"{self.base}/events/projects/{quote(project, safe='')}"

    def session(self, timeout: float) -> aiohttp.ClientSession:
        connector: aiohttp.BaseConnector
        if self.unix_socket:
            connector = aiohttp.UnixConnector(path=self.unix_socket)
        else:
            connector = aiohttp.TCPConnector(ssl=self.tls if self.tls is not None else True)
        return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout))

    def request_url(self, project: str) -> URL:
        # encoded=True: a project ARN's "/" stays %2F, the path the signature covers.
        return URL(self.url(project), encoded=True)


def make_target(intake: str, auth: str = "none", *, token_file: str | None = None, region: str | None = None,
                ca_bundle: str | None = None, environ: Mapping[str, str] | None = None) -> Target:
    """The Target for ``--intake``, ``--auth`` and friends; TargetError names the option at fault."""
    env = os.environ if environ is None else environ
    parts = urlsplit(intake)
    unix_socket = None
    if parts.scheme == "unix":
        unix_socket = parts.path or parts.netloc
        if not unix_socket:
            raise TargetError(f"--intake {intake}: a Unix socket is unix:///path/to/intake.sock")
        base = "http://localhost"
    elif parts.scheme in ("http", "https") and parts.hostname:
        base = f"{parts.scheme}://{parts.netloc}"
    else:
        raise TargetError(f"--intake {intake}: expected http://HOST:PORT, https://HOST:PORT or unix:///PATH")
    tls = _tls(ca_bundle or env.get("AWS_CA_BUNDLE")) if parts.scheme == "https" else None
    return Target(base, unix_socket, tls, _signer(auth, token_file, region, env))


def _tls(ca_bundle: str | None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_bundle) if ca_bundle else ssl.create_default_context()
    except (OSError, ssl.SSLError) as e:
        raise TargetError(f"cannot load the CA bundle {ca_bundle} (--ca-bundle or AWS_CA_BUNDLE): {e}") from None


def _signer(auth: str, token_file: str | None, region: str | None, env: Mapping[str, str]) -> Signer:
    if auth == "none":
        return lambda url, body, headers: headers
    if auth == "token":
        token = _token(token_file, env)
        return lambda url, body, headers: {**headers, "Authorization": f"Bearer {token}"}
    if auth == "sigv4":
        return _sigv4(region)
    raise TargetError(f"--auth must be one of {', '.join(AUTH_CHOICES)}, got {auth!r}")


def _token(token_file: str | None, env: Mapping[str, str]) -> str:
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise TargetError(f"--token-file {token_file}: cannot read it: {getattr(e, 'strerror', None) or e}") \
                from None
        tokens = [line for line in lines if line and not line.startswith("#")]
        if not tokens:
            raise TargetError(f"--token-file {token_file} holds no token (one per line, # comments)")
        return tokens[0]
    token = env.get(TOKEN_ENV, "").strip()
    if not token:
        raise TargetError(f"--auth token needs --token-file FILE or the {TOKEN_ENV} variable")
    return token


def _sigv4(region: str | None) -> Signer:
    import botocore.session
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    session = botocore.session.get_session()  # the standard chain, from this process's environment
    credentials = session.get_credentials()
    if credentials is None:
        raise TargetError("--auth sigv4 found no AWS credentials in the standard chain "
                          "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role)")
    region = region or os.environ.get("AWS_REGION") or session.get_config_variable("region")
    if not region:
        raise TargetError("--auth sigv4 needs a region: --region, AWS_REGION or AWS_DEFAULT_REGION "
                          "(the forwarder's evidently.region)")

    def sign(url: str, body: bytes, headers: dict[str, str]) -> dict[str, str]:
        request = AWSRequest(method="POST", url=url, data=body, headers=headers)
        SigV4Auth(credentials.get_frozen_credentials(), "evidently", region).add_auth(request)
        return dict(request.headers.items())

    return sign
