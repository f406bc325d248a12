"""Configuration: frozen dataclasses, one per TOML section, validated once at start-up.

Every error names the key (``batch.max_events must be between 1 and 50, got 80``).
Environment variables ``FORWARDER_<SECTION>__<KEY>`` override the file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import reprlib
import tomllib
import urllib.parse
from dataclasses import dataclass, field, fields
from typing import Any, Collection, Iterable, Mapping

from forwarder.evidently.protocol import MAX_EVENTS_PER_CALL, project_error, region_error
from forwarder.region import resolve_region
from forwarder.reading import MiB, FileRefused, read_bounded

ENV_PREFIX = "FORWARDER_"
# A field the daemon fills in, not a key a user sets (e.g. where evidently.region came from).
DERIVED = {"derived": True}
MAX_CONFIG_BYTES = MiB  # a configuration file beyond this is refused, never read whole
GiB, TiB = 1 << 30, 1 << 40
MAX_RATE = 1_000_000  # requests/s: evidently.max_rate's ceiling, far above any quota
MIN_RATE = 0.5  # requests/s: the rate limiter's floor (it never stops probing entirely)
# The names evidently.rate_controller accepts in production, in the order an error lists them;
# delivery/rate.py's SHIPPED_CONTROLLERS implements each (a benchmark passes its own names in).
RATE_CONTROLLERS = ("cubic", "scaled")
# An AWS region name: us-east-1, eu-central-2, us-gov-west-1, cn-northwest-1.
REGION_PATTERN = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}", re.ASCII)
UNIX_PATH_MAX = 107  # bytes of a Unix socket address (sun_path), less its terminating NUL

# Published PutProjectEvents quota, requests/s per account; adjustable by AWS.
_HIGH_QUOTA_REGIONS = frozenset({"us-east-1", "us-west-2", "eu-west-1"})


def region_quota(region: str) -> float:
    """The region's published PutProjectEvents quota in requests/s."""
    return 1000.0 if region in _HIGH_QUOTA_REGIONS else 200.0


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class IntakeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 1_048_576
    max_events_per_request: int = 500
    auth: str = "none"  # "none", "sigv4" (credentials_file), "token" (token_file) or "mtls" (tls_client_ca_file)
    credentials_file: str = ""  # AWS shared-credentials file: one profile per accepted key pair
    token_file: str = ""  # one bearer token per line
    allow_unauthenticated: bool = False  # auth = "none" on a non-loopback host, on purpose
    # Listeners. port = -1: no TCP listener (the Unix socket only).
    unix_socket: str = ""  # path; "": none
    unix_socket_mode: str = "0660"  # octal permission bits of the socket file
    tls_cert_file: str = ""  # PEM certificate chain; with tls_key_file the TCP listener speaks TLS 1.2+
    tls_key_file: str = ""
    tls_client_ca_file: str = ""  # auth = "mtls": PEM bundle of the CAs whose client certificates are accepted
    tls_allowed_identities: tuple[str, ...] = ()  # auth = "mtls": SAN URI/DNS or subject CN; () admits any
    # Connections (forwarder/intake/connections.py).
    max_connections: int = 4096  # lowered at start to fit RLIMIT_NOFILE
    idle_timeout: float = 60.0  # seconds a connection may wait for its next request's headers to complete
    header_timeout: float = 10.0  # seconds from a request's first byte to the end of its headers
    body_timeout: float = 30.0  # seconds from the end of the headers to the end of the body
    max_header_bytes: int = 32_768  # request line and headers of one request, in total
    # The datagram intake (forwarder/intake/datagram/stage.py): one sendto per event, no answer.
    datagram_socket: str = ""  # path of a Unix datagram socket; "": none
    datagram_socket_mode: str = "0660"  # octal permission bits of the socket file
    datagram_port: int = 0  # UDP port on datagram_host; 0: none
    datagram_host: str = "127.0.0.1"  # must be a loopback address
    datagram_max_bytes: int = 65_536  # one datagram; larger ones are counted as oversized
    datagram_rcvbuf: int = 4_194_304  # SO_RCVBUF asked for the UDP socket (bytes)


@dataclass(frozen=True)
class MetricsConfig:
    port: int = 0  # 0: /metrics is served on the intake port only
    host: str = ""  # "": the intake's host


@dataclass(frozen=True)
class BufferConfig:
    type: str = "memory"
    path: str = "/var/lib/forwarder"
    max_events: int = 100_000
    max_bytes: int = 268_435_456
    when_full: str = "reject"
    fsync: str = "normal"


