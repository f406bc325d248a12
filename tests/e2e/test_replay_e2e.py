"""``forwarder replay`` as a process, into real intakes: bearer tokens, SigV4 over TLS, a Unix socket.

Each intake is a ``forwarder run`` delivering to an emulator process. The
dead-letter file holds numbered events ({"i": n}); the checks read "every n
arrived at the emulator exactly once" after an interrupted run (SIGINT), the
run that resumes it, and a last run that finds nothing to send. The intake's
buffer is small and the emulator slow, so the intake answers 429 part of the
time: a replay takes seconds, which leaves room to interrupt it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from forwarder.delivery.deadletter import lines
from forwarder.emulator.harness import EmulatorProcess, ForwarderProcess, forwarder_command, wait_for
from tests.tools import make_ca_and_server_pair

pytestmark = pytest.mark.e2e

TOTAL = 200
REGION = "eu-west-1"
KEY, SECRET = "AKIDREPLAY", "replay-secret"
TOKEN = "replay-token-0123456789abcdef"


def write_dead_letters(path: Path) -> None:
    path.write_bytes(b"".join(
        lines("checkout" if i % 40 < 20 else "search", [orjson.dumps({"data": orjson.dumps({"i": i}).decode(),
                                                                      "timestamp": 1, "type": "aws.evidently.custom"})],
              "ThrottlingException", "slow", 3, 1.0, 2.0) for i in range(TOTAL)))


def token_setup(tmp_path: Path) -> tuple[dict[str, Any], list[str], dict[str, str], Any]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    tokens.chmod(0o600)
    return {"auth": "token", "token_file": str(tokens)}, ["--auth", "token"], {"FORWARDER_TOKEN": TOKEN}, None


def sigv4_tls_setup(tmp_path: Path) -> tuple[dict[str, Any], list[str], dict[str, str], Any]:
    import ssl
    creds = tmp_path / "credentials"
    creds.write_text(f"[replay]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\n")
    creds.chmod(0o600)
    ca, cert, key = make_ca_and_server_pair(tmp_path)
    intake = {"auth": "sigv4", "credentials_file": str(creds), "tls_cert_file": str(cert), "tls_key_file": str(key)}
    env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_CA_BUNDLE": str(ca),
           "AWS_REGION": REGION, "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    return intake, ["--auth", "sigv4"], env, ssl.create_default_context(cafile=str(ca))


def unix_socket_setup(tmp_path: Path) -> tuple[dict[str, Any], list[str], dict[str, str], Any]:
    socket_path = tmp_path / "intake.sock"
    return {"unix_socket": str(socket_path)}, ["--intake", f"unix://{socket_path}"], {}, None


SETUPS = {"token": token_setup, "sigv4 over TLS": sigv4_tls_setup, "unix socket": unix_socket_setup}


def replay_process(tmp_path: Path, dead_letters: Path, intake: ForwarderProcess, flags: list[str],
                   env: dict[str, str]) -> subprocess.Popen[str]:
    intake_flag = [] if "--intake" in flags else ["--intake", intake.url]
    return subprocess.Popen(forwarder_command("replay", str(dead_letters), *intake_flag, *flags, "--max-events", "20",
                                              "--timeout", "60"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env}, cwd=tmp_path)


def committed(dead_letters: Path) -> int:
    try:
        state = orjson.loads(Path(f"{dead_letters}.replayed").read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return 0
    return sum(entry["offset"] for entry in state["files"].values())


async def finish(proc: subprocess.Popen[str], timeout: float = 60.0) -> tuple[int, str, str]:
    out, err = await asyncio.to_thread(proc.communicate, timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.parametrize("setup", SETUPS.values(), ids=SETUPS.keys())
async def test_replay_delivers_every_dead_letter_exactly_once_across_an_interrupted_run_and_two_more(
        tmp_path, procs, session, setup):
    intake_keys, flags, env, tls = setup(tmp_path)
    emulator = procs(EmulatorProcess(tmp_path, "--latency", "0.3"))
    await emulator.ready(session)
    forwarder = procs(ForwarderProcess(tmp_path, {
        "intake": intake_keys, "evidently": {"endpoint_url": emulator.url, "region": REGION, "concurrency": 1},
        "buffer": {"max_events": 40}, "batch": {"flush_interval": 0.05},
    }, tls=tls))
    await forwarder.ready(session)
    dead_letters = tmp_path / "replay" / "dead-letter.ndjson"
    dead_letters.parent.mkdir()
    write_dead_letters(dead_letters)

    if "AWS_CA_BUNDLE" in env:  # an intake whose CA is not trusted: one line naming the fix, nothing sent
        untrusted = {k: v for k, v in env.items() if k != "AWS_CA_BUNDLE"}
        code, out, err = await finish(replay_process(tmp_path, dead_letters, forwarder, flags, untrusted))
        assert code == 2 and "CERTIFICATE_VERIFY_FAILED" in err and "--ca-bundle or AWS_CA_BUNDLE" in err, err
        assert err.count("\n") == 1 and committed(dead_letters) == 0

    # 1. Interrupted once some requests were answered.
    first = replay_process(tmp_path, dead_letters, forwarder, flags, env)

    async def some_answered() -> bool:
        assert first.poll() is None, first.communicate()
        return committed(dead_letters) > 0
    await wait_for(some_answered, 30, "the first answered request", interval=0.01)
    first.send_signal(signal.SIGINT)
    code, out, err = await finish(first)
    assert code == 1 and "interrupted: run the same command again to resume" in out, (out, err)
    assert "Traceback" not in err

    # 2. Resumed: the rest.
    code, out, err = await finish(replay_process(tmp_path, dead_letters, forwarder, flags, env))
    assert code == 0, (out, err)
    resumed = int(out.split("replayed ")[1].split(" ")[0])
    assert 0 < resumed < TOTAL, out

    # 3. Nothing left.
    code, out, err = await finish(replay_process(tmp_path, dead_letters, forwarder, flags, env))
    assert code == 0 and out.startswith("nothing to replay"), (out, err)

    async def all_delivered() -> bool:
        return await emulator.accepted(session) >= TOTAL
    await wait_for(all_delivered, 60, f"{TOTAL} events at the emulator", interval=0.1)
    await forwarder.wait_drained(session, 30)
    counts = Counter(orjson.loads(e["data"])["i"] for e in await emulator.events(session))
    assert counts == Counter(range(TOTAL))
