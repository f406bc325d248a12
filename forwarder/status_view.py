"""``forwarder status``: fetch a running forwarder's /status and render it for a person.

A compact table in the manner of ``vector top``: the overall state first (what
to look at), then the buffer, the sending side, outages and dead letters, then
one row per project. Only the standard library: the command must start fast.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import datetime
from typing import Any

from forwarder.config import Config


class StatusError(RuntimeError):
    """The forwarder could not be asked; the message says why."""


def status_url(config: Config | None) -> str:
    """Where a forwarder with this configuration answers /status (its metrics listener, else its intake)."""
    if config is None:
        return "http://127.0.0.1:8080"
    if config.metrics.port:
        return f"http://{_host(config.metrics.host or config.intake.host)}:{config.metrics.port}"
    scheme = "https" if config.intake.tls_cert_file else "http"
    return f"{scheme}://{_host(config.intake.host)}:{config.intake.port}"


def _host(host: str) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "localhost": "127.0.0.1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


def fetch(url: str, timeout: float) -> dict[str, Any]:
    """GET <url>/status as a dict; StatusError when there is no usable answer."""
    target = url.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as answer:  # noqa: S310 (a URL the user gave)
            return json.loads(answer.read())
    except urllib.error.HTTPError as e:
        raise StatusError(f"{target} answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise StatusError(f"cannot reach {target}: {reason}") from None
    except ValueError as e:
        raise StatusError(f"{target} did not answer JSON: {e}") from None


def render(doc: dict[str, Any], url: str, now: float | None = None) -> str:
    """The document as a compact table."""
    now = time.time() if now is None else now
    ev, buf, send = doc["evidently"], doc["buffer"], doc["sending"]
    creds = ev["credentials"]
    lines = [
        f"forwarder {doc['version']} at {url}, up {_duration(doc['uptime'])}: {doc['state'].upper()}",
        f"evidently   region {ev['region']} ({ev['region_source']}), endpoint {ev['endpoint'] or '-'}, "
        f"credentials {creds['method'] if creds['found'] else 'NONE FOUND'}",
    ]
    if doc.get("blocked"):
        lines.append(f"blocked     {doc['blocked']['error']} (since {_clock(doc['blocked']['since'])})")
    lines += [
        f"buffer      {buf['type']}: {buf['events']:,}/{buf['max_events']:,} events, "
        f"{_bytes(buf['bytes'])}/{_bytes(buf['max_bytes'])}{' FULL' if buf['full'] else ''}, "
        f"oldest event {_duration(buf['oldest_event_age'])}",
        f"sending     {send['measured_rate']:g} calls/s (allowed {send['allowed_rate']:g}, max {send['max_rate']:g}), "
        f"controller {send['controller']} ({send['phase'].replace('_', ' ')}), "
        f"{send['calls_in_flight']} in flight",
    ]
    if send.get("last_error"):
        lines.append(f"last error  {send['last_error']} ({_ago(send['last_error_at'], now)})")
    outage = doc.get("outage")
    lines.append("outage      none" if outage is None else
                 f"outage      since {_clock(outage['since'])} ({_duration(outage['seconds'])}), "
                 f"{outage['probes']} probes, last error: {outage['last_error']}")
    dl = doc["dead_letter"]
    lines.append(f"dead letter {dl['events']:,} events since start -> {dl['path']} ({_bytes(dl['bytes'])})")
    lines.append("")
    lines.extend(_table(doc["projects"], now))
    return "\n".join(lines)


_COLUMNS = ("PROJECT", "QUEUED", "IN FLIGHT", "DELIVERED", "DEAD", "LAST DELIVERY", "CIRCUIT")


def _table(projects: list[dict[str, Any]], now: float) -> list[str]:
    if not projects:
        return ["(no project has sent events yet)"]
    rows = [_COLUMNS]
    for p in projects:
        name = p["project"] if p["project"] != "other" else f"other ({p.get('projects', 0)} projects)"
        rows.append((name, f"{p['queued']:,}", f"{p['in_flight']:,}", f"{p['delivered']:,}",
                     f"{p['dead_lettered']:,}", _ago(p["last_delivery"], now), _circuit(p)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS) - 1)]
    out = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:])]
        out.append("  ".join(cells + [r[-1]]))
    return out


def _circuit(p: dict[str, Any]) -> str:
    if p["circuit"] == "closed":
        return "closed" if not p.get("circuits_open") else f"{p['circuits_open']} open"
    text = f"{p['circuit']}: {p['reason']}"
    if "not_found_grace" in p:
        text += f" (dead-lettered in {_duration(p['dead_lettered_in'])}, grace {p['not_found_grace']:g} s)"
    return text


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"


def _clock(iso: str | None) -> str:
    return "-" if iso is None else iso.replace("+00:00", "Z")


def _ago(iso: str | None, now: float) -> str:
    if iso is None:
        return "-"
    return f"{_duration(max(0.0, now - datetime.fromisoformat(iso).timestamp()))} ago"