@dataclass(frozen=True)
class BatchConfig:
    max_events: int = 50
    flush_interval: float = 1.0  # seconds the oldest event of a batch may wait


@dataclass(frozen=True)
class EvidentlyConfig:
    region: str = "us-east-1"  # unset: AWS_REGION, AWS_DEFAULT_REGION, the profile's region, else us-east-1
    region_source: str = field(default="default", compare=False, metadata=DERIVED)  # where region came from
    endpoint_url: str = ""
    default_project: str = ""
    concurrency: int = 4
    initial_rate: float = 0.0  # requests/s; 0 means a tenth of max_rate
    max_rate: float = 0.0  # requests/s; 0 means the region's published quota
    request_timeout: float = 10.0
    rate_controller: str = "cubic"  # "scaled" for a fleet of many forwarders on one quota
    # A client certificate chain and key (PEM) presented to an https endpoint_url: a central tier's mTLS intake
    client_cert_file: str = ""
    client_key_file: str = ""
    # false: calls go out unsigned (no AWS credentials needed), for a central tier with intake.auth = "mtls"
    sign_requests: bool = True

    @property
    def effective_max_rate(self) -> float:
        return self.max_rate or region_quota(self.region)

    @property
    def effective_initial_rate(self) -> float:
        return min(self.initial_rate or self.effective_max_rate / 10, self.effective_max_rate)


@dataclass(frozen=True)
class RetryConfig:
    max_elapsed: float = 600.0  # seconds from an event's first attempt to dead letter
    initial_backoff: float = 0.1
    max_backoff: float = 20.0
    not_found_grace: float = 90.0  # seconds a missing project (404) may take to appear before its events are dead-lettered


@dataclass(frozen=True)
class DeadLetterConfig:
    path: str = "/var/lib/forwarder/dead-letter.ndjson"
    max_bytes: int = 104_857_600  # rotate the file beyond this size


