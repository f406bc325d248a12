"""Every example in README.md and docs/ runs as written.

Each fenced block with a language carries an HTML comment on the line before it:
``<!-- example: SETUP -->`` runs it in SETUP (below), ``<!-- example: not run
by the docs test: WHY -->`` says why it is not run (a Docker build, a systemd
install, an AWS account). A block without either fails the test, so a new
example cannot go unrun unnoticed.

Setups that need a daemon run in a network and mount namespace of their own
(``unshare``, root): ports 8080, 8081 and 8089 are free there as the examples
assume, ``/run`` and ``/var/lib`` are private and empty, and ``forwarder``
resolves to 127.0.0.1 as a service name would. Inside, this file runs again as
a script (``--inside``): it starts the setup's processes, runs each example with
its interpreter (sh: bash -euo pipefail; python: the venv's; js: node, which
must exit by itself) and, as every such example sends events, waits for the
emulator to have accepted more than before.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_TIMEOUT = 60  # seconds for one example
TOKEN = "docs-example-token-0123456789abcdef"

_MARKER = re.compile(r"^\s*<!-- example: (?P<setup>.*?) -->\s*$")
_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
NOT_RUN = "not run by the docs test:"
SERVED = ("local", "token", "sigv4", "replay", "emulator")  # run inside a namespace, against the emulator


@dataclass(frozen=True)
class Example:
    where: str  # file:line of the opening fence
    setup: str
    lang: str
    code: str


def examples() -> list[Example]:
    """Every fenced block with a language in README.md and docs/*.md, with its marker ('' when none)."""
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            fence = _FENCE.match(lines[i])
            if fence is None:
                i += 1
                continue
            indent, lang, start = fence["indent"], fence["lang"], i
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
                i += 1
            i += 1
            marker = _MARKER.match(lines[start - 1]) if start else None
            if lang:
                found.append(Example(f"{path.relative_to(ROOT)}:{start + 1}", marker["setup"] if marker else "",
                                     lang, "\n".join(body) + "\n"))
    return found


def by_setup(setup: str) -> list[Example]:
    return [e for e in examples() if e.setup == setup]


# --- outside: what pytest runs ---------------------------------------------------------------------------


def test_every_code_block_is_marked_to_run_or_says_why_not():
    unmarked = [e.where for e in examples() if not e.setup]
    assert unmarked == [], f"blocks without <!-- example: SETUP --> or <!-- example: {NOT_RUN} WHY -->"
    known = {*SERVED, "config", "credentials-file", "fleet-args"}
    for e in examples():
        assert e.setup in known or (e.setup.startswith(NOT_RUN) and len(e.setup) > len(NOT_RUN) + 5), e
    assert len([e for e in examples() if e.setup in SERVED]) >= 10


def test_configuration_examples_are_accepted_by_the_daemon():
    from forwarder import config as config_mod
    blocks = by_setup("config")
    assert blocks
    for e in blocks:
        config_mod.from_dict(tomllib.loads(e.code), {})


def test_the_credentials_file_example_is_read_by_the_intake(tmp_path):
    from forwarder.intake.auth import load_credentials
    (block,) = by_setup("credentials-file")
    path = tmp_path / "credentials"
    path.write_text(block.code)
    path.chmod(0o600)
    assert "AKIDFWDCHECKOUT01" in load_credentials(str(path))


def test_fleet_commands_are_accepted_by_the_fleet_simulation():
    """They run for minutes (make fleet): checked to parse as written, not run."""
    from benchmarks.fleet.runner import parse_args
    commands = [line for e in by_setup("fleet-args") for line in e.code.splitlines() if line.strip()]
    assert commands
    for line in commands:
        argv = shlex.split(line)
        assert argv[:3] == [".venv/bin/python", "-m", "benchmarks.fleet"], line
        parse_args(argv[3:])


def _namespace_tools() -> None:
    from tests.tools import require_tool
    for tool in ("unshare", "mount", "ip", "curl", "node", "aws"):
        require_tool(tool)
    probe = subprocess.run(["unshare", "--net", "--mount", "--fork", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        message = f"cannot make a network and mount namespace (root needed): {probe.stderr.strip()}"
        if os.environ.get("CI"):
            raise AssertionError(message)
        import pytest
        pytest.skip(message)


import pytest  # noqa: E402  (after the helpers above, which the --inside script also uses)


@pytest.mark.e2e
@pytest.mark.parametrize("setup", SERVED)
def test_examples_run_as_written_and_deliver(tmp_path, setup):
    _namespace_tools()
    blocks = by_setup(setup)
    assert blocks, f"no example for setup {setup}"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"setup": setup, "work": str(tmp_path), "examples": [asdict(e) for e in blocks]}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["unshare", "--net", "--mount", "--fork", sys.executable, __file__, "--inside", str(spec)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT * (len(blocks) + 2), env=env)
    results_path = tmp_path / "results.json"
    assert results_path.exists(), f"the setup did not run:\n{done.stdout}\n{done.stderr}"
    failures = [r for r in json.loads(results_path.read_text()) if not r["ok"]]
    assert failures == [], "\n\n".join(f"{r['where']} ({r['setup']}): {r['why']}\n{r['output']}" for r in failures)


# --- inside the namespace ---------------------------------------------------------------------------------


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read()
    except OSError:
        return 0, b""


def _wait(what: str, check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _accepted() -> int:
    status, body = _get("http://127.0.0.1:8081/_emulator/stats")
    return int(json.loads(body)["events_accepted"]) if status == 200 else -1


def _private_mounts(work: Path) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for directory in ("/run", "/var/lib"):
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", directory], check=True)
    os.makedirs("/run/forwarder")
    os.makedirs("/var/lib/forwarder")
    hosts = work / "hosts"
    hosts.write_text("127.0.0.1 localhost forwarder\n::1 localhost\n")
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)


class Inside:
    """One setup's processes and examples, inside the namespace."""

    def __init__(self, spec: dict) -> None:
        self.setup = spec["setup"]
        self.work = Path(spec["work"])
        self.examples = [Example(**e) for e in spec["examples"]]
        self.procs: list[subprocess.Popen] = []
        venv_bin = str(Path(sys.executable).parent)
        (self.work / "home").mkdir(exist_ok=True)
        if not (self.work / ".venv").exists():
            (self.work / ".venv").symlink_to(Path(sys.executable).parent.parent)
        self.env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "HOME": str(self.work / "home"),
                    "XDG_STATE_HOME": str(self.work / "state"), "AWS_EC2_METADATA_DISABLED": "true",
                    "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_DATA_PATH"):
            self.env.pop(key, None)

    def start(self, args: list[str], env: dict[str, str], log: str) -> None:
        out = open(self.work / log, "ab")
        self.procs.append(subprocess.Popen([sys.executable, "-m", "forwarder", *args], stdout=out,
                                           stderr=subprocess.STDOUT, env={**self.env, **env}, cwd=self.work,
                                           start_new_session=True))

    def daemon_env(self, **intake: str) -> dict[str, str]:
        env = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
               "FORWARDER_EVIDENTLY__ENDPOINT_URL": "http://127.0.0.1:8081", "FORWARDER_BATCH__FLUSH_INTERVAL": "0.1",
               "FORWARDER_LOG__FORMAT": "console"}
        env.update({f"FORWARDER_INTAKE__{k.upper()}": v for k, v in intake.items()})
        return env

    def bring_up(self) -> dict[str, str]:
        """Start the setup's processes; the environment its examples get on top of the base one."""
        if self.setup in ("local", "replay"):
            self.start(["dev", "--temporary"], {"FORWARDER_INTAKE__UNIX_SOCKET": "/run/forwarder/intake.sock",
                                                "FORWARDER_INTAKE__DATAGRAM_SOCKET": "/run/forwarder/events.sock",
                                                "FORWARDER_INTAKE__DATAGRAM_PORT": "8089"}, "dev.log")
        if self.setup in ("token", "sigv4"):
            self.start(["emulator", "--port", "8081"], {}, "emulator.log")
        extra: dict[str, str] = {}
        if self.setup == "token":
            Path("/run/forwarder/tokens").write_text(TOKEN + "\n")
            os.chmod("/run/forwarder/tokens", 0o600)
            self.start(["run"], self.daemon_env(host="0.0.0.0", auth="token", token_file="/run/forwarder/tokens"),
                       "forwarder.log")
            extra["TOKEN"] = TOKEN
        if self.setup == "sigv4":
            (credentials,) = [e for e in examples() if e.setup == "credentials-file"]
            Path("/run/forwarder/credentials").write_text(credentials.code)
            os.chmod("/run/forwarder/credentials", 0o600)
            parser = configparser.ConfigParser(interpolation=None)
            parser.read_string(credentials.code)
            extra["CHECKOUT_SECRET"] = parser["checkout-team"]["aws_secret_access_key"]
            self.start(["run"], {**self.daemon_env(host="0.0.0.0", auth="sigv4",
                                                   credentials_file="/run/forwarder/credentials"),
                                 "FORWARDER_EVIDENTLY__REGION": "eu-west-1"}, "forwarder.log")
        if self.setup == "replay":
            from forwarder.delivery.deadletter import lines
            Path("/var/lib/forwarder/dead-letter.ndjson").write_bytes(b"".join(
                lines("demo", [json.dumps({"data": json.dumps({"replayed": i}), "timestamp": 1790000000,
                                           "type": "aws.evidently.custom"}).encode()],
                      "ThrottlingException", "Rate exceeded", 5, 1790000000.0, 1790000600.0) for i in range(3)))
        if self.setup != "emulator":
            _wait("the forwarder and the emulator", lambda: _get("http://127.0.0.1:8080/readyz")[0] == 200
                  and _accepted() >= 0)
        return extra

    def run(self, example: Example, extra: dict[str, str]) -> dict:
        before = _accepted()
        if example.lang == "sh":
            command = ["bash", "-euo", "pipefail", "-c", example.code]
        elif example.lang == "python":
            command = [sys.executable, "-c", example.code]
        elif example.lang == "js":
            command = ["node", "-e", example.code]
        else:
            return {"ok": False, "why": f"no runner for {example.lang}", "output": ""}
        if self.setup == "emulator":
            return self.serve(command, extra)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=self.work,
                                  env={**self.env, **extra})
        except subprocess.TimeoutExpired as e:
            return {"ok": False, "why": f"did not exit within {RUN_TIMEOUT}s", "output": str(e.stdout)}
        output = done.stdout + done.stderr
        if done.returncode != 0:
            return {"ok": False, "why": f"exit {done.returncode}", "output": output}
        try:
            _wait("the emulator to accept its events", lambda: _accepted() > before, timeout=15)
        except RuntimeError as e:
            return {"ok": False, "why": str(e), "output": output}
        return {"ok": True, "why": "", "output": output}

    def serve(self, command: list[str], extra: dict[str, str]) -> dict:
        """A block that starts a daemon: it must answer, and deliver an event posted to it."""
        log = open(self.work / "served.log", "wb")
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.work,
                                env={**self.env, **extra}, start_new_session=True)
        self.procs.append(proc)
        try:
            _wait("the served daemon", lambda: _get("http://127.0.0.1:8080/readyz")[0] == 200 and _accepted() >= 0)
            request = urllib.request.Request("http://127.0.0.1:8080/events/projects/demo", method="POST",
                                             data=b'{"events":[{"data":{"a":1}}]}',
                                             headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=5).read()
            _wait("the emulator to accept the event", lambda: _accepted() >= 1, timeout=15)
        except (RuntimeError, OSError) as e:
            return {"ok": False, "why": str(e), "output": (self.work / "served.log").read_text(errors="replace")}
        return {"ok": True, "why": "", "output": ""}

    def close(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)


def inside(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["work"])
    _private_mounts(work)
    run = Inside(spec)
    results = []
    try:
        try:
            extra = run.bring_up()
        except RuntimeError as e:
            logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in work.glob("*.log"))
            results = [{**asdict(ex), "ok": False, "why": f"setup: {e}", "output": logs} for ex in run.examples]
            return
        for example in run.examples:
            results.append({**asdict(example), **run.run(example, extra)})
    finally:
        run.close()
        (work / "results.json").write_text(json.dumps(results))


if __name__ == "__main__" and sys.argv[1:2] == ["--inside"]:
    inside(sys.argv[2])
