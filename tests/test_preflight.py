"""Start-up checks (issue 22): where the region comes from, check-config opening every file the
configuration names, and credentials looked for until they appear."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from forwarder.cli import main
from forwarder.config import ConfigError, from_dict
from forwarder.delivery.credentials import HOW_TO_PROVIDE, CredentialsWatch
from forwarder.region import resolve_region
from forwarder.preflight import problems
from tests.tools import make_ca_and_server_pair


@pytest.mark.parametrize("raw,environ,region,source", [
    ({"evidently": {"region": "ap-south-1"}}, {"AWS_REGION": "eu-west-1"}, "ap-south-1", "evidently.region"),
    ({}, {"FORWARDER_EVIDENTLY__REGION": "sa-east-1", "AWS_REGION": "eu-west-1"}, "sa-east-1",
     "FORWARDER_EVIDENTLY__REGION"),
    ({}, {"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "us-west-2"}, "eu-west-1", "AWS_REGION"),
    ({}, {"AWS_DEFAULT_REGION": "us-west-2"}, "us-west-2", "AWS_DEFAULT_REGION"),
    ({}, {}, "us-east-1", "default"),
])
def test_the_region_is_the_configs_else_aws_region_else_aws_default_region_else_us_east_1(
        tmp_path, raw, environ, region, source):
    environ = {"HOME": str(tmp_path), **environ}
    ev = from_dict(raw, environ).evidently
    assert (ev.region, ev.region_source) == (region, source)


def test_without_variables_the_region_is_the_profiles(tmp_path):
    config = tmp_path / "config"
    config.write_text("[default]\nregion = eu-central-1\n[profile ops]\nregion = ca-central-1\n")
    assert resolve_region({"AWS_CONFIG_FILE": str(config)}) == ("eu-central-1", f"profile default ({config})")
    assert resolve_region({"AWS_CONFIG_FILE": str(config), "AWS_PROFILE": "ops"}) == (
        "ca-central-1", f"profile ops ({config})")
    assert resolve_region({"AWS_CONFIG_FILE": str(tmp_path / "none"), "HOME": str(tmp_path)}) == (
        "us-east-1", "default")


def test_region_source_is_not_a_key_a_user_can_set():
    with pytest.raises(ConfigError, match="unknown key evidently.region_source"):
        from_dict({"evidently": {"region_source": "x"}}, {})


def test_check_config_shows_the_region_from_aws_region_and_where_it_came_from(tmp_path):
    env = {**os.environ, "AWS_REGION": "eu-west-1", "HOME": str(tmp_path), "PYTHONPATH": os.getcwd()}
    env.pop("AWS_DEFAULT_REGION", None)
    done = subprocess.run([sys.executable, "-m", "forwarder", "check-config"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "# evidently.region = 'eu-west-1' from AWS_REGION"
    assert 'region = "eu-west-1"' in done.stdout


def config_with(tmp_path, **sections):
    raw = {"dead_letter": {"path": str(tmp_path / "dl" / "dead-letter.ndjson")},
           "buffer": {"path": str(tmp_path / "buffer")}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw, {"HOME": str(tmp_path)})


def test_check_config_accepts_files_it_can_use(tmp_path):
    _, cert, key = make_ca_and_server_pair(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text("a-token-of-at-least-the-minimum-length-0123456789\n")
    config = config_with(tmp_path, intake={"auth": "token", "token_file": str(tokens), "tls_cert_file": str(cert),
                                           "tls_key_file": str(key)}, buffer={"type": "disk"})
    assert problems(config) == []


@pytest.mark.parametrize("key", ["intake.token_file", "intake.credentials_file", "intake.tls_cert_file",
                                 "intake.tls_key_file", "buffer.path", "dead_letter.path"])
def test_check_config_fails_naming_the_key_of_a_file_it_cannot_use(tmp_path, capsys, monkeypatch, key):
    _, cert, key_file = make_ca_and_server_pair(tmp_path)
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    sections: dict = {
        "intake.token_file": {"intake": {"auth": "token", "token_file": str(tmp_path / "missing")}},
        "intake.credentials_file": {"intake": {"auth": "sigv4", "credentials_file": str(not_a_directory)}},
        "intake.tls_cert_file": {"intake": {"tls_cert_file": str(tmp_path / "missing.crt"),
                                            "tls_key_file": str(key_file)}},
        "intake.tls_key_file": {"intake": {"tls_cert_file": str(cert), "tls_key_file": str(cert)}},
        "buffer.path": {"buffer": {"type": "disk", "path": str(not_a_directory / "buffer")}},
        "dead_letter.path": {"dead_letter": {"path": str(not_a_directory / "dl.ndjson")}},
    }[key]
    config = config_with(tmp_path, **sections)
    [problem] = problems(config)
    assert problem.startswith(key), problem
    path = tmp_path / "forwarder.toml"
    from forwarder.config import to_toml
    path.write_text(to_toml(config))
    assert main(["check-config", "--config", str(path)]) == 2
    assert f"configuration error: {key}" in capsys.readouterr().err


async def test_credentials_are_looked_for_with_a_growing_interval_until_found():
    found_at = 4
    lookups, slept, missing, found = [], [], [], []

    async def lookup():
        lookups.append(len(lookups))
        return "iam-role" if len(lookups) > found_at else None

    async def sleep(seconds):
        slept.append(seconds)

    async def on_found(method):
        found.append(method)

    watch = CredentialsWatch(lookup, missing.append, on_found, sleep)
    assert await watch.check() is False and missing == [HOW_TO_PROVIDE]
    await watch.watch()
    assert slept == [1.0, 2.0, 4.0, 8.0] and found == ["iam-role"] and watch.method == "iam-role"
    assert len(missing) == 1 + 3  # once at start, then after each lookup that found none (rate-limited by the log)
