"""The intake's listening sockets: TCP (optionally TLS) and a Unix domain socket, and their lifecycle.

Every failure here is a one-line start-up error naming the configuration key.
"""

from __future__ import annotations

import functools
import resource
import socket
import ssl
from typing import Any, Awaitable, Callable

from aiohttp import web

from forwarder.config import IntakeConfig, is_loopback_address
from forwarder.observability import Observer
from forwarder.reading import MiB, FileRefused, OffLoop, read_bounded
from forwarder.intake.connections import LISTEN_BACKLOG, MIN_CONNECTIONS, Connections, Limits, connection_limit
from forwarder.intake.unix_socket import UnixSocket, bind_unix

Handler = Callable[[bool, web.BaseRequest], Awaitable[web.StreamResponse]]

CLOSE_TIMEOUT = 5.0  # seconds requests in progress get to finish when the listeners close
MAX_PEM_BYTES = MiB  # a certificate chain or key file beyond this is refused, never read whole


class ListenerError(OSError):
    """A listener cannot be set up; the message names the configuration key."""


def bind_tcp(host: str, port: int) -> list[socket.socket]:
    """Listening, non-blocking sockets on every address ``host`` resolves to (as create_server does)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ListenerError(f"intake.host: cannot resolve {host!r}: {e.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                raise ListenerError(f"intake.host/intake.port: cannot listen on {address[0]} port {port}: "
                                    f"{e.strerror}") from None
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def is_loopback(sockets: list[socket.socket]) -> bool:
    """True when every socket listens on a loopback address (then Host is checked)."""
    return all(is_loopback_address(s.getsockname()[0]) for s in sockets)


class TlsCertificates:
    """The intake's certificate and key (and, for mutual TLS, the client CA bundle), re-read without a restart.

    Listeners get ``context``, whose SNI callback (called for every handshake,
    with or without SNI) hands each new connection the context loaded last, so a
    reload needs no new listener and connections already open keep theirs. The
    verification mode is the listener's context's (fixed at start); the CAs a
    client certificate is checked against are those of the context handed over.
    """

    LIVE_KEYS = ()
    # Re-read on every reload (SIGHUP, or a change on disk noticed by forwarder/watch.py).
    FILE_KEYS = ("intake.tls_cert_file", "intake.tls_key_file", "intake.tls_client_ca_file")

    def __init__(self, cert_file: str, key_file: str, log: Any = None, client_ca_file: str = "") -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self._log = log
        self._reads = OffLoop("intake.tls_cert_file/intake.tls_key_file/intake.tls_client_ca_file")
        self.context = self._load()
        self._current = self.context
        self.context.sni_callback = self._select

    async def reconfigure(self, intake: IntakeConfig) -> None:
        """Load the files again, off the event loop (reload); on any error the context in use stays (raises)."""
        self._current = await self._reads.run(self._load)
        if self._log is not None:
            self._log.info("tls_reloaded", cert_file=self.cert_file, key_file=self.key_file,
                           client_ca_file=self.client_ca_file or None)

    def _select(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        connection.context = self._current

    def _load(self) -> ssl.SSLContext:
        cert = _read_pem(self.cert_file, "intake.tls_cert_file", "CERTIFICATE-----")
        key = _read_pem(self.key_file, "intake.tls_key_file", "PRIVATE KEY-----")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as e:
            if e.reason == "KEY_VALUES_MISMATCH":
                raise ListenerError(f"intake.tls_key_file: {self.key_file} is not the key of "
                                    f"intake.tls_cert_file {self.cert_file}") from None
            raise ListenerError(f"intake.tls_cert_file/intake.tls_key_file: cannot load {cert} and {key}: "
                                f"{e.reason or e}") from None
        if self.client_ca_file:
            self._require_client_certificates(context)
        return context

    def _require_client_certificates(self, context: ssl.SSLContext) -> None:
        # CERT_OPTIONAL, not CERT_REQUIRED: a certificate presented is verified
        # in the handshake (another CA's or an expired one fails it), while a
        # connection without one is still served /healthz, /readyz and /metrics
        # (the kubelet's HTTPS probes present none); posting events needs one
        # (intake/auth.py, MtlsAuthenticator).
        _read_pem(self.client_ca_file, "intake.tls_client_ca_file", "CERTIFICATE-----")
        try:
            context.load_verify_locations(cafile=self.client_ca_file)
        except ssl.SSLError as e:
            raise ListenerError(f"intake.tls_client_ca_file: cannot load {self.client_ca_file}: "
                                f"{e.reason or e}") from None
        context.verify_mode = ssl.CERT_OPTIONAL


def _read_pem(path: str, key: str, marker: str) -> str:
    try:
        text = read_bounded(path, MAX_PEM_BYTES)
    except FileRefused as e:
        raise ListenerError(f"{key}: {path} {e}") from None
    except OSError as e:
        raise ListenerError(f"{key}: cannot read {path}: {e.strerror}") from None
    if marker.encode() not in text:
        raise ListenerError(f"{key}: {path} holds no PEM {marker.rstrip('-').lower()}")
    return path


class Listeners:
    """The intake's sockets under one connection limit: TCP (TLS when configured) and a Unix socket."""

    def __init__(self, config: IntakeConfig, observer: Observer, upstream_connections: int = 0) -> None:
        self._config = config
        self._observer = observer
        self._upstream = upstream_connections
        self.connections: Connections | None = None  # None before start and after close
        self._unix: UnixSocket | None = None
        self._tls: TlsCertificates | None = None
        self.port = 0

    async def start(self, handler: Handler) -> int:
        """Listen, each request handled by ``handler(check_host, request)``; returns the TCP port, 0 without one.

        ``check_host`` is true on loopback TCP listeners, where Host must name this machine.
        """
        c = self._config
        limits = Limits(self._connection_limit(), c.idle_timeout, c.header_timeout, c.body_timeout,
                        c.max_header_bytes)
        self.connections = connections = Connections(limits, self._observer)
        metrics = self._observer.metrics
        metrics.intake_connections.set_function(lambda: connections.count)
        metrics.intake_connection_limit.set(limits.max_connections)
        try:
            if c.port != -1:
                self._tls = TlsCertificates(c.tls_cert_file, c.tls_key_file, self._observer.log,
                                            c.tls_client_ca_file) if c.tls_cert_file else None
                sockets = bind_tcp(c.host, c.port)
                self.port = sockets[0].getsockname()[1]
                tcp = self._server(handler, is_loopback(sockets))
                for sock in sockets:
                    connections.listen(sock, tcp, self._tls.context if self._tls else None)
            if c.unix_socket:
                self._unix = bind_unix(c.unix_socket, int(c.unix_socket_mode, 8), socket.SOCK_STREAM,
                                       "intake.unix_socket")
                self._unix.sock.listen(LISTEN_BACKLOG)
                connections.listen(self._unix.sock, self._server(handler, False), None)
        except BaseException:
            await self.close()
            raise
        connections.start()
        self._observer.log.info("intake_listening", host=c.host if c.port != -1 else None, port=self.port or None,
                                tls=self._tls is not None, unix_socket=c.unix_socket or None,
                                max_connections=limits.max_connections)
        return self.port

    def _server(self, handler: Handler, check_host: bool) -> web.Server:
        # aiohttp's low-level server with the intake's own routing: web.Application
        # adds a router, a middleware chain and a web.Request with match info to
        # every request, a visible share of a single-event request's CPU
        # (docs/intake.md). Six fixed routes need none of that.
        assert self.connections is not None
        return self.connections.server(functools.partial(handler, check_host), self._config.max_body_bytes)

    def _connection_limit(self) -> int:
        configured = self._config.max_connections
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY:
            return configured
        limit = connection_limit(configured, nofile, self._upstream)
        if limit < min(configured, MIN_CONNECTIONS):
            raise ListenerError(f"intake.max_connections: the open-file limit (RLIMIT_NOFILE {nofile}) leaves room "
                                f"for {limit} connections; raise it (ulimit -n, LimitNOFILE=)")
        if limit < configured:
            self._observer.log.warning("connection_limit_lowered", configured=configured, applied=limit,
                                       rlimit_nofile=nofile)
        return limit

    @property
    def tls(self) -> TlsCertificates | None:
        """The TCP listener's certificates (a live stage: re-read on reload), None without TLS or before start."""
        return self._tls

    async def close(self) -> None:
        """Stop listening, let requests in progress finish, remove the Unix socket (idempotent)."""
        connections, self.connections = self.connections, None
        if connections is not None:
            await connections.close(CLOSE_TIMEOUT)
        unix, self._unix = self._unix, None
        if unix is not None:
            unix.remove()