@dataclass(frozen=True)
class ShutdownConfig:
    drain_timeout: float = 20.0


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True)
class Config:
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    evidently: EvidentlyConfig = field(default_factory=EvidentlyConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    dead_letter: DeadLetterConfig = field(default_factory=DeadLetterConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def load(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None, *,
         regular_only: bool = False, controllers: Collection[str] = RATE_CONTROLLERS) -> Config:
    """Read the TOML file (if any), apply environment overrides and validate; raises ConfigError only.

    ``regular_only``: refuse a FIFO or a device at ``path`` (a reload must not
    wait for a writer); at start a pipe such as ``--config <(...)`` is read.
    ``controllers``: the rate controllers ``evidently.rate_controller`` may name.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read(path, regular_only)
    try:
        return from_dict(raw, os.environ if environ is None else environ, controllers)
    except ConfigError:
        raise
    except RecursionError:  # a value nested deep enough to reach the interpreter's limit while checked
        raise ConfigError(f"config file {path} nests a value too deeply to be checked") from None
    except Exception as e:  # nothing in a configuration may end in a traceback: a bug here is one line too
        raise ConfigError(f"config file {path} could not be checked: {type(e).__name__}: {_show(str(e))}") from e


def _read(path: str | os.PathLike[str], regular_only: bool) -> dict[str, Any]:
    try:
        return tomllib.loads(read_bounded(path, MAX_CONFIG_BYTES, regular_only=regular_only).decode())
    except FileRefused as e:
        raise ConfigError(f"config file {path} {e}") from None
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a file") from None
    except PermissionError:
        raise ConfigError(f"config file {path} cannot be read: permission denied") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}): TOML files must be") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(f"config file {path} nests arrays or inline tables too deeply "
                          "(more than a few hundred levels)") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None


def from_dict(raw: Mapping[str, Any], environ: Mapping[str, str] | None = None,
              controllers: Collection[str] = RATE_CONTROLLERS) -> Config:
    """Validate a {section: {key: value}} mapping with ``FORWARDER_*`` overrides from ``environ``.

    ``evidently.rate_controller`` must name one of ``controllers``: the shipped
    ones, unless a benchmark passes its own.
    """
    known = {f.name: f for f in fields(Config)}
    for name, value in raw.items():
        if name not in known:
            raise ConfigError(f"unknown section [{name}]; known: {', '.join(known)}")
        if not isinstance(value, Mapping):
            raise ConfigError(f"[{name}] must be a table of keys, got {name} = {_show(value)}")
    from_env = _env_values(environ or {})
    sections: dict[str, Any] = {}
    for name, f in known.items():
        values = {**raw.get(name, {}), **{k: v for (s, k), (v, _) in from_env.items() if s == name}}
        sections[name] = _build(name, f.default_factory, values)  # type: ignore[misc]
    config = _with_region(Config(**sections), raw, from_env, environ or {})
    try:
        _validate(config)
        _choice("evidently.rate_controller", config.evidently.rate_controller, tuple(controllers))
    except ConfigError as e:  # say which variable set the value, when one did
        sources = [var for (s, k), (_, var) in from_env.items() if str(e).startswith(f"{s}.{k} ")]
        if sources:
            raise ConfigError(f"{e} (set by {sources[0]})") from None
        raise
    return config


def _with_region(config: Config, raw: Mapping[str, Any], from_env: dict[tuple[str, str], tuple[Any, str]],
                 environ: Mapping[str, str]) -> Config:
    """evidently.region as set, else as the AWS SDKs resolve it; with where it came from."""
    if ("evidently", "region") in from_env:
        source = from_env[("evidently", "region")][1]
        region = config.evidently.region
    elif "region" in raw.get("evidently", {}):
        region, source = config.evidently.region, "evidently.region"
    else:
        region, source = resolve_region(environ)
    return dataclasses.replace(config, evidently=dataclasses.replace(config.evidently, region=region,
                                                                      region_source=source))


def _settable(cls: type) -> dict[str, Any]:
    """The keys of a section a user may set (derived fields excluded)."""
    return {f.name: f for f in fields(cls) if not f.metadata.get("derived")}


def _env_values(environ: Mapping[str, str]) -> dict[tuple[str, str], tuple[Any, str]]:
    """(section, key) -> (value, variable) for every FORWARDER_<SECTION>__<KEY> variable."""
    sections = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]
    out: dict[tuple[str, str], tuple[Any, str]] = {}
    for var, text in environ.items():
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        section, _, key = var[len(ENV_PREFIX):].lower().partition("__")
        if section not in sections:
            raise ConfigError(f"environment variable {var} names no section; known: {', '.join(sections)}")
        names = _settable(sections[section])
        if key not in names:
            raise ConfigError(f"environment variable {var} names no key of [{section}]; "
                              f"known: {', '.join(names)}")
        out[(section, key)] = (_parse_env(var, f"{section}.{key}", names[key].type, text), var)
    return out


_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "tuple[str, ...]": "a list of strings"}


# What an environment variable may say for a number: ASCII digits only. Python's int()
# and float() also take "1_0" and full-width or other Unicode digits ("１０"), which no
# one means as 10; inf and nan are let through to be refused as not finite.
_ENV_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_ENV_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|infinity|nan)",
                        re.ASCII | re.IGNORECASE)


def _parse_env(var: str, key: str, typ: Any, text: str) -> Any:
    typ = typ if isinstance(typ, str) else typ.__name__
    refused = ConfigError(f"{key} must be {_TYPE_NAMES.get(typ, typ)} written in ASCII digits, "
                          f"got {_show(text)} (set by {var})")
    if typ == "int":
        if not _ENV_INT.fullmatch(text.strip()):
            raise refused
        return int(text)
    if typ == "float":
        if not _ENV_FLOAT.fullmatch(text.strip()):
            raise refused
        return float(text)
    if typ == "bool":
        try:
            return {"true": True, "false": False}[text.lower()]
        except KeyError:
            raise ConfigError(f"{key} must be true or false, got {_show(text)} (set by {var})") from None
    if typ.startswith("tuple"):  # a list: comma-separated
        return tuple(item.strip() for item in text.split(",") if item.strip())
    return text


def _show(value: Any) -> str:
    """A value for an error message: its repr, cut short (a value may be megabytes, or nested deep)."""
    return _SHOW.repr(value)


_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 80
_SHOW.maxlevel = 3


def _build(section: str, cls: type, values: dict[str, Any]) -> Any:
    by_name = _settable(cls)
    for key, value in values.items():
        if key not in by_name:
            raise ConfigError(f"unknown key {section}.{key}; known: {', '.join(by_name)}")
        want = by_name[key].type if isinstance(by_name[key].type, str) else by_name[key].type.__name__
        if want == "float" and isinstance(value, int) and not isinstance(value, bool):
            values[key] = value = float(value)
        elif want.startswith("tuple") and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            values[key] = value = tuple(value)
        elif not _is_type(value, want):
            raise ConfigError(f"{section}.{key} must be {_TYPE_NAMES.get(want, want)}, got {_show(value)}")
        if want == "float" and not math.isfinite(value):
            raise ConfigError(f"{section}.{key} must be a finite number, got {value!r}")
        if want == "str" and "\x00" in value:  # no path, name or address holds one; open() would raise
            raise ConfigError(f"{section}.{key} must not contain a NUL character, got {_show(value)}")
    return cls(**values)


def _is_type(value: Any, want: str) -> bool:
    if isinstance(value, bool):
        return want == "bool"
    return {"int": int, "float": float, "str": str}.get(want, object) is type(value) or (
        want == "float" and isinstance(value, float)
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _range(key: str, value: float, low: float, high: float = math.inf, unit: str = "") -> None:
    unit = f" {unit}" if unit else ""
    if high == math.inf:
        _check(value >= low and math.isfinite(value), f"{key} must be at least {low}{unit}, got {value}")
    else:
        _check(low <= value <= high, f"{key} must be between {low} and {high}{unit}, got {value}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{key} must be one of {', '.join(map(repr, choices))}, got {_show(value)}")


def _rate(key: str, value: float) -> None:
    _check(value == 0 or value >= MIN_RATE,
           f"{key} must be 0 (the default) or at least {MIN_RATE} requests/s (the limiter's floor), got {value}")


def is_loopback_address(host: str) -> bool:
    """Whether ``host`` is a loopback IP address (a name never is: it may resolve anywhere)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_host(host: str) -> bool:
    """Whether intake.host only accepts connections from this machine (a name other than localhost might not)."""
    return host == "localhost" or is_loopback_address(host)


def _validate(c: Config) -> None:
    _check(bool(c.intake.host.strip()),
           "intake.host must not be empty; name an address (0.0.0.0 listens on every IPv4 address)")
    _range("intake.port", c.intake.port, -1, 65535)
    _check(c.intake.port != -1 or bool(c.intake.unix_socket),
           "intake.port = -1 (no TCP listener) needs intake.unix_socket")
    _validate_unix_socket("intake.unix_socket", c.intake.unix_socket)
    _check(_octal_mode(c.intake.unix_socket_mode) is not None,
           f"intake.unix_socket_mode must be octal permission bits like \"0660\", got {_show(c.intake.unix_socket_mode)}")
    _check(bool(c.intake.tls_cert_file) == bool(c.intake.tls_key_file),
           "intake.tls_cert_file and intake.tls_key_file must be set together")
    _check(not c.intake.tls_cert_file or c.intake.port != -1,
           "intake.tls_cert_file applies to the TCP listener, and intake.port is -1")
    _range("intake.max_connections", c.intake.max_connections, 1, 1_048_576)
    _check(0 < c.intake.idle_timeout <= 3600,
           f"intake.idle_timeout must be between 0 (exclusive) and 3600 seconds, got {c.intake.idle_timeout}")
    _check(0 < c.intake.header_timeout <= 3600,
           f"intake.header_timeout must be between 0 (exclusive) and 3600 seconds, got {c.intake.header_timeout}")
    _check(0 < c.intake.body_timeout <= 3600,
           f"intake.body_timeout must be between 0 (exclusive) and 3600 seconds, got {c.intake.body_timeout}")
    _range("intake.max_header_bytes", c.intake.max_header_bytes, 4096, 1_048_576)
    _range("intake.max_body_bytes", c.intake.max_body_bytes, 1024, GiB, "bytes")
    _range("intake.max_events_per_request", c.intake.max_events_per_request, 1, 1_000_000)
    _choice("intake.auth", c.intake.auth, ("none", "sigv4", "token", "mtls"))
    _check(c.intake.auth != "sigv4" or bool(c.intake.credentials_file),
           "intake.credentials_file must be set when intake.auth is 'sigv4'")
    _check(c.intake.auth != "token" or bool(c.intake.token_file),
           "intake.token_file must be set when intake.auth is 'token'")
    _validate_mtls(c.intake)
    _check(c.intake.auth != "none" or is_loopback_host(c.intake.host) or c.intake.allow_unauthenticated,
           f"intake.host = {_show(c.intake.host)} is not a loopback address and intake.auth is 'none': anyone who reaches "
           "it could write events into your Evidently projects; set intake.auth = 'sigv4' or 'token', or "
           "intake.allow_unauthenticated = true to run it open on purpose")
    _validate_datagram(c.intake)
    _range("metrics.port", c.metrics.port, 0, 65535)
    _choice("buffer.type", c.buffer.type, ("memory", "disk"))
    _range("buffer.max_events", c.buffer.max_events, 1, 1_000_000_000)
    _range("buffer.max_bytes", c.buffer.max_bytes, 1024, TiB, "bytes")
    _choice("buffer.when_full", c.buffer.when_full, ("reject", "drop_oldest"))
    _choice("buffer.fsync", c.buffer.fsync, ("normal", "always"))
    _check(c.buffer.type != "disk" or bool(c.buffer.path), "buffer.path must be set when buffer.type is 'disk'")
    _range("batch.max_events", c.batch.max_events, 1, MAX_EVENTS_PER_CALL)
    _check(0 < c.batch.flush_interval <= 3600,
           f"batch.flush_interval must be between 0 (exclusive) and 3600 seconds, got {c.batch.flush_interval}")
    _check(bool(c.evidently.region), "evidently.region must not be empty")
    _check(REGION_PATTERN.fullmatch(c.evidently.region) is not None,
           f"evidently.region must be an AWS region name such as us-east-1 or eu-west-2, got {_show(c.evidently.region)}")
    _check(c.evidently.endpoint_url == "" or c.evidently.endpoint_url.startswith(("http://", "https://")),
           f"evidently.endpoint_url must start with http:// or https://, got {_show(c.evidently.endpoint_url)}")
    if c.evidently.endpoint_url:
        problem = _url_problem(c.evidently.endpoint_url)
        _check(problem is None, f"evidently.endpoint_url {problem}, got {_show(c.evidently.endpoint_url)}")
    if c.evidently.default_project:
        problem = project_error(c.evidently.default_project) or region_error(c.evidently.default_project,
                                                                               c.evidently.region)
        _check(problem is None, f"evidently.default_project is invalid: {problem}")
    _check(bool(c.evidently.client_cert_file) == bool(c.evidently.client_key_file),
           "evidently.client_cert_file and evidently.client_key_file must be set together")
    _check(not c.evidently.client_cert_file or c.evidently.endpoint_url.startswith("https://"),
           "evidently.client_cert_file is presented over TLS only: evidently.endpoint_url must be an https:// URL "
           "(a central tier's intake)")
    _check(c.evidently.sign_requests or bool(c.evidently.endpoint_url),
           "evidently.sign_requests = false needs evidently.endpoint_url (a central tier's intake): AWS itself "
           "refuses unsigned calls")
    _range("evidently.concurrency", c.evidently.concurrency, 1, 1024)
    _rate("evidently.initial_rate", c.evidently.initial_rate)
    _rate("evidently.max_rate", c.evidently.max_rate)
    _range("evidently.max_rate", c.evidently.max_rate, 0, MAX_RATE, "requests/s")
    _check(c.evidently.initial_rate <= c.evidently.effective_max_rate,
           f"evidently.initial_rate ({c.evidently.initial_rate}) must not exceed evidently.max_rate "
           f"({c.evidently.effective_max_rate})")
    _range("evidently.request_timeout", c.evidently.request_timeout, 0.001, 3600, "seconds")
    _range("retry.max_elapsed", c.retry.max_elapsed, 0.001, 604_800, "seconds")  # a week
    _range("retry.initial_backoff", c.retry.initial_backoff, 0.001, 3600, "seconds")
    _range("retry.max_backoff", c.retry.max_backoff, 0.001, 3600, "seconds")
    _check(c.retry.max_backoff >= c.retry.initial_backoff,
           f"retry.max_backoff must be at least retry.initial_backoff ({c.retry.initial_backoff}), got {c.retry.max_backoff}")
    _check(bool(c.dead_letter.path), "dead_letter.path must not be empty")
    _range("dead_letter.max_bytes", c.dead_letter.max_bytes, 4096, TiB, "bytes")
    _range("shutdown.drain_timeout", c.shutdown.drain_timeout, 0, 3600, "seconds")
    _choice("log.level", c.log.level, ("debug", "info", "warning", "error"))
    _choice("log.format", c.log.format, ("json", "console"))


def _validate_mtls(c: IntakeConfig) -> None:
    mtls = c.auth == "mtls"
    _check(not mtls or bool(c.tls_cert_file),
           "intake.auth = 'mtls' needs the TLS listener: set intake.tls_cert_file and intake.tls_key_file")
    _check(mtls == bool(c.tls_client_ca_file),
           "intake.tls_client_ca_file must be set when intake.auth is 'mtls', and only then"
           if mtls else "intake.tls_client_ca_file applies only with intake.auth = 'mtls'")
    _check(mtls or not c.tls_allowed_identities, "intake.tls_allowed_identities applies only with intake.auth = 'mtls'")
    for identity in c.tls_allowed_identities:
        _check(bool(identity.strip()) and "*" not in identity.rstrip("*") and identity != "*",
               f"intake.tls_allowed_identities: {identity!r} must be a SAN URI (spiffe://...), a DNS name or a "
               "subject CN, with at most a trailing * (spiffe://cluster.local/ns/shop/*)")


# A host name as botocore accepts one for an endpoint: dot-separated labels of letters, digits and hyphens.
_HOST_NAME = re.compile(r"((?!-)[a-z0-9-]{1,63}(?<!-)\.)*(?!-)[a-z0-9-]{1,63}(?<!-)\.?", re.ASCII | re.IGNORECASE)


def _url_problem(url: str) -> str | None:
    """Why botocore would refuse ``url`` as an endpoint (it raises at start), or None."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number from 0 to 65535)
    except ValueError as e:
        return f"is not a URL ({e})"
    host = parts.hostname or ""
    if not host:
        return "names no host"
    if not (is_ip_address(host) or (len(host) <= 255 and _HOST_NAME.fullmatch(host))):
        return f"names an invalid host {_show(host)}"
    return None


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _validate_unix_socket(key: str, path: str) -> None:
    if not path:
        return
    # intake/unix_socket.py binds it as the path itself (its temporary name,
    # reached through /proc/self/fd, costs no bytes); the binder makes it absolute.
    length = len(os.fsencode(os.path.abspath(path)))
    _check(length <= UNIX_PATH_MAX,
           f"{key} must be at most {UNIX_PATH_MAX} bytes long as an absolute path (what a Unix socket address "
           f"holds), got {length}")


def _validate_datagram(c: IntakeConfig) -> None:
    _validate_unix_socket("intake.datagram_socket", c.datagram_socket)
    _check(_octal_mode(c.datagram_socket_mode) is not None,
           f"intake.datagram_socket_mode must be octal permission bits like \"0660\", got {_show(c.datagram_socket_mode)}")
    _range("intake.datagram_port", c.datagram_port, 0, 65535)
    _check(is_loopback_address(c.datagram_host),
           f"intake.datagram_host must be a loopback address (127.0.0.1 or ::1): UDP datagrams are not "
           f"authenticated, so the datagram intake never listens beyond this machine; got {_show(c.datagram_host)}")
    _range("intake.datagram_max_bytes", c.datagram_max_bytes, 1024, 1_048_576)
    _range("intake.datagram_rcvbuf", c.datagram_rcvbuf, 4096, 2**31 - 1)


def _octal_mode(text: str) -> int | None:
    """``"0660"`` -> 0o660; None unless 3 or 4 octal digits within 0o777."""
    if not 3 <= len(text) <= 4 or any(ch not in "01234567" for ch in text):
        return None
    mode = int(text, 8)
    return mode if mode <= 0o777 else None


def merge_live(old: Config, new: Config, keys: Iterable[str]) -> Config:
    """The running configuration after a reload: ``keys`` (dotted) from ``new``, every other from ``old``."""
    changes: dict[str, dict[str, Any]] = {}
    for key in keys:
        section, name = key.split(".")
        changes.setdefault(section, {})[name] = getattr(getattr(new, section), name)
    return dataclasses.replace(old, **{section: dataclasses.replace(getattr(old, section), **values)
                                       for section, values in changes.items()})


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys whose value differs between two configurations."""
    out = []
    for section in fields(Config):
        a, b = getattr(old, section.name), getattr(new, section.name)
        for f in _settable(type(a)).values():
            if getattr(a, f.name) != getattr(b, f.name):
                out.append(f"{section.name}.{f.name}")
    return out


def to_toml(config: Config | Mapping[str, Mapping[str, Any]]) -> str:
    """TOML for a configuration or a plain {section: {key: value}} mapping (check-config's output)."""
    if isinstance(config, Config):
        sections = {s.name: {k: getattr(getattr(config, s.name), k) for k in _settable(type(getattr(config, s.name)))}
                    for s in fields(Config)}
    else:
        sections = config
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = _toml_string(value)
            elif isinstance(value, (list, tuple)):
                text = "[" + ", ".join(_toml_string(v) for v in value) + "]"
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
