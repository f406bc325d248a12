"""The alerts' runbooks point at things that exist: log lines and their fields, commands, metrics.

An on-call engineer follows a runbook at the worst moment; "read the last error
from outage_started" must not send them looking for a field the code never
writes (issue 22). Log lines are found in forwarder/ by their constant event
name and the keywords of the call that writes them.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import yaml

from forwarder.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
# "outage_started" log line (its last_error field) / "dead_lettered" log lines (their error, reason fields)
LOG_REFERENCE = re.compile(r'"(\w+)" log (?:lines|line|events|event)(?:\s+\((?:its|their) ([\w, ]+?) fields?\))?')
LOG_LEVELS = {"debug", "info", "warning", "error", "critical", "exception"}


def runbooks() -> dict[str, str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: " ".join(rule["annotations"]["runbook"].split())
            for group in groups for rule in group["rules"] if "alert" in rule}


def log_lines() -> dict[str, set[str]]:
    """Event name -> every keyword any call writing it passes (log.<level>(event, ...), limited(level, event, ...))."""
    fields: dict[str, set[str]] = defaultdict(set)
    for path in (ROOT / "forwarder").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            strings = [a.value for a in node.args[:2] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if strings and strings[0] in LOG_LEVELS:  # limited("warning", "event", ...)
                strings = strings[1:]
            elif not (isinstance(node.func, ast.Attribute) and node.func.attr in LOG_LEVELS):
                continue
            if strings:
                fields[strings[0]].update(k.arg for k in node.keywords if k.arg)
    return fields


def referenced(text: str) -> list[tuple[str, list[str]]]:
    out = []
    for event, names in LOG_REFERENCE.findall(text):
        out.append((event, [n for n in re.split(r",\s*|\s+and\s+", names) if n] if names else []))
    return out


def test_the_reference_pattern_reads_events_and_their_fields():
    assert referenced('the "outage_started" log line (its last_error field) and "x_y" log events') == [
        ("outage_started", ["last_error"]), ("x_y", [])]
    assert referenced('"dead_lettered" log lines (their error, reason and event_ids fields)') == [
        ("dead_lettered", ["error", "reason", "event_ids"])]


def test_every_log_line_a_runbook_names_is_written_with_the_fields_it_names():
    written = log_lines()
    checked = 0
    for alert, text in runbooks().items():
        for event, names in referenced(text):
            assert event in written, f"{alert}: the runbook names a \"{event}\" log line that nothing writes"
            missing = set(names) - written[event]
            assert not missing, f"{alert}: \"{event}\" log lines have no field {', '.join(sorted(missing))}"
            checked += 1
    assert checked >= 6  # the outage, circuit, dead-letter and blocked runbooks at least


def test_the_commands_runbooks_name_exist():
    parser = build_parser()
    commands = set(next(a for a in parser._actions if a.dest == "command").choices)
    for alert, text in runbooks().items():
        for command in re.findall(r"`forwarder ([\w-]+)", text):
            assert command in commands, f"{alert}: `forwarder {command}` is not a command"


def test_the_outage_runbook_points_at_the_last_error_of_outage_started():
    # The field the issue found missing: it exists now, and the runbook names it.
    assert ("outage_started", ["last_error"]) in referenced(runbooks()["ForwarderEvidentlyOutage"])
    assert "last_error" in log_lines()["outage_started"]
